"""The hook engine: turns "site → module + how to read/write it" into `Backend.run`.

A backend built on `HookBackend` supplies a table of sites, each with a `Hookpoint` (which
module, whether its input or output, which element of a tuple). The engine attaches hooks
only for the requested sites, applies edits, stops the forward pass after the deepest
captured site when logits are not needed, and removes every hook it attached in all cases.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from .backends import Backend, BackendError, Edit, RunResult
from .sites import Site, SiteError, SiteInfo, resolve

if TYPE_CHECKING:
    import torch
    from torch import nn


class StopForward(Exception):
    """Raised inside a hook to end the forward pass early; never escapes `run`."""


@dataclass(frozen=True)
class Hookpoint:
    """Where a site's value lives: the ``output`` (or ``input``) of ``module``.

    ``index`` picks an element when the value is a tuple/list (block outputs such as
    ``(hidden, cache)``); for ``input``, ``index`` is the positional argument and ``arg`` the
    keyword name used when the argument is passed by keyword.
    """

    module: nn.Module
    io: str = "output"  # "output" | "input"
    index: int = 0
    arg: str = "hidden_states"
    #: Copy the captured value (for modules whose output a later step modifies in place).
    clone: bool = False

    def __post_init__(self) -> None:
        if self.io not in ("output", "input"):
            raise ValueError(f"Hookpoint.io must be 'output' or 'input', got {self.io!r}")


@dataclass
class RunContext:
    """Everything one `run` call needs; backends may read it in their overrides."""

    batch: dict[str, Any]
    capture: list[str]
    edits: dict[str, list[Edit]]
    stop_after: str | None
    store: dict[str, torch.Tensor] = field(default_factory=dict)
    initial_state: Mapping[str, torch.Tensor] | None = None
    return_state: bool = False
    grad: bool = False
    #: Per-run data of a backend's own (e.g. a plan computed once and read by its overrides).
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def attention_mask(self) -> torch.Tensor | None:
        return self.batch.get("attention_mask")


def prepare_inputs(inputs: Any, device: Any = None) -> dict[str, Any]:
    """Token ids (tensor, list of lists, or a mapping with ``input_ids`` and optionally
    ``attention_mask``) → a batch dict of 2-D tensors on ``device``."""
    import torch

    if isinstance(inputs, str) or (
        isinstance(inputs, (list, tuple)) and inputs and isinstance(inputs[0], str)
    ):
        raise TypeError(
            "run/extract take token ids, not text: tokenize first, e.g. "
            "archscope.make_tokenize_fn(tokenizer)(texts), or pass {'input_ids': ..., "
            "'attention_mask': ...}"
        )
    if isinstance(inputs, Mapping):
        batch = {k: v for k, v in inputs.items() if v is not None}
        if "input_ids" not in batch and "inputs_embeds" not in batch:
            raise ValueError(
                f"input mapping needs 'input_ids' (and optionally 'attention_mask'); got keys "
                f"{sorted(inputs)}"
            )
    else:
        batch = {"input_ids": inputs}
    for key in ("input_ids", "attention_mask"):
        if key in batch and not isinstance(batch[key], torch.Tensor):
            try:
                batch[key] = torch.tensor(batch[key], dtype=torch.long)
            except (ValueError, TypeError) as exc:
                raise ValueError(
                    f"could not make a tensor of {key}: {exc}. Sequences of different lengths "
                    "must be padded (make_tokenize_fn pads) and come with an attention_mask"
                ) from None
    ids = batch.get("input_ids")
    if ids is not None:
        if ids.dtype.is_floating_point:
            raise ValueError(f"input_ids must be integer token ids, got dtype {ids.dtype}")
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        if ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq) or (seq,), got shape {tuple(ids.shape)}")
        if ids.shape[1] == 0:
            raise ValueError("input_ids is empty: give at least one token")
        batch["input_ids"] = ids
        mask = batch.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(ids)
        if mask.dim() == 1:
            mask = mask.unsqueeze(0)
        if mask.shape != ids.shape:
            raise ValueError(
                f"attention_mask shape {tuple(mask.shape)} does not match input_ids "
                f"shape {tuple(ids.shape)}"
            )
        if (mask.sum(-1) == 0).any():
            raise ValueError("a row of attention_mask has no real token")
        batch["attention_mask"] = mask.long()
    if device is not None:
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return batch


def accepted_kwargs(function: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The subset of ``kwargs`` that ``function`` accepts (all of them if it takes **kwargs)."""
    import inspect

    try:
        params = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return kwargs
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return kwargs
    names = {p.name for p in params}
    return {k: v for k, v in kwargs.items() if k in names}


def padding_side(mask: torch.Tensor) -> Literal["none", "left", "right", "mixed"]:
    """Which side a (batch, seq) attention mask pads on."""
    if bool(mask.all()):
        return "none"
    if bool((mask[:, 1:] <= mask[:, :-1]).all()):
        return "right"
    if bool((mask[:, 1:] >= mask[:, :-1]).all()):
        return "left"
    return "mixed"


