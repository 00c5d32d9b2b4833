"""Method parameters as a schema read from the method function's signature: each keyword-only
parameter's annotation gives its type (int, float, bool, str, Literal choices, ``X | None``,
``list[X]``), `Param` metadata (through ``typing.Annotated``) its help and range. The CLI,
`archscope info`, validation and the conformance kit all read this one schema."""

from __future__ import annotations

import dataclasses
import inspect
import json
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ParameterError

_EMPTY = inspect.Parameter.empty


@dataclass(frozen=True)
class Param:
    """Metadata for a method parameter: ``Annotated[int, Param(min=1, help="...")]``."""

    help: str = ""
    min: float | None = None
    max: float | None = None


@dataclass(frozen=True)
class ParamSpec:
    """One parameter of a method: name, type, default (``inspect.Parameter.empty`` when
    required), help and bounds."""

    name: str
    annotation: Any
    default: Any = _EMPTY
    help: str = ""
    min: float | None = None
    max: float | None = None

    @property
    def required(self) -> bool:
        return self.default is _EMPTY

    @property
    def type_name(self) -> str:
        return _type_name(self.annotation)

    def describe(self) -> str:
        text = f"{self.name}: {self.type_name}"
        text += " (required)" if self.required else f" = {self.default!r}"
        bounds = [
            f">= {self.min:g}" if self.min is not None else "",
            f"<= {self.max:g}" if self.max is not None else "",
        ]
        if any(bounds):
            text += f" [{', '.join(b for b in bounds if b)}]"
        return text + (f" — {self.help}" if self.help else "")

    def parse(self, text: str) -> Any:
        """A command-line string → a value of this parameter's type."""
        try:
            value = _parse(self.annotation, text)
        except (ValueError, TypeError) as exc:
            raise ParameterError(
                f"parameter {self.name!r} expects {self.type_name}, got {text!r} ({exc})"
            ) from None
        return self.check(value)

    def check(self, value: Any) -> Any:
        """Validate (and lightly coerce) a Python value."""
        try:
            value = _coerce(self.annotation, value)
        except (ValueError, TypeError) as exc:
            raise ParameterError(
                f"parameter {self.name!r} expects {self.type_name}, got {value!r} ({exc})"
            ) from None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if self.min is not None and value < self.min:
                raise ParameterError(
                    f"parameter {self.name!r} must be >= {self.min:g}, got {value!r}"
                )
            if self.max is not None and value > self.max:
                raise ParameterError(
                    f"parameter {self.name!r} must be <= {self.max:g}, got {value!r}"
                )
        return value


def _split_annotated(annotation: Any) -> tuple[Any, Param | None]:
    if typing.get_origin(annotation) is typing.Annotated:
        base, *extra = typing.get_args(annotation)
        meta = next((e for e in extra if isinstance(e, Param)), None)
        return base, meta
    return annotation, None


def _members(annotation: Any) -> tuple[Any, ...] | None:
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        return typing.get_args(annotation)
    return None


def _type_name(annotation: Any) -> str:
    members = _members(annotation)
    if members is not None:
        return " | ".join(_type_name(m) for m in members)
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return "{" + ", ".join(repr(a) for a in typing.get_args(annotation)) + "}"
    if origin in (list, tuple):
        args = typing.get_args(annotation)
        return f"list[{_type_name(args[0]) if args else 'any'}]"
    if annotation is type(None):
        return "None"
    if annotation is _EMPTY or annotation is Any:
        return "any"
    return getattr(annotation, "__name__", str(annotation))


