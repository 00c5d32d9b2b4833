"""What `Backend.run` keeps between runs (the plan of each request: hooked sites, stop site,
late edits; resolved captures; the padding side found by the mask check; the model lock) never
outlives a change that makes it wrong. Each test runs one request so that its plan is cached,
changes the model or the inputs between runs, and checks the next run of the same request
against the model's own forward pass run without archscope."""

from __future__ import annotations

import gc
from typing import Any

import pytest
import torch
from reliability.support import forward_attributes, small_gpt2, token_ids

import archscope
from archscope import guards
from archscope.errors import InputError
from archscope.testing import hook_ids

CAPTURE = ["layer_0.residual", "layer_1.residual", "logits"]


def _own(model: Any, ids: torch.Tensor, **kwargs: Any) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each block's output and the logits of the model's own forward (plain hooks)."""
    out: list[torch.Tensor] = []

    def keep(module: Any, args: Any, output: Any) -> None:
        out.append((output[0] if isinstance(output, tuple) else output).detach().clone())

    handles = [block.register_forward_hook(keep) for block in model.transformer.h]
    try:
        with torch.no_grad():
            logits = model(ids, use_cache=False, **kwargs).logits
    finally:
        for handle in handles:
            handle.remove()
    return out, logits


def _check(result: Any, model: Any, ids: torch.Tensor, **kwargs: Any) -> None:
    blocks, logits = _own(model, ids, **kwargs)
    torch.testing.assert_close(result["layer_0.residual"], blocks[0], rtol=0, atol=0)
    torch.testing.assert_close(result["layer_1.residual"], blocks[1], rtol=0, atol=0)
    torch.testing.assert_close(result.logits, logits, rtol=0, atol=0)


def _nothing_left(model: Any) -> None:
    assert hook_ids(model) == set() and forward_attributes(model) == []


def test_weights_changed_in_place_are_read() -> None:
    model = small_gpt2()
    backend = archscope.Backend.for_model(model)
    ids = token_ids()
    before = backend.run(ids, capture=CAPTURE)
    with torch.no_grad():
        for param in model.transformer.h[0].parameters():
            param.mul_(1.5)
    model.load_state_dict({k: v * 1.01 for k, v in model.state_dict().items()})
    after = backend.run(ids, capture=CAPTURE)
    assert not torch.equal(after["logits"], before["logits"])
    _check(after, model, ids)


def test_a_replaced_block_gets_a_new_plan() -> None:
    model = small_gpt2()
    backend = archscope.Backend.for_model(model)
    ids = token_ids()
    backend.run(ids, capture=CAPTURE)
    plans = backend.model_state().plans
    assert len(plans) == 1
    old_plan = next(iter(plans.values()))
    old = model.transformer.h[0]
    new = type(old)(model.config, layer_idx=0).eval()
    model.transformer.h[0] = new
    result = backend.run(ids, capture=CAPTURE)
    _check(result, model, ids)
    fresh = backend.model_state().plans
    assert fresh is not plans and len(fresh) == 1, "the old model's plans are dropped"
    assert next(iter(fresh.values())) is not old_plan
    assert "forward" not in old.__dict__ and "forward" not in new.__dict__
    _nothing_left(model)


def test_a_users_hook_added_after_the_plan_is_respected_and_kept() -> None:
    model = small_gpt2()
    backend = archscope.Backend.for_model(model)
    ids = token_ids()
    first = backend.run(ids, capture=CAPTURE)
    block = model.transformer.h[0]

    def double(module: Any, args: Any, output: Any) -> Any:
        if isinstance(output, tuple):
            return (output[0] * 2, *output[1:])
        return output * 2

    handle = block.register_forward_hook(double)
    try:
        hooked = backend.run(ids, capture=CAPTURE)
        assert len(block._forward_hooks) == 1 and "forward" not in block.__dict__
        _check(hooked, model, ids)  # the model's own pass runs the user's hook too
        torch.testing.assert_close(hooked["layer_0.residual"], 2 * first["layer_0.residual"])
    finally:
        handle.remove()
    again = backend.run(ids, capture=CAPTURE)
    torch.testing.assert_close(again.logits, first.logits, rtol=0, atol=0)
    _nothing_left(model)


def test_a_forward_patched_after_the_plan_is_the_one_run() -> None:
    model = small_gpt2()
    backend = archscope.Backend.for_model(model)
    ids = token_ids()
    first = backend.run(ids, capture=CAPTURE)
    block = model.transformer.h[1]
    original = block.forward

    def halved(*args: Any, **kwargs: Any) -> Any:
        output = original(*args, **kwargs)
        return (output[0] / 2, *output[1:]) if isinstance(output, tuple) else output / 2

    block.forward = halved  # on the instance, as accelerate's hooks do
    try:
        patched = backend.run(ids, capture=CAPTURE)
        assert block.__dict__["forward"] is halved, "the instance's own forward is kept"
        torch.testing.assert_close(patched["layer_1.residual"], first["layer_1.residual"] / 2)
        _check(patched, model, ids)
    finally:
        del block.forward
    torch.testing.assert_close(backend.run(ids, capture=CAPTURE).logits, first.logits)


def test_training_mode_set_after_the_plan_is_switched_off_for_the_run() -> None:
    model = small_gpt2()
    model.config.resid_pdrop = 0.5
    backend = archscope.Backend.for_model(model)
    ids = token_ids()
    first = backend.run(ids, capture=CAPTURE)
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.9
    a = backend.run(ids, capture=CAPTURE)
    b = backend.run(ids, capture=CAPTURE)
    assert all(m.training for m in model.modules()), "the model's own mode is restored"
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)
    torch.testing.assert_close(a.logits, first.logits, rtol=0, atol=0)


def test_a_dtype_change_after_the_plan_is_followed() -> None:
    model = small_gpt2()
    backend = archscope.Backend.for_model(model)
    ids = token_ids()
    backend.run(ids, capture=CAPTURE)
    model.double()
    result = backend.run(ids, capture=CAPTURE)
    assert result["logits"].dtype == torch.float64
    assert result["layer_0.residual"].dtype == torch.float64
    _check(result, model, ids)


def test_padding_is_found_for_each_batch_not_kept_from_the_last() -> None:
    model = small_gpt2()
    backend = archscope.Backend.for_model(model)
    ids = token_ids()
    full = torch.ones_like(ids)
    _check(backend.run({"input_ids": ids, "attention_mask": full}, capture=CAPTURE), model, ids)
    # the same request, now left-padded: GPT-2 needs positions counted from the first real
    # token, which the backend adds only when it knows the batch is left-padded
    left = full.clone()
    left[0, :2] = 0
    result = backend.run({"input_ids": ids, "attention_mask": left}, capture=CAPTURE)
    positions = (left.cumsum(-1) - 1).clamp(min=0)
    blocks, logits = _own(model, ids, attention_mask=left, position_ids=positions)
    torch.testing.assert_close(result["logits"][:, 2:], logits[:, 2:], rtol=0, atol=0)
    torch.testing.assert_close(result["layer_1.residual"][1], blocks[1][1], rtol=0, atol=0)
    # the same mask tensor changed in place between runs: read again, not remembered
    full[1, :3] = 0
    again = backend.run({"input_ids": ids, "attention_mask": full}, capture=CAPTURE)
    positions = (full.cumsum(-1) - 1).clamp(min=0)
    _, logits = _own(model, ids, attention_mask=full, position_ids=positions)
    torch.testing.assert_close(again["logits"][1, 3:], logits[1, 3:], rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(1, 8), (2, 40)], ids=["read-at-once", "reduction"])
def test_id_and_mask_checks_hold_for_small_and_large_batches(shape: tuple[int, int]) -> None:
    assert (shape[0] * shape[1] <= guards.SMALL_READ) == (shape == (1, 8))
    model = small_gpt2()
    backend = archscope.Backend.for_model(model)
    ids = token_ids(*shape)
    backend.run(ids, capture=CAPTURE)
    bad = ids.clone()
    bad[-1, -1] = 100
    with pytest.raises(InputError, match="outside the vocabulary of 100"):
        backend.run(bad, capture=CAPTURE)
    bad[-1, -1] = -3
    with pytest.raises(InputError, match="negative token id -3"):
        backend.run(bad, capture=CAPTURE)
    mask = torch.ones_like(ids)
    mask[0, -1] = 2
    with pytest.raises(InputError, match="must hold 0 and 1"):
        backend.run({"input_ids": ids, "attention_mask": mask}, capture=CAPTURE)
    assert guards.int_range(ids) == (int(ids.min()), int(ids.max()))
    _check(backend.run(ids, capture=CAPTURE), model, ids)


def test_a_meta_model_is_refused_after_a_cached_plan() -> None:
    model = small_gpt2()
    backend = archscope.Backend.for_model(model)
    ids = token_ids()
    backend.run(ids, capture=CAPTURE)
    model.to("meta")
    with pytest.raises(InputError, match="meta device"):
        backend.run(ids, capture=CAPTURE)


def test_model_lock_is_one_per_live_model() -> None:
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    lock = guards.model_lock(a)
    assert guards.model_lock(a) is lock and guards.model_lock(b) is not lock
    key = id(a)
    del a
    gc.collect()
    assert key not in guards._locks, "the entry leaves with its model"