def last_real_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token, for left or right padding."""
    import torch

    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, torch.full_like(positions, -1)).max(dim=1).values


def apply_edit(value: torch.Tensor, edit: Edit, info: SiteInfo,
               mask: torch.Tensor | None) -> torch.Tensor:
    """``value`` with ``edit`` applied (a new tensor): the one implementation of edit semantics,
    for the engine's hooks and for backends that apply edits themselves."""
    import torch

    out = value.clone()
    site = edit.site
    if edit.positions is not None and info.kind != "token":
        raise SiteError(f"edit of {site!r}: positions apply only to token sites; "
                        f"{site} is a {info.kind} site")
    units = None
    if edit.units is not None:
        units = torch.as_tensor(list(edit.units), dtype=torch.long, device=value.device)
        if units.numel() and (units.max() >= value.shape[-1] or units.min() < -value.shape[-1]):
            raise SiteError(f"edit of {site!r}: unit index out of range for dimension "
                            f"{value.shape[-1]}")

    # Select: rows x positions (token sites) then units.
    if edit.positions == "last":
        if mask is None:
            raise SiteError("positions='last' needs an attention mask")
        rows = torch.arange(value.shape[0], device=value.device)
        cols = last_real_index(mask)
        index: tuple[Any, ...] = (rows, cols)
    elif edit.positions is None:
        index = (slice(None),)
    else:
        pos = edit.positions
        seq = value.shape[1]
        if isinstance(pos, int):
            pos = [pos]
        if isinstance(pos, slice):
            index = (slice(None), pos)
        else:
            pos_list = [int(p) for p in pos]
            bad = [p for p in pos_list if not -seq <= p < seq]
            if bad:
                raise SiteError(f"edit of {site!r}: positions {bad} out of range for a "
                                f"sequence of length {seq}")
            index = (slice(None), torch.tensor(pos_list, dtype=torch.long, device=value.device))
    selected = out[index]
    target = selected[..., units] if units is not None else selected

    if edit.op == "fn":
        new = edit.value(target)
        if not isinstance(new, torch.Tensor) or new.shape != target.shape:
            raise SiteError(f"edit of {site!r}: the function must return a tensor of shape "
                            f"{tuple(target.shape)}, got "
                            f"{tuple(new.shape) if isinstance(new, torch.Tensor) else type(new)}")
    else:
        operand = edit.value
        if isinstance(operand, (int, float)):
            if edit.op == "replace":
                operand = torch.full_like(target, float(operand))
            else:
                operand = torch.tensor(float(operand), dtype=target.dtype, device=target.device)
        else:
            operand = torch.as_tensor(operand).to(device=target.device, dtype=target.dtype)
            vector = operand.dim() == 1 and operand.shape[0] == target.shape[-1]
            if operand.shape != target.shape and not vector:
                raise SiteError(
                    f"edit of {site!r}: value of shape {tuple(operand.shape)} does not fit the "
                    f"selected part of the site, shape {tuple(target.shape)} (site shape "
                    f"{tuple(value.shape)}); give exactly that shape or a vector of "
                    f"{target.shape[-1]} to apply at every selected position"
                )
        if edit.op == "replace":
            new = operand.expand_as(target)
        elif edit.op == "add":
            new = target + operand
        elif edit.op == "scale":
            new = target * operand
        else:
            raise SiteError(f"unknown edit op {edit.op!r}: use replace, add, scale or fn")
    if units is not None:
        selected[..., units] = new.to(selected.dtype)
    else:
        selected = new.to(selected.dtype)
    out[index] = selected
    return out


