"""A selective scan for Hugging Face Mamba-1 mixers on CPU that gives transformers' PyTorch path's
values bit for bit, faster, and can keep what the scan computes on the way (the state after every
token, each token's write and decay) at little extra cost.

transformers' CPU path (``mamba_selective_scan``, reached through ``mamba_scan_forward`` when no
kernel applies) discretises the whole sequence into (batch, d_inner, seq, d_state) tensors, then
loops over time creating new tensors at each step and stacks the outputs. `selective_scan` does
the same arithmetic, operation for operation, in another order of memory:

- time is cut into chunks of `CHUNK` tokens; each chunk's decays ``exp(Δ·A)`` and writes
  ``(Δ·B)·x`` are computed as batched tensors in a (chunk, batch, d_inner, d_state) layout whose
  per-token slices are contiguous, into buffers allocated once per call (the whole sequence's
  only when they are kept);
- the recurrence ``S_t = decay_t * S_{t-1} + write_t`` runs in place (a multiplication into the
  state buffer, then an addition: the same two roundings as transformers' expression);
- each token's output ``S_t · C_t`` is transformers' own ``matmul`` of a (batch, d_inner,
  d_state) state, written into a buffer; then the skip ``D·x`` and the gate as transformers
  applies them.

`own_scan` installs it for the duration of one run (`archscope_mamba.backend`); a mixer uses it
only when every condition in `scan_applies` holds, and transformers' own function runs otherwise.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from archscope import ParameterError

if TYPE_CHECKING:
    import torch

#: Tokens per chunk of the discretisation (the per-chunk tensors stay in cache; measured on the
#: benchmark model, 8-32 are alike).
CHUNK = 16
#: What a run can ask the scan to keep (per layer): ``states`` (after every token), ``writes``
#: ((Δ·B)·x per token), ``decays`` (exp(Δ·A) per token).
KEEPABLE = frozenset({"states", "writes", "decays"})
#: Where a run keeps its `ScanUse` (``RunRequest.extra``).
SCAN_EXTRA = "mamba_scan"
#: Which write site needs which kept tensor.
_KEPT_FOR = {"ssm_states": "states", "state_write": "writes", "write_decay": "decays"}


def scan_keeps(roles: set[str]) -> frozenset[str]:
    """What the scan keeps for a layer whose write sites ``roles`` are captured."""
    return frozenset(_KEPT_FOR[r] for r in roles if r in _KEPT_FOR)


@dataclass
class ScanRecord:
    """What one layer's scan kept, in the caller-facing (batch, seq, ...) layout (views).

    ``dt``: (batch, seq, d_inner) Δ after its bias and softplus; ``x``: (batch, seq, d_inner)
    the scan input; ``B``: (batch, seq, d_state); ``states``, ``writes``, ``decays``: (batch,
    seq, d_inner, d_state) or None when not kept; ``last``: (batch, d_inner, d_state)."""

    dt: torch.Tensor
    x: torch.Tensor
    B: torch.Tensor
    last: torch.Tensor
    states: torch.Tensor | None = None
    writes: torch.Tensor | None = None
    decays: torch.Tensor | None = None


def selective_scan(
    x: torch.Tensor,
    time_step: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    gate: torch.Tensor,
    dt_bias: torch.Tensor | None,
    keep: frozenset[str] | set[str] = frozenset(),
    chunk: int = CHUNK,
) -> tuple[torch.Tensor, ScanRecord]:
    """transformers' ``mamba_selective_scan(x, time_step, A, B.mT, C.mT, D, gate, dt_bias,
    delta_softplus=True, return_last_state=True)`` (float32, from a zero state).

    ``x``, ``time_step``, ``gate``: (batch, d_inner, seq); ``A``: (d_inner, d_state); ``B``,
    ``C``: (batch, seq, d_state); ``D``: (d_inner,). Returns the gated output (batch, d_inner,
    seq) and the `ScanRecord` (``keep`` ⊆ `KEEPABLE`). Runs without autograd (in-place ops
    on its own buffers)."""
    import torch
    import torch.nn.functional as F

    unknown = set(keep) - KEEPABLE
    if unknown:
        raise ParameterError(
            f"selective_scan: keep takes {sorted(KEEPABLE)}, got {sorted(unknown)}"
        )
    if not isinstance(chunk, int) or chunk < 1:
        raise ParameterError(f"selective_scan: chunk is a number of tokens ≥ 1, got {chunk!r}")
    batch, channels, seq = x.shape
    n = A.shape[-1]
    dt = time_step if dt_bias is None else time_step + dt_bias.to(time_step.dtype)[..., None]
    dt = F.softplus(dt)  # (b, d, t)
    dt_t = dt.permute(2, 0, 1)  # (t, b, d) views: per-token slices for the chunks
    x_t = x.permute(2, 0, 1)
    B_t = B.transpose(0, 1)  # (t, b, n)
    size = min(chunk, seq)

    def buffer(kept: bool) -> torch.Tensor:
        return x.new_empty((seq if kept else size, batch, channels, n), dtype=torch.float32)

    decays, writes, states = (buffer(k in keep) for k in ("decays", "writes", "states"))
    read = x.new_empty((size, batch, channels, 1), dtype=torch.float32)
    out = x.new_empty((batch, channels, seq), dtype=torch.float32)
    prev = x.new_zeros((batch, channels, n), dtype=x.dtype)
    A32 = A.float()
    for start in range(0, seq, size):
        stop = min(seq, start + size)
        length = stop - start
        at = slice(start, stop) if "decays" in keep else slice(0, length)
        decay = decays[at]
        torch.mul(A32, dt_t[start:stop, :, :, None], out=decay)
        decay.exp_()
        at = slice(start, stop) if "writes" in keep else slice(0, length)
        write = writes[at]
        torch.mul(dt_t[start:stop, :, :, None], B_t[start:stop, :, None, :].float(), out=write)
        write.mul_(x_t[start:stop, :, :, None].float())
        at = slice(start, stop) if "states" in keep else slice(0, length)
        state = states[at]
        for j in range(length):
            torch.mul(decay[j], prev, out=state[j])
            state[j].add_(write[j])
            prev = state[j]
            # transformers' own read, operand for operand (the batched-product kernel chosen
            # depends on the shapes, so a chunk-wide product would differ in the last bits)
            torch.matmul(prev, C[:, start + j, :, None], out=read[j])
        if "states" not in keep and stop < seq:
            prev = prev.clone()  # the scratch buffer is overwritten by the next chunk
        out[:, :, start:stop] = read[:length, :, :, 0].permute(1, 2, 0)
    last = prev.clone()  # the cache's own tensor, not a view of a buffer
    out = out + x * D[None, :, None]
    out = out * F.silu(gate)
    record = ScanRecord(
        dt=dt.transpose(1, 2),
        x=x.transpose(1, 2),
        B=B,
        last=last,
        states=states.transpose(0, 1) if "states" in keep else None,
        writes=writes.transpose(0, 1) if "writes" in keep else None,
        decays=decays.transpose(0, 1) if "decays" in keep else None,
    )
    return out, record


# -- using it inside a run ---------------------------------------------------------------------
@dataclass
class ScanUse:
    """One run's use of the scan: which mixers (by id) may use it, what each keeps, and what
    each kept."""

    keep: dict[int, frozenset[str]]
    records: dict[int, ScanRecord] = field(default_factory=dict)


def scan_record(extra: dict[str, Any], index: int) -> ScanRecord | None:
    """What layer ``index``'s own scan kept in the run whose ``extra`` this is (None when the
    layer ran transformers' function)."""
    use = extra.get(SCAN_EXTRA)
    return None if use is None else use.records.get(index)


