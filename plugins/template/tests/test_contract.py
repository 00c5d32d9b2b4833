"""The archscope conformance kit, run on the template backend."""

from __future__ import annotations

import torch
from torch import nn

from archscope.testing import BackendContract
from archscope_template.model import MinGRULM


def tiny(seed: int, **kwargs) -> MinGRULM:
    torch.manual_seed(seed)
    return MinGRULM(**kwargs).eval()


class TestMinGRUBackend(BackendContract):
    backend_name = "mingru"
    distribution = "archscope-template"

    def make_models(self):
        return {"mingru-3x32": tiny(0), "mingru-2x16": tiny(1, d_model=16, n_layers=2, d_mlp=24)}

    def make_foreign_models(self):
        return {"gru": nn.GRU(4, 4), "sequential": nn.Sequential(nn.Linear(2, 2))}

    def reference_activations(self, model, batch):
        # Recomputed from the model's parameters with an explicit loop over time: independent of
        # archscope and of the model's own forward.
        x = model.embed(batch["input_ids"])
        out = {"embed": x}
        for i, block in enumerate(model.blocks):
            u = block.norm1(x)
            z = torch.sigmoid(block.mixer.to_z(u))
            cand = block.mixer.to_h(u)
            h = torch.zeros_like(u[:, 0])
            steps = []
            for t in range(u.shape[1]):
                h = (1 - z[:, t]) * h + z[:, t] * cand[:, t]
                steps.append(h)
            mixer = torch.stack(steps, 1)
            x = x + mixer
            mlp = block.mlp(block.norm2(x))
            x = x + mlp
            out.update({f"layer_{i}.mixer": mixer, f"layer_{i}.mlp": mlp, f"layer_{i}.residual": x})
        out["final_norm"] = model.norm(x)
        out["logits"] = model.head(out["final_norm"])
        return out
