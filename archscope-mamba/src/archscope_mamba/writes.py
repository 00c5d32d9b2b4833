"""State writes and effective attention of selective state-space layers.

A selective SSM layer is a linear recurrence given its input-dependent parameters: per head ``h``
(Mamba-1: per channel) the state ``S_t`` (head_dim × d_state) is

    S_t = decay_t ⊙ S_{t-1} + W_t,    W_t = v_t ⊗ k_t,    y_t = S_t · q_t + D · x_t

with the value ``v_t = Δ_t · x_t``, the key ``k_t = B_t``, the query ``q_t = C_t`` and the decay
``exp(Δ_t · A)`` (Mamba-2: one number per head; Mamba-1: one per channel and state entry). This
module gives the per-position write ``W_t`` and its factors as sites, lets edits replace them and
carries each edit through the rest of the recurrence, and computes the layer's effective
attention ``A[t, s] = q_t · (Π_{r=s+1..t} decay_r) · k_s · Δ_s``, for which
``y_t = Σ_s A[t, s] · x_s + D · x_t`` exactly.

Sites (declared with `declare_write_sites`, through the public `SiteTable`; they have no
hookpoint, the backend computes them while the layer runs):

| site | Mamba-1 shape | Mamba-2 shape | writable |
|---|---|---|---|
| ``layer_i.state_write`` | (batch, seq, d_inner, d_state) | (batch, seq, heads, head_dim, d_state) | yes |
| ``layer_i.write_value`` | (batch, seq, d_inner) = Δ·x | (batch, seq, heads, head_dim) = Δ·x | yes |
| ``layer_i.write_key`` | (batch, seq, d_state) = B | (batch, seq, heads, d_state) = B of the head's group | yes |
| ``layer_i.write_decay`` | (batch, seq, d_inner, d_state) = exp(Δ·A) | (batch, seq, heads) = exp(Δ·A) | no |
| ``layer_i.ssm_states`` | (batch, seq, d_inner, d_state) | (batch, seq, heads, head_dim, d_state) | no |
| ``layer_i.effective_attention`` | (batch, groups, seq, key): channel mean | (batch, heads, seq, key) | no |

An edited run adds the edits' effect to the model's own output: the write with the edits
(value and key edits first, then ``state_write`` edits) minus the run's own write is scanned
with the run's decays, read with the run's queries and added to the scan output before the
gate / gated norm. The recurrence is linear given its parameters, so this is the run with the
edited writes; an edit that gives the write its own value adds exactly zero, and positions
before the first edited one are unchanged bit for bit. The state after the last real token
(``ssm_state`` and ``return_state``) includes the edit's effect.

The roles, `linear_scan` and `scalar_decay_attention` are the architecture-free contract in
`archscope.recurrence`; this module re-exports them for code written against it before.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from archscope import BackendError
from archscope.engine import RunRequest, SiteTable, apply_edit
from archscope.recurrence import (
    WRITABLE_ROLES,
    WRITE_ROLES,
    linear_scan,
    scalar_decay_attention,
    unroll_square,
    write_sites_of,
)
from archscope.recurrence import declare_write_sites as declare_generic

from .scan import ScanRecord, scan_record

if TYPE_CHECKING:
    import torch

__all__ = [
    "EFFECTIVE_ATTENTION_GROUPS",
    "WRITE_ROLES",
    "ScanParts",
    "declare_write_sites",
    "frozen_scan",
    "frozen_write_sites",
    "layer_runs",
    "linear_scan",
    "mixer_kind",
    "scalar_decay_attention",
    "write_hooks",
    "write_sites_of",
]

#: What the write sites hold in these layers (the generic roles: `archscope.recurrence`).
DESCRIPTIONS: dict[str, str] = {
    "write_value": "the value factor of each position's state write (Δ·x)",
    "write_key": "the key factor of each position's state write (B)",
    "write_decay": "the decay applied to the state before each position's write (exp(Δ·A))",
    "effective_attention": (
        "the layer's implicit attention A[t, s] = C_t·(decays s+1..t)·B_s·Δ_s, per head "
        "(computed on request)"
    ),
}
#: Mamba-1 has no heads: its effective attention averages channels in this many equal groups
#: (or the greatest common divisor with d_inner).
EFFECTIVE_ATTENTION_GROUPS = 8


# -- the recurrence, independent of any model ---------------------------------------------------
def channel_decay_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    groups: int,
) -> torch.Tensor:
    """Mamba-1 effective attention per channel, averaged over ``groups`` equal groups of
    channels: per channel ``d``, ``A_d[t, s] = Σ_n C_t[n] · (Π_{r=s+1..t} exp(Δ_r[d] · A[d, n]))
    · B_s[n] · Δ_s[d]``. ``query``/``key``: (batch, seq, d_state); ``dt``: (batch, seq,
    d_inner); ``A``: (d_inner, d_state). Returns (batch, groups, seq, seq); with ``groups`` =
    d_inner, the per-channel matrices.

    Computed as a scan over queries that carries every key's decayed contribution (batch,
    d_inner, d_state, seq): O(batch · d_inner · d_state · seq²) time, no (seq, seq, d_state)
    tensor per channel."""
    import torch

    batch, seq, channels = dt.shape
    dt = dt.float()
    decays = torch.exp(dt[..., None] * A.float())  # (b, t, d, n)
    query, key = query.float(), key.float()
    carried = dt.new_zeros((batch, channels, A.shape[-1], 0))  # the keys s <= t seen so far
    out = dt.new_zeros((batch, groups, seq, seq))
    for t in range(seq):  # out of place, so that it also runs under autograd (run(grad=True))
        fresh = key[:, t, None, :, None] * dt[:, t, :, None, None]  # (b, d, n, 1)
        carried = torch.cat([carried * decays[:, t, :, :, None], fresh], dim=-1)
        row = torch.matmul(query[:, t, None, None, :], carried)[:, :, 0]  # (b, d, t + 1)
        out[:, :, t, : t + 1] = row.reshape(batch, groups, channels // groups, t + 1).mean(2)
    return out


@dataclass
class ScanParts:
    """One layer's recurrence over a run, in the per-head layout: ``x`` (batch, seq, heads,
    head_dim), ``dt`` (batch, seq, heads), ``A`` (heads,) or (heads, d_state), ``B`` and ``C``
    (batch, seq, heads, d_state). Mamba-1 is the case heads = d_inner, head_dim = 1."""

    x: torch.Tensor
    dt: torch.Tensor
    A: torch.Tensor
    B: torch.Tensor
    C: torch.Tensor
    #: the unedited write when the layer's own scan formed it (then it is used as it is, so that
    #: an edited run's values equal an unedited run's bit for bit)
    write: torch.Tensor | None = None
    #: likewise the unedited states after every position
    states: torch.Tensor | None = None

    @property
    def value(self) -> torch.Tensor:
        return self.dt[..., None] * self.x

    @property
    def decay(self) -> torch.Tensor:
        """exp(Δ·A), shaped to broadcast against the state (batch, seq, heads, head_dim, d_state)."""
        import torch

        if self.A.dim() == 1:
            return torch.exp(self.dt * self.A)[..., None, None]
        return torch.exp(self.dt[..., None] * self.A)[..., None, :]

    @staticmethod
    def write_of(value: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        return value[..., :, None] * key[..., None, :]

    def read(self, states: torch.Tensor) -> torch.Tensor:
        """The scan output ``S_t · C_t`` (batch, seq, heads, head_dim) of per-position states."""
        return (states * self.C[..., None, :]).sum(-1)


# -- how the HF mixers compute their scan inputs ------------------------------------------------
def mixer_kind(mixer: Any) -> str | None:
    """ "mamba" / "mamba2" for the Hugging Face Mamba and Mamba-2 mixers whose scan inputs this
    module reads (their PyTorch path); None for others (e.g. mixers with extra norms on B, C, Δ
    or multipliers, whose write sites are not declared)."""
    name = type(mixer).__name__
    if name == "MambaMixer" and all(
        hasattr(mixer, a) for a in ("in_proj", "x_proj", "dt_proj", "out_proj", "A_log")
    ):
        return "mamba"
    if name == "Mamba2Mixer" and all(
        hasattr(mixer, a) for a in ("in_proj", "conv1d", "norm", "dt_bias", "A_log")
    ):
        return "mamba2"
    return None


def declare_write_sites(table: SiteTable, layer: int, state_shape: tuple[Any, ...]) -> None:
    """Add the write sites of layer ``layer`` to ``table`` (no hookpoint: the backend computes
    them while the layer runs). ``state_shape`` is ``("mamba", d_inner, d_state)`` or
    ``("mamba2", heads, head_dim, d_state)``."""
    kind, *sizes = state_shape
    if kind == "mamba":
        d_inner, n = sizes
        shapes = {
            "state_write": (("batch", "seq", "d_inner", "d_state"), n),
            "write_value": (("batch", "seq", "d_inner"), d_inner),
            "write_key": (("batch", "seq", "d_state"), n),
            "write_decay": (("batch", "seq", "d_inner", "d_state"), n),
            "ssm_states": (("batch", "seq", "d_inner", "d_state"), n),
        }
        heads = math.gcd(d_inner, EFFECTIVE_ATTENTION_GROUPS)
    else:
        heads, p, n = sizes
        shapes = {
            "state_write": (("batch", "seq", "heads", "head_dim", "d_state"), n),
            "write_value": (("batch", "seq", "heads", "head_dim"), p),
            "write_key": (("batch", "seq", "heads", "d_state"), n),
            "write_decay": (("batch", "seq", "heads"), heads),
            "ssm_states": (("batch", "seq", "heads", "head_dim", "d_state"), n),
        }
    declare_generic(table, layer, shapes, heads, DESCRIPTIONS)


@dataclass
class _LayerRun:
    """What the hooks of one layer saw during one run."""

    projected: Any = None
    mask: Any = None
    gate: Any = None
    x: Any = None
    ssm_params: Any = None
    delta_state: Any = None  # the edits' effect on the state after the last position
    scan_inputs: Any = None  # Mamba-2: (x, B, C, dt) as the mixer handed them to its scan
    handles: list[Any] = field(default_factory=list)


def _parts_mamba(mixer: Any, seen: _LayerRun, record: ScanRecord | None = None) -> ScanParts:
    """The layer's scan inputs: from its own scan's record where it ran (the values every
    unedited run reports), else recomputed from ``x_proj``'s input and output."""
    import torch
    import torch.nn.functional as F

    x = seen.x.float()  # (b, t, d): the masked, convolved input of x_proj
    n = int(mixer.ssm_state_size)
    rank = int(mixer.time_step_rank)
    time_step, B, C = torch.split(seen.ssm_params.float(), [rank, n, n], dim=-1)
    write = states = None
    if record is not None:
        x, dt, B = record.x.float(), record.dt, record.B.float()
        if record.writes is not None:
            write = record.writes[:, :, :, None, :]
        if record.states is not None:
            states = record.states[:, :, :, None, :]
    else:
        bias = mixer.dt_proj.bias
        dt = time_step @ mixer.dt_proj.weight.float().T
        if bias is not None:
            dt = dt + bias.float()
        dt = F.softplus(dt)
    d = x.shape[-1]
    return ScanParts(
        x=x[..., None],
        dt=dt,
        A=-torch.exp(mixer.A_log.float()),
        B=B[:, :, None, :].expand(-1, -1, d, -1),
        C=C[:, :, None, :].expand(-1, -1, d, -1),
        write=write,
        states=states,
    )


