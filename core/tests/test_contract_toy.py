"""The conformance kit run on the test plugin's toy backend (a known-good backend)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from archscope.testing import BackendContract


class TestToyBackendContract(BackendContract):
    backend_name = "toy"
    distribution = "archscope-testplugin-good"

    @pytest.fixture(autouse=True)
    def _installed(self, with_plugins):
        yield

    def model_names(self):
        # the toy plugin is importable only inside the with_plugins fixture, after collection
        return ["toy-3", "toy-5"]

    def make_models(self):
        from archscope_testplugin_good.backend import build_toy

        return {"toy-3": build_toy(0), "toy-5": build_toy(1, n_layers=5, d_model=12)}

    def make_foreign_models(self):
        return {"sequential": nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 5))}

    def reference_activations(self, model, batch):
        h = model.emb(batch["input_ids"])
        out = {"embed": h}
        for i, block in enumerate(model.blocks):
            h = h + torch.tanh(block.lin(h))
            out[f"layer_{i}.residual"] = h
        out["logits"] = model.head(h)
        return out
