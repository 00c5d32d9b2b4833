"""The hook engine: `HookBackend` implements `Backend.execute` from a site table.

A backend built on `HookBackend` supplies `site_table()`, built with `SiteTable`: each site with
a `Hookpoint` (which module, whether its input or output, which element of a tuple, optional
`View`). The engine
attaches hooks only for the requested sites, applies edits, stops the forward pass after the
deepest captured site when logits are not needed, and removes every hook it attached in all
cases.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any, ClassVar

from .backends import Backend
from .batch import last_real_index, padding_side, prepare_inputs
from .edits import apply_edit
from .errors import BackendError
from .hookpoints import Hookpoint, SiteTable, View
from .modules import accepted_kwargs, find_module, get_module
from .runs import RunRequest, RunResult
from .sites import Site, resolve

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "LOGITS_FORMS",
    "HookBackend",
    "Hookpoint",
    "RunContext",
    "RunRequest",
    "SiteTable",
    "StopForward",
    "View",
    "accepted_kwargs",
    "apply_edit",
    "find_module",
    "get_module",
    "last_real_index",
    "logits_from",
    "padding_side",
    "prepare_inputs",
]

#: The model outputs logits are found in, for error messages.
LOGITS_FORMS = (
    "a tensor",
    "a tuple or list whose first element is the logits",
    "an object with a .logits attribute",
    "a mapping with a 'logits' key",
)


class StopForward(Exception):
    """Raised inside a hook to end the forward pass early; never escapes `run`."""


#: The run as the extension points receive it (one class with the request `Backend.run` built).
RunContext = RunRequest


def logits_from(output: Any) -> torch.Tensor | None:
    """The logits in a model output of any of the `LOGITS_FORMS`, or None."""
    import torch

    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        found = output.get("logits")
    else:
        found = getattr(output, "logits", None)
    if found is None and isinstance(output, (tuple, list)) and output:
        found = output[0]
    return found if isinstance(found, torch.Tensor) else None


#: 0.2 names of the extension points → their public names (0.2 subclasses keep working).
_RENAMED = {
    "_site_table": "site_table",
    "_forward": "forward",
    "_logits_of": "logits_of",
    "_read_unhooked": "read_unhooked",
    "_final_state": "final_state",
    "_run_context": "run_settings",
}


class HookBackend(Backend):
    """A backend that maps sites to module hooks. Subclasses implement `site_table`; the
    other extension points (`forward`, `logits_of`, `read_unhooked`, `final_state`,
    `run_settings`) have defaults that suit a model called as ``model(input_ids, ...)``."""

    #: Set True when the backend applies edits of hookpoint-less writable sites itself (in
    #: `forward` / `read_unhooked`, with `apply_edit`); otherwise such edits are refused.
    edits_unhooked: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for old, new in _RENAMED.items():
            if old in cls.__dict__ and new not in cls.__dict__:
                setattr(cls, new, cls.__dict__[old])

    # -- extension points ----------------------------------------------------------------------
    def forward(self, ctx: RunContext) -> Any:
        """Call the model on ``ctx.batch``, passing only the keys its ``forward`` accepts (a
        model without an ``attention_mask`` argument gets none). Override to add arguments
        (cache, positions, initial state)."""
        kwargs = accepted_kwargs(self.model.forward, ctx.batch)
        if "input_ids" in ctx.batch and "input_ids" not in kwargs:  # forward(self, x, ...)
            return self.model(ctx.batch["input_ids"], **kwargs)
        return self.model(**kwargs)

    def logits_of(self, output: Any) -> torch.Tensor | None:
        """The logits in the model's output (any of `LOGITS_FORMS`)."""
        return logits_from(output)

    def read_unhooked(self, ctx: RunContext, output: Any, names: list[str]) -> dict[str, Any]:
        """Values of sites that have no hookpoint (after the forward pass)."""
        raise BackendError(
            f"{type(self).__name__} declares sites {names} without a hookpoint "
            "but does not implement read_unhooked()"
        )

    def final_state(self, ctx: RunContext, output: Any) -> dict[str, torch.Tensor]:
        """The recurrent state after each row's last real token (``return_state=True``); by
        default the values of the backend's state sites."""
        names = self.table.names(kind="state")
        if "state_patch" not in self.capabilities or not names:
            raise BackendError(
                f"backend {self.name!r} cannot return a recurrent state "
                "(no 'state_patch' capability)"
            )
        return {n: ctx.store[n] for n in names}

    def run_settings(self, ctx: RunContext) -> contextlib.AbstractContextManager[Any]:
        """Temporary model settings for one run (restored afterwards)."""
        return contextlib.nullcontext()

    # -- the engine ----------------------------------------------------------------------------
    def hookpoint(self, site: str | Site) -> Hookpoint | None:
        info = resolve(site, self.sites(), self.name)
        return self.table.hookpoint(info.name)

    def _engine_plan(self, request: RunRequest) -> _Plan:
        """What the engine derives from a request's site names and options alone (the hooked
        sites in forward order, where to stop, which edits need the whole pass), kept with
        the model state: rebuilt when the model's modules change (`Backend.model_state`)."""
        key = (
            tuple(request.capture),
            tuple(request.edits),
            request.stop_early,
            request.return_state,
        )
        plans = self._state().plans
        plan: _Plan | None = plans.get(key)
        if plan is None:
            plan = _Plan(self, request)
            if len(plans) < _MAX_PLANS:
                plans[key] = plan
        return plan

    def _start(self, request: RunRequest, plan: _Plan | None = None) -> RunRequest:
        """The run: ``request`` with nothing captured yet and the site to stop after."""
        if plan is None:
            plan = self._engine_plan(request)
        if type(request) is not RunRequest:  # a subclass keeps its own fields
            return replace(
                request, capture=list(plan.capture), stop_after=plan.stop_after, store={}, extra={}
            )
        return RunRequest(  # what `replace` does, without its per-call field walk
            request.batch,
            list(plan.capture),
            request.edits,
            stop_early=request.stop_early,
            initial_state=request.initial_state,
            return_state=request.return_state,
            grad=request.grad,
            stop_after=plan.stop_after,
            padding=request.padding,
        )

    @functools.cached_property
    def _hook_order(self) -> tuple[dict[str, float], list[str]]:
        """Forward order of the hooked sites, and the hooked state sites (from the site table;
        forgotten with it when the model changes, see `Backend.model_changed`)."""
        table = self.table
        order = {n: i.order for n, (i, hp) in table.items() if hp is not None}
        return order, [n for n in order if table[n][0].kind == "state"]

    def execute(self, request: RunRequest) -> RunResult:
        import torch

        plan = self._engine_plan(request)
        ctx = self._start(request, plan)
        wanted = request.capture
        handles = []
        output = None
        state = None
        try:
            for name in plan.hooked:
                handles.append(self._attach(name, ctx))
            with self.run_settings(ctx), torch.set_grad_enabled(ctx.grad):
                try:
                    output = self.forward(ctx)
                except StopForward:
                    output = None
                if plan.late and output is None:
                    raise BackendError(
                        f"edits of {plan.late} need the full forward pass, but this run stopped "
                        f"early after {ctx.stop_after!r}: a run whose capture list lacks "
                        "'logits' stops after its deepest captured site automatically. Pass "
                        "stop_early=False (or also capture 'logits') to run the whole model "
                        "with these edits"
                    )
                if plan.unhooked:
                    ctx.store.update(self.read_unhooked(ctx, output, list(plan.unhooked)))
                if ctx.return_state:
                    state = self.final_state(ctx, output)
        finally:
            for handle in handles:
                handle.remove()
        logits = self._find_logits(output)
        store = ctx.store
        if logits is not None and "logits" not in store and "logits" in wanted:
            store["logits"] = logits
        try:
            activations = {n: store[n] for n in wanted}
        except KeyError:
            missing = [n for n in wanted if n not in store]
            raise BackendError(
                f"backend {self.name!r} did not produce {missing}: the forward "
                "pass never reached their modules"
            ) from None
        return RunResult(logits, activations, ctx.batch.get("attention_mask"), state)

    def _find_logits(self, output: Any) -> torch.Tensor | None:
        if output is None:
            return None
        logits = self.logits_of(output)
        if logits is None and "logits" in self.capabilities:
            raise BackendError(
                f"backend {self.name!r} claims 'logits' but found none in the model's output "
                f"({type(output).__name__}); the engine accepts {', '.join(LOGITS_FORMS)}. "
                "Return one of these from the model, or override logits_of(output)"
            )
        return logits

    def _attach(self, name: str, run: RunRequest) -> Any:
        info, hp = self.table[name]
        assert hp is not None
        edits = run.edits.get(name, [])
        stop = name == run.stop_after
        module = hp.module
        if (
            not edits
            and hp.io == "output"
            and hp.view is None
            and hp.to_site is None
            and module is not self.model
            and _wrappable(module)
        ):  # the common case, a plain read of a module's output: one function, no hook
            return _WrappedForward.reading(module, name, hp.index, hp.clone, run, stop)
        capture = name in run.capture

        # the hookpoint's view: raw module value -> site tensor (and back, for edits)
        view = hp.view
        converted = hp.to_site is not None or hp.from_site is not None
        mask = run.batch.get("attention_mask")

        def process(raw: Any) -> Any:
            if view is not None:
                value = view.read(raw, run)
            else:
                value = hp.read(raw) if converted else raw
            for edit in edits:
                if view is not None:
                    value = view.edit(value, edit, info, run)
                else:
                    value = apply_edit(value, edit, info, mask)
            if capture:
                stored = value.detach() if not run.grad and value.requires_grad else value
                run.store[name] = stored.clone() if hp.clone else stored
            if not edits:
                return raw
            if view is not None:
                return view.write(value, raw, run)
            return hp.write(value, raw) if converted else value

        assert not isinstance(module, str), "SiteTable resolves module paths"
        if hp.io == "output":
            hook = _output_hook(hp, process, bool(edits), stop)
            if module is not self.model and _wrappable(module):
                return _WrappedForward(module, None, hook)
            return module.register_forward_hook(hook)
        pre_hook = _input_hook(name, hp, process, bool(edits), stop)
        if module is not self.model and _wrappable(module):
            return _WrappedForward(module, pre_hook, None)
        return module.register_forward_pre_hook(pre_hook, with_kwargs=True)


