"""What plugins register besides backends: method descriptions and model sources."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, cast

from .errors import CapabilityError, MethodError, ParameterError
from .modules import find_attribute
from .params import ParamSpec, schema, validate


def _resolve(target: str | Callable[..., Any]) -> Callable[..., Any]:
    """``"package.module:attr"`` → the attribute, imported on first use (keeps discovery light)."""
    if callable(target):
        return target
    module, _, attr = target.partition(":")
    if not module or not attr:
        raise ParameterError(f"expected 'package.module:function', got {target!r}")
    obj = find_attribute(importlib.import_module(module), attr)
    if obj is None:
        raise ParameterError(f"{target!r}: module {module} has no attribute {attr!r}")
    return cast("Callable[..., Any]", obj)


InputKind = Literal["batch", "dataset", "contrast"]
INPUT_KINDS: dict[str, str] = {
    "batch": "one token batch (token ids, or a mapping with input_ids and attention_mask)",
    "dataset": "an archscope.data.Dataset: texts or token ids, optionally labelled",
    "contrast": "an archscope.data.Contrast: clean / corrupted input pairs",
}


@dataclass(frozen=True)
class Method:
    """An analysis method as registered by a plugin.

    ``function`` is called as ``function(backend, data, **params)`` (``arity=2``:
    ``function(backend_a, backend_b, data, **params)``) and returns an `archscope.Result`;
    give it as ``"module:function"`` so that discovery imports nothing heavy. Its keyword-only
    parameters are the method's parameters (`archscope.params`); or, with ``options`` (a
    dataclass whose fields are the parameters, for parameters that several methods share or
    that also make a configuration object), it is called as ``function(backend, data,
    options)`` with one validated instance. Write a method with the `method` decorator to keep
    this description beside its code. ``input`` says what ``data`` is; ``requires`` lists backend capabilities; ``quick`` holds parameter values that make the
    method run in seconds on a tiny model (the conformance kit and ``archscope run --quick``).
    """

    name: str
    summary: str
    function: str | Callable[..., Any]
    requires: frozenset[str] = frozenset()
    input: InputKind = "batch"
    arity: int = 1
    quick: Mapping[str, Any] = field(default_factory=dict)
    options: type | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "requires", frozenset(self.requires))
        object.__setattr__(self, "quick", dict(self.quick))
        if self.input not in INPUT_KINDS:
            raise ParameterError(
                f"method {self.name!r}: input must be one of "
                f"{', '.join(INPUT_KINDS)}, got {self.input!r}"
            )
        if self.arity not in (1, 2):
            raise ParameterError(
                f"method {self.name!r}: arity is 1 (one model) or 2 (two "
                f"models), got {self.arity!r}"
            )

    def supports(self, capabilities: frozenset[str] | set[str]) -> bool:
        return self.requires <= set(capabilities)

    def missing(self, capabilities: frozenset[str] | set[str]) -> list[str]:
        return sorted(self.requires - set(capabilities))

    def resolve(self) -> Callable[..., Any]:
        """The method's function (its module is imported on first use)."""
        return _resolve(self.function)

    def params(self) -> dict[str, ParamSpec]:
        """The parameter schema: the fields of ``options``, else the function's keyword-only
        parameters."""
        return schema(self.options if self.options is not None else self.resolve())

    def check_params(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """Validated parameter values (`ParameterError` lists the valid ones)."""
        return validate(self.params(), values, f"method {self.name!r}")

    def quick_params(self) -> dict[str, Any]:
        return self.check_params(self.quick)

    def __call__(self, *args: Any, **params: Any) -> Any:
        """``method(backend, data, **params)`` (two backends for ``arity=2``)."""
        if len(args) != self.arity + 1:
            shape = "backend, data" if self.arity == 1 else "backend_a, backend_b, data"
            raise ParameterError(
                f"method {self.name!r} is called as method({shape}, **params);"
                f" got {len(args)} positional arguments"
            )
        *backends, data = args
        # ``tokenizer=`` turns texts into ids for every method (unless it takes one itself)
        tokenizer = params.pop("tokenizer", None) if "tokenizer" not in self.params() else None
        values = self.check_params(params)  # first, so a bad parameter is named on any backend
        for backend in backends:
            caps = set(getattr(backend, "capabilities", ()))
            missing = self.missing(caps)
            if missing:
                raise CapabilityError(
                    f"method {self.name!r} needs capabilities {sorted(self.requires)}; backend "
                    f"{getattr(backend, 'name', type(backend).__name__)!r} lacks {missing}"
                )
        if tokenizer is not None:
            from .tokens import check_fits

            check_fits(tokenizer, backends[0])
        if self.input == "batch" and (
            isinstance(data, (list, tuple)) or (isinstance(data, str) and tokenizer is not None)
        ):
            from .data import as_dataset, pad_batch, padding_for
            from .tokens import pad_id

            rows = as_dataset([data] if isinstance(data, str) else list(data), tokenizer).ids()
            data = pad_batch(rows, padding_for(backends[0]), pad_id(tokenizer))
        elif self.input == "dataset":
            from .data import as_dataset

            data = as_dataset(data, tokenizer)
        elif self.input == "contrast":
            from .data import as_contrast

            data = as_contrast(data, tokenizer)
        if self.options is not None:
            return self.resolve()(*backends, data, self.options(**values))
        return self.resolve()(*backends, data, **values)


def method(
    name: str,
    summary: str,
    *,
    requires: frozenset[str] | set[str] = frozenset(),
    input: InputKind = "batch",
    arity: int = 1,
    quick: Mapping[str, Any] | None = None,
    options: type | None = None,
) -> Callable[[Callable[..., Any]], Method]:
    """Declare a method where its code is: ``@method("probe", "...", input="dataset")`` above
    the function makes it a `Method` (called as ``method(backend, data, **params)``, the
    parameters validated against its schema). A plugin returns these from ``register_methods``
    like any other `Method`."""

    def wrap(function: Callable[..., Any]) -> Method:
        return Method(
            name=name,
            summary=summary,
            function=function,
            requires=frozenset(requires),
            input=input,
            arity=arity,
            quick=dict(quick or {}),
            options=options,
        )

    return wrap


def run_method(name: str, *args: Any, **params: Any) -> Any:
    """Run the registered method ``name``: ``run_method("probe", backend, data, site=...)``."""
    from .plugins import get_manager

    entry = get_manager().methods.get(name)
    if entry is None:
        raise MethodError(
            f"no method named {name!r}; registered methods: "
            f"{', '.join(get_manager().methods.names()) or '(none)'}"
        )
    method: Method = entry.obj
    return method(*args, **params)


@dataclass(frozen=True)
class ModelSource:
    """Loads models named ``"<prefix>:<rest>"`` (and, if ``claims`` says so, bare specs).

    ``load(rest, dtype=None, device="cpu")`` returns ``(model, tokenizer)``; the tokenizer may
    be None. ``claims(spec) -> bool`` lets a source take specs without a prefix (a local
    folder, say); sources are asked in order of ``priority`` (highest first), then name.
    ``examples`` are specs ``archscope bench`` profiles when given no model; ``tasks(rest,
    tokenizer)`` returns the `archscope.apps.bench.ProfileTasks` (labelled probe sets, texts,
    contrast pairs) that suit this source's models, when it has any.
    """

    name: str
    load: str | Callable[..., Any]
    description: str = ""
    claims: str | Callable[[str], bool] | None = None
    priority: int = 0
    examples: tuple[str, ...] = ()
    tasks: str | Callable[..., Any] | None = None

    def __call__(self, rest: str, **kwargs: Any) -> Any:
        return _resolve(self.load)(rest, **kwargs)

    def profile_tasks(self, rest: str, tokenizer: Any) -> Any:
        """This source's profile tasks for the model ``rest`` (None when it has none)."""
        return None if self.tasks is None else _resolve(self.tasks)(rest, tokenizer)

    def claim(self, spec: str) -> bool:
        if self.claims is None:
            return False
        try:
            return bool(_resolve(self.claims)(spec))
        except Exception:
            return False
