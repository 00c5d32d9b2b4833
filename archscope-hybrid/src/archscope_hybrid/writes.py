"""State writes and effective attention of the hybrids' matrix-state mixers.

Every recurrent mixer here with a matrix state is, given its input-dependent parameters, a
linear recurrence per head over a state ``S`` (key_dim × value_dim, the layout of the model's
own cache and of ``layer_i.ssm_state``):

    S_t = M_t(S_{t-1}) + W_t,    W_t = k_t ⊗ (β_t v_t),    o_t = S_tᵀ q_t

- gated delta nets (Qwen3-Next, Qwen3.5, OLMo-hybrid): ``M_t(S) = (I − β_t k_t k_tᵀ) α_t S``,
  one decay ``α_t = exp(g_t)`` per head, ``k_t``/``q_t`` L2-normalised, ``q_t`` scaled by
  1/√key_dim (OLMo-hybrid with ``allow_neg_eigval`` doubles β);
- Kimi delta attention (KDA): the same with ``diag(α_t)``, one decay per key channel;
- lightning attention (MiniMax): ``M_t(S) = λ S`` with a fixed decay ``λ = exp(−slope)`` per
  head, ``β = 1``, no erase.

The read-out ``o_t`` then goes through the layer's gated RMSNorm (lightning: RMSNorm and a
sigmoid output gate) and its output projection.

Sites (declared with `archscope.recurrence.declare_write_sites`; no hookpoint, the backend
computes them while the layer runs; ``heads`` are the value heads, a grouped key serves each of
its value heads):

| site | shape | what |
|---|---|---|
| ``state_write`` | (batch, seq, heads, key_dim, value_dim) | ``W_t = k_t ⊗ β_t v_t`` (writable) |
| ``write_value`` | (batch, seq, heads, value_dim) | ``β_t v_t`` (writable) |
| ``write_key`` | (batch, seq, heads, key_dim) | ``k_t`` (writable) |
| ``write_decay`` | (batch, seq, heads); KDA (batch, seq, heads, key_dim) | ``α_t`` |
| ``ssm_states`` | (batch, seq, heads, key_dim, value_dim) | ``S_t`` after every position |
| ``effective_attention`` | (batch, heads, seq, key) | ``A[t, s]`` with ``o_t = Σ_s A[t, s] v_s`` |

The erase ``β_t k_t k_tᵀ`` belongs to the transition ``M_t``: an edit of a write (its value,
its key or the whole matrix) changes what is added at that position, and the transitions of the
run (decays, erases) carry the change on. The change of the write is scanned with the run's
transitions (`archscope.recurrence.delta_rule_scan`), read with the run's queries and added to
the read-out before the gated norm; the recurrence being linear in the state given its
parameters, that is the run with the edited write. Positions before the first edited one get
exactly zero added, an edit to the write's own value adds exactly zero, and the state after the
last real token (``ssm_state``, ``return_state``) includes the change.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from archscope import BackendError
from archscope.engine import RunRequest, SiteTable, apply_edit
from archscope.recurrence import (
    WRITABLE_ROLES,
    WRITE_ROLES,
    declare_write_sites,
    delta_rule_attention,
    delta_rule_scan,
    delta_rule_states,
    scalar_decay_attention,
    write_sites_of,
)

from .structure import get

if TYPE_CHECKING:
    import torch

__all__ = [
    "DeltaParts",
    "declare_layer_writes",
    "frozen_write_sites",
    "layer_runs",
    "variant_of",
    "write_hooks",
]

#: Mixer variants whose scan inputs this module reads (their PyTorch path).
QKVZ = "qkvz"  # Qwen3-Next: fused q/k/v/z and b/a projections
QKV = "qkv"  # Qwen3.5: fused q/k/v, separate z, b, a
SEPARATE = "separate"  # OLMo-hybrid: q, k, v, a, b projections of their own
KDA = "kda"  # Kimi-Linear: per-channel decay from a forget gate
LIGHTNING = "lightning"  # MiniMax: fused q/k/v, fixed decay per head

#: Per variant: the child modules whose outputs are kept, and the norm whose input is the
#: read-out (where an edit's effect is added).
_KEEP: dict[str, tuple[str, ...]] = {
    QKVZ: ("in_proj_qkvz", "in_proj_ba"),
    QKV: ("in_proj_qkv", "in_proj_b", "in_proj_a"),
    SEPARATE: ("q_proj", "k_proj", "v_proj", "b_proj", "a_proj"),
    KDA: ("q_proj", "k_proj", "v_proj", "b_proj", "forget_gate"),
    LIGHTNING: ("qkv_proj",),
}
_NORM = {QKVZ: "norm", QKV: "norm", SEPARATE: "o_norm", KDA: "o_norm", LIGHTNING: "norm"}

DESCRIPTIONS: dict[str, str] = {
    "state_write": "each position's write k_t ⊗ β_t·v_t into the matrix state (key_dim × value_dim)",
    "write_value": "the value factor β_t·v_t of each position's state write",
    "write_key": "the key factor k_t (L2-normalised) of each position's state write",
    "write_decay": "the decay α_t applied to the state before each position's erase and write",
    "ssm_states": "the matrix state after every position (computed on request)",
    "effective_attention": (
        "the layer's implicit attention A[t, s] = β_s·q_tᵀ(transitions s+1..t)k_s per head, "
        "o_t = Σ_s A[t, s]·v_s before the gated norm (computed on request)"
    ),
}


def variant_of(mixer: Any) -> str | None:
    """The variant of a recurrent mixer whose write sites this module computes, or None."""

    def has(*names: str) -> bool:
        return all(get(mixer, n) is not None for n in names)

    if has("in_proj_qkvz", "in_proj_ba", "fix_query_key_value_ordering", "A_log", "norm"):
        return QKVZ
    if has("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "A_log", "norm"):
        return QKV
    if has("forget_gate.A_log", "q_proj", "k_proj", "v_proj", "b_proj", "o_norm"):
        return KDA
    if has("q_proj", "k_proj", "v_proj", "a_proj", "b_proj", "A_log", "o_norm"):
        return SEPARATE
    if has("qkv_proj", "slope_rate", "norm", "output_gate", "act_fn"):
        return LIGHTNING
    return None


#: The gated delta nets (the delta rule with a scalar decay per head), by variant: the
#: projection of the output gate z and the gated norm and output projection after the scan.
GATED_DELTA: dict[str, tuple[str, str, str]] = {
    QKVZ: ("in_proj_qkvz", "norm", "out_proj"),
    QKV: ("in_proj_z", "norm", "out_proj"),
    SEPARATE: ("g_proj", "o_norm", "o_proj"),
}


#: The variants whose frozen recomputation (`archscope_hybrid.freeze`) scans the write sites.
FROZEN_WRITES = frozenset({*GATED_DELTA, KDA, LIGHTNING})


def delta_projections(
    variant: str, mixer: Any, projection: Callable[[str], Any], gate: bool = False
) -> tuple[Any, Any, Any, Any]:
    """(the mixed [q | k | v] before the causal convolution, the output gate z (None unless
    ``gate``), β's logits, the decay's input ``a``) of a mixer of ``variant`` (a key of
    `GATED_DELTA`, or KDA: no ``a``), from ``projection(name)``: the output of the mixer's
    projection ``name`` (kept by a hook, or computed; None where the mixer has none). The fused
    Qwen3-Next projections are split by the layer's own ``fix_query_key_value_ordering``."""
    import torch

    if variant == QKVZ:
        q, k, v, z, b, a = mixer.fix_query_key_value_ordering(
            projection("in_proj_qkvz"), projection("in_proj_ba")
        )
        mixed = torch.cat([x.reshape(x.shape[0], x.shape[1], -1) for x in (q, k, v)], dim=-1)
        return mixed, z.reshape(z.shape[0], z.shape[1], -1) if gate else None, b, a
    if variant == QKV:
        z = projection("in_proj_z") if gate else None
        return projection("in_proj_qkv"), z, projection("in_proj_b"), projection("in_proj_a")
    mixed = torch.cat([projection("q_proj"), projection("k_proj"), projection("v_proj")], dim=-1)
    z = projection("g_proj") if gate else None
    return mixed, z, projection("b_proj"), projection("a_proj")


