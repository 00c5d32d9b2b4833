"""Class 2 of the reliability issue: a model left in training mode (as Hugging Face models
built from a config are) runs with inference semantics by default - dropout off, two runs
identical, equal to the model's own eval-mode output - and its mode is restored afterwards;
``inference=False`` on the backend keeps the model's own mode."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from reliability.support import batch

import archscope


def _gpt2() -> Any:
    from archscope_transformer.testing import tiny_model

    model = tiny_model("gpt2")
    model.config.resid_pdrop = model.config.embd_pdrop = 0.5
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.5
    return model


def _mamba() -> Any:
    from archscope_mamba.testing import make_model

    return make_model("mamba")


def _lstm() -> Any:
    from archscope_recurrent.testing import tiny_recurrent_lm

    return tiny_recurrent_lm("lstm")


FAMILIES: dict[str, Callable[[], Any]] = {"gpt2": _gpt2, "mamba": _mamba, "lstm": _lstm}


def _model_logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_train_mode_model_runs_in_inference_mode_and_keeps_its_mode(name: str) -> None:
    model = FAMILIES[name]()
    ids = batch([7], seed=1)["input_ids"]
    model.eval()
    with torch.no_grad():
        reference = _model_logits(model, ids)
    model.train()
    last_child = list(model.named_children())[-1][0]
    model.get_submodule(last_child).eval()  # mixed modes must come back exactly
    modes = {n: m.training for n, m in model.named_modules()}
    backend = archscope.Backend.for_model(model)
    assert backend.inference is True
    seen: list[bool] = []
    handles = [
        m.register_forward_pre_hook(lambda mod, a: seen.append(mod.training))
        for m in model.modules()
        if not next(m.children(), None)
    ]
    try:
        first = backend.run(ids, capture=["logits"]).logits
        second = backend.run(ids, capture=["logits"]).logits
    finally:
        for h in handles:
            h.remove()
    assert seen and not any(seen), "a module ran in training mode"
    assert torch.equal(first, second)
    assert torch.allclose(first, reference, atol=1e-5)
    assert {n: m.training for n, m in model.named_modules()} == modes


def test_opt_out_keeps_training_mode() -> None:
    torch.manual_seed(0)
    model = _gpt2().train()
    backend = archscope.Backend.for_model(model)
    backend.inference = False
    ids = batch([7], seed=1)["input_ids"]
    seen: list[bool] = []
    handle = model.register_forward_pre_hook(lambda m, a: seen.append(m.training))
    try:
        first = backend.run(ids, capture=["logits"]).logits
        second = backend.run(ids, capture=["logits"]).logits
    finally:
        handle.remove()
    assert seen == [True, True]
    assert not torch.equal(first, second)  # dropout p=0.5 is active
    assert model.training


def test_mode_restored_when_the_run_fails() -> None:
    model = _gpt2().train()
    backend = archscope.Backend.for_model(model)
    with pytest.raises(archscope.errors.ArchscopeError):
        backend.run(batch([3]), capture=["layer_9.residual"])
    with pytest.raises(archscope.errors.SiteError):
        backend.run(
            batch([3]),
            capture=["logits"],
            edits=[archscope.Edit.add("layer_0.residual", torch.zeros(5))],
        )
    assert all(m.training for m in model.modules())
