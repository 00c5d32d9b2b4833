"""The method conformance kit, run on the core's built-in methods with its toy backend."""

from __future__ import annotations

import pytest
import torch

from archscope import Edit
from archscope.testing import MethodContract
from archscope.testing.methods import ToyMethodBackend, toy_model


class TestActivationStats(MethodContract):
    method_name = "activation-stats"


class TestLogitLens(MethodContract):
    method_name = "logit-lens"


def test_toy_backend_matches_its_model() -> None:
    """The kit's toy backend reads the values a plain forward computes (its own reference)."""
    model = toy_model()
    backend = ToyMethodBackend(model)
    ids = torch.tensor([[1, 2, 3, 4]])
    run = backend.run(
        ids, capture=["layer_2.residual", "final_norm", "logits", "layer_0.mlp_hidden"]
    )
    h = model.embed(ids)
    for block in model.blocks:
        h = h + block.mlp(h)
    torch.testing.assert_close(run["layer_2.residual"], h)
    torch.testing.assert_close(run["logits"], model(ids))
    torch.testing.assert_close(backend.unembed(h), model(ids))
    hidden = model.blocks[0].mlp.act(model.blocks[0].mlp.up(model.embed(ids)))
    torch.testing.assert_close(run["layer_0.mlp_hidden"], hidden)
    ablated = backend.run(ids, edits=[Edit.scale("layer_0.mlp", 0.0)]).logits
    assert not torch.allclose(ablated, run.logits)


def test_the_kit_catches_a_method_that_returns_no_result() -> None:
    from archscope import Method

    broken = Method("broken", "returns a dict", lambda backend, data: {"not": "a result"})

    class Broken(MethodContract):
        def _method(self) -> Method:
            return broken

    with pytest.raises(pytest.fail.Exception, match="without to_dict"):
        Broken().test_runs_end_to_end_and_returns_a_serialisable_result()


def test_the_kit_catches_a_method_that_leaves_hooks() -> None:
    from archscope import Method

    def leaky(backend: object, data: object) -> None:
        backend.model.head.register_forward_hook(lambda *a: None)  # type: ignore[attr-defined]

    class Leaky(MethodContract):
        def _method(self) -> Method:
            return Method("leaky", "leaves a hook", leaky)

    with pytest.raises(pytest.fail.Exception, match="left hooks"):
        Leaky().test_model_weights_mode_and_hooks_unchanged()
