"""Run guards: what every run checks and holds around the forward pass, whatever the backend —
the inputs the model can take (`InputLimits`, refused before the forward), inference mode
(restored afterwards), one run at a time per model, and the hooks a model had before a run."""

from __future__ import annotations

import contextlib
import functools
import math
import os
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import InputError

if TYPE_CHECKING:
    import torch

__all__ = [
    "InputLimits",
    "all_finite",
    "available_memory",
    "check_finite_state",
    "check_inputs",
    "check_memory",
    "check_state_shapes",
    "check_width",
    "inference_mode",
    "int_range",
    "limits_from_model",
    "model_lock",
    "restore_hooks",
    "state_sizes",
    "unembed_input",
    "warn_if_not_finite",
]

#: Config attributes that hold a model's position limit, in the order they are looked up.
_POSITION_KEYS = ("n_positions", "max_position_embeddings", "n_ctx", "max_seq_len")


@dataclass(frozen=True)
class InputLimits:
    """What token batches a model can take: ids in ``0..vocab_size-1`` and at most
    ``max_positions`` columns. None = no limit known (e.g. no position table)."""

    vocab_size: int | None = None
    max_positions: int | None = None


def limits_from_model(model: Any, backend: Any = None) -> InputLimits:
    """Limits read from the model: the rows of its input embedding (else ``config.vocab_size``,
    else the rows of the module behind the ``embed`` site of ``backend``, e.g. the
    ``nn.Embedding`` of a plain ``nn.Module`` model) and the first position limit its config
    names (`_POSITION_KEYS`)."""
    vocab = None
    get_embeddings = getattr(model, "get_input_embeddings", None)
    if callable(get_embeddings):
        with contextlib.suppress(Exception):  # a model without one may raise NotImplementedError
            vocab = getattr(get_embeddings(), "num_embeddings", None)
    config = getattr(model, "config", None)
    if vocab is None:
        vocab = getattr(config, "vocab_size", None)
    if vocab is None and callable(getattr(backend, "hookpoint", None)):
        with contextlib.suppress(Exception):  # no embed site, or one without a module
            hookpoint = backend.hookpoint("embed")
            if hookpoint is not None and hookpoint.io == "output":
                vocab = getattr(hookpoint.module, "num_embeddings", None)
    positions = None
    for key in _POSITION_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            positions = value
            break
    return InputLimits(vocab if isinstance(vocab, int) and vocab > 0 else None, positions)


#: Integer tensors on the CPU with at most this many elements are read as Python ints for their
#: smallest and largest value (`int_range`): one copy, several times cheaper than a reduction
#: and two reads on the few-token batches of a sweep; larger ones take the reduction.
SMALL_READ = 64


def int_range(tensor: torch.Tensor) -> tuple[int, int]:
    """The smallest and largest value of a non-empty integer tensor, as Python ints."""
    import torch

    if tensor.is_cpu and tensor.numel() <= SMALL_READ:
        values = tensor.tolist()
        if tensor.dim() == 2:
            return min(map(min, values)), max(map(max, values))
        if tensor.dim() == 1:
            return min(values), max(values)
    low, high = torch.aminmax(tensor)
    return int(low), int(high)


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
    low_id, high_id = int_range(ids)
    if low_id >= 0 and (limits.vocab_size is None or high_id < limits.vocab_size):
        return  # the common case, in one reduction (or one read of a small tensor)
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


@functools.cache
def _meta_device() -> Any:
    """``torch.device("meta")``, made on first use."""
    import torch

    return torch.device("meta")


def check_device(device: torch.device, backend: str) -> None:
    """A model on the meta device has no weights to run."""
    meta = _meta_device()
    # (comparing devices costs far less than reading ``device.type`` on a CPU)
    if device == meta or (device.index is not None and device.type == "meta"):
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