def mamba2_projection(mixer: Any, projected: torch.Tensor) -> tuple[Any, Any, Any]:
    """(the gate z, the convolution's input [x | B | C], Δ's input) of a Mamba-2 mixer's
    ``in_proj`` output (a leading gated-MLP part, where the projection has one, is dropped)."""
    inner, heads = int(mixer.intermediate_size), int(mixer.num_heads)
    conv_dim = int(mixer.conv_dim)
    extra = int(projected.shape[-1]) - inner - conv_dim - heads
    z, xbc, dt = projected[..., extra:].split([inner, conv_dim, heads], dim=-1)
    return z, xbc, dt


def mamba2_convolution(mixer: Any, xbc: torch.Tensor) -> torch.Tensor:
    """The causal convolution of a Mamba-2 mixer over [x | B | C] (batch, seq, conv_dim), before
    its activation."""
    import torch.nn.functional as F

    conv, seq = mixer.conv1d, xbc.shape[1]
    out = F.conv1d(
        xbc.transpose(1, 2),
        conv.weight,
        conv.bias,
        padding=int(conv.kernel_size[0]) - 1,
        groups=int(conv.groups),
    )
    return out[..., :seq].transpose(1, 2)


def mamba2_time_step(mixer: Any, dt: torch.Tensor) -> torch.Tensor:
    """Δ per head: ``softplus(dt + dt_bias)`` in float32, clamped to the time-step limit."""
    import torch
    import torch.nn.functional as F

    dt = F.softplus(dt.float() + mixer.dt_bias.float())
    low, high = (float(v) for v in mixer.time_step_limit)
    if low > 0.0 or high < math.inf:  # softplus is ≥ 0: the default limits (0, inf) change nothing
        dt = torch.clamp(dt, min=low, max=high)
    return dt


