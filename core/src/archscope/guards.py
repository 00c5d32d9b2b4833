"""Run guards: what every run checks and holds around the forward pass, whatever the backend —
the inputs the model can take (`InputLimits`, refused before the forward), inference mode
(restored afterwards), one run at a time per model, and the hooks a model had before a run."""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import InputError

if TYPE_CHECKING:
    import torch

__all__ = [
    "InputLimits",
    "check_inputs",
    "check_width",
    "inference_mode",
    "limits_from_model",
    "model_lock",
    "restore_hooks",
]

#: Config attributes that hold a model's position limit, in the order they are looked up.
_POSITION_KEYS = ("n_positions", "max_position_embeddings", "n_ctx", "max_seq_len")


@dataclass(frozen=True)
class InputLimits:
    """What token batches a model can take: ids in ``0..vocab_size-1`` and at most
    ``max_positions`` columns. None = no limit known (e.g. no position table)."""

    vocab_size: int | None = None
    max_positions: int | None = None


def limits_from_model(model: Any) -> InputLimits:
    """Limits read from the model: the rows of its input embedding (else ``config.vocab_size``)
    and the first position limit its config names (`_POSITION_KEYS`)."""
    vocab = None
    get_embeddings = getattr(model, "get_input_embeddings", None)
    if callable(get_embeddings):
        with contextlib.suppress(Exception):  # a model without one may raise NotImplementedError
            vocab = getattr(get_embeddings(), "num_embeddings", None)
    config = getattr(model, "config", None)
    if vocab is None:
        vocab = getattr(config, "vocab_size", None)
    positions = None
    for key in _POSITION_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            positions = value
            break
    return InputLimits(vocab if isinstance(vocab, int) and vocab > 0 else None, positions)


def check_inputs(batch: MutableMapping[str, Any], limits: InputLimits, backend: str) -> None:
    """Refuse a batch the model cannot take (no rows, ids outside the vocabulary, more columns
    than positions), naming the limit. Ids at padding positions are not tokens: they are not
    checked, and one outside the vocabulary is replaced by 0 in ``batch``."""
    ids = batch.get("input_ids")
    first = ids if ids is not None else batch.get("inputs_embeds")
    if first is None:
        return
    if first.shape[0] == 0:
        raise InputError(
            f"the batch has no rows (input shape {tuple(first.shape)}); give at least one sequence"
        )
    if limits.max_positions is not None and first.shape[1] > limits.max_positions:
        raise InputError(
            f"the batch has {first.shape[1]} tokens per row (padding included) but the model "
            f"takes at most {limits.max_positions} positions (backend {backend!r}); shorten "
            "the texts (make_tokenize_fn(tokenizer, max_length=...)) or split them"
        )
    if ids is None:
        return
    if ids.numel() == 0:
        return
    import torch

    low_id, high_id = torch.aminmax(ids)
    if int(low_id) >= 0 and (limits.vocab_size is None or int(high_id) < limits.vocab_size):
        return  # the common case, in one reduction
    mask = batch.get("attention_mask")
    real = ids[mask.bool()] if mask is not None else ids.reshape(-1)
    if mask is not None and limits.vocab_size is not None:
        # pad ids are not tokens, but the embedding still looks them up: one outside the
        # vocabulary (e.g. -100) becomes 0, which the mask hides from every real position
        outside = (ids < 0) | (ids >= limits.vocab_size)
        if bool(outside.any()):
            batch["input_ids"] = ids.masked_fill(outside & ~mask.bool(), 0)
    if real.numel() == 0:
        return
    low, high = int(real.min()), int(real.max())
    if low < 0:
        raise InputError(
            f"negative token id {low} in input_ids: token ids are 0.."
            f"{'' if limits.vocab_size is None else limits.vocab_size - 1}; mark "
            "padding with attention_mask = 0 instead"
        )
    if limits.vocab_size is not None and high >= limits.vocab_size:
        raise InputError(
            f"token id {high} is outside the vocabulary of {limits.vocab_size} tokens (ids 0.."
            f"{limits.vocab_size - 1}) of this model (backend {backend!r}); use the model's own "
            "tokenizer"
        )


