"""The write sites of gated delta nets in frozen runs (`archscope.freeze`): the frozen
recomputation scans the ``state_write`` site's value, so a capture of the write equals the
model's, an edit of it changes the frozen delta rule's states exactly as the same edit changes
the real model's (the backend's write edits, unfrozen, are the reference), the write is affine
in the embeddings like everything else in a frozen run, and gradients flow from the logits to
the write and from the write back to the layer's input."""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch

from archscope import Backend, Edit
from archscope.freeze import freeze
from archscope.testing import check_frozen
from archscope_hybrid.testing import make_model, missing, random_ids, recurrent_layer_indices

FAMILIES = ("qwen3_5_text", "qwen3_next", "olmo_hybrid", "minimax", "kimi_linear")
SEQ = 9


@functools.cache
def _built(family: str) -> tuple[Any, list[int]]:
    model = make_model(family)
    return Backend.for_model(model), recurrent_layer_indices(model)


@pytest.fixture(params=FAMILIES)
def family(request: Any) -> tuple[Any, list[int]]:
    reason = missing(request.param)
    if reason is not None:  # the oldest transformers the packages allow lacks the family
        pytest.skip(reason)
    return _built(request.param)


def _ids() -> torch.Tensor:
    return random_ids(1, SEQ, seed=3)


def _change(like: torch.Tensor, seed: int) -> torch.Tensor:
    """A random change of a write site's value at positions 2 and 5 only."""
    g = torch.Generator().manual_seed(seed)
    change = torch.zeros_like(like)
    for p in (2, 5):
        change[:, p] = torch.randn(like[:, p].shape, generator=g) * like.std() * 30
    return change


def test_a_frozen_run_is_the_model_and_its_writes_are_affine_with_exact_slopes(
    family: tuple[Any, list[int]],
) -> None:
    """`check_frozen` with the write sites of the first and last recurrent layers: captures
    equal the model's, the writes are affine in the embeddings, the gradient at a write leaf is
    the frozen model's slope, a write depends on earlier positions only (through the held delta
    rule), nothing is left behind."""
    backend, layers = family
    first, last = (f"layer_{i}.state_write" for i in (layers[0], layers[-1]))
    sites = list(dict.fromkeys([first, f"layer_{layers[0]}.ssm_states", last]))
    check_frozen(backend, _ids(), sites, leaves=("embed", last))
    assert backend.frozen_writes is None


def test_a_write_edit_in_a_frozen_run_is_the_models_write_edit(
    family: tuple[Any, list[int]],
) -> None:
    backend, layers = family
    ids = _ids()
    for layer in (layers[0], layers[-1]):
        site = f"layer_{layer}.state_write"
        write = backend.run(ids, capture=[site])[site]
        edits = [Edit.add(site, _change(write, layer))]
        # the edit's layer sees the same input in both runs, hence the same held decay, β,
        # keys and queries: the states after the edit are the model's (its output passes the
        # gated RMSNorm, whose scale a frozen run holds at the prompt's value)
        capture = [f"layer_{layer}.ssm_states", site, f"layer_{layer}.ssm_state"]
        clean = backend.run(ids, capture=capture)
        real = backend.run(ids, capture=capture, edits=edits)
        with freeze(backend, ids):
            frozen = backend.run(ids, capture=capture, edits=edits)
        states = capture[0]
        assert float((real[states] - clean[states]).abs().max()) > 1e-3
        for name in capture:
            torch.testing.assert_close(frozen[name], real[name], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(frozen[states][:, :2], clean[states][:, :2], atol=1e-6, rtol=0)
