"""Freezing on every family the package builds: `archscope.testing.check_frozen` wherever the
backend declares ``freeze`` (the model at the prompt, affine around it, exact slopes), and a
reason wherever it does not.

This is where OPT's and MPT's MLP activations (owned by the decoder layer / by the MLP around
its output projection, not by a module at the MLP's port), Phi-3's fused gate-and-up MLP and
OLMo's parameter-free LayerNorm were found held wrongly or not at all."""

from __future__ import annotations

import pytest
import torch

from archscope import Backend, Edit
from archscope.freeze import FreezeError, freeze
from archscope.testing import check_frozen
from archscope_transformer.freeze import _GATES
from archscope_transformer.testing import FAMILY_NAMES, tiny_model

#: families whose attention layout or output the freezing does not hold (the backend says so)
NOT_FROZEN = {"gpt_neox", "gpt_neo", "bloom", "falcon", "gemma2"}


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_every_family_is_frozen_correctly_or_says_why_not(family: str) -> None:
    backend = Backend.for_model(tiny_model(family, n_layers=2))
    if family in NOT_FROZEN:
        assert "freeze" not in backend.capabilities
        assert backend.frozen_unavailable  # the reason `archscope info` shows
        return
    ids = torch.randint(4, 90, (1, 7), generator=torch.Generator().manual_seed(0))
    check_frozen(backend, ids, ["layer_0.mlp", "layer_1.residual"])


def test_a_plain_mlp_with_an_up_projection_is_not_taken_for_a_gated_one() -> None:
    """MPT's MLP is down(act(up(x))): held at its activation's slope, so the MLP still passes
    gradients (holding the activation's output whole would make it a constant)."""
    backend = Backend.for_model(tiny_model("mpt", n_layers=2))
    assert not any(hasattr(backend.model.transformer.blocks[0].ffn, g) for g in _GATES)
    ids = torch.randint(4, 90, (1, 7), generator=torch.Generator().manual_seed(0))
    mlp_in = backend.run(ids, capture=["layer_0.residual"])["layer_0.residual"]
    with freeze(backend, ids):
        leaf = mlp_in.clone().requires_grad_(True)
        out = backend.run(
            ids, capture=["layer_1.mlp"], edits=[Edit.replace("layer_0.residual", leaf)], grad=True
        )
        (grad,) = torch.autograd.grad(out["layer_1.mlp"].sum(), [leaf])
    assert float(grad.abs().sum()) > 0


def test_an_mlp_whose_activation_cannot_be_found_is_refused() -> None:
    backend = Backend.for_model(tiny_model("opt", n_layers=2))
    for layer in backend.model.model.decoder.layers:
        del layer.activation_fn
        layer.activation_fn = torch.relu  # a plain function: nothing to hold it with
    ids = torch.randint(4, 90, (1, 7), generator=torch.Generator().manual_seed(0))
    with pytest.raises(FreezeError, match="no activation module"), freeze(backend, ids):
        pass
