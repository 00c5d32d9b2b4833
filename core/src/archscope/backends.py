"""The Backend protocol: one class per architecture family maps a model's internals to sites.

A backend wraps one model instance. `Backend.for_model` picks the registered backend whose
`can_handle` is most confident. Backend classes live in plugins (entry-point group
``archscope``); `Backend.register` registers one in-process for quick experiments.
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from .errors import BackendError, CapabilityError, NoBackendError, PaddingError
from .sites import Site, SiteError, SiteInfo, resolve

if TYPE_CHECKING:  # torch is imported lazily: discovery and the CLI must not pay for it
    import torch


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


EditOp = Literal["replace", "add", "scale", "fn"]


def _is_index(value: Any) -> bool:
    """An integer index (int, numpy or 0-d torch integer), not a bool."""
    if isinstance(value, bool):
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True
Positions = None | int | slice | Sequence[int]


@dataclass(frozen=True)
class Edit:
    """A change to a site's value during a run.

    ``op``: ``replace`` (patch), ``add`` (steer), ``scale`` (multiply; 0 ablates) or ``fn``
    (call ``value(tensor) -> tensor``). ``positions`` selects sequence positions of token sites
    (None = all). ``units`` selects feature indices (neurons) of the last axis (None = all).
    A tensor ``value`` must have exactly the selected shape, or be a vector over the selected
    units, which is then applied at every selected position; anything else is an error.
    """

    site: str
    op: EditOp
    value: Any
    positions: Positions = None
    units: Sequence[int] | None = None

    def __post_init__(self) -> None:
        where = f"Edit of {self.site!r}"
        if self.op not in ("replace", "add", "scale", "fn"):
            raise ValueError(f"{where}: unknown op {self.op!r}; use replace, add, scale or fn "
                             "(Edit.replace / add / scale / apply)")
        if self.op == "fn" and not callable(self.value):
            raise TypeError(f"{where}: Edit.apply needs a function tensor -> tensor, got "
                            f"{type(self.value).__name__}")
        if self.op != "fn" and (isinstance(self.value, (str, bytes)) or callable(self.value)):
            raise TypeError(f"{where}: the value of a {self.op} edit is a number or a tensor, "
                            f"got {type(self.value).__name__}")
        for field_name in ("positions", "units"):  # tensors / arrays of indices -> lists
            value = getattr(self, field_name)
            if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
                object.__setattr__(self, field_name, value.tolist())
        pos = self.positions
        ok = (pos is None or pos == "last" or isinstance(pos, slice) or _is_index(pos)
              or (isinstance(pos, Sequence) and not isinstance(pos, str)
                  and all(_is_index(p) for p in pos)))
        if not ok:
            raise ValueError(f"{where}: positions must be None (all), an int, a slice, a list of "
                             f"ints or 'last' (each row's last real token); got {pos!r}")
        if self.units is not None and (isinstance(self.units, str) or not all(
                _is_index(u) for u in self.units)):
            raise ValueError(f"{where}: units must be a list of feature indices (ints), got "
                             f"{self.units!r}")

    @classmethod
    def replace(cls, site: str | Site, value: Any, positions: Positions = None,
                units: Sequence[int] | None = None) -> Edit:
        return cls(str(site), "replace", value, positions, units)

    @classmethod
    def add(cls, site: str | Site, value: Any, positions: Positions = None,
            units: Sequence[int] | None = None) -> Edit:
        return cls(str(site), "add", value, positions, units)

    @classmethod
    def scale(cls, site: str | Site, factor: Any, positions: Positions = None,
              units: Sequence[int] | None = None) -> Edit:
        return cls(str(site), "scale", factor, positions, units)

    @classmethod
    def apply(cls, site: str | Site, fn: Callable[[Any], Any], positions: Positions = None,
              units: Sequence[int] | None = None) -> Edit:
        return cls(str(site), "fn", fn, positions, units)


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
        capture: Iterable[str | Site] = (),
        edits: Iterable[Edit] = (),
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
        """
        raise NotImplementedError(f"{type(self).__name__} must implement run()")

    def check_request(
        self,
        capture: Iterable[str | Site],
        edits: Iterable[Edit],
        initial_state: Mapping[str, torch.Tensor] | None = None,
        return_state: bool = False,
    ) -> tuple[list[str], dict[str, list[Edit]]]:
        """Validate what a run asks for: site names to capture and edits grouped by site.
        Every `run` implementation calls this, so bad requests fail the same way everywhere."""
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
                raise SiteError(f"site {info.name!r} of backend {backend!r} is read-only"
                                + (f" ({reason})" if reason else "")
                                + f"; writable sites include {', '.join(writable[:8]) or 'none'}")
            edit_map.setdefault(info.name, []).append(edit)
        if initial_state is not None or return_state:
            self.require("state_patch")
        return wanted, edit_map

    def read_only_reason(self, info: SiteInfo) -> str:
        """Why a site cannot be edited, for the error message (override to explain)."""
        return ""

    @property
    def device(self) -> torch.device:
        import torch

        for p in self.model.parameters():
            return p.device
        return torch.device("cpu")

    def prepare_inputs(self, inputs: Any) -> dict[str, Any]:
        """Validate and batch the inputs on the model's device; refuse padding the backend does
        not handle (its ``padding`` attribute) instead of returning wrong activations."""
        from .engine import padding_side, prepare_inputs

        batch = prepare_inputs(inputs, self.device)
        mask = batch.get("attention_mask")
        side = padding_side(mask) if mask is not None else "none"
        if side == "mixed" or (side != "none" and self.padding not in (side, "both")):
            raise PaddingError(self.padding_message(side))
        return batch

    def padding_message(self, side: str) -> str:
        """The error for a batch padded on ``side`` ("left", "right" or "mixed" = gaps)."""
        if side == "mixed":
            return (f"backend {self.name!r}: the rows of this attention_mask are not all "
                    "padded on one side (or have padding between real tokens); pad every row on "
                    f"the same side{'' if self.padding == 'both' else ' (' + self.padding + ')'}")
        return (f"backend {self.name!r} handles only {self.padding} padding, but this batch is "
                f"{side}-padded: pad on the {self.padding} (e.g. tokenizer.padding_side = "
                f"{self.padding!r}) or run the rows one at a time")

    def extract(self, inputs: Any, layers: list[str] | None = None) -> list[ActivationRecord]:
        """Seed API: capture ``layers`` (default: `layer_names()`) as ActivationRecords."""
        names = [str(Site.parse(n)) for n in (layers if layers is not None else self.layer_names())]
        result = self.run(inputs, capture=names)
        records = []
        for name in names:
            info = self.site_info(name)
            records.append(ActivationRecord(
                layer_name=name,
                activations=result.activations[name],
                meta={"kind": info.kind, "shape": info.shape, "dim": info.dim,
                      "backend": self.name, "site": name},
                attention_mask=result.attention_mask,
            ))
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
        ``sites`` (default: all state sites); continue on ``suffix``; return the suffix run."""
        self.require("state_patch")
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
        `can_handle` is most confident (ties: priority, then name, with a warning)."""
        from .plugins import get_manager, suggest_distribution

        manager = get_manager()
        if hint is not None:
            entry = manager.backends.get(hint)
            if entry is None:
                aliases = manager.backends.aliases()
                raise NoBackendError(
                    f"unknown backend hint {hint!r}; registered backends: "
                    f"{', '.join(manager.backends.names()) or '(none)'}"
                    + (f"; aliases: {', '.join(f'{a}->{n}' for a, n in sorted(aliases.items()))}"
                       if aliases else "")
                )
            backend_cls: type[Backend] = entry.obj
            return backend_cls(model)

        scored: list[tuple[float, int, str, type[Backend]]] = []
        for entry in manager.backends:
            try:
                score = entry.obj.can_handle(model)
            except Exception as exc:  # can_handle must not raise; do not let one break detection
                warnings.warn(f"archscope: {entry.name}.can_handle raised {exc!r}; ignoring it",
                              stacklevel=2)
                continue
            if score is not None and score > 0:
                scored.append((float(score), int(entry.obj.priority), entry.name, entry.obj))
        if not scored:
            model_cls = type(model)
            installed = ", ".join(
                f"{e.name} ({e.distribution})" for e in manager.backends) or "(none)"
            suggestion = suggest_distribution(model)
            hint_text = (
                f"install {suggestion} (pip install {suggestion})"
                if suggestion and suggestion not in {e.distribution for e in manager.backends}
                else "describe the model with a custom-model adapter or write a backend plugin "
                "(see docs/plugin-authors.md), or pass hint=<backend name>"
            )
            raise NoBackendError(
                f"no installed archscope backend can handle {model_cls.__qualname__} "
                f"(module {model_cls.__module__}). Installed backends: {installed}. "
                f"To fix: {hint_text}."
            )
        scored.sort(key=lambda t: (-t[0], -t[1], t[2]))
        best = scored[0]
        ties = [s for s in scored if s[0] == best[0]]
        if len(ties) > 1:
            warnings.warn(
                f"archscope: backends {', '.join(t[2] for t in ties)} are equally confident "
                f"({best[0]}) for {type(model).__name__}; using {best[2]} (pass hint= to choose)",
                stacklevel=2,
            )
        return best[3](model)


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
