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


def _hooks(model: Any) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _ids() -> torch.Tensor:
    return random_ids(1, SEQ, seed=3)


def _change(like: torch.Tensor, seed: int) -> torch.Tensor:
    """A random change of a write site's value at positions 2 and 5 only."""
    g = torch.Generator().manual_seed(seed)
    change = torch.zeros_like(like)
    for p in (2, 5):
        change[:, p] = torch.randn(like[:, p].shape, generator=g) * like.std() * 30
    return change


def test_a_frozen_run_captures_the_models_writes(family: tuple[Any, list[int]]) -> None:
    backend, layers = family
    ids = _ids()
    layer = layers[0]
    sites = [f"layer_{layer}.state_write", f"layer_{layer}.ssm_states", "logits"]
    real = backend.run(ids, capture=sites)
    model = backend.model
    hooks = _hooks(model)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with freeze(backend, ids):
        frozen = backend.run(ids, capture=sites)
        edit = [Edit.scale(sites[0], 0.5)]
        backend.run(ids, capture=sites, edits=edit, grad=True)["logits"].sum().backward()
    model.zero_grad(set_to_none=True)
    # nothing left behind: no hook, the weights and the mode as they were
    assert _hooks(model) == hooks and not model.training
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    for site in sites:
        torch.testing.assert_close(frozen[site], real[site], atol=1e-5, rtol=1e-4)
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


def test_the_frozen_write_is_affine_and_carries_gradients(family: tuple[Any, list[int]]) -> None:
    backend, layers = family
    ids = _ids()
    site = f"layer_{layers[-1]}.state_write"
    real = backend.run(ids, capture=["embed", site])
    embed, write = real["embed"], real[site]
    g = torch.Generator().manual_seed(1)
    a, b = (torch.randn(embed.shape, generator=g) * embed.std() for _ in range(2))

    def run(x: torch.Tensor) -> Any:
        return backend.run(ids, capture=[site, "logits"], edits=[Edit.replace("embed", x)])

    with freeze(backend, ids):
        outs = [run(x) for x in (a, b, a + b, torch.zeros_like(a))]
        for name in (site, "logits"):
            gap = outs[0][name] + outs[1][name] - outs[2][name] - outs[3][name]
            assert float(gap.abs().max()) < 1e-4 * (1 + float(outs[2][name].abs().max()))
        # logits <- write: the gradient at a write leaf is the frozen model's exact slope
        leaf = write.clone().requires_grad_(True)
        live = backend.run(
            ids, capture=["logits"], edits=[Edit.apply(site, lambda x: leaf.to(x.dtype))], grad=True
        )
        target = live.logits[0, -1, 7]
        (grad,) = torch.autograd.grad(target, [leaf])
        step = _change(write, 9) * 0.1
        moved = backend.run(ids, capture=["logits"], edits=[Edit.replace(site, write + step)])
        expected = float(moved.logits[0, -1, 7] - target.detach())
        assert abs(expected) > 1e-5
        assert float((grad * step).sum()) == pytest.approx(expected, rel=1e-3, abs=1e-6)
        # write <- layer input: a gradient at the embeddings, none from later positions
        emb = embed.clone().requires_grad_(True)
        live = backend.run(ids, capture=[site], edits=[Edit.replace("embed", emb)], grad=True)
        (back,) = torch.autograd.grad(live[site][0, 4].sum(), [emb])
        assert float(back[0, :5].abs().sum()) > 0 and float(back[0, 5:].abs().sum()) == 0.0
    assert backend.frozen_writes is None