_lock = threading.Lock()
_active: dict[int, tuple[ScanUse, int]] = {}  # id(mixer) -> (its run's use, layer index)
_installed: dict[str, tuple[Callable[..., Any], int]] = {}  # module -> (original, users)


def scan_applies(module: Any, x: torch.Tensor, time_step: torch.Tensor, cache: Any) -> bool:
    """When the own scan gives transformers' values exactly: float32 tensors on CPU, no
    autograd or compilation (transformers' associative scan runs only when compiling), no
    ``use_mambapy``, and a full-sequence call from an empty cache (no state carried in, no
    intermediate states kept by the cache); otherwise transformers' own path runs."""
    import torch

    if x.device.type != "cpu" or x.dtype != torch.float32 or time_step.dtype != torch.float32:
        return False
    compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    if torch.is_grad_enabled() or (compiling is not None and compiling()):
        return False
    if getattr(module, "use_mambapy", False):
        return False
    if x.shape[-1] < 1:
        return False
    if cache is not None:
        getter = getattr(cache, "get_recurrent_state", None)
        keeps = getattr(cache, "get_recurrent_states_to_keep", None)
        if getter is None or keeps is None:
            return False
        if getter(module.layer_idx, state_idx=0) is not None:
            return False
        if keeps(module.layer_idx):
            return False
    return True


