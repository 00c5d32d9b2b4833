"""Recurrent states across runs: the one ``initial_state`` policy (`check_initial_state`) and
`state_patch`, which swaps the state one prefix reached into the run of another."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from .errors import SiteError
from .runs import RunResult
from .sites import Site, SiteInfo

if TYPE_CHECKING:
    import torch


class Backend(Protocol):
    """What the state policies need of a backend (`archscope.backends.Backend` has it)."""

    @property
    def name(self) -> str: ...

    def sites(self) -> dict[str, SiteInfo]: ...

    def require(self, capability: str) -> None: ...

    def prepare_inputs(self, inputs: Any) -> dict[str, Any]: ...

    def run(
        self,
        inputs: Any,
        capture: Iterable[str | Site] | None = (),
        *,
        initial_state: Mapping[str, torch.Tensor] | None = None,
        return_state: bool = False,
        stop_early: bool = True,
    ) -> RunResult: ...


__all__ = ["check_initial_state", "state_patch"]


def check_initial_state(
    backend: Backend, initial_state: Mapping[str, torch.Tensor] | None, batch: Mapping[str, Any]
) -> None:
    """The one ``initial_state`` policy: every key is a state site of ``backend``; each value
    has one row per batch row, the site's size on every other axis (as the backend's own
    ``RunResult.state`` has it) and finite values. Sites left out start from the model's own
    initial state (as in a run without ``initial_state``)."""
    from .guards import check_finite_state, check_state_shapes, state_sizes

    if not initial_state:
        return
    table = backend.sites()
    states = [n for n, i in table.items() if i.kind == "state"]
    unknown = [str(n) for n in initial_state if str(n) not in states]
    if unknown:
        raise SiteError(
            f"initial_state has entries that are not state sites: {unknown}; "
            f"state sites of backend {backend.name!r}: "
            f"{', '.join(states) or '(none)'}"
        )
    rows = next(iter(batch.values())).shape[0]
    for name, value in initial_state.items():
        info = table[str(name)]
        shape = tuple(getattr(value, "shape", ()))
        if len(shape) != len(info.shape) or shape[0] != rows or shape[-1] != info.dim:
            axes = ", ".join(info.shape)
            expected = (
                (rows, *shape[1:-1], info.dim) if len(shape) == len(info.shape) else f"({axes})"
            )
            raise SiteError(
                f"initial_state[{info.name!r}] must have shape ({axes}) with batch = {rows} "
                f"and {info.shape[-1]} = {info.dim}: initial_state[{info.name!r}] has shape "
                f"{shape}; expected {expected}. Take it from the RunResult.state of a run on "
                f"{rows} rows"
            )
    check_finite_state(initial_state)
    check_state_shapes(backend, initial_state, rows, state_sizes(backend))


def state_patch(
    backend: Backend,
    prefix: Any,
    source_prefix: Any,
    suffix: Any,
    sites: Iterable[str | Site] | None = None,
    capture: Iterable[str | Site] = (),
) -> RunResult:
    """Run ``prefix``; swap in the recurrent state that ``source_prefix`` reached at ``sites``
    (default: all state sites); continue on ``suffix``; return the suffix run. The three inputs
    have one row count, or one row, which is used with every row of the others."""
    from .batch import broadcast_rows

    backend.require("state_patch")
    given = {"prefix": prefix, "source_prefix": source_prefix, "suffix": suffix}
    inputs = broadcast_rows(
        {name: backend.prepare_inputs(value) for name, value in given.items()}, "state_patch"
    )
    prefix, source_prefix, suffix = inputs["prefix"], inputs["source_prefix"], inputs["suffix"]
    target = backend.run(prefix, return_state=True, stop_early=False)
    source = backend.run(source_prefix, return_state=True, stop_early=False)
    assert target.state is not None and source.state is not None
    merged = dict(target.state)
    chosen = list(source.state) if sites is None else [str(Site.parse(s)) for s in sites]
    for name in chosen:
        if name not in source.state:
            raise SiteError(
                f"{name!r} is not part of the recurrent state of backend {backend.name!r}; "
                f"state sites: {sorted(source.state)}"
            )
        merged[name] = source.state[name]
    return backend.run(suffix, capture=capture, initial_state=merged, stop_early=False)
