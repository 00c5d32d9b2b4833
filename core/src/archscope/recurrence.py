"""The public contract for layers that are linear recurrences with per-token state writes.

Many sequence mixers keep a matrix-valued state that, given the run's input-dependent
parameters, evolves linearly: per head (or channel) ``h``

    S_t = transition_t(S_{t-1}) + W_t,    W_t = v_t ⊗ k_t,    y_t = read_t(S_t)

(a selective SSM decays every entry, a gated delta net also erases along ``k_t``, an mLSTM
gates by its forget gate). This module names the sites such a layer exposes and gives the
pieces every backend needs to declare and compute them; it knows no architecture.

| role | value | writable |
|---|---|---|
| ``state_write`` | each position's write ``W_t`` (value ⊗ key, gates folded in) | yes |
| ``write_value`` | the write's value factor | yes |
| ``write_key`` | the write's key factor | yes |
| ``write_decay`` | the decay (or gate) applied to the state before the write | no |
| ``ssm_states`` | the state after every position (on request) | no |
| ``effective_attention`` | ``A[t, s]``: how much position s's input reaches output t, per head, so that the mixer's output is ``Σ_s A[t, s] · value_s`` plus the layer's documented skip terms (on request) | no |

A backend declares them with `declare_write_sites` (sites without a hookpoint: the backend
computes them while the layer runs and applies their edits itself, see docs/architecture.md),
and finds which a run asks for with `write_sites_of`. An edit of a write is carried through the
rest of the recurrence: the edited write minus the run's own write is scanned with the run's
transitions and read with the run's read-out, which, the recurrence being linear given its
parameters, is exactly the run with the edited write.

For a scalar decay per head (or channel), `linear_scan` and `scalar_decay_attention`; for the
(gated) delta rule ``S_t = (I − β_t k_t k_tᵀ) diag(α_t) S_{t-1} + W_t`` (gated delta nets, KDA),
whose transition also erases along the key, `delta_rule_scan`, `delta_rule_states` and
`delta_rule_attention`. `given_states` and `feed_tokens` are what continuing a model from a
state one token at a time needs, whatever its architecture.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

from .errors import ParameterError, SiteError
from .hookpoints import SiteTable

if TYPE_CHECKING:
    import torch

__all__ = [
    "WRITABLE_ROLES",
    "WRITE_ROLES",
    "decayed_scores",
    "declare_write_sites",
    "delta_rule_attention",
    "delta_rule_scan",
    "delta_rule_states",
    "feed_tokens",
    "given_states",
    "linear_scan",
    "scalar_decay_attention",
    "unroll_square",
    "write_sites_of",
]

#: Roles of the write sites, with their descriptions.
WRITE_ROLES: dict[str, str] = {
    "state_write": "each position's write into the recurrent state (value ⊗ key)",
    "write_value": "the value factor of each position's state write",
    "write_key": "the key factor of each position's state write",
    "write_decay": "the decay (or gate) applied to the state before each position's write",
    "ssm_states": "the recurrent state after every position (computed on request)",
    "effective_attention": (
        "the layer's implicit attention A[t, s] per head, so that its output is "
        "Σ_s A[t, s]·value_s plus documented skip terms (computed on request)"
    ),
}
#: Roles whose edits the recurrence carries.
WRITABLE_ROLES = ("write_value", "write_key", "state_write")


def declare_write_sites(
    table: SiteTable,
    layer: int,
    shapes: Mapping[str, tuple[tuple[str, ...], int]],
    heads: int,
    descriptions: Mapping[str, str] | None = None,
) -> None:
    """Add layer ``layer``'s write sites to ``table``: ``shapes`` maps each role it has (a key of
    `WRITE_ROLES`, ``effective_attention`` aside) to (axis names, feature size); the
    ``effective_attention`` site (batch, heads, seq, key) with ``heads`` heads is always added.
    ``descriptions`` overrides the default description of a role (say what the factors are in
    this architecture)."""
    unknown = set(shapes) - (set(WRITE_ROLES) - {"effective_attention"})
    if unknown:
        raise SiteError(
            f"unknown write role(s) {sorted(unknown)}; valid: "
            f"{sorted(set(WRITE_ROLES) - {'effective_attention'})}"
        )
    text = {**WRITE_ROLES, **(descriptions or {})}
    for role, (shape, dim) in shapes.items():
        table.add(
            f"layer_{layer}.{role}",
            None,
            dim,
            kind="token",
            shape=shape,
            writable=role in WRITABLE_ROLES,
            description=text[role],
        )
    table.add(
        f"layer_{layer}.effective_attention",
        None,
        heads,
        kind="token",
        shape=("batch", "heads", "seq", "key"),
        writable=False,
        description=text["effective_attention"],
    )


def write_sites_of(names: Iterable[Any]) -> dict[int, set[str]]:
    """Layer → roles of the write sites among site ``names`` (canonical)."""
    out: dict[int, set[str]] = {}
    for name in names:
        head, _, role = str(name).partition(".")
        if role in WRITE_ROLES and head.startswith("layer_") and head[6:].isdigit():
            out.setdefault(int(head[6:]), set()).add(role)
    return out


def linear_scan(
    decay: torch.Tensor, write: torch.Tensor, initial: torch.Tensor | None = None
) -> torch.Tensor:
    """States ``S_t = decay_t * S_{t-1} + write_t`` for every t (axis 1), from ``initial`` (zero
    by default). ``decay`` broadcasts against ``write`` (batch, seq, ...); returns the states in
    ``write``'s shape, the state after position t at index t."""
    import torch

    state = (
        torch.zeros_like(write[:, 0])
        if initial is None
        else initial.to(write.dtype).expand_as(write[:, 0])
    )
    tracked = (decay, write) if initial is None else (decay, write, initial)
    if torch.is_grad_enabled() and any(x.requires_grad for x in tracked):
        states = []
        for t in range(write.shape[1]):
            state = decay[:, t] * state + write[:, t]
            states.append(state)
        return torch.stack(states, dim=1)
    # Without autograd: the same multiplication and addition per step, written in place into
    # one buffer (no per-step tensors, no final copy).
    out = torch.empty(write.shape, dtype=torch.result_type(decay, write), device=write.device)
    for t in range(write.shape[1]):
        torch.mul(decay[:, t], state, out=out[:, t])
        out[:, t].add_(write[:, t])
        state = out[:, t]
    return out