def check_device(device: torch.device, backend: str) -> None:
    """A model on the meta device has no weights to run."""
    if device.type == "meta":
        raise InputError(
            f"backend {backend!r}: the model's parameters are on the meta device (shapes "
            "only, no values), so it cannot run; load the weights first (e.g. "
            "from_pretrained, or model.to_empty(device='cpu') then load_state_dict)"
        )


def check_width(tensor: Any, width: int, what: str) -> None:
    """Refuse a tensor whose last axis is not ``width`` (e.g. the input of `unembed`)."""
    shape = tuple(getattr(tensor, "shape", ()))
    if not shape or shape[-1] != width:
        raise InputError(
            f"{what} takes a tensor whose last axis has width {width}, got shape "
            f"{shape}; pass a residual-stream tensor of this model"
        )


@contextlib.contextmanager
def inference_mode(
    model: Any, enabled: bool = True, modules: list[Any] | None = None
) -> Iterator[None]:
    """Run with every module in eval mode (dropout off), restoring each module's own flag
    afterwards, also when the run raises. ``enabled=False`` keeps the model's mode.
    ``modules``: every module of ``model``, when the caller has already listed them."""
    listed = modules if modules is not None else _modules(model)
    training = [m for m in listed if m.training] if enabled else []
    for module in training:
        module.training = False  # per module: model.eval() would also reset mixed modes
    try:
        yield
    finally:
        for module in training:
            module.training = True


def _modules(model: Any) -> list[Any]:
    """Every module under ``model`` (a plain walk: `nn.Module.modules` also builds names and a
    memo, which costs more than the run's mode switch itself on small models)."""
    found, stack = [], [model]
    while stack:
        module = stack.pop()
        found.append(module)
        stack.extend(child for child in module._modules.values() if child is not None)
    return found


_locks: weakref.WeakKeyDictionary[Any, threading.RLock] = weakref.WeakKeyDictionary()
_locks_guard = threading.Lock()


def model_lock(model: Any) -> threading.RLock:
    """The lock that serialises runs on ``model``: hooks, edits, early stops and mode changes
    live on the shared modules, so two runs on one model at once would see each other's. Runs
    on different models stay parallel; a run started inside a run on the same thread (an
    Edit.apply function that calls run) re-enters."""
    lock = _locks.get(model)
    if lock is None:
        with _locks_guard:
            lock = _locks.setdefault(model, threading.RLock())
    return lock


@contextlib.contextmanager
def restore_hooks(model: Any, attributes: tuple[str, ...] = ()) -> Iterator[None]:
    """Leave ``model`` with exactly the module hooks it had before (removing any a library
    installed during the run), and restore the named attributes of every module that marks
    them (such as a library's "hooks installed" flag, so it installs them again when needed)."""
    kinds = ("_forward_hooks", "_forward_pre_hooks")
    modules = list(model.modules())
    before = [{kind: set(getattr(m, kind)) for kind in kinds} for m in modules]
    missing = object()
    flags = [{a: m.__dict__.get(a, missing) for a in attributes} for m in modules]
    try:
        yield
    finally:
        for module, keys, saved in zip(modules, before, flags, strict=True):
            for kind in kinds:
                hooks = getattr(module, kind)
                for key in [k for k in hooks if k not in keys[kind]]:
                    del hooks[key]
                    for extra in (
                        "_forward_hooks_with_kwargs",
                        "_forward_hooks_always_called",
                        "_forward_pre_hooks_with_kwargs",
                    ):
                        getattr(module, extra, {}).pop(key, None)
            for name, value in saved.items():
                if value is missing:
                    module.__dict__.pop(name, None)
                else:
                    module.__dict__[name] = value