def write_strength(variant: str, mixer: Any, logits: Any) -> Any:
    """β from its logits: the sigmoid, doubled where an OLMo-hybrid layer allows negative
    eigenvalues (``allow_neg_eigval``)."""
    beta = logits.float().sigmoid()
    if variant == SEPARATE and getattr(mixer, "allow_neg_eigval", False):
        beta = beta * 2.0
    return beta


def declare_layer_writes(
    table: SiteTable, layer: int, state_shape: tuple[int, ...], variant: str
) -> None:
    """Declare layer ``layer``'s write sites; ``state_shape`` is (heads, key_dim, value_dim)."""
    heads, key_dim, value_dim = state_shape
    matrix = ("batch", "seq", "heads", "key_dim", "value_dim")
    decay: tuple[tuple[str, ...], int] = (
        (("batch", "seq", "heads", "key_dim"), key_dim)
        if variant == KDA
        else (("batch", "seq", "heads"), heads)
    )
    shapes = {
        "state_write": (matrix, value_dim),
        "write_value": (("batch", "seq", "heads", "value_dim"), value_dim),
        "write_key": (("batch", "seq", "heads", "key_dim"), key_dim),
        "write_decay": decay,
        "ssm_states": (matrix, value_dim),
    }
    descriptions = dict(DESCRIPTIONS)
    if variant == LIGHTNING:
        descriptions.update(
            write_value="the value factor v_t of each position's state write",
            write_key="the key factor k_t of each position's state write",
            write_decay="the fixed decay exp(−slope) per head applied before each write",
            effective_attention=(
                "the layer's implicit attention A[t, s] = q_t·k_s·exp(−slope·(t−s)) per head, "
                "o_t = Σ_s A[t, s]·v_s before the norm and output gate (computed on request)"
            ),
        )
    declare_write_sites(table, layer, shapes, heads, descriptions)