def scalar_decay_attention(
    query: torch.Tensor, key: torch.Tensor, log_decay: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """Effective attention of a recurrence with one decay per head and position:
    ``A[b, h, t, s] = (q_t · k_s) · exp(Σ_{r=s+1..t} log_decay_r) · scale_s`` for s ≤ t, else 0.

    ``query``/``key``: (batch, seq, heads, d_key); ``log_decay``, ``scale``: (batch, seq, heads).
    Returns (batch, heads, seq, seq)."""
    import torch

    cum = torch.cumsum(log_decay.float(), dim=1).transpose(1, 2)  # (b, h, t)
    seq = query.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=query.device).tril()
    gap = (cum[..., :, None] - cum[..., None, :]).masked_fill(~causal, 0.0)
    decays = torch.exp(gap).masked_fill(~causal, 0.0)
    scores = torch.einsum("bthn,bshn->bhts", query.float(), key.float())
    return scores * decays * scale.float().transpose(1, 2)[:, :, None, :]


def unroll_square(
    value: torch.Tensor,
    shift: torch.Tensor | None,
    roll: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """(batch, heads, seq, seq) from a backend's row layout (rows right-shifted by ``shift``) to
    the caller's, on both sequence axes; ``roll(value, shift)`` shifts axis 1 per row."""
    if shift is None:
        return value
    rows = roll(value.transpose(1, 2), -shift).transpose(1, 2)  # query axis
    return roll(rows.transpose(1, 3), -shift).transpose(1, 3)  # key axis


def delta_rule_scan(
    query: torch.Tensor,
    key: torch.Tensor,
    beta: torch.Tensor,
    log_decay: torch.Tensor,
    write: torch.Tensor,
    initial: torch.Tensor | None = None,
    erase: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """States and read-outs of a (gated) delta rule driven by ``write``:
    ``S_t = (I − β_t k_t k_tᵀ) diag(α_t) S_{t-1} + W_t`` and ``o_t = S_tᵀ q_t``, the transition
    taken from the run (``erase=False``: ``S_t = diag(α_t) S_{t-1} + W_t``, plain decayed linear
    attention).

    ``query``/``key``: (batch, seq, heads, d_key); ``beta``: (batch, seq, heads);
    ``log_decay``: (batch, seq, heads) or (batch, seq, heads, d_key) (``α = exp(log_decay)``);
    ``write``: (batch, seq, heads, d_key, d_value), e.g. ``k_t ⊗ β_t v_t``, or the difference an
    edit makes to it (the states are linear in the writes given the transitions). Returns the
    states (batch, seq, heads, d_key, d_value), the state after position t at index t, and the
    read-outs (batch, seq, heads, d_value)."""
    import torch

    decay = torch.exp(log_decay.float())
    decay = decay[..., None, None] if decay.dim() == 3 else decay[..., None]
    query, key, beta, write = query.float(), key.float(), beta.float(), write.float()
    state = (
        torch.zeros_like(write[:, 0]) if initial is None else initial.float().expand_as(write[:, 0])
    )
    states = []
    for t in range(write.shape[1]):
        state = decay[:, t] * state
        if erase:
            k = key[:, t]  # (b, h, d_key)
            seen = torch.einsum("bhk,bhkv->bhv", k, state)
            state = state - beta[:, t, :, None, None] * k[..., None] * seen[..., None, :]
        state = state + write[:, t]
        states.append(state)
    stacked = torch.stack(states, dim=1)
    return stacked, torch.einsum("bthkv,bthk->bthv", stacked, query)


def decayed_scores(
    query: torch.Tensor, key: torch.Tensor, cum_log_decay: torch.Tensor, block: int = 64
) -> torch.Tensor:
    """``P[b, h, t, s] = Σ_c q_t[c] · k_s[c] · exp(cum_t[c] − cum_s[c])`` for s ≤ t, else 0.

    ``query``/``key``: (batch, heads, seq, d_key); ``cum_log_decay``: the cumulative log decay
    (batch, heads, seq, 1) (one decay per head) or (batch, heads, seq, d_key) (one per key
    channel). Per channel, key blocks of ``block`` positions are decayed to their last position
    and the queries after it from there (every factor ≤ 1 for decays ≤ 1, so nothing
    overflows); within a block the decays are explicit. O(seq² · d_key) time, no
    (seq, seq, d_key) tensor."""
    import torch

    query, key, cum = query.float(), key.float(), cum_log_decay.float()
    seq = query.shape[-2]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=query.device).tril()
    if cum.shape[-1] == 1:
        gap = (cum[..., :, None, 0] - cum[..., None, :, 0]).masked_fill(~causal, float("-inf"))
        return (query @ key.transpose(-1, -2)) * torch.exp(gap)
    rows = []
    for start in range(0, seq, block):
        end = min(start + block, seq)
        ref = cum[..., end - 1 : end, :]
        q_blk, k_blk, c_blk = (
            query[..., start:end, :],
            key[..., start:end, :],
            cum[..., start:end, :],
        )
        gap = (c_blk[..., :, None, :] - c_blk[..., None, :, :]).masked_fill(
            ~causal[: end - start, : end - start, None], float("-inf")
        )
        inner = torch.einsum("bhtc,bhsc,bhtsc->bhts", q_blk, k_blk, torch.exp(gap))
        later = query[..., end:, :] * torch.exp(cum[..., end:, :] - ref)
        outer = later @ (k_blk * torch.exp(ref - c_blk)).transpose(-1, -2)
        column = torch.cat(
            [query.new_zeros((*query.shape[:2], start, end - start)), inner, outer], -2
        )
        rows.append(column)
    return torch.cat(rows, dim=-1)


def delta_rule_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    beta: torch.Tensor,
    log_decay: torch.Tensor,
    erase: bool = True,
) -> torch.Tensor:
    """Effective attention of the (gated) delta rule of `delta_rule_scan` with writes
    ``k_s ⊗ β_s v_s``: ``A[b, h, t, s] = β_s · q_tᵀ (Π_{r=s+1..t} (I − β_r k_r k_rᵀ) diag(α_r))
    k_s`` for s ≤ t, so that ``o_t = Σ_s A[t, s] · v_s``.

    Computed without the products of matrices: with ``P[t, s] = q_tᵀ diag(α_{s+1..t}) k_s``
    (`decayed_scores`) and ``L`` the strictly lower ``L[t, s] = β_t k_tᵀ diag(α_{s+1..t}) k_s``,
    ``A = P (I + L)⁻¹ diag(β)`` (one triangular solve per head; ``erase=False``: ``A = P
    diag(β)``). Shapes as in `delta_rule_scan`; returns (batch, heads, seq, seq)."""
    import torch

    q, k = query.float().transpose(1, 2), key.float().transpose(1, 2)  # (b, h, t, d)
    b = beta.float().transpose(1, 2)  # (b, h, t)
    g = log_decay.float()
    g = g[..., None] if g.dim() == 3 else g
    cum = torch.cumsum(g.transpose(1, 2), dim=2)  # (b, h, t, 1 or d)
    scores = decayed_scores(q, k, cum)
    if not erase:
        return scores * b[..., None, :]
    seq = q.shape[2]
    lower = (decayed_scores(k, k, cum) * b[..., :, None]).tril(-1)
    system = lower + torch.eye(seq, dtype=lower.dtype, device=lower.device)
    inverse: torch.Tensor = torch.linalg.solve_triangular(
        system, torch.diag_embed(b), upper=False, unitriangular=True
    )
    return scores @ inverse


