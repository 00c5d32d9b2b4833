"""State writes and effective attention of the Hugging Face mLSTM (xLSTM) and RWKV-4 mixers.

**mLSTM.** Per head, with the forget and input gate pre-activations ``f_t``, ``i_t``, the scaled
query ``q̃_t = q_t / √d_qk`` and the stabiliser ``m_t``, the model keeps (as its cache stores
them, ``C`` of shape d_qk × d_v):

    C_t = decay_t · C_{t-1} + W_t,    W_t = k_t ⊗ (g_t · v_t),
    n_t = decay_t · n_{t-1} + g_t · k_t,
    h_t = q̃_t · C_t / (max(|q̃_t · n_t|, exp(-m_t)) + eps)

with ``decay_t = exp(logσ(f_t) + m_{t-1} - m_t)``, the input gate ``g_t = exp(i_t - m_t)`` and
``m_t = max(logσ(f_t) + m_{t-1}, i_t)``. The gate is folded into the write's value factor (as
Mamba folds Δ into its value): ``write_value = g_t · v_t``, ``write_key = k_t``. Unrolled,
``h_t = Σ_s A[t, s] · v_s`` (+ the initial state's term when the run continues from one) with

    A[t, s] = (q̃_t · k_s) · exp(F_t - F_s + i_s - m_t) / den_t,    F_t = Σ_{r<=t} logσ(f_r)

and ``den_t`` the denominator above: the layer's effective attention, exact, per head. Its rows
sum to ``q̃_t·n_t / den_t``: ±1 when ``|q̃_t · n_t| >= exp(-m_t)`` (the usual case, up to eps),
less otherwise; a row is negative where ``q̃_t · n_t`` is. ``h`` then goes through the layer's
per-head norm, the output gate and ``out_proj`` (``mixer = out_proj(σ(o_t) ⊙ norm(h_t))``),
which effective attention leaves out, as it leaves out softmax attention's output projection.

An edit of a write (value, key or the whole write) changes ``C`` only: the edited write minus
the run's own write is scanned with the run's decays and read with the run's queries and the
run's denominators, and added to ``h`` (and to the final ``C`` the cache keeps). The normaliser
``n`` and the stabiliser ``m`` stay the run's own, so that the edit's effect is linear in it and
an edit that gives a write its own value changes nothing.

**RWKV-4.** The WKV recurrence keeps per channel a numerator and a denominator (scalars, with a
running maximum for stability), not a matrix: there is no outer-product write, so no write
sites. Its output is a softmax over past positions per channel, ``wkv_t = Σ_s A_c[t, s] v_s``
with ``A_c[t, s] ∝ exp(k_s - (t-1-s)·w)`` for s < t and ``exp(u + k_t)`` for s = t (w =
exp(time_decay), u = time_first; the initial state, when given, is one more term); the mixer
output is ``output(σ(r_t) ⊙ wkv_t)``. The effective attention site averages the per-channel
matrices over `EFFECTIVE_ATTENTION_GROUPS` equal groups of channels (rows still sum to 1).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from archscope.backends import BackendError
from archscope.engine import RunContext, SiteTable, apply_edit
from archscope.recurrence import (
    WRITABLE_ROLES,
    WRITE_ROLES,
    declare_write_sites,
    delta_rule_states,
    write_sites_of,
)

if TYPE_CHECKING:
    import torch

__all__ = [
    "EFFECTIVE_ATTENTION_GROUPS",
    "MLSTMParts",
    "declare_mlstm_sites",
    "declare_rwkv_sites",
    "head_decay_scan",
    "mlstm_hooks",
    "rwkv_hooks",
    "wkv_attention",
]

#: RWKV-4 has no heads: its effective attention averages channels in this many equal groups (or
#: the greatest common divisor with the attention size).
EFFECTIVE_ATTENTION_GROUPS = 8

MLSTM_DESCRIPTIONS: dict[str, str] = {
    "state_write": "each position's write into the mLSTM memory C: k_t ⊗ (exp(i_t - m_t)·v_t)",
    "write_value": "the value factor of each write: the value gated by exp(i_t - m_t)",
    "write_key": "the key factor of each write (the layer's key k_t)",
    "write_decay": "the forget gate applied to C before each write: exp(logσ(f_t) + m_{t-1} - m_t)",
    "ssm_states": "the mLSTM memory C after every position (computed on request)",
    "effective_attention": (
        "the mLSTM's implicit attention A[t, s] = q̃_t·k_s·exp(F_t - F_s + i_s - m_t)/den_t per "
        "head, so that the cell output h_t = Σ_s A[t, s]·v_s (computed on request)"
    ),
}
RWKV_DESCRIPTION = (
    "the WKV recurrence's implicit attention (a softmax over past positions per channel), "
    "averaged over equal groups of channels, so that wkv_t = Σ_s A[t, s]·v_s per channel "
    "(computed on request)"
)


def _groups(channels: int) -> int:
    return math.gcd(channels, EFFECTIVE_ATTENTION_GROUPS)


# -- mLSTM ---------------------------------------------------------------------------------------
@dataclass
class MLSTMParts:
    """One mLSTM call, in the kernel's layout: ``query``/``key`` (batch, heads, seq, d_qk),
    ``value`` (batch, heads, seq, d_v), ``igate``/``fgate`` pre-activations (batch, heads, seq);
    the initial ``(C, n, m)`` (None: zeros, as the model starts)."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    igate: torch.Tensor
    fgate: torch.Tensor
    c0: torch.Tensor | None = None
    n0: torch.Tensor | None = None
    m0: torch.Tensor | None = None
    eps: float = 1e-6

    def __post_init__(self) -> None:
        import torch
        import torch.nn.functional as F

        b, h, _, _ = self.key.shape
        log_f = F.logsigmoid(self.fgate.float())
        self.cum = torch.cumsum(log_f, dim=-1)  # F_t
        m0 = (
            self.key.new_zeros((b, h), dtype=torch.float32)
            if self.m0 is None
            else self.m0.float()[..., 0]
        )
        self.initial_log = self.cum + m0[..., None]  # log weight of the initial state at t
        #: the stabiliser m_t (the model's running max, in closed form): m_t = max(F_t + m_0,
        #: max_{s<=t} F_t - F_s + i_s), the inner max a running max over positions
        best = torch.cummax(self.igate.float() - self.cum, dim=-1).values
        self.m = torch.maximum(self.cum + best, self.initial_log)
        self.previous_m = torch.cat([m0[..., None], self.m[..., :-1]], dim=-1)
        self.log_f = log_f
        self.scale = float(self.key.shape[-1]) ** -0.5

    @functools.cached_property
    def log_weights(self) -> torch.Tensor:
        """F_t - F_s + i_s for s <= t, else -inf (batch, heads, seq, seq): only effective
        attention and the read of an edit need it."""
        import torch

        t = self.cum.shape[-1]
        causal = torch.ones(t, t, dtype=torch.bool, device=self.key.device).tril()
        gap = self.cum[..., :, None] - self.cum[..., None, :] + self.igate.float()[..., None, :]
        return gap.masked_fill(~causal, -math.inf)

    @property
    def q_scaled(self) -> torch.Tensor:
        return cast("torch.Tensor", self.query.float() * self.scale)

    def initial_weight(self) -> torch.Tensor:
        """exp(F_t + m_0 - m_t): how much of the initial state reaches t (batch, heads, seq)."""
        import torch

        return torch.exp(self.initial_log - self.m)

    def denominator(self) -> torch.Tensor:
        """The run's denominator max(|q̃_t·n_t|, exp(-m_t)) + eps, (batch, heads, seq)."""
        import torch

        weights = torch.exp(self.log_weights - self.m[..., None])
        scores = torch.einsum("bhtd,bhsd->bhts", self.q_scaled, self.key.float())
        qn = (scores * weights).sum(-1)
        if self.n0 is not None:
            qn = qn + self.initial_weight() * torch.einsum(
                "bhtd,bhd->bht", self.q_scaled, self.n0.float()
            )
        return torch.maximum(qn.abs(), torch.exp(-self.m)) + self.eps

    def attention(self) -> torch.Tensor:
        """A[t, s] (batch, heads, seq, seq): ``h_t = Σ_s A[t, s] v_s`` + `initial_term`."""
        import torch

        weights = torch.exp(self.log_weights - self.m[..., None])
        scores = torch.einsum("bhtd,bhsd->bhts", self.q_scaled, self.key.float())
        return scores * weights / self.denominator()[..., None]

    def initial_term(self) -> torch.Tensor | None:
        """The initial memory's share of h (batch, heads, seq, d_v), None without one."""
        import torch

        if self.c0 is None:
            return None
        read = torch.einsum("bhtd,bhdv->bhtv", self.q_scaled, self.c0.float())
        return read * (self.initial_weight() / self.denominator())[..., None]

    # site layout: (batch, seq, heads, ...)
    def log_decay(self) -> torch.Tensor:
        """logσ(f_t) + m_{t-1} - m_t (<= 0), (batch, seq, heads)."""
        return (self.log_f + self.previous_m - self.m).transpose(1, 2)

    def decay(self) -> torch.Tensor:
        """exp(logσ(f_t) + m_{t-1} - m_t), (batch, seq, heads)."""
        import torch

        return torch.exp(self.log_decay())

    def gated_value(self) -> torch.Tensor:
        """exp(i_t - m_t)·v_t, (batch, seq, heads, d_v)."""
        import torch

        gate = torch.exp(self.igate.float() - self.m)
        return (gate[..., None] * self.value.float()).transpose(1, 2)

    def site_key(self) -> torch.Tensor:
        return self.key.float().transpose(1, 2)

    @staticmethod
    def write_of(key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """k ⊗ v: (batch, seq, heads, d_qk, d_v), the orientation of the model's C."""
        return key[..., :, None] * value[..., None, :]

    def read(self, states: torch.Tensor) -> torch.Tensor:
        """q̃_t · S_t / den_t for per-position states (batch, seq, heads, d_qk, d_v) → the
        kernel layout (batch, heads, seq, d_v)."""
        import torch

        read = torch.einsum("bhtd,bthdv->bhtv", self.q_scaled, states)
        return read / self.denominator()[..., None]


def head_decay_scan(
    log_decay: torch.Tensor,
    write: torch.Tensor,
    initial: torch.Tensor | None = None,
    chunk: int = 16,
) -> torch.Tensor:
    """`archscope.recurrence.linear_scan` for one decay per head, ``S_t = exp(log_decay_t) ·
    S_{t-1} + write_t``, a chunk of positions at a time: inside a chunk every state is a
    weighted sum of the chunk's writes and the state before it (weights exp of differences of
    cumulative log decays, at most 1 for log decays <= 0). ``log_decay`` (batch, seq, heads),
    ``write`` (batch, seq, heads, ...); returns the states in ``write``'s shape."""
    import torch

    batch, seq, heads = log_decay.shape
    extra = write.shape[3:]
    flat = write.reshape(batch, seq, heads, -1)
    state = (
        flat.new_zeros((batch, heads, flat.shape[-1]))
        if initial is None
        else initial.to(flat.dtype).reshape(batch, heads, -1)
    )
    out = []
    for start in range(0, seq, chunk):
        cum = torch.cumsum(log_decay[:, start : start + chunk].float(), dim=1)  # (b, l, h)
        n = cum.shape[1]
        future = torch.ones(n, n, dtype=torch.bool, device=cum.device).triu(1)
        gap = (cum[:, :, None, :] - cum[:, None, :, :]).masked_fill(
            future[None, :, :, None], -math.inf
        )
        weights = torch.exp(gap)  # (b, t, s, h)
        states = torch.einsum("btsh,bshd->bthd", weights.to(flat.dtype), flat[:, start : start + n])
        states = states + torch.exp(cum).to(flat.dtype)[..., None] * state[:, None]
        out.append(states)
        state = states[:, -1]
    return torch.cat(out, dim=1).reshape(batch, seq, heads, *extra)


def declare_mlstm_sites(table: SiteTable, layer: int, heads: int, d_qk: int, d_v: int) -> None:
    """The mLSTM write sites of layer ``layer`` (through the public contract)."""
    state = ("batch", "seq", "heads", "d_qk", "d_v")
    declare_write_sites(
        table,
        layer,
        {
            "state_write": (state, d_v),
            "write_value": (("batch", "seq", "heads", "d_v"), d_v),
            "write_key": (("batch", "seq", "heads", "d_qk"), d_qk),
            "write_decay": (("batch", "seq", "heads"), heads),
            "ssm_states": (state, d_v),
        },
        heads,
        MLSTM_DESCRIPTIONS,
    )


@dataclass
class _Seen:
    calls: int = 0


class _MLSTMLayer:
    """The write sites of one mLSTM layer in one run: captures and edits."""

    def __init__(self, backend: Any, ctx: RunContext, index: int, eps: float) -> None:
        self.ctx, self.eps = ctx, eps
        self.prefix = f"layer_{index}."
        self.edits = {role: ctx.edits.get(self.prefix + role, []) for role in WRITABLE_ROLES}
        self.edited = any(self.edits.values())
        self.capture = {role for role in WRITE_ROLES if self.prefix + role in ctx.capture}
        self.infos = {role: backend.table.info(self.prefix + role) for role in WRITE_ROLES}

    def store(self, role: str, value: torch.Tensor) -> None:
        self.ctx.store[self.prefix + role] = value if self.ctx.grad else value.detach()

    def site_value(self, role: str, value: torch.Tensor) -> torch.Tensor:
        todo = self.edits.get(role, [])
        for edit in todo:
            value = apply_edit(value, edit, self.infos[role], self.ctx.attention_mask)
        if role in self.capture:
            self.store(role, value)
        return value

    def __call__(self, kwargs: dict[str, Any], output: Any) -> Any:
        h, state = (output[0], output[1]) if isinstance(output, tuple) else (output, None)
        parts = MLSTMParts(
            query=kwargs["query"],
            key=kwargs["key"],
            value=kwargs["value"],
            igate=kwargs["igate"],
            fgate=kwargs["fgate"],
            c0=kwargs.get("c_initial"),
            n0=kwargs.get("n_initial"),
            m0=kwargs.get("m_initial"),
            eps=self.eps,
        )
        if "write_decay" in self.capture:
            self.store("write_decay", parts.decay())
        if "effective_attention" in self.capture:
            self.store("effective_attention", parts.attention())
        value = self.site_value("write_value", parts.gated_value())
        key = self.site_value("write_key", parts.site_key())
        if not (self.edited or {"state_write", "ssm_states"} & self.capture):
            return None
        write = None
        if self.edited or "state_write" in self.capture:
            write = self.site_value("state_write", MLSTMParts.write_of(key, value))
        if "ssm_states" in self.capture:
            if write is not None and self.edits["state_write"]:  # a write of any rank
                states = head_decay_scan(parts.log_decay(), write, parts.c0)
            else:  # k ⊗ v: the chunked scan of the factors, no write materialised
                ones = value.new_ones(value.shape[:3])
                states = delta_rule_states(
                    key, value, ones, parts.log_decay(), erase=False, initial=parts.c0
                )
            self.store("ssm_states", states)
        if not self.edited or write is None:
            return None
        delta = write - MLSTMParts.write_of(parts.site_key(), parts.gated_value())
        delta_states = head_decay_scan(parts.log_decay(), delta)
        h = h + parts.read(delta_states).to(h.dtype)
        if state is None:
            return h
        c, *rest = state
        return h, (c + delta_states[:, -1].to(c.dtype), *rest)


@contextlib.contextmanager
def mlstm_hooks(backend: Any, ctx: RunContext, mixers: list[Any]) -> Iterator[None]:
    """Forward hooks on the mLSTM kernels (``mixers[i].mlstm_backend``) of the layers whose
    write sites ``ctx`` captures or edits; all removed on exit."""
    wanted = write_sites_of([*ctx.capture, *ctx.edits])
    handles = []
    try:
        for index in sorted(wanted):
            kernel = mixers[index].mlstm_backend
            layer = _MLSTMLayer(backend, ctx, index, float(mixers[index].config.eps))
            seen = _Seen()

            def hook(
                _m: Any,
                _args: Any,
                kwargs: dict[str, Any],
                output: Any,
                layer: _MLSTMLayer = layer,
                seen: _Seen = seen,
                index: int = index,
            ) -> Any:
                seen.calls += 1
                if seen.calls > 1:
                    raise BackendError(
                        f"xlstm: layer {index}'s mLSTM ran more than once in one forward pass "
                        "(a sequence longer than config.max_inference_chunksize is run in "
                        "pieces); the write sites need one call: run shorter sequences or raise "
                        "max_inference_chunksize"
                    )
                return layer(kwargs, output)

            handles.append(kernel.register_forward_hook(hook, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


# -- RWKV-4 --------------------------------------------------------------------------------------
def wkv_attention(
    key: torch.Tensor,
    time_decay: torch.Tensor,
    time_first: torch.Tensor,
    initial: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-channel WKV attention: ``key`` (batch, seq, channels), the layer's ``time_decay`` and
    ``time_first`` (channels,), optionally the initial (numerator, denominator, maximum) state
    (batch, channels each). Returns ``A`` (batch, channels, seq, seq) and, with an initial
    state, the weight of its ``numerator / denominator`` (batch, channels, seq), so that
    ``wkv_t = Σ_s A[t, s] v_s + weight_t · num_0 / den_0`` per channel."""
    import torch

    seq = key.shape[1]
    k = key.float().transpose(1, 2)  # (b, c, s)
    w = torch.exp(time_decay.float())[None, :, None, None]  # (1, c, 1, 1)
    t_idx = torch.arange(seq, device=key.device)
    steps = (t_idx[:, None] - 1 - t_idx[None, :]).float()  # t - 1 - s
    # s < t: k_s - (t-1-s)·w; s = t: u + k_t (= k_t - (-1)·w + (u - w)); s > t: -inf
    eye = torch.eye(seq, device=key.device)
    future = torch.ones(seq, seq, dtype=torch.bool, device=key.device).triu(1)
    fixed = eye * (time_first.float() - w[0, :, 0, 0])[:, None, None]  # (c, t, s)
    fixed = fixed.masked_fill(future, -math.inf)
    logits = k[:, :, None, :] - steps * w + fixed
    if initial is None:
        return torch.softmax(logits, dim=-1), None
    _num, den, top = (x.float() for x in initial)
    # the initial state enters step t decayed t times: exp(max0 - t·w) (·num0, ·den0)
    init_log = top[:, :, None] - t_idx.float() * w[..., 0] + torch.log(den)[:, :, None]
    both = torch.cat([logits, init_log[..., None]], dim=-1)
    weights = torch.softmax(both, dim=-1)
    return weights[..., :-1], weights[..., -1]


def _grouped_wkv_attention(
    key: torch.Tensor,
    time_decay: torch.Tensor,
    time_first: torch.Tensor,
    initial: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
) -> torch.Tensor:
    """`wkv_attention` averaged over equal groups of channels, one group at a time (memory:
    one group's per-channel matrices, not every channel's)."""
    import torch

    channels = key.shape[-1]
    groups = _groups(channels)
    size = channels // groups
    means = []
    for g in range(groups):
        part = slice(g * size, (g + 1) * size)
        start = None if initial is None else tuple(x[:, part] for x in initial)
        per_channel, _ = wkv_attention(
            key[..., part],
            time_decay[part],
            time_first[part],
            start,  # type: ignore[arg-type]
        )
        means.append(per_channel.mean(1))
    return torch.stack(means, dim=1)


def declare_rwkv_sites(table: SiteTable, layer: int, channels: int) -> None:
    """RWKV-4's effective attention site for layer ``layer`` (no write sites: see the module)."""
    declare_write_sites(
        table, layer, {}, _groups(channels), {"effective_attention": RWKV_DESCRIPTION}
    )


@contextlib.contextmanager
def rwkv_hooks(ctx: RunContext, mixers: list[Any]) -> Iterator[None]:
    """Hooks on the time-mix modules of the layers whose effective attention ``ctx`` captures:
    the initial WKV state at the call, the keys from ``key``; the site is stored when the
    module returns. All removed on exit."""
    wanted = write_sites_of(ctx.capture)
    handles = []
    try:
        for index in sorted(wanted):
            mixer = mixers[index]
            seen: dict[str, Any] = {}

            def before(
                module: Any, args: Any, kwargs: dict[str, Any], seen: dict[str, Any] = seen
            ) -> None:
                state = kwargs.get("state", args[1] if len(args) > 1 else None)
                layer = module.layer_id
                seen["initial"] = (
                    None
                    if state is None
                    else tuple(s[:, :, layer].detach().clone() for s in state[2:5])
                )

            def keys(_m: Any, _a: Any, out: torch.Tensor, seen: dict[str, Any] = seen) -> None:
                seen["key"] = out

            def after(
                module: Any,
                _a: Any,
                _k: Any,
                _out: Any,
                seen: dict[str, Any] = seen,
                index: int = index,
            ) -> None:
                initial = seen["initial"]
                if initial is not None and bool((initial[2] <= -1e30).all()):
                    initial = None  # the model's own empty starting state
                value = _grouped_wkv_attention(
                    seen["key"], module.time_decay, module.time_first, initial
                )
                ctx.store[f"layer_{index}.effective_attention"] = (
                    value if ctx.grad else value.detach()
                )

            handles += [
                mixer.register_forward_pre_hook(before, with_kwargs=True),
                mixer.key.register_forward_hook(keys),
                mixer.register_forward_hook(after, with_kwargs=True),
            ]
        yield
    finally:
        for handle in handles:
            handle.remove()