class inference_mode:  # used like a function: ``with inference_mode(model):``
    """Run with every module in eval mode (dropout off), restoring each module's own flag
    afterwards, also when the run raises. ``enabled=False`` keeps the model's mode.
    ``modules``: every module of ``model``, when the caller has already listed them.
    (A class rather than a generator: entered at every run, it costs less.)"""

    __slots__ = ("enabled", "model", "modules", "training")

    def __init__(self, model: Any, enabled: bool = True, modules: list[Any] | None = None) -> None:
        self.model, self.enabled, self.modules = model, enabled, modules
        self.training: list[Any] = []

    def __enter__(self) -> None:
        if not self.enabled:
            return
        # the flags as they are on entering (inside the run's model lock), not on creation
        modules = self.modules if self.modules is not None else _modules(self.model)
        training = self.training = [m for m in modules if m.training]
        for module in training:
            module.training = False  # per module: model.eval() would also reset mixed modes

    def __exit__(self, *exc: object) -> None:
        for module in self.training:
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


#: id(model) → (weak reference to the model, its lock); an entry leaves with its model.
_locks: dict[int, tuple[weakref.ref[Any], threading.RLock]] = {}
_locks_guard = threading.Lock()


def model_lock(model: Any) -> threading.RLock:
    """The lock that serialises runs on ``model``: hooks, edits, early stops and mode changes
    live on the shared modules, so two runs on one model at once would see each other's. Runs
    on different models stay parallel; a run started inside a run on the same thread (an
    Edit.apply function that calls run) re-enters."""
    entry = _locks.get(id(model))
    if entry is not None and entry[0]() is model:
        return entry[1]
    with _locks_guard:
        entry = _locks.get(id(model))
        if entry is None or entry[0]() is not model:  # none yet, or a dead model's id
            key = id(model)

            def forget(ref: weakref.ref[Any]) -> None:
                if _locks.get(key, (None,))[0] is ref:  # not a newer model's entry
                    _locks.pop(key, None)

            entry = _locks[key] = (weakref.ref(model, forget), threading.RLock())
        return entry[1]


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


# -- what a run's values may hold --------------------------------------------------------------
def unembed_input(residual: Any, width: int, what: str, model: Any) -> torch.Tensor:
    """The input of a backend's ``unembed``: a tensor whose last axis is ``width``
    (`check_width`), on the model's device and in its floating dtype, so a float32 residual
    unembeds through a float16 / bfloat16 model (and the other way round) as in a run."""
    import torch

    check_width(residual, width, what)
    tensor = torch.as_tensor(residual)
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    if param is not None and tensor.is_floating_point():
        tensor = tensor.to(device=param.device, dtype=param.dtype)
    return tensor


def check_finite_state(initial_state: Any) -> None:
    """Refuse an ``initial_state`` entry that holds NaN or infinity: the run would continue
    from it and return non-finite values at every later position without an error."""
    import torch

    for name, value in initial_state.items():
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            continue
        if value.device.type != "meta" and not all_finite(value):
            finite = torch.isfinite(value)
            raise InputError(
                f"initial_state[{str(name)!r}] holds {int((~finite).sum())} non-finite values "
                f"(NaN or infinity) of {value.numel()}; a run continued from it gives NaN "
                "everywhere after. Take states from the RunResult.state of a run "
                "(return_state=True), or check how the state was computed"
            )


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether a floating tensor holds no NaN or infinity. First one sum, read as a Python
    float (NaN and infinity propagate into it; two dispatches, the cheapest check on small
    tensors); only when the sum is not finite, which finite values can also give by
    overflowing, the exact element-wise check decides."""
    import torch

    if tensor.numel() == 0:
        return True
    value = tensor.detach() if tensor.requires_grad else tensor
    dtype = value.dtype
    if dtype is torch.float32 or dtype is torch.float64:  # summed in their own precision
        total = value.sum()
    else:  # narrower types in float32, which holds their largest values
        total = value.sum(dtype=torch.float32)
    if math.isfinite(total.item()):
        return True
    return bool(torch.isfinite(value).all())


def warn_if_not_finite(logits: Any, backend: str) -> None:
    """Warn when a run's logits hold NaN or infinity (e.g. an edit that overflows float16)."""
    import torch

    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        return
    if logits.is_meta or all_finite(logits):
        return
    bad = int((~torch.isfinite(logits)).sum())
    warnings.warn(
        f"archscope: backend {backend!r}: the run's logits hold {bad} non-finite values (NaN "
        f"or infinity) of {logits.numel()} (dtype {logits.dtype}); an edit value too large "
        "for the model's dtype (float16 overflows above 65504) or non-finite weights or "
        "inputs cause this",
        RuntimeWarning,
        stacklevel=3,
    )


