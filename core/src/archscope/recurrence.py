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
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from .hookpoints import SiteTable

if TYPE_CHECKING:
    import torch

__all__ = [
    "WRITABLE_ROLES",
    "WRITE_ROLES",
    "declare_write_sites",
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
        raise ValueError(
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
    states = []
    for t in range(write.shape[1]):
        state = decay[:, t] * state + write[:, t]
        states.append(state)
    return torch.stack(states, dim=1)


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
