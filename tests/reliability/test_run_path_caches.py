"""The per-call savings of `Backend.run` change no result and drop no check: reads through a
wrapped ``forward`` equal reads through hooks and leave nothing on the modules, a module that
already has a hook is read through a hook (after it, as before), the non-finite check is exact (its warning: test_tour_run.py),
the 0/1 mask check still refuses what it refused, and the memory check's cached widths follow
the model."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from archs import arch
from reliability.support import forward_attributes

from archscope import InputError, guards
from archscope.engine import logits_from
from archscope.testing import hook_ids

SITES = ["layer_0.residual", "layer_1.residual", "logits"]


@pytest.mark.parametrize("name", ["gpt2", "llama", "mamba", "lstm"])
def test_captures_equal_the_models_own_outputs_and_leave_nothing_behind(name: str) -> None:
    from archs import FACTORIES

    from archscope import Backend, Edit

    model = FACTORIES[name]()  # a fresh model: no library hooks installed on it yet
    reference = copy.deepcopy(model)
    backend = Backend.for_model(model)
    ids = torch.randint(4, 90, (2, 7), generator=torch.Generator().manual_seed(0))
    residuals = backend.layer_names()
    result = backend.run(ids, capture=[*residuals, "logits"])
    assert hook_ids(model) == set() and forward_attributes(model) == []
    with torch.no_grad():
        plain = reference(ids)
    logits = logits_from(plain)
    torch.testing.assert_close(result.logits, logits, rtol=0, atol=0)
    if name != "lstm":  # the model's own hidden states (Mamba's are the mixers' residuals)
        offset = 0 if name == "mamba" else 1
        with torch.no_grad():
            hidden = reference(ids, output_hidden_states=True).hidden_states
        for i, site in enumerate(residuals[:-1]):
            torch.testing.assert_close(result[site], hidden[i + offset], rtol=0, atol=0)
    # an edit through a wrapped forward changes the run as through a hook, and is undone
    edited = backend.run(ids, capture=["logits"], edits=[Edit.scale(residuals[0], 0.0)])
    assert not torch.equal(edited.logits, result.logits)
    again = backend.run(ids, capture=["logits"])
    assert torch.equal(again.logits, result.logits)
    assert hook_ids(model) == set() and forward_attributes(model) == []


def test_a_module_with_its_own_hook_is_read_after_that_hook() -> None:
    a = arch("gpt2")
    block = a.model.transformer.h[0]
    ids = torch.randint(4, 90, (1, 6), generator=torch.Generator().manual_seed(1))
    before = a.backend.run(ids, capture=["layer_0.residual"])["layer_0.residual"]

    def double(module: Any, args: Any, output: Any) -> Any:
        if isinstance(output, tuple):
            return (output[0] * 2, *output[1:])
        return output * 2

    handle = block.register_forward_hook(double)
    try:
        seen = a.backend.run(ids, capture=["layer_0.residual"])["layer_0.residual"]
        assert "forward" not in block.__dict__
        assert len(block._forward_hooks) == 1  # the user's own, still there
    finally:
        handle.remove()
    torch.testing.assert_close(seen, 2 * before, rtol=0, atol=0)


def test_a_forward_set_on_the_instance_is_kept() -> None:
    a = arch("gpt2")
    block = a.model.transformer.h[1]
    calls = []
    own = block.forward

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return own(*args, **kwargs)

    block.forward = counted
    try:
        ids = torch.randint(4, 90, (1, 5), generator=torch.Generator().manual_seed(2))
        a.backend.run(ids, capture=["layer_1.residual", "logits"])
        assert block.__dict__["forward"] is counted and calls == [1]
    finally:
        del block.forward


def test_a_run_that_raises_restores_every_forward() -> None:
    a = arch("gpt2")

    def fail(value: Any) -> Any:
        raise RuntimeError("boom")

    from archscope import Edit

    ids = torch.randint(4, 90, (1, 5))
    hooks = hook_ids(a.model)
    with pytest.raises(RuntimeError, match="boom"):
        a.backend.run(ids, capture=["logits"], edits=[Edit.apply("layer_0.residual", fail)])
    assert forward_attributes(a.model) == [] and hook_ids(a.model) == hooks


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_all_finite_is_exact(dtype: torch.dtype) -> None:
    big = torch.finfo(dtype).max
    assert guards.all_finite(torch.zeros(0, dtype=dtype))
    assert guards.all_finite(torch.tensor([1.0, -2.0], dtype=dtype))
    # finite values whose sum overflows are finite
    assert guards.all_finite(torch.full((64,), big, dtype=dtype))
    assert guards.all_finite(torch.tensor([big, big, -big], dtype=dtype))
    for bad in (float("nan"), float("inf"), float("-inf")):
        x = torch.ones(10, dtype=dtype)
        x[3] = bad
        assert not guards.all_finite(x)
    both = torch.tensor([float("inf"), float("-inf")], dtype=dtype)
    assert not guards.all_finite(both)


@pytest.mark.parametrize("dtype", [torch.long, torch.int32, torch.uint8, torch.float32])
def test_mask_values_are_checked_for_every_dtype(dtype: torch.dtype) -> None:
    a = arch("gpt2")
    ids = torch.randint(4, 90, (2, 5))
    ones = torch.ones(2, 5, dtype=dtype)
    padded = ones.clone()
    padded[0, 3:] = 0
    full = a.backend.run({"input_ids": ids, "attention_mask": ones}, capture=SITES)
    assert torch.equal(full.attention_mask, torch.ones(2, 5, dtype=torch.long))
    part = a.backend.run({"input_ids": ids, "attention_mask": padded}, capture=SITES)
    assert part.attention_mask.tolist()[0] == [1, 1, 1, 0, 0]
    odd = ones.clone()
    odd[1, 2] = 2
    with pytest.raises(InputError, match="must hold 0 and 1"):
        a.backend.run({"input_ids": ids, "attention_mask": odd}, capture=SITES)
    empty = ones.clone()
    empty[1] = 0
    with pytest.raises(InputError, match="no real token"):
        a.backend.run({"input_ids": ids, "attention_mask": empty}, capture=SITES)
    if dtype in (torch.long, torch.int32):
        negative = ones.clone()
        negative[0, 0] = -1
        with pytest.raises(InputError, match="must hold 0 and 1"):
            a.backend.run({"input_ids": ids, "attention_mask": negative}, capture=SITES)
    if dtype == torch.float32:
        soft = ones.clone()
        soft[0, 1] = 0.5
        with pytest.raises(InputError, match="must hold 0 and 1"):
            a.backend.run({"input_ids": ids, "attention_mask": soft}, capture=SITES)


def test_memory_check_follows_the_models_dtype_and_vocabulary(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from archscope import Backend
    from archscope_transformer.testing import tiny_model

    model = tiny_model("gpt2")
    backend = Backend.for_model(model)
    ids = torch.full((100_000, 64), 5, dtype=torch.long)
    seen: list[float] = []

    def need(rows: int) -> float:
        with pytest.raises(InputError) as info:
            guards.check_memory(backend, {"input_ids": ids[:rows]}, ["logits"], True, lambda d: 1)
        return float(str(info.value).split("needs at least ")[1].split()[0])

    backend.run(ids[:1, :4], capture=["logits"])  # fills the cached widths
    seen.append(need(100_000))
    model.half()
    seen.append(need(100_000))
    assert seen[1] == pytest.approx(seen[0] / 2, rel=0.02)
    vocab = model.get_input_embeddings().num_embeddings
    model.resize_token_embeddings(vocab * 8)
    backend.run(ids[:1, :4], capture=["logits"])  # the model state notices the new vocabulary
    assert need(100_000) > 2 * seen[1]  # the logits part grew eightfold