@dataclass
class DeltaParts:
    """One layer's recurrence over a run, per value head: ``value`` (batch, seq, heads,
    value_dim), ``beta`` (batch, seq, heads), ``log_decay`` (batch, seq, heads) or (batch, seq,
    heads, key_dim); ``erase``: a delta rule (else decayed linear attention).

    ``raw_query``/``raw_key`` (batch, seq, key_heads, key_dim) are the query and key as the
    mixer hands them to its kernel; `query` and `key` (batch, seq, heads, key_dim) are them as
    the kernel uses them (L2-normalised when ``norm`` is ``"rsqrt"`` or ``"divide"``, the query
    scaled by 1/√key_dim, each key head serving its consecutive value heads), computed when
    first read: capturing the factors alone never normalises the queries."""

    raw_query: torch.Tensor
    raw_key: torch.Tensor
    value: torch.Tensor
    beta: torch.Tensor
    log_decay: torch.Tensor
    erase: bool = True
    norm: str | None = None
    scale_query: bool = True

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if self.norm is not None:
            x = _l2norm(x, self.norm == "divide")
        per = self.value.shape[2] // x.shape[2]
        return x.repeat_interleave(per, dim=2) if per > 1 else x

    @functools.cached_property
    def key(self) -> torch.Tensor:
        return self._heads(self.raw_key)

    @functools.cached_property
    def query(self) -> torch.Tensor:
        query = self._heads(self.raw_query)
        return query * query.shape[-1] ** -0.5 if self.scale_query else query

    @functools.cached_property
    def write_value(self) -> torch.Tensor:
        return self.beta[..., None] * self.value

    @staticmethod
    def write_of(value: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        return key[..., :, None] * value[..., None, :]

    def scan(self, write: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """States and read-outs of ``write`` carried by the run's transitions."""
        return delta_rule_scan(
            self.query, self.key, self.beta, self.log_decay, write, erase=self.erase
        )

    def states(self) -> torch.Tensor:
        """The run's own states after every position (computed in chunks)."""
        return delta_rule_states(self.key, self.value, self.beta, self.log_decay, erase=self.erase)

    def attention(self) -> torch.Tensor:
        if self.erase:
            return delta_rule_attention(self.query, self.key, self.beta, self.log_decay)
        return scalar_decay_attention(self.query, self.key, self.log_decay, self.beta)


# -- reading the scan inputs ---------------------------------------------------------------------
def _l2norm(x: torch.Tensor, divide: bool) -> torch.Tensor:
    """The kernels' L2 normalisation (KDA divides by the root, the others multiply by rsqrt)."""
    import torch

    total = (x * x).sum(dim=-1, keepdim=True) + 1e-6
    return x / torch.sqrt(total) if divide else x * torch.rsqrt(total)


#: The chunked kernels the gated delta nets hand their scan inputs to, by the name transformers
#: gives them in the module that defines the mixer (or on the mixer itself).
_KERNEL_NAMES: dict[str, tuple[str, ...]] = {
    QKVZ: ("chunk_gated_delta_rule", "torch_chunk_gated_delta_rule"),
    QKV: ("chunk_gated_delta_rule", "torch_chunk_gated_delta_rule"),
    SEPARATE: ("chunk_gated_delta_rule", "torch_chunk_gated_delta_rule"),
    KDA: ("chunk_kda", "chunk_kimi_delta_attention"),
}
#: The kernels' leading arguments, in the order of their common signature.
_KERNEL_ARGS = ("query", "key", "value", "g", "beta")


def kernel_of(mixer: Any, variant: str) -> Any:
    """The module whose forward is the chunked kernel ``mixer`` calls (an attribute of the
    mixer, or of the Python module defining its class, as transformers wraps its kernels in
    modules it can swap), or None: then the sites are recomputed from the projections."""
    import sys

    import torch

    homes = (mixer, sys.modules.get(type(mixer).__module__))
    for name in _KERNEL_NAMES.get(variant, ()):
        for home in homes:
            kernel = getattr(home, name, None)
            if isinstance(kernel, torch.nn.Module):
                return kernel
    return None


def _from_kernel(variant: str, call: dict[str, Any], seq: int) -> DeltaParts | None:
    """The scan inputs as the mixer handed them to its chunked kernel (the convolution, its
    activation, β and the decay computed once, by the model), or None when that call does not
    cover the whole run from a zero state (then they are recomputed from the projections)."""
    if any(call.get(name) is None for name in _KERNEL_ARGS):
        return None
    if call.get("initial_state") is not None or int(call["key"].shape[1]) != seq:
        return None
    norm = (
        ("divide" if variant == KDA else "rsqrt") if call.get("use_qk_l2norm_in_kernel") else None
    )
    return DeltaParts(
        call["query"],
        call["key"],
        call["value"].float(),
        call["beta"].float(),
        call["g"].float(),
        norm=norm,
    )


def convolved(mixer: Any, mixed: torch.Tensor, activation: bool = True) -> torch.Tensor:
    """The mixer's causal depthwise convolution and activation (or, without ``activation``,
    the convolution alone) of (batch, seq, channels)."""
    import torch.nn.functional as F
    from transformers.activations import ACT2FN

    conv = mixer.conv1d
    seq = mixed.shape[1]
    out = F.conv1d(
        mixed.transpose(1, 2).to(conv.weight.dtype),
        conv.weight,
        conv.bias,
        padding=int(conv.kernel_size[0]) - 1,
        groups=int(conv.groups),
    )[..., :seq]
    if not activation:
        return out.transpose(1, 2)
    return ACT2FN[mixer.activation](out).transpose(1, 2)  # type: ignore[no-any-return]


def _parts(variant: str, mixer: Any, kept: dict[str, Any], mask: Any) -> DeltaParts:
    """The scan inputs recomputed from the projections the mixer computed."""
    import torch
    import torch.nn.functional as F

    if variant == LIGHTNING:
        qkv = kept["act_fn"] if "act_fn" in kept else mixer.act_fn(kept["qkv_proj"])
        if mask is not None:
            qkv = qkv * mask[:, :, None].to(qkv.dtype)
        heads, dim = int(mixer.num_attention_heads), int(mixer.head_dim)
        b, t = qkv.shape[:2]
        q, k, v = torch.split(qkv.float().reshape(b, t, heads, 3 * dim), dim, dim=3)
        slope = mixer.slope_rate.float().reshape(1, 1, heads).expand(b, t, heads)
        return DeltaParts(q, k, v, torch.ones_like(slope), -slope, erase=False, scale_query=False)

    mixed, _, b_, a = delta_projections(variant, mixer, kept.get)
    mixed = convolved(mixer, mixed).float()
    batch, seq = mixed.shape[:2]
    if variant == KDA:
        heads = v_heads = int(mixer.num_heads)
        key_dim = value_dim = int(mixer.head_dim)
    else:
        heads, v_heads = int(mixer.num_k_heads), int(mixer.num_v_heads)
        key_dim, value_dim = int(mixer.head_k_dim), int(mixer.head_v_dim)
    q, k, v = torch.split(mixed, [heads * key_dim, heads * key_dim, v_heads * value_dim], -1)
    q = q.reshape(batch, seq, heads, key_dim)
    k = k.reshape(batch, seq, heads, key_dim)
    v = v.reshape(batch, seq, v_heads, value_dim)
    beta = write_strength(variant, mixer, b_)
    if variant == KDA:
        g = kept["forget_gate"].float()
    else:
        g = -mixer.A_log.float().exp() * F.softplus(a.float() + mixer.dt_bias.float())
    return DeltaParts(q, k, v, beta, g, norm="divide" if variant == KDA else "rsqrt")


# -- hooks --------------------------------------------------------------------------------------
@dataclass
class _LayerRun:
    """What the hooks of one layer saw during one run."""

    kept: dict[str, Any] = field(default_factory=dict)
    mask: Any = None
    delta_state: Any = None  # the edits' effect on the state after the last position
    handles: list[Any] = field(default_factory=list)
    call: dict[str, Any] | None = None  # the arguments of the mixer's chunked kernel
    active: bool = False  # the mixer is running (its kernel's calls are this layer's)
    seq: int = -1  # the length of the mixer's input
    use_kernel: bool = True  # read the scan inputs from the kernel's arguments where possible


_EXTRA = "hybrid_write_layers"
#: Read the scan inputs from the arguments of the mixer's chunked kernel where it calls one
#: through a module (False: always recompute them from the projections, as a check).
READ_KERNEL_ARGUMENTS = True


def layer_runs(run: RunRequest) -> dict[int, _LayerRun]:
    """What the write hooks of ``run`` saw per layer (empty when it has no write sites)."""
    return run.extra.get(_EXTRA, {})  # type: ignore[no-any-return]


def _written_layers(
    backend: Any, run: RunRequest, seen: dict[int, _LayerRun]
) -> Iterator[tuple[int, set[str], Any, str | None]]:
    """(index, roles, mixer, variant) of each layer whose write sites ``run`` captures or
    edits, in layer order; ``seen`` (filled by the caller) is what `layer_runs` reports."""
    run.extra[_EXTRA] = seen
    for index, roles in sorted(write_sites_of([*run.capture, *run.edits]).items()):
        layer = backend.layers[index]
        mixer = layer.block.get_submodule(layer.mixer)
        yield index, roles, mixer, variant_of(mixer)


@contextlib.contextmanager
def write_hooks(backend: Any, run: RunRequest) -> Iterator[dict[int, _LayerRun]]:
    """Hooks on the mixers of the layers whose write sites ``run`` captures or edits, for the
    forward pass (all removed on exit). Captures go to ``run.store``; edits are carried through
    the rest of the recurrence."""
    seen: dict[int, _LayerRun] = {}
    try:
        for index, roles, mixer, variant in _written_layers(backend, run, seen):
            if variant is None:  # never declared for such mixers
                raise BackendError(f"layer {index} has no write sites ({type(mixer).__name__})")
            seen[index] = state = _LayerRun(use_kernel=READ_KERNEL_ARGUMENTS)
            writes = _LayerWrites(backend, run, index, roles, state)
            _attach(mixer, variant, writes, state)
        yield seen
    finally:
        for state in seen.values():
            for handle in state.handles:
                handle.remove()
            state.handles.clear()


@contextlib.contextmanager
def frozen_write_sites(
    backend: Any, run: RunRequest, layers: dict[int, _LayerWrites]
) -> Iterator[dict[int, _LayerRun]]:
    """The write sites of ``run`` on a frozen model (`archscope_hybrid.freeze`): no hooks; each
    layer's `_LayerWrites` is put in ``layers`` (emptied on exit) for the frozen recomputation
    of its gated delta net, which scans the ``state_write`` site's value (`_LayerWrites.scan`),
    so that captures and edits of the write sites act on the frozen recurrence itself."""
    seen: dict[int, _LayerRun] = {}
    try:
        for index, roles, mixer, variant in _written_layers(backend, run, seen):
            if variant not in FROZEN_WRITES:
                raise BackendError(
                    f"layer {index} ({type(mixer).__name__}): write sites in a frozen run are "
                    "computed for gated delta nets, KDA and lightning attention only"
                )
            seen[index] = state = _LayerRun()
            layers[index] = _LayerWrites(backend, run, index, roles, state)
        yield seen
    finally:
        layers.clear()


class _LayerWrites:
    """The write sites of one layer in one run: captures and edits."""

    def __init__(
        self, backend: Any, run: RunRequest, index: int, roles: set[str], seen: _LayerRun
    ) -> None:
        self.run, self.seen = run, seen
        self.prefix = f"layer_{index}."
        self.edits = {role: run.edits.get(self.prefix + role, []) for role in WRITABLE_ROLES}
        self.edited = any(self.edits.values())
        self.capture = {role for role in roles if self.prefix + role in run.capture}
        self.infos = {role: backend.table.info(self.prefix + role) for role in WRITE_ROLES}

    def store(self, role: str, value: torch.Tensor) -> None:
        self.run.store[self.prefix + role] = value if self.run.grad else value.detach()

    def site_value(self, role: str, value: torch.Tensor) -> torch.Tensor:
        """``value`` of ``role`` with the run's edits (captured after them)."""
        for edit in self.edits.get(role, []):
            value = apply_edit(value, edit, self.infos[role], self.run.attention_mask)
        if role in self.capture:
            self.store(role, value)
        return value

    def scan(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        beta: torch.Tensor,
        log_decay: torch.Tensor,
        value: torch.Tensor,
        erase: bool = True,
    ) -> torch.Tensor:
        """The read-outs (batch, seq, heads, value_dim) of a frozen run's recurrence over the
        write as the sites give it: ``k_t ⊗ β_t v_t`` after the run's edits of
        ``write_value``, ``write_key`` and ``state_write``, captured where the run asks. The
        transitions (decay; with ``erase``, the erase along the held keys) are the held ones.
        ``query`` and ``key`` as the scan uses them (normalised, scaled), (batch, seq, heads,
        key_dim); ``log_decay`` (batch, seq, heads) or, per key channel, (batch, seq, heads,
        key_dim); ``value``: the live values."""
        held = DeltaParts(query, key, value, beta, log_decay, erase=erase, scale_query=False)
        strength = self.site_value("write_value", held.write_value)
        written = self.site_value("write_key", key)
        if "write_decay" in self.capture:
            self.store("write_decay", log_decay.exp())
        if "effective_attention" in self.capture:
            self.store("effective_attention", held.attention())
        write = self.site_value("state_write", DeltaParts.write_of(strength, written))
        states, read = held.scan(write)
        if "ssm_states" in self.capture:
            self.store("ssm_states", states)
        if self.edited and self.prefix + "ssm_state" in self.run.capture:
            # the final state (read from the model's cache) gets the edits' effect, as in an
            # unfrozen run: one more scan, only when it is asked for
            delta, _ = held.scan(write - DeltaParts.write_of(held.write_value, key))
            self.seen.delta_state = delta[:, -1]
        return read

    def effect(self, parts: DeltaParts) -> torch.Tensor | None:
        """Record the captures; the change of the read-out that the edits make (or None)."""
        value = self.site_value("write_value", parts.write_value)
        key = self.site_value("write_key", parts.key)
        if "write_decay" in self.capture:
            self.store("write_decay", parts.log_decay.exp())
        if "effective_attention" in self.capture:
            self.store("effective_attention", parts.attention())
        if not (self.edited or {"state_write", "ssm_states"} & self.capture):
            return None  # the factors alone: the (larger) write is not materialised
        change = delta_states = None
        if self.edited or "state_write" in self.capture:
            write = self.site_value("state_write", DeltaParts.write_of(value, key))
            if self.edited:
                own = DeltaParts.write_of(parts.write_value, parts.key)
                delta_states, change = parts.scan(write - own)
                self.seen.delta_state = delta_states[:, -1]
        if "ssm_states" in self.capture:
            states = parts.states()
            self.store("ssm_states", states if delta_states is None else states + delta_states)
        return change


def _scan_inputs(variant: str, mixer: Any, seen: _LayerRun) -> DeltaParts:
    """The scan inputs of the layer's run: its kernel's arguments, else recomputed."""
    parts = None if seen.call is None else _from_kernel(variant, seen.call, seen.seq)
    seen.call = None
    if parts is not None:
        return parts
    missing = [n for n in _KEEP[variant] if n not in seen.kept]
    if missing:
        raise BackendError(
            f"{type(mixer).__name__}: the write sites need the outputs of "
            f"{list(_KEEP[variant])}, but only {sorted(seen.kept)} ran before its norm"
        )
    return _parts(variant, mixer, seen.kept, seen.mask)


def _attach(mixer: Any, variant: str, writes: _LayerWrites, seen: _LayerRun) -> None:
    """Keep what the mixer computes: the arguments of its chunked kernel where it calls one
    through a module (`kernel_of`), else its projections' outputs (and the padding mask); at
    its norm, compute the sites and add the edits' effect to the read-out."""
    import torch

    def keep_mask(_m: Any, args: Any, kwargs: Any) -> None:
        mask = kwargs.get("attention_mask", args[2] if len(args) > 2 else None)
        seen.mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        hidden = args[0] if args else kwargs.get("hidden_states")
        seen.seq = int(hidden.shape[1]) if isinstance(hidden, torch.Tensor) else -1
        seen.kept.clear()
        seen.call = None
        seen.active = True

    def keep(name: str) -> Callable[..., None]:
        def hook(_m: Any, _a: Any, out: Any) -> None:
            seen.kept[name] = out

        return hook

    def tap(_m: Any, args: Any, kwargs: Any, _out: Any) -> None:
        if seen.active and seen.call is None:  # the kernel module is shared by the layers
            seen.call = {**dict(zip(_KERNEL_ARGS, args, strict=False)), **kwargs}

    def inject(_m: Any, args: Any) -> Any:
        seen.active = False
        change = writes.effect(_scan_inputs(variant, mixer, seen))
        if change is None:
            return None
        read = args[0]
        return (read + change.reshape(read.shape).to(read.dtype), *args[1:])

    seen.handles.append(mixer.register_forward_pre_hook(keep_mask, with_kwargs=True))
    kernel = kernel_of(mixer, variant) if seen.use_kernel else None
    if kernel is not None:
        seen.handles.append(kernel.register_forward_hook(tap, with_kwargs=True))
    for name in _KEEP[variant]:
        seen.handles.append(mixer.get_submodule(name).register_forward_hook(keep(name)))
    act = getattr(mixer, "act_fn", None)
    if variant == LIGHTNING and isinstance(act, torch.nn.Module):  # its output is q, k, v
        seen.handles.append(act.register_forward_hook(keep("act_fn")))
    norm = mixer.get_submodule(_NORM[variant])
    seen.handles.append(norm.register_forward_pre_hook(inject))