# -- state shapes --------------------------------------------------------------------------------
def check_state_shapes(
    backend: Any, initial_state: Any, rows: int, sizes: dict[str, tuple[int, ...]]
) -> None:
    """Every axis of each ``initial_state`` entry against the shape of that state site:
    ``rows`` on the batch axis, ``sizes[name]`` (the sizes of the other axes, as the backend's
    own states have them) on the rest."""
    for name, value in initial_state.items():
        key = str(name)
        shape = tuple(getattr(value, "shape", ()))
        expected = (rows, *sizes[key]) if key in sizes else None
        if expected is None or shape == expected:
            continue
        axes = backend.site_info(key).shape
        named = ", ".join(f"{a}={n}" for a, n in zip(axes, expected, strict=False))
        wrong = [
            f"{a} is {g}, not {w}" for a, g, w in zip(axes, shape, expected, strict=False) if g != w
        ]
        raise _site_error(
            f"initial_state[{key!r}] has shape {shape}; the state site {key!r} of backend "
            f"{backend.name!r} has shape ({named}) for {rows} rows"
            + (f" ({'; '.join(wrong)})" if wrong and len(shape) == len(expected) else "")
            + f". Take it from the RunResult.state of a run on {rows} rows "
            "(return_state=True)"
        )


def _site_error(message: str) -> Exception:
    from .errors import SiteError

    return SiteError(message)


def state_sizes(backend: Any) -> dict[str, tuple[int, ...]]:
    """The sizes of every axis but the batch axis of each state site: declared in the site's
    ``extra["size"]`` when the backend gives them, else read once from the state the backend
    returns for a one-token run (kept on the backend)."""
    cached = backend.__dict__.get("_archscope_state_sizes")
    if cached is not None:
        return dict(cached)
    states = {n: i for n, i in backend.sites().items() if i.kind == "state"}
    sizes: dict[str, tuple[int, ...]] = {}
    for name, info in states.items():
        declared = info.extra.get("size")
        if isinstance(declared, (tuple, list)) and len(declared) == len(info.shape) - 1:
            sizes[name] = tuple(int(n) for n in declared)
    if len(sizes) < len(states):
        import torch

        probe = torch.zeros((1, 1), dtype=torch.long)
        try:
            state = backend.run(probe, return_state=True, stop_early=False).state or {}
        except Exception:  # a model that cannot run one token: keep the declared sizes
            state = {}
        for name, value in state.items():
            sizes.setdefault(str(name), tuple(int(n) for n in value.shape[1:]))
    backend.__dict__["_archscope_state_sizes"] = sizes
    return dict(sizes)


# -- memory ----------------------------------------------------------------------------------------
#: Runs estimated below this many bytes are not checked against the free memory.
MEMORY_CHECK_FROM = 256 * 2**20


def available_memory(device: Any) -> int | None:
    """Bytes free for a run on ``device``: the accelerator's free memory, or for the CPU the
    kernel's MemAvailable (bounded by a cgroup limit when one is set); None when unknown."""
    import torch

    if device.type == "cuda":
        with contextlib.suppress(Exception):
            return int(torch.cuda.mem_get_info(device)[0])
        return None
    if device.type != "cpu":
        return None
    free: int | None = None
    with contextlib.suppress(OSError, ValueError), open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
                break
    if free is None:
        with contextlib.suppress(ValueError, OSError, AttributeError):
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    with contextlib.suppress(OSError, ValueError):
        limit = open("/sys/fs/cgroup/memory.max").read().strip()
        used = int(open("/sys/fs/cgroup/memory.current").read().strip())
        if limit != "max":
            room = int(limit) - used
            free = room if free is None else min(free, room)
    return free


