"""Class 7 of the reliability issue: after capturing attention patterns (which makes the
transformers library install its own output-capturing hooks on first use), the model has
exactly the hooks it had before the run, and the next run gives identical logits."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from reliability.support import batch

import archscope
from archscope.testing import hook_ids


def _fresh(kind: str) -> Any:
    from archscope_transformer.testing import tiny_model

    return tiny_model(kind)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_attention_capture_leaves_exactly_the_hooks_the_model_had(kind: str) -> None:
    model = _fresh(kind)
    mine = model.transformer.h[0] if kind == "gpt2" else model.model.layers[0]
    handle = mine.register_forward_hook(lambda m, a, o: None)  # a user's own hook stays
    before = hook_ids(model)
    backend = archscope.Backend.for_model(model)
    ids = batch([5, 3])
    clean = backend.run(ids, capture=["logits"]).logits
    result = backend.run(
        ids, capture=["layer_0.attn_pattern", "layer_1.attn_pattern", "logits"], stop_early=False
    )
    assert hook_ids(model) == before
    pattern = result["layer_0.attn_pattern"]
    rows = pattern[0].sum(-1)  # probabilities over keys sum to 1 at every real query
    assert torch.allclose(rows, torch.ones_like(rows), atol=1e-5)
    assert torch.equal(backend.run(ids, capture=["logits"]).logits, clean)
    handle.remove()
    assert hook_ids(model) == before - {h for h in before if h[0] == handle_module(model, kind)}


def handle_module(model: Any, kind: str) -> str:
    return "transformer.h.0" if kind == "gpt2" else "model.layers.0"