#: Plans remembered per model state (distinct requests of one backend).
_MAX_PLANS = 256


class _Plan:
    """What `HookBackend.execute` derives from a request's site names and options: the sites
    to capture (with the state sites ``return_state`` reads), the hooked sites in forward
    order, the site to stop after, edits that need the whole pass and captures without a
    hookpoint. Building one refuses edits the backend cannot apply."""

    __slots__ = ("capture", "hooked", "late", "stop_after", "unhooked")

    def __init__(self, backend: HookBackend, request: RunRequest) -> None:
        table = backend.table
        order, state_sites = backend._hook_order
        wanted = request.capture
        need_logits = (
            not (request.stop_early and wanted and "logits" not in wanted) or request.return_state
        )
        self.stop_after = None
        if not need_logits:
            hooked = [n for n in wanted if table[n][1] is not None]
            if hooked and len(hooked) == len(wanted):
                self.stop_after = max(hooked, key=lambda n: table[n][0].order)
        unhooked_edits = [n for n in request.edits if table[n][1] is None]
        if unhooked_edits and not backend.edits_unhooked:
            raise BackendError(
                f"backend {backend.name!r} cannot edit {unhooked_edits} during a run (they are "
                "not module inputs or outputs); recurrent states are set with initial_state= "
                "or state_patch()"
            )
        sites = {*wanted, *request.edits} & order.keys()
        self.capture = list(wanted)
        if request.return_state:  # the default final_state reads the state sites' hooks
            sites |= {*state_sites}
            self.capture += [n for n in state_sites if n not in wanted]
        self.hooked = sorted(sites, key=order.__getitem__)
        self.late = [n for n in request.edits if n not in order]
        self.unhooked = [n for n in wanted if n not in order]


