"""The testing helpers of `archscope.testing`: `unchanged` and `hook_ids` catch what they name
and let an untouched model through; `check_frozen` passes a correct freeze and fails broken
ones with a message that says what is wrong."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import archscope
from archscope.testing import check_frozen, hook_ids, unchanged


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)).eval()


def test_hook_ids_names_every_kind_of_hook_by_module() -> None:
    model = _model()
    assert hook_ids(model) == set()
    handles = [
        model[0].register_forward_hook(lambda m, a, o: None),
        model[0].register_forward_pre_hook(lambda m, a: None),
        model[2].register_full_backward_hook(lambda m, gi, go: None),
        model[2].register_full_backward_pre_hook(lambda m, go: None),
    ]
    kinds = {(name, kind) for name, kind, _ in hook_ids(model)}
    assert kinds == {
        ("0", "_forward_hooks"),
        ("0", "_forward_pre_hooks"),
        ("2", "_backward_hooks"),
        ("2", "_backward_pre_hooks"),
    }
    for h in handles:
        h.remove()
    assert hook_ids(model) == set()


def test_an_untouched_model_passes() -> None:
    model = _model()
    with unchanged(model):
        model(torch.ones(1, 3))
        handle = model[1].register_forward_hook(lambda m, a, o: None)
        handle.remove()


def test_a_hook_left_behind_fails() -> None:
    model = _model()
    with pytest.raises(AssertionError, match="hooks changed: added"), unchanged(model):
        model[1].register_forward_hook(lambda m, a, o: None)


def test_a_removed_hook_fails() -> None:
    model = _model()
    handle = model[1].register_forward_pre_hook(lambda m, a: None)
    with pytest.raises(AssertionError, match="removed"), unchanged(model):
        handle.remove()


def test_a_changed_weight_fails_and_is_named() -> None:
    model = _model()
    with pytest.raises(AssertionError, match=r"weights changed: \['2.bias'\]"), unchanged(model):
        with torch.no_grad():
            model[2].bias.add_(1e-6)


def test_a_changed_mode_fails() -> None:
    model = _model()
    with pytest.raises(AssertionError, match="modes changed"), unchanged(model):
        model[0].train()


# -- check_frozen: it passes a correct freeze and names what a broken one gets wrong ---------
def _llama() -> Any:
    from archscope_transformer.testing import tiny_model

    return archscope.Backend.for_model(tiny_model("llama", n_layers=2))


def _prompt() -> torch.Tensor:
    return torch.randint(4, 90, (1, 7), generator=torch.Generator().manual_seed(0))


def test_check_frozen_passes_the_transformer_backends_freeze() -> None:
    check_frozen(_llama(), _prompt(), ["layer_0.residual"], leaves=("embed", "layer_0.mlp"))


def test_check_frozen_catches_a_freeze_that_records_nothing(monkeypatch: Any) -> None:
    from archscope.freeze import FrozenValues

    monkeypatch.setattr(FrozenValues, "hold", lambda self, key, factor: factor)
    with pytest.raises(AssertionError, match="freeze held nothing"):
        check_frozen(_llama(), _prompt())


def test_check_frozen_catches_held_factors_that_follow_the_input(monkeypatch: Any) -> None:
    """Factors recorded, but the live ones used (nothing replayed): the model is not affine."""
    from archscope.freeze import FrozenValues

    hold = FrozenValues.hold

    def live(self: Any, key: Any, factor: torch.Tensor) -> torch.Tensor:
        hold(self, key, factor)
        return factor

    monkeypatch.setattr(FrozenValues, "hold", live)
    with pytest.raises(AssertionError, match="not affine in the embeddings"):
        check_frozen(_llama(), _prompt())


def test_check_frozen_catches_held_values_that_carry_gradients(monkeypatch: Any) -> None:
    """The recorded values replayed, but the gradient flowing through the live factor: the
    frozen model is affine, its gradient is not its slope."""
    from archscope.freeze import FrozenValues

    hold = FrozenValues.hold

    def leaky(self: Any, key: Any, factor: torch.Tensor) -> torch.Tensor:
        return factor + (hold(self, key, factor) - factor).detach()

    monkeypatch.setattr(FrozenValues, "hold", leaky)
    with pytest.raises(AssertionError, match="the gradient at embed predicts"):
        check_frozen(_llama(), _prompt())


def test_check_frozen_refuses_a_batch_and_a_backend_without_freeze() -> None:
    with pytest.raises(AssertionError, match=r"one unpadded prompt of shape \(1, seq\)"):
        check_frozen(_llama(), torch.ones(2, 5, dtype=torch.long))
    backend = _llama()
    backend.capabilities = frozenset(backend.capabilities) - {"freeze"}
    with pytest.raises(AssertionError, match="does not declare 'freeze'"):
        check_frozen(backend, _prompt())
