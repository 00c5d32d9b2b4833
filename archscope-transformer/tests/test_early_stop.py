"""Capturing an early site runs only the blocks up to it, with the same values."""

from __future__ import annotations

import torch
from transformer_reference import blocks_of, ids_for, model_of

from archscope import Backend


def _count_calls(blocks: list) -> tuple[list[int], list]:
    calls = [0] * len(blocks)

    def counter(i: int):
        def hook(module, args, output):
            calls[i] += 1

        return hook

    return calls, [b.register_forward_hook(counter(i)) for i, b in enumerate(blocks)]


def test_layer_1_residual_of_a_six_layer_model_runs_two_blocks(family: str) -> None:
    model = model_of(family, n_layers=6)
    backend = Backend.for_model(model)
    ids = ids_for(7)
    calls, handles = _count_calls(blocks_of(model, family))
    try:
        early = backend.run(ids, capture=["layer_1.residual"])
        assert calls == [1, 1, 0, 0, 0, 0]
        full = backend.run(ids, capture=["layer_1.residual", "logits"])
        assert calls == [2, 2, 1, 1, 1, 1]
        late = backend.run(ids, capture=["layer_1.residual"], stop_early=False)
        assert calls == [3, 3, 2, 2, 2, 2]
    finally:
        for handle in handles:
            handle.remove()
    assert early.logits is None and full.logits is not None and late.logits is not None
    assert torch.equal(early["layer_1.residual"], full["layer_1.residual"])
    assert torch.equal(early["layer_1.residual"], late["layer_1.residual"])


def test_an_early_sub_layer_site_stops_inside_the_block(family: str) -> None:
    model = model_of(family, n_layers=6)
    backend = Backend.for_model(model)
    ids = ids_for(8)
    calls, handles = _count_calls(blocks_of(model, family))
    try:
        early = backend.run(ids, capture=["embed", "layer_0.attn", "layer_2.mlp_hidden"])
        # block 2 started but did not finish: its output hook never fired
        assert calls == [1, 1, 0, 0, 0, 0]
    finally:
        for handle in handles:
            handle.remove()
    full = backend.run(ids, capture=["embed", "layer_0.attn", "layer_2.mlp_hidden", "logits"])
    for site in ("embed", "layer_0.attn", "layer_2.mlp_hidden"):
        assert torch.equal(early[site], full[site])