def _kernelized(original: Any) -> bool:
    """Whether ``kernels.kernelize`` gave transformers' function a kernel: its wrapper module (or
    the model's private copy of it, which transformers activates during a forward) carries its
    own ``forward``. The own scan then stands aside."""
    if "forward" in getattr(original, "__dict__", {}):
        return True
    try:
        from kernels._internals.layer.layer import _ACTIVE_KERNEL_FUNCS
    except Exception:  # kernels absent or reorganised: nothing can be active through it
        return False
    entry = (_ACTIVE_KERNEL_FUNCS.get() or {}).get(id(original))
    if entry is None:
        return False
    copy, forward = entry
    return "forward" in getattr(copy, "__dict__", {}) or forward is not type(original).forward


def _dispatcher(original: Callable[..., Any]) -> Callable[..., Any]:
    def mamba_scan_forward(
        module: Any,
        hidden_states: torch.Tensor,
        time_step: torch.Tensor,
        B: torch.Tensor,
        C: torch.Tensor,
        gate: torch.Tensor,
        cache: Any,
        **kwargs: Any,
    ) -> Any:
        entry = _active.get(id(module))
        if (
            entry is None
            or kwargs
            or _kernelized(original)
            or not scan_applies(module, hidden_states, time_step, cache)
        ):
            return original(module, hidden_states, time_step, B, C, gate, cache, **kwargs)
        use, index = entry
        import torch

        bias = module.dt_proj.bias
        out, record = selective_scan(
            hidden_states,
            time_step,
            -torch.exp(module.A_log.float()),
            B,
            C,
            module.D.float(),
            gate,
            None if bias is None else bias.float(),
            keep=use.keep.get(index, frozenset()),
        )
        use.records[index] = record
        if cache is not None:
            cache.update_recurrent_state(record.last, module.layer_idx)
        return out

    mamba_scan_forward.__wrapped__ = original  # type: ignore[attr-defined]
    return mamba_scan_forward


#: The first transformers release whose ``mamba_scan_forward(module, hidden_states, time_step,
#: B, C, gate, cache)`` this module replaces (checked against it in the tests).
FIRST_RELEASE = (5, 25)


def scan_module(mixer: Any) -> Any:
    """The Python module whose ``mamba_scan_forward`` the mixer calls: a transformers module of
    release `FIRST_RELEASE` or later (None otherwise: the mixer keeps transformers' scan)."""
    name = type(mixer).__module__
    if not name.startswith("transformers."):
        return None
    from archscope.compat import transformers_release

    if transformers_release() < FIRST_RELEASE:
        return None
    module = sys.modules.get(name)
    return module if callable(getattr(module, "mamba_scan_forward", None)) else None


@contextlib.contextmanager
def own_scan(mixers: dict[int, Any], keep: dict[int, frozenset[str]]) -> Iterator[ScanUse]:
    """For the duration of the block, the Mamba-1 ``mixers`` (layer index -> mixer) run
    `selective_scan` wherever `scan_applies`; ``keep`` says what each layer keeps. Other models
    and mixers calling the same transformers function are passed to it unchanged."""
    use = ScanUse(keep=keep)
    modules = []
    with _lock:
        for index, mixer in mixers.items():
            module = scan_module(mixer)
            if module is None:
                continue
            name = module.__name__
            if name in _installed:
                original, users = _installed[name]
                _installed[name] = (original, users + 1)
            else:
                original = module.mamba_scan_forward
                _installed[name] = (original, 1)
                module.mamba_scan_forward = _dispatcher(original)
            modules.append(module)
            _active[id(mixer)] = (use, index)
    try:
        yield use
    finally:
        with _lock:
            for mixer in mixers.values():
                if _active.get(id(mixer), (None,))[0] is use:
                    del _active[id(mixer)]
            for module in modules:
                original, users = _installed[module.__name__]
                if users == 1:
                    module.mamba_scan_forward = original
                    del _installed[module.__name__]
                else:
                    _installed[module.__name__] = (original, users - 1)
