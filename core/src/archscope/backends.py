"""The Backend protocol: one class per architecture family maps a model's internals to sites.

A backend wraps one model instance. `Backend.for_model` picks the registered backend whose
`can_handle` is most confident. Backend classes live in plugins (entry-point group
``archscope``); `Backend.register` registers one in-process for quick experiments.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, cast

from . import guards
from .batch import padding_side, prepared
from .edits import Edit, EditError, EditOp, Positions
from .errors import (
    BackendError,
    CapabilityError,
    NoBackendError,
    PaddingError,
    SiteError,
    UsageError,
)
from .guards import InputLimits
from .hookpoints import SiteTable
from .runs import RunRequest, RunResult
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
    "ModelState",
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


class ModelState:
    """What a backend derives from its model while the model's modules stay the same: the
    module list (the walk `Backend.run` makes anyway, for inference mode, doubles as the check
    that nothing was replaced, added or removed), the input embedding and its size (a resized
    vocabulary changes the sites' sizes too), the default input limits and the resolved
    requests. `Backend.model_state` builds a new one, and calls `Backend.model_changed`, when
    either differs from the last run's."""

    __slots__ = (
        "embedding",
        "first_parameter",
        "limits",
        "memory",
        "modules",
        "plans",
        "requests",
        "vocab",
    )

    def __init__(self, model: Any) -> None:
        self.modules = module_list(model)
        self.embedding = _input_embedding(model)
        self.vocab = _rows(self.embedding)
        self.limits: InputLimits | None = None
        #: (module, name) of the model's first parameter, whose device is the model's
        self.first_parameter: tuple[Any, str] | None = None
        #: (capture, edits present) → resolved capture names; only requests without edits
        self.requests: dict[tuple[Any, ...], list[str]] = {}
        #: what the engine derives from a resolved request (`archscope.engine.HookBackend`)
        self.plans: dict[tuple[Any, ...], Any] = {}
        #: the site widths `archscope.guards.check_memory` needs (it fills this in)
        self.memory: Any = None

    def current(self, model: Any) -> bool:
        """Whether ``model`` still has the modules and vocabulary this state was built from."""
        return module_list(model) == self.modules and _rows(self.embedding) == self.vocab


def module_list(model: Any) -> list[Any]:
    """Every module under ``model``, parents before children (a plain walk over ``_modules``:
    `nn.Module.modules` also builds names and a memo, several times slower on small models)."""
    found = [model]
    if getattr(model, "_modules", None) is None:  # not a torch module: nothing below it
        return found
    try:
        for module in found:  # grows while it is read
            children = module._modules
            if children:
                found.extend(children.values())
    except AttributeError:  # a child slot set to None (``module.name = None``): skip those
        found = [model]
        for module in found:
            found += [child for child in module._modules.values() if child is not None]
    return found


def _input_embedding(model: Any) -> Any:
    get_embeddings = getattr(model, "get_input_embeddings", None)
    if not callable(get_embeddings):
        return None
    try:  # a model without one may raise NotImplementedError
        return get_embeddings()
    except Exception:
        return None


def _rows(embedding: Any) -> Any:
    return getattr(embedding, "num_embeddings", None)


#: Requests remembered per model state (distinct capture lists of one backend).
_MAX_REQUESTS = 256


class Backend:
    """Base class of every backend. Subclasses set the class attributes and implement
    `can_handle`, `site_table` (built with `SiteTable`, the one way to declare sites) and
    `execute` (the hook engine, `archscope.engine.HookBackend`, does the last)."""

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
    def site_table(self) -> SiteTable | Mapping[str, Any]:
        """The backend's sites, in forward order, built with `SiteTable` (the one way to
        declare sites): site name → (`SiteInfo`, `Hookpoint` or None; None = the backend
        produces the value itself). Called once per backend, on first use (`table`)."""
        raise NotImplementedError(f"{type(self).__name__} must implement site_table()")

    @functools.cached_property
    def table(self) -> SiteTable:
        """The site table (`site_table()`, built on first use, so a subclass may set its own
        attributes in ``__init__`` before or after calling ``super().__init__()``; built again
        after the model's modules changed, see `model_state`)."""
        self._state()  # from now on, a change of the model's modules is noticed
        return SiteTable.of(self.site_table())

    def sites(self) -> dict[str, SiteInfo]:
        """Every site of the wrapped model, in forward order."""
        self.model_state()
        return dict(self._site_infos)

    @functools.cached_property
    def _site_infos(self) -> dict[str, SiteInfo]:
        return self.table.infos()

    def site_info(self, site: str | Site) -> SiteInfo:
        self.model_state()
        return resolve(site, self._site_infos, self.name or type(self).__name__)

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
        the inputs (`prepare_inputs`), checks ``initial_state``
        (`archscope.state_patch.check_initial_state`) and
        hands a `RunRequest` to `execute`.
        """
        edits = _edit_list(edits)
        # what was derived from the model (site table, module list, limits, resolved requests)
        # is reused while its modules and vocabulary stay the same, and rebuilt when they change
        state = self.model_state()
        wanted, edit_map = self.check_request(
            () if capture is None else capture, edits, initial_state, return_state
        )
        # the guards are looked up on their module at each run (a test may replace one)
        device = self.device
        guards.check_device(device, self.name)
        padding = None
        if type(self).prepare_inputs is Backend.prepare_inputs:
            batch, padding = self._prepare(inputs, device)
        else:
            batch = self.prepare_inputs(inputs)
        guards.check_inputs(batch, self._limits(state), self.name)
        full_pass = not (stop_early and wanted and "logits" not in wanted) or return_state
        guards.check_memory(self, batch, wanted, full_pass)
        if initial_state:
            from .state_patch import check_initial_state

            check_initial_state(self, initial_state, batch)
        request = RunRequest(
            batch,
            wanted,
            edit_map,
            stop_early=stop_early,
            initial_state=initial_state,
            return_state=return_state,
            grad=grad,
            padding=padding,
        )
        # hooks, edits, early stops and mode changes live on the model's shared modules: one
        # run at a time per model (see docs/architecture.md, "Runs and threads")
        with (
            guards.model_lock(self.model),
            guards.inference_mode(self.model, self.inference, modules=state.modules),
        ):
            result = None
            if self.regroup_states:
                from .regroup import execute_regrouped, needs_regrouping

                if needs_regrouping(self, request):
                    result = execute_regrouped(self, request)
            if result is None:
                result = self.execute(request)
        guards.warn_if_not_finite(result.logits, self.name)
        return result

    # -- what is derived from the model --------------------------------------------------------
    def model_state(self) -> ModelState:
        """What this backend derived from its model, checked against the model first: when a
        module was replaced, added or removed, or the input embedding was resized, since it was
        built, `model_changed` runs and a new state is built. `run` calls this once per run
        (it costs a walk over the modules, which the run needs anyway for inference mode)."""
        state: ModelState | None = self.__dict__.get("_model_state")
        if state is not None:
            if state.current(self.model):
                return state
            self.model_changed()
        state = self.__dict__["_model_state"] = ModelState(self.model)
        return state

    def _state(self) -> ModelState:
        """The current state without checking it again (within one run)."""
        state: ModelState | None = self.__dict__.get("_model_state")
        if state is None:
            state = self.__dict__["_model_state"] = ModelState(self.model)
        return state

    def model_changed(self) -> None:
        """Forget what was derived from the model's modules: the site table and every cached
        property of the backend (rebuilt on next use). Called by `model_state` when the model
        changed; a backend that keeps more (e.g. a structure it found in ``__init__``) extends
        this and calls ``super().model_changed()``."""
        for cls in type(self).__mro__:
            for name, value in vars(cls).items():
                if isinstance(value, functools.cached_property):
                    self.__dict__.pop(value.attrname or name, None)

    def _limits(self, state: ModelState) -> InputLimits:
        if type(self).input_limits is not Backend.input_limits:
            return self.input_limits()  # a backend's own limits: asked at every run
        return self._model_limits(state)

    def _model_limits(self, state: ModelState) -> InputLimits:
        """The default limits, read once per model state."""
        limits = state.limits
        if limits is None:
            from .guards import limits_from_model

            limits = state.limits = limits_from_model(self.model, self)
        return limits

    def input_limits(self) -> InputLimits:
        """What token batches the model can take (vocabulary size, maximum positions), checked
        before every forward pass. The default reads the model's input embedding and its
        config (`archscope.guards.limits_from_model`) once per model state (`model_state`);
        override for models that keep them elsewhere (None = no limit; an override may call
        ``super().input_limits()`` for the default)."""
        return self._model_limits(self.model_state())

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
        table = self._site_infos  # the run checked the model (model_state) just before
        backend = self.name or type(self).__name__
        capture = tuple(capture)
        state = self.__dict__.get("_model_state")
        requests = (state if state is not None else self._state()).requests
        try:
            wanted = requests.get(capture)
        except TypeError:  # an unhashable entry: resolve says what is wrong with it
            wanted = None
        if wanted is None:
            wanted = [resolve(s, table, backend).name for s in capture]
            if len(requests) < _MAX_REQUESTS:
                requests[capture] = wanted
        wanted = list(wanted)
        edit_map: dict[str, list[Edit]] = {}
        for edit in edits:
            if not isinstance(edit, Edit):
                raise EditError(f"edits must be archscope.Edit objects, got {type(edit).__name__}")
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

    # -- rows of different lengths -------------------------------------------------------------
    #: True when the model's state outputs are the state after the whole (right-padded) row.
    #: `run` then reads state sites, and the returned state, from one extra pass per group of
    #: equal-length rows trimmed to their length: the state after each row's last real token.
    regroup_states: ClassVar[bool] = False

    def read_only_reason(self, info: SiteInfo) -> str:
        """Why a site cannot be edited, for the error message (override to explain)."""
        return ""

    @property
    def device(self) -> torch.device:
        """The device of the model's first parameter (CPU for a model without parameters)."""
        state: ModelState | None = self.__dict__.get("_model_state")
        place: Any = state.first_parameter if state is not None else None
        if place is not None:  # read again each time: .to() moves it in place
            found = place[0]._parameters.get(place[1])
            if found is not None:
                return found.device  # type: ignore[no-any-return]
        state = self._state()
        for name, param in self.model.named_parameters():
            owner_path, _, key = name.rpartition(".")
            state.first_parameter = (self.model.get_submodule(owner_path), key)
            return cast("torch.device", param.device)
        import torch

        return torch.device("cpu")

    def prepare_inputs(self, inputs: Any) -> dict[str, Any]:
        """Validate and batch the inputs on the model's device; refuse padding the backend does
        not handle (its ``padding`` attribute) instead of returning wrong activations."""
        return self._prepare(inputs, self.device)[0]

    def _prepare(self, inputs: Any, device: Any) -> tuple[dict[str, Any], str]:
        """`prepare_inputs` on ``device``, and the batch's padding side."""
        padding = self.padding
        batch, full = prepared(inputs, device, "left" if padding == "left" else "right")
        mask = batch.get("attention_mask")
        side = "none" if full or mask is None else padding_side(mask)
        if side != "none" and (side == "mixed" or padding not in (side, "both")):
            raise PaddingError(self.padding_message(side))
        return batch, side

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
        parsed = [Site.parse(n) for n in (layers if layers is not None else self.layer_names())]
        result = self.run(inputs, capture=parsed)  # Site objects: not parsed again
        names = [str(s) for s in parsed]
        table = self.sites()
        records = []
        for name in names:
            info = table[name]
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
        ``sites`` (default: all state sites); continue on ``suffix``; return the suffix run."""
        from .state_patch import state_patch

        return state_patch(self, prefix, source_prefix, suffix, sites, capture)

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
                raise UsageError(
                    f"Backend.register expects a Backend subclass, got {backend_cls!r}"
                )
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

        return cast("Backend", backend_for(model, hint))


def _edit_list(edits: Any) -> list[Edit]:
    """``edits`` as a list: None = no edits, one Edit = a list of one; anything but Edits is
    refused with what was given."""
    if edits is None or (type(edits) is tuple and not edits):  # the default: no edits
        return []
    from .edits import EditError

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
