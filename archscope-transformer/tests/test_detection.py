"""Detection by structure: our families yes; recurrent, state-space, hybrid and foreign
models no; a decoder LM whose parts cannot be found gets an error naming what is missing."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest
import torch
import transformers
from transformer_reference import ids_for

from archscope import Backend
from archscope_transformer.backend import TransformerBackend
from archscope_transformer.structure import StructureError
from archscope_transformer.testing import tiny_model

# Models other backends serve: (config class, model class, tiny config arguments).
FOREIGN: dict[str, tuple[str, str, dict[str, Any]]] = {
    "mamba": (
        "MambaConfig",
        "MambaForCausalLM",
        {"hidden_size": 32, "num_hidden_layers": 2, "state_size": 4},
    ),
    "mamba2": (
        "Mamba2Config",
        "Mamba2ForCausalLM",
        {
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "state_size": 4,
            "num_heads": 4,
            "head_dim": 16,
            "n_groups": 1,
        },
    ),
    "falcon_mamba": (
        "FalconMambaConfig",
        "FalconMambaForCausalLM",
        {"hidden_size": 32, "num_hidden_layers": 2, "state_size": 4},
    ),
    "rwkv": (
        "RwkvConfig",
        "RwkvForCausalLM",
        {
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "attention_hidden_size": 32,
            "intermediate_size": 64,
            "context_length": 64,
        },
    ),
    "xlstm": (
        "xLSTMConfig",
        "xLSTMForCausalLM",
        {"hidden_size": 32, "num_hidden_layers": 2, "num_heads": 2, "qk_dim_factor": 1.0},
    ),
    "jamba": (
        "JambaConfig",
        "JambaForCausalLM",
        {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "attn_layer_period": 2,
            "attn_layer_offset": 1,
            "expert_layer_period": 2,
            "expert_layer_offset": 1,
            "num_experts": 2,
            "mamba_d_state": 4,
            "use_mamba_kernels": False,
        },
    ),
    "bamba": (
        "BambaConfig",
        "BambaForCausalLM",
        {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "attn_layer_indices": [1],
            "mamba_n_heads": 4,
            "mamba_d_head": 16,
            "mamba_d_state": 4,
            "mamba_n_groups": 1,
        },
    ),
    "zamba2": (
        "Zamba2Config",
        "Zamba2ForCausalLM",
        {
            "hidden_size": 32,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "mamba_d_state": 4,
            "mamba_headdim": 16,
            "n_mamba_heads": 4,
            "mamba_ngroups": 1,
            "intermediate_size": 64,
            "layers_block_type": ["mamba", "hybrid", "mamba", "hybrid"],
        },
    ),
    "falcon_h1": (
        "FalconH1Config",
        "FalconH1ForCausalLM",
        {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "mamba_d_ssm": 64,
            "mamba_n_heads": 4,
            "mamba_d_head": 16,
            "mamba_d_state": 4,
            "mamba_n_groups": 1,
        },
    ),
    "granitemoehybrid": (
        "GraniteMoeHybridConfig",
        "GraniteMoeHybridForCausalLM",
        {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "layer_types": ["mamba", "attention"],
            "mamba_n_heads": 4,
            "mamba_d_head": 16,
            "mamba_d_state": 4,
            "mamba_n_groups": 1,
            "num_local_experts": 2,
            "num_experts_per_tok": 1,
            "shared_intermediate_size": 64,
        },
    ),
    "nemotron_h": (
        "NemotronHConfig",
        "NemotronHForCausalLM",
        {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "hybrid_override_pattern": "M*-",
            "mamba_num_heads": 4,
            "mamba_head_dim": 16,
            "ssm_state_size": 4,
            "n_groups": 1,
        },
    ),
    "bert_masked_lm": (
        "BertConfig",
        "BertForMaskedLM",
        {
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 64,
        },
    ),
}


class TorchLSTMLM(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(100, 16)
        self.rnn = torch.nn.LSTM(16, 16, num_layers=2, batch_first=True)
        self.head = torch.nn.Linear(16, 100)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.embed(input_ids))[0])


@pytest.mark.parametrize("name", sorted(FOREIGN))
def test_recurrent_hybrid_and_encoder_models_are_not_ours(name: str) -> None:
    config_cls, model_cls, arguments = FOREIGN[name]
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(
        getattr(transformers, config_cls)(vocab_size=100, **arguments)
    )
    assert TransformerBackend.can_handle(model) is None


@pytest.mark.parametrize(
    "obj",
    [TorchLSTMLM(), torch.nn.Linear(3, 3), None, "gpt2", 42, {"config": 1}],
    ids=["lstm-lm", "linear", "none", "str", "int", "dict"],
)
def test_torch_rnns_and_arbitrary_objects_are_not_ours(obj: Any) -> None:
    assert TransformerBackend.can_handle(obj) is None


def test_detection_imports_neither_torch_nor_transformers() -> None:
    code = (
        "import sys, archscope\n"
        "from archscope.plugins import get_manager\n"
        "backend = get_manager().backends.get('transformer').obj\n"
        "assert backend.can_handle(object()) is None\n"
        "assert backend.can_handle('hf:gpt2') is None\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    env = {**os.environ, "ARCHSCOPE_STRICT_PLUGINS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_a_mixture_of_experts_model_has_no_neuron_sites() -> None:
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(
        transformers.MixtralConfig(
            vocab_size=100,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_local_experts=2,
        )
    ).eval()
    backend = Backend.for_model(model)
    assert "mlp_hidden" not in backend.capabilities
    assert "layer_0.mlp_hidden" not in backend.sites()
    ids = ids_for()
    with torch.no_grad():
        reference = model(ids, output_hidden_states=True)
    result = backend.run(ids, capture=["layer_0.residual", "layer_1.mlp", "logits"])
    torch.testing.assert_close(result["layer_0.residual"], reference.hidden_states[1])
    torch.testing.assert_close(result.logits, reference.logits)


def test_a_block_list_that_cannot_be_found_is_named() -> None:
    model = tiny_model("gpt2")
    model.transformer.h = torch.nn.ModuleList(list(model.transformer.h)[:2])
    assert TransformerBackend.can_handle(model) == pytest.approx(0.1)
    with pytest.raises(StructureError) as info:
        Backend.for_model(model)
    message = str(info.value)
    assert "GPT2LMHeadModel" in message and "block list" in message
    assert "length 3" in message and "h (2)" in message


def test_a_missing_final_norm_is_named() -> None:
    model = tiny_model("llama")
    del model.model.norm
    with pytest.raises(
        StructureError,
        match=r"final norm.*norm, ln_f.*children are "
        r"embed_tokens, layers, rotary_emb",
    ):
        TransformerBackend(model)


def test_a_block_without_attention_is_named() -> None:
    model = tiny_model("llama")
    block = model.model.layers[1]
    block.mixing = block.self_attn
    del block.self_attn
    with pytest.raises(
        StructureError,
        match=r"model\.layers\.1 \(LlamaDecoderLayer\) has no "
        r"attention sub-module: looked for self_attn",
    ):
        TransformerBackend(model)


def test_a_model_without_lm_head_is_named() -> None:
    model = tiny_model("gpt2")
    model.lm_head = None
    with pytest.raises(StructureError, match="get_output_embeddings.*AutoModelForCausalLM"):
        TransformerBackend(model)