class HookBackend(Backend):
    """A backend that maps sites to module hooks. Subclasses implement `_site_table`."""

    #: Set True when the backend applies edits of hookpoint-less writable sites itself (in
    #: `_forward` / `_read_unhooked`, with `apply_edit`); otherwise such edits are refused.
    edits_unhooked: ClassVar[bool] = False

    def __init__(self, model: Any) -> None:
        super().__init__(model)
        self._table: dict[str, tuple[SiteInfo, Hookpoint | None]] = self._site_table()

    # -- what subclasses provide -------------------------------------------------------------
    def _site_table(self) -> dict[str, tuple[SiteInfo, Hookpoint | None]]:
        """Site name → (metadata, hookpoint). A None hookpoint means the backend produces the
        value itself in `_read_unhooked` (e.g. a recurrent state read from a cache)."""
        raise NotImplementedError(f"{type(self).__name__} must implement _site_table()")

    def _forward(self, ctx: RunContext) -> Any:
        """Call the model on ``ctx.batch``, passing only the keys its ``forward`` accepts (a
        model without an ``attention_mask`` argument gets none). Override to add arguments
        (cache, positions)."""
        kwargs = accepted_kwargs(self.model.forward, ctx.batch)
        if "input_ids" in ctx.batch and "input_ids" not in kwargs:  # forward(self, x, ...)
            return self.model(ctx.batch["input_ids"], **kwargs)
        return self.model(**kwargs)

    def _logits_of(self, output: Any) -> torch.Tensor | None:
        import torch

        if isinstance(output, torch.Tensor):
            return output
        logits = getattr(output, "logits", None)
        if logits is None and isinstance(output, (tuple, list)) and output:
            logits = output[0]
        return logits

    def _read_unhooked(self, ctx: RunContext, output: Any, names: list[str]) -> dict[str, Any]:
        """Values of sites that have no hookpoint (after the forward pass)."""
        raise BackendError(f"{type(self).__name__} declares sites {names} without a hookpoint "
                           "but does not implement _read_unhooked()")

    def _final_state(self, ctx: RunContext, output: Any) -> dict[str, torch.Tensor]:
        raise BackendError(f"backend {self.name!r} cannot return a recurrent state "
                           "(no 'state_patch' capability)")

    def _run_context(self, ctx: RunContext) -> contextlib.AbstractContextManager[Any]:
        """Temporary model settings for one run (restored afterwards)."""
        return contextlib.nullcontext()

    # -- the engine ----------------------------------------------------------------------------
    def sites(self) -> dict[str, SiteInfo]:
        return {name: info for name, (info, _) in self._table.items()}

    def hookpoint(self, site: str | Site) -> Hookpoint | None:
        info = resolve(site, self.sites(), self.name)
        return self._table[info.name][1]

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
        import torch

        table = self.sites()
        wanted, edit_map = self.check_request(capture, edits, initial_state, return_state)

        need_logits = not (stop_early and wanted and "logits" not in wanted) or return_state
        stop_after = None
        if not need_logits:
            hooked = [n for n in wanted if self._table[n][1] is not None]
            unhooked = [n for n in wanted if self._table[n][1] is None]
            if hooked and not unhooked:
                stop_after = max(hooked, key=lambda n: table[n].order)
        ctx = RunContext(batch=self.prepare_inputs(inputs), capture=wanted, edits=edit_map,
                         stop_after=stop_after, initial_state=initial_state,
                         return_state=return_state, grad=grad)

        handles = []
        hooked_sites = sorted({*wanted, *edit_map} & {n for n, (_, hp) in self._table.items()
                                                       if hp is not None},
                              key=lambda n: table[n].order)
        unhooked_edits = [n for n in edit_map if self._table[n][1] is None]
        if unhooked_edits and not self.edits_unhooked:
            raise BackendError(
                f"backend {self.name!r} cannot edit {unhooked_edits} during a run (they are not "
                "module inputs or outputs); recurrent states are set with initial_state= or "
                "state_patch()"
            )
        output = None
        try:
            for name in hooked_sites:
                handles.append(self._attach(name, ctx))
            with self._run_context(ctx), torch.set_grad_enabled(grad):
                try:
                    output = self._forward(ctx)
                except StopForward:
                    output = None
                if unhooked_edits and output is None:
                    raise BackendError(f"edits of {unhooked_edits} need a full forward pass")
                extra = [n for n in wanted if self._table[n][1] is None]
                if extra:
                    ctx.store.update(self._read_unhooked(ctx, output, extra))
                state = self._final_state(ctx, output) if return_state else None
        finally:
            for handle in handles:
                handle.remove()
        logits = self._logits_of(output) if output is not None else None
        if "logits" in wanted and "logits" not in ctx.store and logits is not None:
            ctx.store["logits"] = logits
        missing = [n for n in wanted if n not in ctx.store]
        if missing:
            raise BackendError(f"backend {self.name!r} did not produce {missing}: the forward "
                               "pass never reached their modules")
        return RunResult(logits=logits, activations={n: ctx.store[n] for n in wanted},
                         attention_mask=ctx.attention_mask, state=state)

    def _attach(self, name: str, ctx: RunContext) -> Any:
        info, hp = self._table[name]
        assert hp is not None
        capture = name in ctx.capture
        edits = ctx.edits.get(name, [])
        stop = name == ctx.stop_after

        def process(value: torch.Tensor) -> torch.Tensor:
            for edit in edits:
                value = apply_edit(value, edit, info, ctx.attention_mask)
            if capture:
                stored = value if ctx.grad else value.detach()
                ctx.store[name] = stored.clone() if hp.clone else stored
            return value

        if hp.io == "output":
            def hook(module: nn.Module, args: Any, output: Any) -> Any:
                result: Any
                if isinstance(output, (tuple, list)):
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

            return hp.module.register_forward_hook(hook)

        def pre_hook(module: nn.Module, args: Any, kwargs: Any) -> Any:
            if len(args) > hp.index:
                new = process(args[hp.index])
                if edits:
                    args = (*args[: hp.index], new, *args[hp.index + 1:])
            elif hp.arg in kwargs:
                new = process(kwargs[hp.arg])
                if edits:
                    kwargs = {**kwargs, hp.arg: new}
            else:
                raise BackendError(f"site {name!r}: {type(module).__name__} was called without "
                                   f"argument {hp.index} / {hp.arg!r}")
            if stop:
                raise StopForward
            return (args, kwargs) if edits else None

        return hp.module.register_forward_pre_hook(pre_hook, with_kwargs=True)


def find_module(root: nn.Module, path: str) -> nn.Module | None:
    """The sub-module at a dotted attribute path (``"transformer.h"``), or None."""
    obj: Any = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj
