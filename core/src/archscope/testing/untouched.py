"""What a model must look like after any archscope call: the same hooks, weights and modes.

`hook_ids` lists every hook a model carries; `unchanged` is a context manager that records
the model before its body and asserts, after a body that returned normally, that no hook was
left behind or removed, no weight changed and no module changed mode. Backend and method
authors use it in their own tests the way the conformance kit does::

    with unchanged(model):
        backend.run(ids, capture=["logits"], edits=[...])
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def hook_ids(model: Any) -> set[tuple[str, str, int]]:
    """Every forward, pre-forward, backward and pre-backward hook on every module of
    ``model``, as (module name, kind, hook id)."""
    return {
        (name, kind, int(key))
        for name, module in model.named_modules()
        for kind in _HOOK_DICTS
        for key in getattr(module, kind, {})
    }


@contextmanager
def unchanged(model: Any) -> Iterator[None]:
    """Assert that the body leaves ``model`` as it found it: the same hooks (by id), equal
    weights and buffers, and every module in the mode (training or eval) it was in."""
    import torch

    hooks = hook_ids(model)
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    modes = {n: m.training for n, m in model.named_modules()}
    yield
    now_hooks = hook_ids(model)
    assert now_hooks == hooks, (
        f"hooks changed: added {sorted(now_hooks - hooks)}, removed {sorted(hooks - now_hooks)}"
    )
    state = model.state_dict()
    assert set(state) == set(weights), "the model's weights were added or removed"
    changed = [k for k, v in weights.items() if not torch.equal(state[k], v)]
    assert not changed, f"weights changed: {changed}"
    now_modes = {n: m.training for n, m in model.named_modules()}
    assert now_modes == modes, "module modes changed: " + ", ".join(
        n for n in modes if now_modes.get(n) != modes[n]
    )