def _wrappable(module: Any) -> bool:
    """Whether the run may read ``module`` by wrapping its ``forward`` for the run instead of
    registering a hook: only where that is indistinguishable, i.e. the module has no hooks of
    its own (so none runs before or after the wrapper's read in a different order), torch has
    no global module hooks, and ``forward`` is not already an attribute of the instance (as
    accelerate's hooks make it). The model itself is always hooked: the backend reads its
    ``forward``'s arguments. A module with a hook makes every module call take torch's
    slower hook path; a wrapped ``forward`` keeps the fast one (≈15 µs per module and call on
    a CPU)."""
    torch_module = _torch_module()
    return not (
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
        or "forward" in module.__dict__
        or torch_module._global_forward_hooks
        or torch_module._global_forward_pre_hooks
        or torch_module._global_backward_hooks
        or torch_module._global_backward_pre_hooks
    )


@functools.cache
def _torch_module() -> Any:
    """``torch.nn.modules.module`` (where torch keeps its global hooks), imported on first
    use."""
    from torch.nn.modules import module

    return module


class _WrappedForward:
    """``module.forward`` replaced, for one run, by a function that calls a forward pre-hook
    or forward hook (the same functions, with the same return conventions) around the class's
    own ``forward``; `remove` (the handle's method, like a hook handle's) restores it."""

    __slots__ = ("module", "wrapper")

    def __init__(
        self,
        module: Any,
        pre_hook: Callable[..., Any] | None,
        hook: Callable[..., Any] | None,
    ) -> None:
        forward = module.forward

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if pre_hook is not None:
                changed = pre_hook(module, args, kwargs)
                if changed is not None:
                    args, kwargs = changed
            output = forward(*args, **kwargs)
            if hook is not None:
                changed = hook(module, args, output)
                if changed is not None:
                    output = changed
            return output

        self._install(module, forward, wrapper)

    @classmethod
    def reading(
        cls, module: Any, name: str, index: int | None, clone: bool, run: RunRequest, stop: bool
    ) -> _WrappedForward:
        """``module.forward`` that stores its output (element ``index`` of a tuple or list
        output) in ``run.store[name]``, detached unless the run records gradients, copied with
        ``clone``; then ends the pass with ``stop``. What `_output_hook` does for a read
        without edits, in one call."""
        forward = module.forward
        store = run.store
        grad = run.grad

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            output = forward(*args, **kwargs)
            value = output
            if index is not None and isinstance(output, (tuple, list)):
                value = output[index]
            if not grad and value.requires_grad:
                value = value.detach()
            store[name] = value.clone() if clone else value
            if stop:
                raise StopForward
            return output

        self = cls.__new__(cls)
        self._install(module, forward, wrapper)
        return self

    def _install(self, module: Any, forward: Any, wrapper: Callable[..., Any]) -> None:
        # `inspect.signature(module.forward)` (which callers use to pick the arguments to
        # pass) follows ``__wrapped__`` to the real signature; the names are the method's
        # (what `functools.update_wrapper` would copy, less the docstring and annotations)
        wrapper.__wrapped__ = forward  # type: ignore[attr-defined]
        wrapper.__name__ = forward.__name__
        wrapper.__qualname__ = forward.__qualname__
        module.__dict__["forward"] = wrapper
        self.module, self.wrapper = module, wrapper

    def remove(self) -> None:
        if self.module.__dict__.get("forward") is self.wrapper:
            del self.module.__dict__["forward"]


