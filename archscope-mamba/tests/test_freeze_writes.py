"""The write sites in frozen runs (`archscope.freeze`): the frozen recomputation of a Mamba /
Mamba-2 mixer scans the ``state_write`` site's value, so a capture of the write equals the
model's, an edit of it changes the frozen recurrence exactly as the same edit changes the real
model at its layer (the backend's write edits, unfrozen, are the reference), the write is affine
in the embeddings like everything else in a frozen run, and gradients flow from the logits to
the write and from the write back to the layer's input."""

from __future__ import annotations

import functools
import warnings
from typing import Any

import pytest
import torch

from archscope import Backend, Edit
from archscope.freeze import freeze
from archscope.testing import check_frozen
from archscope_mamba.testing import make_model, random_ids

warnings.filterwarnings("ignore", message=".*falling back to its reference PyTorch.*")
FAMILIES = ("mamba", "mamba2")
SEQ = 9


@functools.cache
def _backend(family: str) -> Any:
    return Backend.for_model(make_model(family))


def _ids() -> torch.Tensor:
    return random_ids(1, SEQ, seed=3)


def _change(like: torch.Tensor, seed: int) -> torch.Tensor:
    """A random change of a write site's value at positions 2 and 5 only."""
    g = torch.Generator().manual_seed(seed)
    change = torch.zeros_like(like)
    for p in (2, 5):
        change[:, p] = torch.randn(like[:, p].shape, generator=g) * like.std() * 30
    return change


@pytest.mark.parametrize("family", FAMILIES)
def test_a_frozen_run_is_the_model_and_its_writes_are_affine_with_exact_slopes(family: str) -> None:
    """`check_frozen` with the write sites: captures equal the model's, the writes are affine
    in the embeddings, the gradient at a write leaf is the frozen model's slope, the write
    depends on earlier positions only (through the held recurrence), nothing is left behind."""
    backend = _backend(family)
    sites = ["layer_1.state_write", "layer_1.ssm_states", "layer_2.write_value"]
    check_frozen(backend, _ids(), sites, leaves=("embed", "layer_1.state_write"))
    assert backend.frozen_writes is None


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layer", [0, 2])
def test_a_write_edit_in_a_frozen_run_is_the_models_write_edit(family: str, layer: int) -> None:
    backend = _backend(family)
    ids = _ids()
    site = f"layer_{layer}.state_write"
    write = backend.run(ids, capture=[site])[site]
    edits = [Edit.add(site, _change(write, layer))]
    capture = [
        f"layer_{layer}.mixer",
        f"layer_{layer}.ssm_states",
        site,
        f"layer_{layer}.ssm_state",
    ]
    clean = backend.run(ids, capture=capture)
    real = backend.run(ids, capture=capture, edits=edits)
    with freeze(backend, ids):
        frozen = backend.run(ids, capture=capture, edits=edits)
    # the edit's layer sees the same input in both runs, hence the same held Δ, B, C and gates:
    # the states after the edit are the model's; so is Mamba-1's output (Mamba-2's passes its
    # gated RMSNorm, whose scale a frozen run holds at the prompt's value)
    mixer, states = capture[0], capture[1]
    assert float((real[mixer] - clean[mixer]).abs().max()) > 1e-3  # the edit does something
    compared = capture[1:] if family == "mamba2" else capture
    for name in compared:
        torch.testing.assert_close(frozen[name], real[name], atol=1e-5, rtol=1e-4)
    # positions before the first edited one are untouched
    torch.testing.assert_close(frozen[mixer][:, :2], clean[mixer][:, :2], atol=1e-6, rtol=0)
    torch.testing.assert_close(frozen[states][:, :2], clean[states][:, :2], atol=1e-6, rtol=0)