def _decayed_key_products(k: torch.Tensor, cum: torch.Tensor) -> torch.Tensor:
    """``k_tᵀ diag(exp(cum_t − cum_s)) k_s`` for s ≤ t (the rest is not used) within each chunk:
    ``k`` (..., c, d_key), ``cum`` the cumulative log decays from the chunk's start (..., c, 1
    or d_key). One decay per key channel: as the product of keys scaled by exp(±cum) where no
    chunk spans more than a decay of e⁻⁶⁰ (nothing overflows), else explicitly per channel."""
    import torch

    size = k.shape[-2]
    causal = torch.ones(size, size, dtype=torch.bool, device=k.device).tril()
    if cum.shape[-1] == 1:
        gap = (cum - cum.transpose(-1, -2)).masked_fill(~causal, float("-inf"))
        return (k @ k.transpose(-1, -2)) * torch.exp(gap)
    if float(-cum[..., -1, :].detach().min()) < 60.0:
        return (k * torch.exp(cum)) @ (k * torch.exp(-cum)).transpose(-1, -2)
    gap = cum[..., :, None, :] - cum[..., None, :, :]  # (..., t, s, d_key)
    gamma = torch.exp(gap.masked_fill(~causal[..., None], float("-inf")))
    return torch.einsum("...tc,...sc,...tsc->...ts", k, k, gamma)


