"""Rows of different lengths, for backends whose state outputs are the state after the whole
(right-padded) row (``Backend.regroup_states``): `Backend.run` reads state sites, and the
returned state, from one extra pass per group of equal-length rows trimmed to their length."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Protocol

from .edits import Edit
from .runs import RunRequest, RunResult
from .sites import SiteInfo


class Backend(Protocol):
    """What regrouping needs of a backend (`archscope.backends.Backend` has it)."""

    def sites(self) -> dict[str, SiteInfo]: ...

    def execute(self, request: RunRequest) -> RunResult: ...


__all__ = ["edit_rows", "execute_regrouped", "needs_regrouping", "rows_of"]


def needs_regrouping(backend: Backend, request: RunRequest) -> bool:
    """Whether ``request`` reads states of a right-padded batch of unequal rows (then
    `execute_regrouped` runs it)."""
    if request.padding_side != "right":
        return False
    table = backend.sites()
    return request.return_state or any(
        table[n].kind == "state" for n in (*request.capture, *request.edits)
    )


def execute_regrouped(backend: Backend, request: RunRequest) -> RunResult:
    """Run ``request`` once for its token sites and once per group of equal-length rows, trimmed
    to their length, for state sites and the returned state; rows are put back in order."""
    from .batch import length_groups, scatter_rows

    table = backend.sites()
    states = [n for n in request.capture if table[n].kind == "state"]
    token_edits = {n: e for n, e in request.edits.items() if table[n].kind != "state"}
    result = backend.execute(
        replace(
            request,
            capture=[n for n in request.capture if n not in states],
            edits=token_edits,
            return_state=False,
        )
    )
    mask = request.attention_mask
    assert mask is not None
    parts: dict[str, list[tuple[Any, Any]]] = {}
    state_parts: dict[str, list[tuple[Any, Any]]] = {}
    for rows, length in length_groups(mask):
        group = backend.execute(rows_of(request, rows, length, states))
        for name in states:
            parts.setdefault(name, []).append((rows, group.activations[name]))
        for name, value in (group.state or {}).items():
            state_parts.setdefault(name, []).append((rows, value))
    n_rows = mask.shape[0]
    for name in states:
        result.activations[name] = scatter_rows(parts[name], n_rows)
    result.activations = {n: result.activations[n] for n in request.capture}
    if request.return_state:
        result.state = {n: scatter_rows(p, n_rows) for n, p in state_parts.items()}
    return result


def rows_of(request: RunRequest, rows: Any, length: int, capture: list[str]) -> RunRequest:
    """``request`` restricted to ``rows``, trimmed to their ``length`` real tokens."""
    batch = {
        k: v[rows, :length] if getattr(v, "dim", lambda: 0)() == 2 else v
        for k, v in request.batch.items()
    }
    width = request.batch["input_ids"].shape[1] if "input_ids" in request.batch else length
    n_rows = next(iter(request.batch.values())).shape[0]
    edits = {
        n: [edit_rows(e, rows, n_rows, width, length) for e in es]
        for n, es in request.edits.items()
    }
    initial = (
        {k: v[rows] for k, v in request.initial_state.items()} if request.initial_state else None
    )
    return replace(request, batch=batch, capture=capture, edits=edits, initial_state=initial)


def edit_rows(edit: Edit, rows: Any, n_rows: int, width: int, length: int) -> Edit:
    """An edit made for the full batch, for a group of its rows trimmed to ``length``:
    per-row values are sliced; positions count real tokens, so those the group's rows have are
    kept."""
    value = edit.value
    if getattr(value, "dim", lambda: 0)() >= 2 and value.shape[0] == n_rows:
        value = value[rows.to(value.device)]
    positions = edit.positions
    if isinstance(positions, slice):  # explicit, so a slice past a short group stays valid
        positions = list(range(length)[positions])
    if isinstance(positions, (int, list, tuple)):
        given = [positions] if isinstance(positions, int) else list(positions)
        positions = [p for p in given if -length <= p < length]
    return Edit(edit.site, edit.op, value, positions, edit.units)