def _site_widths(backend: Any) -> tuple[int, int, dict[str, int], Any]:
    """(width of the widest token site, width of ``logits`` (0 = none), width of each token
    site but the logits, where the model's first floating parameter is) for `check_memory`.
    They depend only on the site table: a `Backend` keeps them in its model state (rebuilt
    when the model changes)."""
    state = backend._state() if hasattr(backend, "_state") else None
    cached: Any = getattr(state, "memory", None)
    if cached is None:
        sites = backend.sites()
        dims = {n: i.dim for n, i in sites.items() if i.kind == "token" and i.site.role != "logits"}
        logits = sites["logits"].dim if "logits" in sites else 0
        param = next((p for p in backend.model.parameters() if p.is_floating_point()), None)
        cached = (max(dims.values(), default=0), logits, dims, _parameter_place(backend, param))
        if state is not None:
            state.memory = cached
    return cached  # type: ignore[no-any-return]


def _memory_sizes(backend: Any) -> tuple[int, int, int, dict[str, int]]:
    """(bytes per element of the model's floating parameters, width of the widest token site,
    width of ``logits`` (0 = none), width of each token site but the logits) for
    `check_memory`. The widths are kept (`_site_widths`); the element size is read at every
    call (``model.to(dtype)`` changes it in place)."""
    widest, logits, dims, place = _site_widths(backend)
    param = None
    if place is not None:
        owner, key = place
        param = owner._parameters.get(key)
    if param is None or not param.is_floating_point():  # replaced or cast: look again
        param = next((p for p in backend.model.parameters() if p.is_floating_point()), None)
    size = param.element_size() if param is not None else 4
    return size, widest, logits, dims


#: Bytes per element of the widest floating dtype (float64): what `check_memory` assumes for
#: the bound that lets small runs pass without reading the model's dtype.
_MAX_ELEMENT = 8


def _parameter_place(backend: Any, param: Any) -> tuple[Any, str] | None:
    """(module, name) that holds ``param``, so later calls read it without a walk."""
    if param is None:
        return None
    for module in backend.model.modules():
        for key, value in module._parameters.items():
            if value is param:
                return module, key
    return None


def check_memory(
    backend: Any,
    batch: Mapping[str, Any],
    capture: list[str],
    full_pass: bool,
    free: Callable[[Any], int | None] | None = None,
) -> None:
    """Refuse, before the forward pass, a run whose outputs alone cannot fit in the free memory
    of the model's device: the logits (when the pass reaches them), the captured token sites
    and the input and output of the widest site, per token. A lower bound, so only runs that
    would certainly fail are refused, with the number of rows that fit."""
    first = batch.get("input_ids")
    if first is None:
        first = batch.get("inputs_embeds")
    if first is None or first.dim() < 2:
        return
    rows, seq = int(first.shape[0]), int(first.shape[1])
    tokens = rows * seq
    widest, logits, _, _ = _site_widths(backend)
    bound = (2 + len(capture)) * widest + logits  # elements per token, at least what is needed
    if tokens * bound * _MAX_ELEMENT < MEMORY_CHECK_FROM:
        return  # even in float64 this run needs less than is ever checked
    size, widest, logits, dims = _memory_sizes(backend)
    # the input and output of the widest layer exist at once; the logits in the model's dtype
    parts = {"working activations": 2 * widest * size}
    if full_pass and logits:
        parts["logits"] = logits * size
    parts["captured sites"] = sum(dims.get(n, 0) * size for n in capture)
    per_token = sum(parts.values())
    need = per_token * tokens
    if need < MEMORY_CHECK_FROM:
        return
    room = (free or available_memory)(backend.device)
    if room is None or need <= room:
        return
    fits = max(1, room // max(1, per_token * seq) // 2)
    gib = 2**30
    detail = ", ".join(f"{k} {v * tokens / gib:.1f} GiB" for k, v in parts.items() if v)
    raise InputError(
        f"this run of {rows} rows x {seq} tokens needs at least {need / gib:.1f} GiB "
        f"({detail}) but {room / gib:.1f} GiB of {backend.device.type} memory is free; run "
        f"at most about {fits} rows at a time (split the batch, or give the method "
        f"batch_size={fits}), or capture fewer sites"
    )