def delta_rule_states(
    key: torch.Tensor,
    value: torch.Tensor,
    beta: torch.Tensor,
    log_decay: torch.Tensor,
    erase: bool = True,
    chunk: int = 16,
    initial: torch.Tensor | None = None,
) -> torch.Tensor:
    """The states of `delta_rule_scan` driven by the run's own writes ``k_t ⊗ β_t v_t``, from
    ``initial`` (zero by default), a chunk of ``chunk`` positions at a time.

    Within a chunk starting from ``S_0``, ``S_t = diag(α_{1..t}) S_0 + Σ_{s≤t} diag(α_{s+1..t})
    k_s u_sᵀ`` with ``u_s = β_s (v_s − (diag(α_s) S_{s−1})ᵀ k_s)`` (the delta rule's corrected
    values; ``u = β v`` without the erase). For every chunk at once, one triangular solve
    ``(I + L) [U₀ | W] = diag(β) [V | K̃]`` (``K̃`` the keys decayed from the chunk's start)
    gives ``U = U₀ − W S_0``; only the chunks' starting states are then stepped, one chunk at a
    time, and inside the chunks ``S_t = diag(α_t) S_{t−1} + k_t u_tᵀ`` is stepped for every chunk
    together, one position at a time, in place (out of place when autograd tracks the inputs).
    Every decay factor is a product of decays over a stretch of positions, at most 1 for decays
    at most 1. Shapes as in `delta_rule_scan`
    (``value``: (batch, seq, heads, d_value); ``initial``: (batch, heads, d_key, d_value));
    returns (batch, seq, heads, d_key, d_value)."""
    import torch
    import torch.nn.functional as F

    batch, seq, heads, d_key = key.shape
    d_value = value.shape[-1]
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ParameterError(f"chunk must be a positive int (positions per chunk), got {chunk!r}")
    target = (batch, heads, d_key, d_value)
    if initial is not None and (
        initial.dim() > 4
        or any(
            have not in (1, want)
            for have, want in zip(initial.shape[::-1], target[::-1], strict=False)
        )
    ):
        raise ParameterError(
            f"initial has shape {tuple(initial.shape)}; valid: (batch, heads, d_key, d_value) = "
            f"{target}, or a shape that broadcasts to it"
        )
    size = min(chunk, seq) if seq else 1
    n = -(-seq // size)
    pad = n * size - seq  # padded positions: no write, decay 1, after every real one

    def chunked(x: torch.Tensor) -> torch.Tensor:
        """(batch, seq, heads, ...) → (batch, heads, chunks, size, ...)."""
        x = x.float()
        if pad:
            x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, pad))
        return x.reshape(batch, n, size, heads, *x.shape[3:]).movedim(3, 1)

    g = log_decay.float()
    g = chunked(g[..., None] if g.dim() == 3 else g)  # (b, h, n, c, 1 or d_key)
    k, v = chunked(key), chunked(value)  # (b, h, n, c, ·)
    b = chunked(beta)[..., None]  # (b, h, n, c, 1)
    cum = torch.cumsum(g, dim=3)
    last = cum[..., -1:, :]  # (b, h, n, 1, 1 or d_key)
    if erase:
        system = (_decayed_key_products(k, cum) * b).tril(-1)
        system = system + torch.eye(size, dtype=system.dtype, device=system.device)
        rhs = torch.cat([b * v, b * (k * torch.exp(cum))], dim=-1)
        solved = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)
        first, carried = solved.split([d_value, d_key], dim=-1)
    else:
        first, carried = b * v, None
    # the chunks' starting states, one chunk at a time (and the corrected values U)
    state = (
        k.new_zeros((batch, heads, d_key, d_value))
        if initial is None
        else initial.float().expand(batch, heads, d_key, d_value)
    )
    to_end = (k * torch.exp(last - cum)).transpose(-1, -2)  # keys decayed to the chunk's end
    through = torch.exp(last[..., 0, :])[..., None]  # (b, h, n, 1 or d_key, 1)
    starts, corrected = [], []
    for i in range(n):
        starts.append(state)
        u = first[:, :, i] if carried is None else first[:, :, i] - carried[:, :, i] @ state
        corrected.append(u)
        state = through[:, :, i] * state + to_end[:, :, i] @ u
    # inside the chunks, every chunk at once, one position at a time: S_t = α_t S_{t-1} + k_t u_tᵀ
    start = torch.stack(starts, dim=2)  # (b, h, n, d_key, d_value)
    u = torch.stack(corrected, dim=2)  # (b, h, n, s, d_value)
    alpha = torch.exp(g)[..., None]  # (b, h, n, s, 1 or d_key, 1)
    states = k[..., :, None] * u[..., None, :]  # (b, h, n, s, d_key, d_value)
    tracked = torch.is_grad_enabled() and any(
        x.requires_grad for x in (key, value, beta, log_decay, state)
    )
    if tracked:  # out of place, for autograd
        steps = [states[:, :, :, 0] + alpha[:, :, :, 0] * start]
        for t in range(1, size):
            steps.append(states[:, :, :, t] + alpha[:, :, :, t] * steps[-1])
        states = torch.stack(steps, dim=3)
    else:
        states[:, :, :, 0].addcmul_(alpha[:, :, :, 0], start)
        for t in range(1, size):
            states[:, :, :, t].addcmul_(alpha[:, :, :, t], states[:, :, :, t - 1])
    states = states.reshape(batch, heads, n * size, d_key, d_value)
    return states[:, :, :seq].transpose(1, 2)