def _output_hook(
    hp: Hookpoint, process: Callable[[Any], Any], edits: bool, stop: bool
) -> Callable[..., Any]:
    """A forward hook that reads (and, with edits, replaces) the hookpoint's output."""

    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        result: Any
        if hp.index is not None and isinstance(output, (tuple, list)):
            new = process(output[hp.index])
            result = output
            if edits:
                items = list(output)
                items[hp.index] = new
                result = type(output)(items) if isinstance(output, tuple) else items
        else:
            new = process(output)
            result = new if edits else output
        if stop:
            raise StopForward
        return result if edits else None

    return hook


def _input_hook(
    name: str, hp: Hookpoint, process: Callable[[Any], Any], edits: bool, stop: bool
) -> Callable[..., Any]:
    """A forward pre-hook that reads (and, with edits, replaces) the hookpoint's input."""

    def pre_hook(module: nn.Module, args: Any, kwargs: Any) -> Any:
        assert hp.index is not None
        if len(args) > hp.index:
            new = process(args[hp.index])
            if edits:
                args = (*args[: hp.index], new, *args[hp.index + 1 :])
        elif hp.arg in kwargs:
            new = process(kwargs[hp.arg])
            if edits:
                kwargs = {**kwargs, hp.arg: new}
        else:
            raise BackendError(
                f"site {name!r}: {type(module).__name__} was called without "
                f"argument {hp.index} / {hp.arg!r}"
            )
        if stop:
            raise StopForward
        return (args, kwargs) if edits else None

    return pre_hook
