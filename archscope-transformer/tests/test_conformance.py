"""The core's conformance kit, run on a spread of families: sequential GPT-2, OPT (MLP in
the block, flattened tokens), Bloom (sub-modules that add the residual, ALiBi), Gemma-2
(post-norms, soft-capped logits)."""

from __future__ import annotations

from typing import Any

import torch
from transformer_reference import recording

from archscope.testing import BackendContract
from archscope_transformer.testing import tiny_model

KIT_FAMILIES = ("gpt2", "opt", "bloom", "gemma2")


class TestTransformerBackendContract(BackendContract):
    backend_name = "transformer"
    distribution = "archscope-transformer"

    def make_models(self) -> dict[str, Any]:
        if not hasattr(type(self), "_cache"):
            type(self)._cache = {f: tiny_model(f) for f in KIT_FAMILIES}
        return type(self)._cache

    def make_foreign_models(self) -> dict[str, Any]:
        import transformers

        return {
            "mamba": transformers.MambaForCausalLM(
                transformers.MambaConfig(
                    vocab_size=100, hidden_size=32, num_hidden_layers=2, state_size=4
                )
            ),
            "torch lstm": torch.nn.LSTM(4, 4),
        }

    def reference_activations(self, model: Any, batch: dict[str, Any]) -> dict[str, Any]:
        family = next(f for f, m in self.make_models().items() if m is model)
        with recording(model, family) as own:
            out = model(**batch, output_hidden_states=True)
        shape = batch["input_ids"].shape
        values = {
            "embed": out.hidden_states[0],
            "final_norm": out.hidden_states[-1],
            "logits": out.logits,
        }
        for i in range(3):
            values[f"layer_{i}.residual"] = own[f"{i}.block"]
            for role in ("attn", "mlp", "mlp_hidden"):
                values[f"layer_{i}.{role}"] = own[f"{i}.{role}"].reshape(*shape, -1)
        return values