def mamba2_parts(
    mixer: Any, x: torch.Tensor, B: torch.Tensor, C: torch.Tensor, dt: Any
) -> ScanParts:
    """The `ScanParts` of a Mamba-2 mixer from its activated scan inputs ``x`` (batch, seq,
    inner), ``B`` and ``C`` (batch, seq, groups·d_state) and Δ (batch, seq, heads); each group's
    B / C serves its heads as a broadcast view (no copy)."""
    import torch

    heads, p = int(mixer.num_heads), int(mixer.head_dim)
    n, groups = int(mixer.ssm_state_size), int(mixer.n_groups)
    b, seq = x.shape[:2]
    per = heads // groups

    def per_head(value: torch.Tensor) -> torch.Tensor:
        grouped = value.float().reshape(b, seq, groups, 1, n).expand(b, seq, groups, per, n)
        return grouped.flatten(2, 3)

    return ScanParts(
        x=x.float().reshape(b, seq, heads, p),
        dt=dt.float(),
        A=-torch.exp(mixer.A_log.float()),
        B=per_head(B),
        C=per_head(C),
    )


def _parts_mamba2(mixer: Any, seen: _LayerRun) -> ScanParts:
    import torch

    inner, n, groups = int(mixer.intermediate_size), int(mixer.ssm_state_size), int(mixer.n_groups)
    _, xbc, dt = mamba2_projection(mixer, seen.projected)
    seq = xbc.shape[1]
    given, seen.scan_inputs = seen.scan_inputs, None
    if given is not None and int(given[0].shape[1]) == seq:
        # what the mixer handed its scan: convolved, activated and masked by the model
        x, B, C, dt = (value.float() for value in given)
    else:
        xbc = mixer.act(mamba2_convolution(mixer, xbc))
        if seen.mask is not None:
            xbc = xbc * seen.mask[:, :, None].to(xbc.dtype)
        x, B, C = torch.split(xbc.float(), [inner, groups * n, groups * n], dim=-1)
    return mamba2_parts(mixer, x, B, C, mamba2_time_step(mixer, dt))


