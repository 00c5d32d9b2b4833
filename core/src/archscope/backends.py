"""The Backend protocol: one class per architecture family maps a model's internals to sites.

A backend wraps one model instance. `Backend.for_model` picks the registered backend whose
`can_handle` is most confident. Backend classes live in plugins (entry-point group
``archscope``); `Backend.register` registers one in-process for quick experiments.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, ClassVar, cast

from .edits import Edit, EditOp, Positions
from .errors import (
    BackendError,
    CapabilityError,
    NoBackendError,
    PaddingError,
    SiteError,
)
from .guards import InputLimits
from .sites import Site, SiteInfo, resolve

if TYPE_CHECKING:  # torch is imported lazily: discovery and the CLI must not pay for it
    import torch

__all__ = [
    "ActivationRecord",
    "Backend",
    "BackendError",
    "CapabilityError",
    "Edit",
    "EditOp",
    "NoBackendError",
    "PaddingError",
    "Positions",
    "RunRequest",
    "RunResult",
]


@dataclass
class ActivationRecord:
    """One captured site (seed API): name, tensor, metadata and the attention mask."""

    layer_name: str
    activations: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)
    attention_mask: torch.Tensor | None = None

    @property
    def site(self) -> Site:
        return Site.parse(self.layer_name)


@dataclass
class RunResult:
    """What `Backend.run` returns."""

    logits: torch.Tensor | None
    activations: dict[str, torch.Tensor]
    attention_mask: torch.Tensor | None
    #: The recurrent state after the last real token (``return_state=True``), usable as
    #: ``initial_state`` of a later run.
    state: dict[str, torch.Tensor] | None = None

    def __getitem__(self, site: str | Site) -> torch.Tensor:
        key = str(Site.parse(site))
        if key not in self.activations:
            raise KeyError(f"{key!r} was not captured; captured: {sorted(self.activations)}")
        return self.activations[key]

    def __contains__(self, site: object) -> bool:
        return isinstance(site, (str, Site)) and str(site) in self.activations


@dataclass
class RunRequest:
    """A validated run request, as `Backend.execute` receives it: the prepared batch, the site
    names to capture, the edits grouped by site name, and the run options."""

    batch: dict[str, Any]
    capture: list[str]
    edits: dict[str, list[Edit]]
    stop_early: bool = True
    initial_state: Mapping[str, torch.Tensor] | None = None
    return_state: bool = False
    grad: bool = False

    @property
    def attention_mask(self) -> torch.Tensor | None:
        return self.batch.get("attention_mask")


class Backend:
    """Base class of every backend. Subclasses set the class attributes and implement
    `can_handle`, `sites` and `run` (the hook engine in `archscope.engine` does the last)."""

    #: Registry name, accepted as ``hint=``.
    name: ClassVar[str] = ""
    #: One line for `archscope info`.
    description: ClassVar[str] = ""
    #: Capabilities from `archscope.sites.CAPABILITIES` (and any of the plugin's own). The
    #: class value is what `archscope info` shows; an instance may narrow it for one model
    #: (e.g. a mixture-of-experts model without `mlp_hidden`).
    capabilities: frozenset[str] = frozenset()
    #: Tie-break between equally confident backends (higher wins).
    priority: ClassVar[int] = 0
    #: Padding the backend handles exactly at real tokens: "both", "right" or "left".
    padding: str = "both"
    #: The per-layer role `layer_names()` lists (seed API).
    primary_role: ClassVar[str] = "residual"

    #: Run with inference semantics (every module in eval mode, so dropout is off), restoring
    #: each module's mode afterwards. Set False on an instance to run in the model's own mode.
    inference: bool = True

    def __init__(self, model: Any) -> None:
        self.model = model

    # -- detection -----------------------------------------------------------------------------
    @classmethod
    def can_handle(cls, model: Any) -> float | None:
        """Confidence in (0, 1] that this backend serves ``model``; None = not mine.
        Must not raise and must not import heavy frameworks."""
        return None

    # -- sites ---------------------------------------------------------------------------------
    def sites(self) -> dict[str, SiteInfo]:
        """Every site of the wrapped model, in forward order."""
        raise NotImplementedError(f"{type(self).__name__} must implement sites()")

    def site_info(self, site: str | Site) -> SiteInfo:
        return resolve(site, self.sites(), self.name or type(self).__name__)

    @property
    def n_layers(self) -> int:
        layers = [i.site.layer for i in self.sites().values() if i.site.layer is not None]
        return 1 + max(layers, default=-1)

    def layer_names(self) -> list[str]:
        """Seed API: the main per-layer site of each layer (residual stream, RNN hidden)."""
        return [n for n, i in self.sites().items() if i.site.role == self.primary_role]

    def hidden_dim(self, layer_name: str) -> int:
        """Seed API: size of the feature axis of a site."""
        return self.site_info(layer_name).dim

    # -- running -------------------------------------------------------------------------------
    def run(
        self,
        inputs: Any,
        capture: Iterable[str | Site] | None = (),
        edits: Iterable[Edit] | Edit | None = (),
        *,
        stop_early: bool = True,
        initial_state: Mapping[str, torch.Tensor] | None = None,
        return_state: bool = False,
        grad: bool = False,
    ) -> RunResult:
        """Run the model, capturing ``capture`` and applying ``edits``.

        With ``stop_early`` (default) and a capture list without ``logits``, the forward pass
        stops after the deepest captured site and ``logits`` is None. ``initial_state`` starts
        the run from a recurrent state (capability ``state_patch``); ``return_state`` returns
        the state after the last real token in ``RunResult.state``.

        Backends do not override this: it validates the request (`check_request`), prepares
        the inputs (`prepare_inputs`), checks ``initial_state`` (`check_initial_state`) and
        hands a `RunRequest` to `execute`.
        """
        from .guards import (
            check_device,
            check_inputs,
            check_memory,
            inference_mode,
            model_lock,
            warn_if_not_finite,
        )

        edits = _edit_list(edits)
        wanted, edit_map = self.check_request(
            () if capture is None else capture, edits, initial_state, return_state
        )
        check_device(self.device, self.name)
        batch = self.prepare_inputs(inputs)
        check_inputs(batch, self.input_limits(), self.name)
        full_pass = not (stop_early and wanted and "logits" not in wanted) or return_state
        check_memory(self, batch, wanted, full_pass)
        self.check_initial_state(initial_state, batch)
        request = RunRequest(
            batch,
            wanted,
            edit_map,
            stop_early=stop_early,
            initial_state=initial_state,
            return_state=return_state,
            grad=grad,
        )
        # hooks, edits, early stops and mode changes live on the model's shared modules: one
        # run at a time per model (see docs/architecture.md, "Runs and threads")
        with model_lock(self.model), inference_mode(self.model, self.inference):
            if self.regroup_states and self._needs_regrouping(request):
                result = self._execute_regrouped(request)
            else:
                result = self.execute(request)
        warn_if_not_finite(result.logits, self.name)
        return result

    def input_limits(self) -> InputLimits:
        """What token batches the model can take (vocabulary size, maximum positions), checked
        before every forward pass. The default reads the model's input embedding and its
        config (`archscope.guards.limits_from_model`); override for models that keep them
        elsewhere (None = no limit)."""
        from .guards import limits_from_model

        return limits_from_model(self.model, self)

    def execute(self, request: RunRequest) -> RunResult:
        """Run one validated request (the extension point behind `run`; `HookBackend`
        implements it with module hooks)."""
        raise NotImplementedError(f"{type(self).__name__} must implement execute(request)")

    def check_request(
        self,
        capture: Iterable[str | Site],
        edits: Iterable[Edit],
        initial_state: Mapping[str, torch.Tensor] | None = None,
        return_state: bool = False,
    ) -> tuple[list[str], dict[str, list[Edit]]]:
        """Validate what a run asks for: site names to capture and edits grouped by site.
        `run` calls this once, so bad requests fail the same way everywhere."""
        if isinstance(capture, (str, Site)):
            capture = [capture]
        table = self.sites()
        backend = self.name or type(self).__name__
        wanted = [resolve(s, table, backend).name for s in capture]
        edit_map: dict[str, list[Edit]] = {}
        for edit in edits:
            if not isinstance(edit, Edit):
                raise TypeError(f"edits must be archscope.Edit objects, got {type(edit).__name__}")
            info = resolve(edit.site, table, backend)
            if not info.writable:
                writable = [n for n, i in table.items() if i.writable]
                reason = self.read_only_reason(info)
                raise SiteError(
                    f"site {info.name!r} of backend {backend!r} is read-only"
                    + (f" ({reason})" if reason else "")
                    + f"; writable sites include {', '.join(writable[:8]) or 'none'}"
                )
            edit_map.setdefault(info.name, []).append(edit)
        if initial_state is not None or return_state:
            self.require("state_patch")
        return wanted, edit_map

    def check_initial_state(
        self, initial_state: Mapping[str, torch.Tensor] | None, batch: Mapping[str, Any]
    ) -> None:
        """The one ``initial_state`` policy: every key is a state site of this backend; each
        value has one row per batch row, the site's size on every other axis (as the backend's
        own ``RunResult.state`` has it) and finite values. Sites left out start from the
        model's own initial state (as in a run without ``initial_state``)."""
        from .guards import check_finite_state, check_state_shapes, state_sizes

        if not initial_state:
            return
        table = self.sites()
        states = [n for n, i in table.items() if i.kind == "state"]
        unknown = [str(n) for n in initial_state if str(n) not in states]
        if unknown:
            raise SiteError(
                f"initial_state has entries that are not state sites: {unknown}; "
                f"state sites of backend {self.name!r}: "
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
        check_state_shapes(self, initial_state, rows, state_sizes(self))

    # -- rows of different lengths -------------------------------------------------------------
    #: True when the model's state outputs are the state after the whole (right-padded) row.
    #: `run` then reads state sites, and the returned state, from one extra pass per group of
    #: equal-length rows trimmed to their length: the state after each row's last real token.
    regroup_states: ClassVar[bool] = False

    def _needs_regrouping(self, request: RunRequest) -> bool:
        from .batch import padding_side

        mask = request.attention_mask
        if mask is None or padding_side(mask) != "right":
            return False
        table = self.sites()
        return request.return_state or any(
            table[n].kind == "state" for n in (*request.capture, *request.edits)
        )

    def _execute_regrouped(self, request: RunRequest) -> RunResult:
        from .batch import length_groups, scatter_rows

        table = self.sites()
        states = [n for n in request.capture if table[n].kind == "state"]
        token_edits = {n: e for n, e in request.edits.items() if table[n].kind != "state"}
        result = self.execute(
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
            group = self.execute(_rows_of(request, rows, length, states))
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

    def read_only_reason(self, info: SiteInfo) -> str:
        """Why a site cannot be edited, for the error message (override to explain)."""
        return ""

    @property
    def device(self) -> torch.device:
        import torch

        for p in self.model.parameters():
            return cast("torch.device", p.device)
        return torch.device("cpu")

    def prepare_inputs(self, inputs: Any) -> dict[str, Any]:
        """Validate and batch the inputs on the model's device; refuse padding the backend does
        not handle (its ``padding`` attribute) instead of returning wrong activations."""
        from .batch import padding_side, prepare_inputs

        batch = prepare_inputs(inputs, self.device, "left" if self.padding == "left" else "right")
        mask = batch.get("attention_mask")
        side = padding_side(mask) if mask is not None else "none"
        if side == "mixed" or (side != "none" and self.padding not in (side, "both")):
            raise PaddingError(self.padding_message(side))
        return batch

    def padding_message(self, side: str) -> str:
        """The error for a batch padded on ``side`` ("left", "right" or "mixed" = gaps)."""
        if side == "mixed":
            return (
                f"backend {self.name!r}: the rows of this attention_mask are not all "
                "padded on one side (or have padding between real tokens); pad every row on "
                f"the same side{'' if self.padding == 'both' else ' (' + self.padding + ')'}"
            )
        return (
            f"backend {self.name!r} handles only {self.padding} padding, but this batch is "
            f"{side}-padded: pad on the {self.padding} (e.g. tokenizer.padding_side = "
            f"{self.padding!r}) or run the rows one at a time"
        )

    def extract(self, inputs: Any, layers: list[str] | None = None) -> list[ActivationRecord]:
        """Seed API: capture ``layers`` (default: `layer_names()`) as ActivationRecords."""
        names = [str(Site.parse(n)) for n in (layers if layers is not None else self.layer_names())]
        result = self.run(inputs, capture=names)
        records = []
        for name in names:
            info = self.site_info(name)
            records.append(
                ActivationRecord(
                    layer_name=name,
                    activations=result.activations[name],
                    meta={
                        "kind": info.kind,
                        "shape": info.shape,
                        "dim": info.dim,
                        "backend": self.name,
                        "site": name,
                    },
                    attention_mask=result.attention_mask,
                )
            )
        return records

    def unembed(self, residual: torch.Tensor) -> torch.Tensor:
        """Logits from a residual-stream tensor through the model's own final norm and head."""
        raise BackendError(
            f"backend {self.name!r} cannot unembed: it has no 'unembed' capability "
            f"(capabilities: {sorted(self.capabilities)})"
        )

    def state_patch(
        self,
        prefix: Any,
        source_prefix: Any,
        suffix: Any,
        sites: Iterable[str | Site] | None = None,
        capture: Iterable[str | Site] = (),
    ) -> RunResult:
        """Run ``prefix``; swap in the recurrent state that ``source_prefix`` reached at
        ``sites`` (default: all state sites); continue on ``suffix``; return the suffix run.
        The three inputs have one row count, or one row, which is used with every row of the
        others."""
        from .batch import broadcast_rows

        self.require("state_patch")
        given = {"prefix": prefix, "source_prefix": source_prefix, "suffix": suffix}
        inputs = broadcast_rows(
            {name: self.prepare_inputs(value) for name, value in given.items()}, "state_patch"
        )
        prefix, source_prefix, suffix = inputs["prefix"], inputs["source_prefix"], inputs["suffix"]
        target = self.run(prefix, return_state=True, stop_early=False)
        source = self.run(source_prefix, return_state=True, stop_early=False)
        assert target.state is not None and source.state is not None
        merged = dict(target.state)
        chosen = list(source.state) if sites is None else [str(Site.parse(s)) for s in sites]
        for name in chosen:
            if name not in source.state:
                raise SiteError(
                    f"{name!r} is not part of the recurrent state of backend {self.name!r}; "
                    f"state sites: {sorted(source.state)}"
                )
            merged[name] = source.state[name]
        return self.run(suffix, capture=capture, initial_state=merged, stop_early=False)

    # -- helpers -------------------------------------------------------------------------------
    def require(self, capability: str) -> None:
        if capability not in self.capabilities:
            raise CapabilityError(
                f"backend {self.name!r} lacks the capability {capability!r} "
                f"(it has: {', '.join(sorted(self.capabilities)) or 'none'})"
            )

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} for {type(self.model).__name__}>"

    # -- registry (seed API) -------------------------------------------------------------------
    @classmethod
    def register(cls, name: str) -> Callable[[type[Backend]], type[Backend]]:
        """Decorator: register a backend class in this process under ``name``."""
        from .plugins import IN_PROCESS, Entry, _manager

        def decorator(backend_cls: type[Backend]) -> type[Backend]:
            if not (isinstance(backend_cls, type) and issubclass(backend_cls, Backend)):
                raise TypeError(f"Backend.register expects a Backend subclass, got {backend_cls!r}")
            if not backend_cls.name:
                backend_cls.name = name
            _manager.register_in_process("backends", Entry(name, backend_cls, IN_PROCESS, "-"))
            return backend_cls

        return decorator

    @classmethod
    def registered(cls) -> dict[str, type[Backend]]:
        from .plugins import get_manager

        return {e.name: e.obj for e in get_manager().backends}

    @classmethod
    def for_model(cls, model: Any, hint: str | None = None) -> Backend:
        """The backend for ``model``: the registered one named by ``hint``, else the one whose
        `can_handle` is most confident (ties: priority, then name, with a warning). The
        selection rules live in `archscope.detection`."""
        from .detection import backend_for

        return backend_for(model, hint)


def _edit_list(edits: Any) -> list[Edit]:
    """``edits`` as a list: None = no edits, one Edit = a list of one; anything but Edits is
    refused with what was given."""
    from .edits import EditError

    if edits is None:
        return []
    if isinstance(edits, Edit):
        return [edits]
    if isinstance(edits, (str, bytes, Mapping)) or not isinstance(edits, Iterable):
        raise EditError(
            f"edits must be an archscope.Edit or a list of them, got "
            f"{type(edits).__name__} {edits!r:.60}; e.g. edits=[Edit.add(site, v)]"
        )
    listed = list(edits)
    for edit in listed:
        if not isinstance(edit, Edit):
            raise EditError(
                f"edits must be archscope.Edit objects, got {type(edit).__name__} "
                f"{edit!r:.60}; e.g. edits=[Edit.add(site, v)]"
            )
    return listed


def _rows_of(request: RunRequest, rows: Any, length: int, capture: list[str]) -> RunRequest:
    """``request`` restricted to ``rows``, trimmed to their ``length`` real tokens."""
    batch = {
        k: v[rows, :length] if getattr(v, "dim", lambda: 0)() == 2 else v
        for k, v in request.batch.items()
    }
    width = request.batch["input_ids"].shape[1] if "input_ids" in request.batch else length
    n_rows = next(iter(request.batch.values())).shape[0]
    edits = {
        n: [_edit_rows(e, rows, n_rows, width, length) for e in es]
        for n, es in request.edits.items()
    }
    initial = (
        {k: v[rows] for k, v in request.initial_state.items()} if request.initial_state else None
    )
    return replace(request, batch=batch, capture=capture, edits=edits, initial_state=initial)


def _edit_rows(edit: Edit, rows: Any, n_rows: int, width: int, length: int) -> Edit:
    """An edit made for the full batch, for a group of its rows trimmed to ``length`` (their
    real tokens): per-row values are sliced; positions count real tokens, so those the group's
    rows have are kept."""
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


def __getattr__(name: str) -> Any:
    # 0.2 exposed per-architecture classes here (e.g. a "...Backend" class per family); they now
    # live in plugins. Resolve such names through the registry so old imports keep working.
    if name.endswith("Backend") and not name.startswith("_"):
        from .plugins import get_manager

        for entry in get_manager().backends:
            if entry.obj.__name__ == name:
                return entry.obj
        raise AttributeError(
            f"archscope.backends has no {name!r}: no installed plugin registers a backend class "
            f"of that name (installed: {', '.join(e.obj.__name__ for e in get_manager().backends)})"
        )
    raise AttributeError(f"module 'archscope.backends' has no attribute {name!r}")
