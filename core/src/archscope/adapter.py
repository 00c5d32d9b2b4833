"""A declarative adapter (architecture-agnostic): describe a custom model with a `ModelSpec` instead of writing a backend.

The spec names the block list, what each block returns, and optionally the embedding, final
norm, unembedding, per-block sub-modules and recurrent-state accessors. `AdapterBackend` turns
that into hook-engine sites. Paths are checked when the backend is made; what each declared
module returns is checked on a two-token probe run at the same time.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, cast

from .detection import Confidence
from .engine import HookBackend, Hookpoint, RunContext, SiteTable
from .errors import BackendError
from .modules import accepted_kwargs, get_module, parameter_names

if TYPE_CHECKING:
    import torch

_ROLE = re.compile(r"^[a-z][a-z0-9_]*$")
_RESERVED = {"residual"}


class SpecError(BackendError, ValueError):
    """A `ModelSpec` that does not match the model it describes."""


@dataclass
class ModelSpec:
    """How a custom model is laid out. Paths are dotted attribute paths from the model
    (``blocks``, ``embed``, ``final_norm``, ``unembed``) or from each block (``submodules``).

    - ``blocks``: the list of blocks (an ``nn.ModuleList`` or ``nn.Sequential``).
    - ``block_output``: None when a block returns the residual stream as a tensor; an index
      when it returns a tuple whose element ``block_output`` is the residual stream.
    - ``embed``: module whose output is the ``embed`` site (default: the input of block 0).
    - ``final_norm`` / ``unembed``: final norm and output head; ``unembed`` enables
      ``backend.unembed(x) = unembed(final_norm(x))`` and its output is the ``logits`` site.
    - ``submodules``: role → path inside each block, or (path, index) when that module returns
      a tuple; each becomes ``layer_i.<role>`` (e.g. ``{"attn": "attn", "mixer": "bilinear"}``).
    - ``states``: role → index of a recurrent state in the block's output tuple, or a function
      ``fn(model_output, layer) -> tensor``; each becomes a read-only ``layer_i.<role>`` state
      site (one value per sequence).
    - ``forward``: ``fn(model, batch) -> output`` when the model is not called as
      ``model(input_ids=..., attention_mask=...)``.
    - ``padding``: which padding side the model handles correctly.
    """

    blocks: str
    block_output: int | None = None
    embed: str | None = None
    final_norm: str | None = None
    unembed: str | None = None
    submodules: Mapping[str, str | tuple[str, int]] = field(default_factory=dict)
    states: Mapping[str, int | Callable[[Any, int], Any]] = field(default_factory=dict)
    forward: Callable[[Any, dict[str, Any]], Any] | None = None
    padding: Literal["right", "left", "both"] = "right"

    @classmethod
    def coerce(cls, spec: ModelSpec | Mapping[str, Any]) -> ModelSpec:
        if isinstance(spec, ModelSpec):
            return spec
        if isinstance(spec, Mapping):
            try:
                return cls(**spec)
            except TypeError as exc:
                raise SpecError(
                    f"bad ModelSpec mapping: {exc}; fields are "
                    f"{', '.join(cls.__dataclass_fields__)}"
                ) from None
        raise SpecError(
            f"a model spec is an archscope.adapter.ModelSpec or a dict, got {type(spec).__name__}"
        )


def resolve_path(root: Any, path: str, what: str) -> Any:
    """The module at ``path`` below ``root``; a `SpecError` naming the missing step and the
    sub-modules that do exist there."""
    try:
        return get_module(root, path)
    except BackendError as exc:
        raise SpecError(f"{what} = {path!r}: {exc}") from None


def _describe(value: Any) -> str:
    import torch

    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, (tuple, list)):
        return (
            f"a {type(value).__name__} of {len(value)} ({', '.join(_describe(v) for v in value)})"
        )
    return f"{type(value).__name__}"


class AdapterBackend(HookBackend):
    """Any ``nn.Module`` described by a `ModelSpec` (argument ``spec`` or the model's
    ``archscope_spec`` attribute). Capabilities follow from what the spec declares."""

    name = "custom"
    description = (
        "custom models described by an archscope.adapter.ModelSpec (capabilities follow the spec)"
    )
    capabilities = frozenset({"residual", "edit"})
    priority = 10

    def __init__(self, model: Any, spec: ModelSpec | Mapping[str, Any] | None = None) -> None:
        spec = spec if spec is not None else getattr(model, "archscope_spec", None)
        if spec is None:
            raise SpecError(
                f"backend 'custom' needs a ModelSpec for {type(model).__qualname__}: call "
                "archscope.adapter.describe(model, ModelSpec(blocks=...)) or set "
                "model.archscope_spec = ModelSpec(...) before Backend.for_model (see "
                "docs/custom-models.md)"
            )
        self.spec = ModelSpec.coerce(spec)
        self.model = model
        self.padding = self.spec.padding
        self._resolve_modules()
        self._shapes = self._probe()
        super().__init__(model)
        caps = {"residual", "edit"}
        if "logits" in self._shapes:
            caps.add("logits")
        if self.spec.unembed:
            caps.add("unembed")
        if {"attn", "mlp", "mixer"} & set(self.spec.submodules):
            caps.add("components")
        if "mlp_hidden" in self.spec.submodules:
            caps.add("mlp_hidden")
        if self.spec.states:
            caps.add("recurrent_state")
        self.capabilities = frozenset(caps)

    @classmethod
    def can_handle(cls, model: Any) -> float | None:
        try:
            spec = getattr(model, "archscope_spec", None)
        except Exception:
            return None
        return Confidence.EXACT if isinstance(spec, (ModelSpec, Mapping)) else None

    # -- declaration checks ----------------------------------------------------------------
    def _resolve_modules(self) -> None:
        s = self.spec
        blocks = resolve_path(self.model, s.blocks, "ModelSpec.blocks")
        try:
            self.blocks = list(blocks)
        except TypeError:
            raise SpecError(
                f"ModelSpec.blocks = {s.blocks!r} is a {type(blocks).__name__}, not a "
                "list of blocks (nn.ModuleList or nn.Sequential)"
            ) from None
        if not self.blocks:
            raise SpecError(f"ModelSpec.blocks = {s.blocks!r} is empty")
        self.embed_module = (
            resolve_path(self.model, s.embed, "ModelSpec.embed") if s.embed else None
        )
        self.norm_module = (
            resolve_path(self.model, s.final_norm, "ModelSpec.final_norm") if s.final_norm else None
        )
        self.head_module = (
            resolve_path(self.model, s.unembed, "ModelSpec.unembed") if s.unembed else None
        )
        for role in [*s.submodules, *s.states]:
            if not _ROLE.match(role) or role in _RESERVED:
                raise SpecError(
                    f"role {role!r} in ModelSpec: roles are lower-case identifiers "
                    f"other than {', '.join(sorted(_RESERVED))}"
                )
        clash = set(s.submodules) & set(s.states)
        if clash:
            raise SpecError(f"roles {sorted(clash)} are declared as both submodules and states")
        self.subs: list[dict[str, tuple[Any, int | None]]] = []
        for i, block in enumerate(self.blocks):
            found = {}
            for role, where in s.submodules.items():
                path, index = (where, None) if isinstance(where, str) else (where[0], where[1])
                found[role] = (
                    resolve_path(block, path, f"ModelSpec.submodules[{role!r}] in block {i}"),
                    index,
                )
            self.subs.append(found)
        for role, accessor in s.states.items():
            if not (isinstance(accessor, int) or callable(accessor)):
                raise SpecError(
                    f"ModelSpec.states[{role!r}] must be an index into the block's "
                    f"output tuple or a function (model_output, layer) -> tensor, "
                    f"got {type(accessor).__name__}"
                )

    def _call(self, batch: dict[str, Any]) -> Any:
        if self.spec.forward is not None:
            return self.spec.forward(self.model, batch)
        kwargs = accepted_kwargs(self.model.forward, batch)
        if "input_ids" in batch and "input_ids" not in kwargs:  # forward(self, x, ...)
            return self.model(batch["input_ids"], **kwargs)
        return self.model(**kwargs)

    def _probe(self) -> dict[str, tuple[int, ...]]:  # noqa: C901 - one check per kind of declaration, each with its own message
        """Run two tokens once, checking what every declared module returns; → shapes."""
        import torch

        shapes: dict[str, tuple[int, ...]] = {}
        errors: list[str] = []
        s = self.spec

        def pick(value: Any, index: int | None, what: str, key: str) -> None:
            if index is None:
                if not isinstance(value, torch.Tensor):
                    errors.append(
                        f"{what} was declared to return a tensor but returned "
                        f"{_describe(value)}; declare the index of the tensor to use"
                    )
                    return
                shapes[key] = tuple(value.shape)
                return
            if (
                not isinstance(value, (tuple, list))
                or len(value) <= index
                or not isinstance(value[index], torch.Tensor)
            ):
                errors.append(
                    f"{what} was declared to return a tuple with a tensor at index "
                    f"{index} but returned {_describe(value)}"
                )
                return
            shapes[key] = tuple(value[index].shape)

        def watch(module: Any, index: int | None, what: str, key: str) -> Any:
            def hook(_module: Any, _args: Any, out: Any) -> None:
                pick(out, index, what, key)

            return module.register_forward_hook(hook)

        handles = []
        try:
            for i, block in enumerate(self.blocks):
                what = f"block {i} ({s.blocks}.{i}, {type(block).__name__})"
                handles.append(
                    watch(
                        block,
                        s.block_output,
                        what + " [ModelSpec.block_output]",
                        f"layer_{i}.residual",
                    )
                )
                for role, acc in s.states.items():
                    if isinstance(acc, int):
                        handles.append(
                            watch(
                                block,
                                acc,
                                what + f" [ModelSpec.states[{role!r}]]",
                                f"layer_{i}.{role}",
                            )
                        )
                for role, (module, index) in self.subs[i].items():
                    handles.append(
                        watch(
                            module,
                            index,
                            f"ModelSpec.submodules[{role!r}] of block "
                            f"{i} ({type(module).__name__})",
                            f"layer_{i}.{role}",
                        )
                    )
            for key, module in (
                ("embed", self.embed_module),
                ("final_norm", self.norm_module),
                ("logits", self.head_module),
            ):
                if module is not None:
                    handles.append(watch(module, None, f"ModelSpec {key} module", key))
            ids = torch.zeros(1, 2, dtype=torch.long, device=self.device)
            with torch.no_grad():
                output = self._call({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
        finally:
            for h in handles:
                h.remove()
        if errors:
            raise SpecError(
                "the ModelSpec does not match what the model returns: "
                + "; ".join(dict.fromkeys(errors))
            )
        if "layer_0.residual" not in shapes:
            raise SpecError(f"the model's forward never called the blocks at {s.blocks!r}")
        if "logits" not in shapes:
            logits = self.logits_of(output)
            if isinstance(logits, torch.Tensor):
                shapes["logits"] = tuple(logits.shape)
        for role, acc in s.states.items():
            if callable(acc):
                for i in range(len(self.blocks)):
                    value = acc(output, i)
                    if not isinstance(value, torch.Tensor):
                        raise SpecError(
                            f"ModelSpec.states[{role!r}](output, {i}) returned "
                            f"{_describe(value)}, not a tensor"
                        )
                    shapes[f"layer_{i}.{role}"] = tuple(value.shape)
        if "embed" not in shapes:
            shapes["embed"] = shapes["layer_0.residual"]
        return shapes

    # -- the site map --------------------------------------------------------------------------
    def site_table(self) -> SiteTable:
        s, sh = self.spec, self._shapes
        table = SiteTable(self.model)

        def add(name: str, hp: Hookpoint | None, desc: str, kind: str = "token", **kw: Any) -> None:
            shape = sh[name]
            axes = (
                ("batch", "seq", *(f"d{k}" for k in range(len(shape) - 2)))
                if kind == "token"
                else ("batch", *(f"d{k}" for k in range(len(shape) - 1)))
            )
            kw.setdefault("writable", True)
            table.add(name, hp, int(shape[-1]), kind=kind, shape=axes, description=desc, **kw)

        if self.embed_module is not None:
            add("embed", Hookpoint(self.embed_module), f"output of {s.embed}")
        else:
            params = parameter_names(self.blocks[0].forward) or []
            add(
                "embed",
                Hookpoint(self.blocks[0], io="input", index=0, arg=params[0] if params else "x"),
                "input of block 0",
            )
        for i, block in enumerate(self.blocks):
            for role, (module, index) in self.subs[i].items():
                add(
                    f"layer_{i}.{role}",
                    Hookpoint(module, index=index or 0),
                    f"output of {s.submodules[role]}",
                )
            add(
                f"layer_{i}.residual",
                Hookpoint(block, index=s.block_output or 0),
                f"output of {s.blocks}.{i}",
            )
            for role, acc in s.states.items():
                add(
                    f"layer_{i}.{role}",
                    Hookpoint(block, index=acc) if isinstance(acc, int) else None,
                    "recurrent state declared in ModelSpec.states",
                    kind="state",
                    writable=False,
                )
        if self.norm_module is not None:
            add("final_norm", Hookpoint(self.norm_module), f"output of {s.final_norm}")
        if "logits" in sh:
            hp = Hookpoint(self.head_module) if self.head_module is not None else None
            add("logits", hp, "output logits", writable=hp is not None)
        return table

    # -- engine overrides ------------------------------------------------------------------------
    def padding_message(self, side: str) -> str:
        return (
            f"this custom model is declared with padding={self.spec.padding!r} "
            f"(ModelSpec.padding) and the batch is {side}-padded; pad on the "
            f"{'right' if self.spec.padding == 'right' else 'left'}, or declare the "
            "padding the model handles"
        )

    def forward(self, ctx: RunContext) -> Any:
        return self._call(ctx.batch)

    def read_unhooked(self, ctx: RunContext, output: Any, names: list[str]) -> dict[str, Any]:
        values = {}
        for name in names:
            if name == "logits":
                values[name] = self.logits_of(output)
                continue
            site = self.table.info(name).site
            accessor = self.spec.states[site.role]
            assert callable(accessor) and site.layer is not None
            value = accessor(output, site.layer)
            values[name] = value if ctx.grad else value.detach()
        return values

    def unembed(self, residual: torch.Tensor) -> torch.Tensor:
        if self.head_module is None:
            return super().unembed(residual)
        from .guards import check_width

        check_width(
            residual, self.site_info(self.layer_names()[-1]).dim, f"backend {self.name!r} unembed"
        )
        x = self.norm_module(residual) if self.norm_module is not None else residual
        return cast("torch.Tensor", self.head_module(x))


def describe(
    model: Any, spec: ModelSpec | Mapping[str, Any], attach: bool = False
) -> AdapterBackend:
    """The adapter backend for ``model`` laid out as ``spec``; with ``attach=True`` the spec is
    also stored as ``model.archscope_spec`` so that ``archscope.Backend.for_model`` finds it."""
    backend = AdapterBackend(model, spec=spec)
    if attach:
        model.archscope_spec = backend.spec
    return backend