class _Layout:
    """Site values ↔ the per-head layout of `ScanParts` (Mamba-1: head_dim 1, one key)."""

    def __init__(self, kind: str) -> None:
        self.mamba1 = kind == "mamba"

    def to_site(self, role: str, value: torch.Tensor) -> torch.Tensor:
        if not self.mamba1:
            if role == "write_key":  # the per-head keys are broadcast views of the groups' keys
                return value.contiguous()
            return value[..., 0, 0] if role == "write_decay" else value
        if role == "write_value":
            return value[..., 0]
        if role == "write_key":
            return value[:, :, 0]
        if role == "write_decay":
            return value[..., 0, :]
        return value[..., 0, :]  # state_write, ssm_states: (b, t, d, 1, n) -> (b, t, d, n)

    def from_site(self, role: str, value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if not self.mamba1:
            return value
        if role == "write_value":
            return value[..., None]
        if role == "write_key":
            return value[:, :, None].expand_as(like)
        return value[..., None, :]


_EXTRA = "write_layers"


def layer_runs(run: RunRequest) -> dict[int, _LayerRun]:
    """What the write hooks of ``run`` saw per layer (empty when it has no write sites)."""
    return run.extra.get(_EXTRA, {})  # type: ignore[no-any-return]


def _written_layers(
    backend: Any, run: RunRequest, seen: dict[int, _LayerRun]
) -> Iterator[tuple[int, set[str], Any, str]]:
    """(index, roles, mixer, kind) of each layer whose write sites ``run`` captures or edits,
    in layer order; ``seen`` (filled by the caller) is what `layer_runs` reports."""
    run.extra[_EXTRA] = seen
    for index, roles in sorted(write_sites_of([*run.capture, *run.edits]).items()):
        layer = backend.layers[index]
        mixer = layer.block.get_submodule(layer.ssm)
        kind = mixer_kind(mixer)
        if kind is None:  # never declared for such mixers
            raise BackendError(f"layer {index} has no write sites ({type(mixer).__name__})")
        yield index, roles, mixer, kind


@contextlib.contextmanager
def write_hooks(
    backend: Any,
    run: RunRequest,
    shift: torch.Tensor | None,
    roll: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> Iterator[dict[int, _LayerRun]]:
    """Hooks on the mixers of the layers whose write sites ``run`` captures or edits, for the
    duration of the forward pass (all removed on exit). Captured values go to ``run.store`` in
    the caller's layout (``shift``: the per-row right shift the backend applied to the batch,
    undone with ``roll``); edits are carried through the recurrence."""
    seen: dict[int, _LayerRun] = {}
    try:
        for index, roles, mixer, kind in _written_layers(backend, run, seen):
            seen[index] = state = _LayerRun()
            _attach(backend, run, index, roles, mixer, kind, state, shift, roll)
        yield seen
    finally:
        for state in seen.values():
            for handle in state.handles:
                handle.remove()
            state.handles.clear()


@contextlib.contextmanager
def frozen_write_sites(
    backend: Any,
    run: RunRequest,
    shift: torch.Tensor | None,
    roll: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    layers: dict[int, _LayerWrites],
) -> Iterator[dict[int, _LayerRun]]:
    """The write sites of ``run`` on a frozen model (`archscope_mamba.freeze`): no hooks on the
    mixers' parts; each layer's `_LayerWrites` is put in ``layers`` (emptied on exit) for the
    frozen recomputation of its mixer, whose scan takes its write from them (`frozen_scan`),
    so that captures and edits of the write sites act on the frozen recurrence itself."""
    seen: dict[int, _LayerRun] = {}
    try:
        for index, roles, _, kind in _written_layers(backend, run, seen):
            seen[index] = state = _LayerRun()
            layers[index] = _LayerWrites(backend, run, index, roles, kind, state, shift, roll)
        yield seen
    finally:
        layers.clear()


def frozen_scan(parts: ScanParts, writes: _LayerWrites | None) -> torch.Tensor:
    """The states (per-head layout) of a frozen mixer's recurrence: ``parts`` hold the held
    decay, key and query and the live values; the write scanned is the ``state_write`` site's
    value (after the run's edits of ``write_value``, ``write_key`` and ``state_write``, and
    captured where the run asks), so a write edit changes the recurrence's input and a
    gradient flows between the write and the layer's input. ``writes`` None: the run touches
    no write site of this layer."""
    if writes is None:
        return linear_scan(parts.decay, ScanParts.write_of(parts.value, parts.B))
    return writes.scan(parts)


def _attach(
    backend: Any,
    run: RunRequest,
    index: int,
    roles: set[str],
    mixer: Any,
    kind: str,
    seen: _LayerRun,
    shift: torch.Tensor | None,
    roll: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> None:
    writes = _LayerWrites(backend, run, index, roles, kind, seen, shift, roll)
    if kind == "mamba":
        _hook_mamba(mixer, writes, seen)
    else:
        _hook_mamba2(mixer, writes, seen)


class _LayerWrites:
    """The write sites of one layer in one run: captures (in the caller's layout) and edits."""

    def __init__(
        self,
        backend: Any,
        run: RunRequest,
        index: int,
        roles: set[str],
        kind: str,
        seen: _LayerRun,
        shift: torch.Tensor | None,
        roll: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> None:
        self.run, self.kind, self.seen, self.shift, self.roll = run, kind, seen, shift, roll
        self.index = index
        self.layout = _Layout(kind)
        self.prefix = f"layer_{index}."
        self.edits = {role: run.edits.get(self.prefix + role, []) for role in WRITABLE_ROLES}
        self.edited = any(self.edits.values())
        self.capture = {role for role in roles if self.prefix + role in run.capture}
        self.infos = {role: backend.table.info(self.prefix + role) for role in WRITE_ROLES}

    def caller(self, value: torch.Tensor) -> torch.Tensor:
        return value if self.shift is None else self.roll(value, -self.shift)

    def model(self, value: torch.Tensor) -> torch.Tensor:
        return value if self.shift is None else self.roll(value, self.shift)

    def store(self, role: str, value: torch.Tensor) -> None:
        self.run.store[self.prefix + role] = value if self.run.grad else value.detach()

    def site_value(self, role: str, value: torch.Tensor) -> torch.Tensor:
        """The edited model-layout value of ``role`` (captured in the caller's layout)."""
        todo = self.edits.get(role, [])
        if not todo and role not in self.capture:
            return value
        site = self.caller(self.layout.to_site(role, value))
        for edit in todo:
            site = apply_edit(site, edit, self.infos[role], self.run.attention_mask)
        if role in self.capture:
            self.store(role, site)
        return self.layout.from_site(role, self.model(site), value) if todo else value

    def from_record(self, record: ScanRecord) -> bool:
        """Record the captures from what the layer's own scan kept (`archscope_mamba.scan`):
        its discretisation and states are the model's own values. False (nothing stored) for
        edited runs and effective attention, which take the hooks' path."""
        if self.edited or "effective_attention" in self.capture:
            return False
        kept = {
            "write_value": lambda: record.dt * record.x,
            "write_key": lambda: record.B,
            "write_decay": lambda: record.decays,
            "state_write": lambda: record.writes,
            "ssm_states": lambda: record.states,
        }
        values = {role: kept[role]() for role in self.capture}
        stored = {role: value for role, value in values.items() if value is not None}
        if len(stored) < len(values):
            return False  # the scan kept less than asked (not expected: `scan_keeps`)
        for role, value in stored.items():
            self.store(role, self.caller(value))
        return True

    def scan(self, parts: ScanParts) -> torch.Tensor:
        """The states of a frozen run's recurrence over the write as the sites give it (see
        `frozen_scan`), with the captures recorded."""
        value = self.site_value("write_value", parts.value)
        key = self.site_value("write_key", parts.B)
        decay = parts.decay
        if "write_decay" in self.capture:
            self.store("write_decay", self.caller(self.layout.to_site("write_decay", decay)))
        if "effective_attention" in self.capture:
            attention = attention_of(self.kind, parts)
            self.store("effective_attention", unroll_square(attention, self.shift, self.roll))
        write = self.site_value("state_write", ScanParts.write_of(value, key))
        states = linear_scan(decay, write)
        if "ssm_states" in self.capture:
            self.store("ssm_states", self.caller(self.layout.to_site("ssm_states", states)))
        if self.edited and self.prefix + "ssm_state" in self.run.capture:
            # the final state (read from the model's cache) gets the edits' effect, as in an
            # unfrozen run: one more scan, only when it is asked for
            own = ScanParts.write_of(parts.value, parts.B)
            self.seen.delta_state = linear_scan(decay, write - own)[:, -1]
        return states

    def effect(self, parts: ScanParts) -> torch.Tensor | None:
        """Record the captures; the change of the scan output that the edits make (or None)."""
        clean_value, clean_key = parts.value, parts.B  # `value` is computed on each access
        value = self.site_value("write_value", clean_value)
        key = self.site_value("write_key", clean_key)
        decay = parts.decay
        if "write_decay" in self.capture:
            self.store("write_decay", self.caller(self.layout.to_site("write_decay", decay)))
        if "effective_attention" in self.capture:
            attention = attention_of(self.kind, parts)
            self.store("effective_attention", unroll_square(attention, self.shift, self.roll))
        if not (self.edited or {"state_write", "ssm_states"} & self.capture):
            return None  # the factors alone: the (larger) write is not materialised
        # the unedited write is formed only where the scan did not keep it or a factor's edit
        # needs it (a full-size tensor per layer: not formed for captures the scan covers)
        factors_edited = value is not clean_value or key is not clean_key
        clean = None
        if parts.write is None or factors_edited:
            clean = ScanParts.write_of(clean_value, clean_key)
        own = parts.write if parts.write is not None else clean
        assert own is not None
        base = own
        if factors_edited:  # edited factors: their change
            assert clean is not None
            base = own + (ScanParts.write_of(value, key) - clean)
        write = self.site_value("state_write", base)
        delta_states = linear_scan(decay, write - own) if self.edited else None
        if "ssm_states" in self.capture:
            if parts.states is None:
                states = linear_scan(decay, write)
            else:  # the unedited states plus what the edits change
                states = parts.states if delta_states is None else parts.states + delta_states
            self.store("ssm_states", self.caller(self.layout.to_site("ssm_states", states)))
        if delta_states is None:
            return None
        self.seen.delta_state = delta_states[:, -1]
        return parts.read(delta_states).flatten(2)


def _hook_mamba(mixer: Any, writes: _LayerWrites, seen: _LayerRun) -> None:
    """Mamba: the gate from ``in_proj``, x / Δ, B, C at ``x_proj``; the edits' effect enters
    ``out_proj``'s input (the gated scan output)."""
    import torch.nn.functional as F

    def keep_gate(_m: Any, _a: Any, out: torch.Tensor) -> None:
        seen.gate = out.chunk(2, dim=-1)[1]

    def keep_x(_m: Any, args: Any, out: torch.Tensor) -> None:
        seen.x, seen.ssm_params = args[0], out

    def inject(_m: Any, args: Any) -> Any:
        record = scan_record(writes.run.extra, writes.index)
        if record is not None and writes.from_record(record):
            return None
        change = writes.effect(_parts_mamba(mixer, seen, record))
        if change is None:
            return None
        gated = args[0] + (change * F.silu(seen.gate.float())).to(args[0].dtype)
        return (gated, *args[1:])

    seen.handles += [
        mixer.in_proj.register_forward_hook(keep_gate),
        mixer.x_proj.register_forward_hook(keep_x),
        mixer.out_proj.register_forward_pre_hook(inject),
    ]


def _hook_mamba2(mixer: Any, writes: _LayerWrites, seen: _LayerRun) -> None:
    """Mamba-2: the mask from the mixer's call, the projections from ``in_proj`` (convolved
    here as the mixer does); the edits' effect enters the gated norm's input."""
    import torch

    def keep_mask(_m: Any, args: Any, kwargs: Any) -> None:
        mask = kwargs.get("attention_mask")
        seen.mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    def keep_projected(_m: Any, _a: Any, out: torch.Tensor) -> None:
        seen.projected = out
        seen.scan_inputs = None

    def keep_scan_inputs(_m: Any, args: Any, kwargs: Any) -> None:
        # the scan module is shared by every mixer of the model: keep this mixer's call only,
        # and only a call over the whole sequence from an empty state (else: recomputed)
        if len(args) >= 5 and args[0] is mixer and _from_zero(mixer, args, kwargs):
            seen.scan_inputs = tuple(args[1:5])

    def inject(_m: Any, args: Any) -> Any:
        change = writes.effect(_parts_mamba2(mixer, seen))
        if change is None:
            return None
        return (args[0] + change.to(args[0].dtype), *args[1:])

    seen.handles += [
        mixer.register_forward_pre_hook(keep_mask, with_kwargs=True),
        mixer.in_proj.register_forward_hook(keep_projected),
        mixer.norm.register_forward_pre_hook(inject),
    ]
    scan = mamba2_scan_module(mixer)
    if scan is not None:
        seen.handles.append(scan.register_forward_pre_hook(keep_scan_inputs, with_kwargs=True))


def mamba2_scan_module(mixer: Any) -> Any:
    """The module whose forward is the scan a Mamba-2 ``mixer`` calls with its convolved, masked
    inputs (transformers wraps ``mamba2_scan_forward`` in a module it can swap for a kernel), or
    None: then the write sites recompute the convolution from ``in_proj``'s output."""
    import sys

    import torch

    scan = getattr(sys.modules.get(type(mixer).__module__), "mamba2_scan_forward", None)
    return scan if isinstance(scan, torch.nn.Module) else None


def _from_zero(mixer: Any, args: Any, kwargs: Any) -> bool:
    """Whether a scan call starts from an empty state (no cache, or one holding no state yet)."""
    cache = args[5] if len(args) > 5 else kwargs.get("cache")
    if cache is None:
        return True
    getter = getattr(cache, "get_recurrent_state", None)
    if getter is None:
        return False
    try:
        return getter(mixer.layer_idx, state_idx=0) is None
    except (TypeError, IndexError, KeyError, AttributeError):
        return False


def attention_of(kind: str, parts: ScanParts) -> torch.Tensor:
    """The effective attention site's value (model layout): Mamba-2 per head; Mamba-1 the mean
    over `EFFECTIVE_ATTENTION_GROUPS` groups of channels of the per-channel matrices."""
    if kind == "mamba2":
        return scalar_decay_attention(parts.C, parts.B, parts.dt * parts.A, parts.dt)
    channels = parts.dt.shape[-1]
    groups = math.gcd(channels, EFFECTIVE_ATTENTION_GROUPS)
    return channel_decay_attention(parts.C[:, :, 0], parts.B[:, :, 0], parts.dt, parts.A, groups)