def _parse(annotation: Any, text: str) -> Any:  # noqa: C901 - one branch per annotation kind
    members = _members(annotation)
    if members is not None:
        errors = []
        # "none" means None before it means a one-item list or a string; strings come last
        for member in sorted(members, key=lambda m: (m is not type(None), m is str)):
            try:
                return _parse(member, text)
            except (ValueError, TypeError) as exc:
                errors.append(str(exc))
        raise ValueError("; ".join(errors))
    origin = typing.get_origin(annotation)
    if annotation is type(None):
        if text.strip().lower() in ("none", "null", ""):
            return None
        raise ValueError("not 'none'")
    if origin is typing.Literal:
        for choice in typing.get_args(annotation):
            if str(choice) == text:
                return choice
        raise ValueError(f"choose one of {', '.join(map(repr, typing.get_args(annotation)))}")
    if origin in (list, tuple):
        (item,) = typing.get_args(annotation)[:1] or (str,)
        stripped = text.strip()
        if stripped.startswith("["):
            return [_coerce(item, v) for v in json.loads(stripped)]
        return [_parse(item, part.strip()) for part in stripped.split(",") if part.strip()]
    if annotation is bool:
        lowered = text.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError("use true or false")
    if annotation in (int, float, str):
        return annotation(text)
    try:  # anything else: JSON if it parses, else the string
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _coerce(annotation: Any, value: Any) -> Any:  # noqa: C901 - one branch per annotation kind
    members = _members(annotation)
    if members is not None:
        errors = []
        for member in members:
            try:
                return _coerce(member, value)
            except (ValueError, TypeError) as exc:
                errors.append(str(exc))
        raise TypeError("; ".join(errors))
    origin = typing.get_origin(annotation)
    if annotation is type(None):
        if value is None:
            return None
        raise TypeError("not None")
    if origin is typing.Literal:
        if value in typing.get_args(annotation):
            return value
        raise ValueError(f"choose one of {', '.join(map(repr, typing.get_args(annotation)))}")
    if origin in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise TypeError("expected a list")
        (item,) = typing.get_args(annotation)[:1] or (Any,)
        return [_coerce(item, v) for v in value]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise TypeError("expected true or false")
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise TypeError("expected an integer")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError("expected a number")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise TypeError("expected a string")
        return value
    return value


def _hints(function: Callable[..., Any]) -> dict[str, Any]:
    try:
        return typing.get_type_hints(function, include_extras=True)
    except Exception:  # unresolvable forward references: fall back to names of builtins
        raw = getattr(function, "__annotations__", {})
        builtins = {"int": int, "float": float, "bool": bool, "str": str}
        return {k: builtins.get(v, Any) if isinstance(v, str) else v for k, v in raw.items()}


def _fields(target: Any) -> list[tuple[str, Any]]:
    """(name, default) of a method function's keyword-only parameters, or of an options
    dataclass's fields, in order."""
    if dataclasses.is_dataclass(target) and isinstance(target, type):
        out = []
        for f in dataclasses.fields(target):
            if not f.init:
                continue
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = _EMPTY
            out.append((f.name, default))
        return out
    return [
        (p.name, p.default)
        for p in inspect.signature(target).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    ]


def schema(target: Callable[..., Any] | type) -> dict[str, ParamSpec]:
    """The parameters of a method: a function's keyword-only parameters, or the fields of an
    options dataclass, in order."""
    hints = _hints(target)
    specs: dict[str, ParamSpec] = {}
    for name, default in _fields(target):
        base, meta = _split_annotated(hints.get(name, Any))
        specs[name] = ParamSpec(
            name,
            base,
            default,
            meta.help if meta else "",
            meta.min if meta else None,
            meta.max if meta else None,
        )
    return specs


def validate(
    specs: Mapping[str, ParamSpec], values: Mapping[str, Any], owner: str = "method"
) -> dict[str, Any]:
    """Check ``values`` against ``specs``: unknown names and missing required ones are refused
    with the list of valid parameters."""
    valid = "; ".join(s.describe() for s in specs.values()) or "none"
    unknown = sorted(set(values) - set(specs))
    if unknown:
        raise ParameterError(
            f"{owner} has no parameter {', '.join(map(repr, unknown))}; its parameters: {valid}"
        )
    missing = [n for n, s in specs.items() if s.required and n not in values]
    if missing:
        raise ParameterError(
            f"{owner} needs parameter {', '.join(map(repr, missing))}; its parameters: {valid}"
        )
    return {name: specs[name].check(value) for name, value in values.items()}