# -- continuing a recurrent model from a state, one token at a time ------------------------------
def given_states(
    table: SiteTable, names: Sequence[str], state: Mapping[Any, Any], batch: int
) -> dict[str, Any]:
    """An ``initial_state`` by canonical site name, checked against the model's state sites
    ``names``: every one given, no other, each of shape (``batch``, *the site's ``size``)."""
    from .errors import SiteError
    from .sites import Site

    given = {str(Site.parse(k)): v for k, v in state.items()}
    unknown = sorted(set(given) - set(names))
    missing = [n for n in names if n not in given]
    if unknown or missing:
        raise SiteError(
            "initial_state must give every recurrent state of the model: "
            + (f"missing {missing}; " if missing else "")
            + (f"not state sites: {unknown}; " if unknown else "")
            + f"state sites are {list(names)}. Take them from run(..., return_state=True).state"
        )
    for name in names:
        size = cast("tuple[int, ...]", table.info(name).extra["size"])
        expected = (batch, *size)
        if tuple(given[name].shape) != expected:
            raise SiteError(
                f"initial_state[{name!r}] has shape {tuple(given[name].shape)}; expected "
                f"{expected} (rows of the suffix, then the site's shape)"
            )
    return given


def feed_tokens(
    store: dict[str, Any],
    steps: int,
    step: Callable[[int], Any],
    token_sites: Iterable[str],
    logits_of: Callable[[Any], Any],
) -> torch.Tensor | None:
    """Run ``step(t)`` for t < ``steps`` (the model fed token t from its cache, hooks attached):
    the values of ``token_sites`` the hooks put into ``store`` at each step are concatenated
    over the steps (axis 1) in ``store``; returns the logits over the steps, or None when a
    step had none (a run stopped early: ``StopForward``)."""
    import torch

    from .engine import StopForward

    collected: dict[str, list[torch.Tensor]] = {n: [] for n in token_sites}
    logits: list[torch.Tensor] = []
    for t in range(steps):
        try:
            step_logits = logits_of(step(t))
            if step_logits is not None:
                logits.append(step_logits)
        except StopForward:
            pass
        for name, parts in collected.items():
            if name in store:
                parts.append(store.pop(name))
    for name, parts in collected.items():
        if len(parts) == steps:
            store[name] = torch.cat(parts, dim=1)
    return torch.cat(logits, dim=1) if len(logits) == steps else None
