"""Looking inside a model: the sub-module at a dotted path and the keyword arguments a callable
accepts. Every package uses these two helpers instead of walking attributes itself."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, cast

from .errors import BackendError

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "accepted_kwargs",
    "accepts",
    "find_attribute",
    "find_module",
    "get_module",
    "parameter_names",
]


def get_module(root: nn.Module, path: str) -> nn.Module:
    """The sub-module of ``root`` at the dotted ``path`` (``"transformer.h.0"``); ``""`` is
    ``root`` itself. A missing part raises `BackendError` naming what exists at that level."""
    if not path:
        return root
    try:
        return root.get_submodule(path)
    except AttributeError:
        pass
    current: Any = root
    walked: list[str] = []
    for part in path.split("."):
        children = dict(current.named_children()) if hasattr(current, "named_children") else {}
        if part not in children:
            where = ".".join(walked) or type(root).__name__
            raise BackendError(
                f"{type(root).__name__} has no module {path!r}: {where} "
                f"({type(current).__name__}) has no attribute {part!r}; its sub-modules are: "
                f"{', '.join(children) or '(none)'}"
            ) from None
        current = children[part]
        walked.append(part)
    return cast("nn.Module", current)  # pragma: no cover - get_submodule found it above


def find_module(root: nn.Module, path: str) -> nn.Module | None:
    """Like `get_module`, but None when the path does not exist (for detection code)."""
    try:
        return get_module(root, path)
    except BackendError:
        return None


def find_attribute(root: Any, path: str) -> Any | None:
    """The object at the dotted attribute ``path`` below ``root`` (``"model.norm.weight"``,
    ``"module:attr"`` parts included), or None where a part is missing or its access raises:
    the one dotted-path walk for anything that is not a sub-module."""
    current = root
    for part in path.split("."):
        try:
            current = getattr(current, part, None)
        except Exception:  # an object whose attribute access raises has no such path
            return None
        if current is None:
            return None
    return current


def parameter_names(function: Callable[..., Any], declared: bool = False) -> list[str] | None:
    """The parameter names of ``function`` (without ``self``), or None when it has no
    inspectable signature or takes ``**kwargs`` (with ``declared=True``: the named ones even
    then)."""
    try:
        params = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return None
    if not declared and any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return [
        p.name for p in params if p.name != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD
    ]


def accepts(function: Callable[..., Any], name: str, *, declared: bool = False) -> bool:
    """Whether ``function`` takes an argument called ``name``: one it names, or any keyword
    through ``**kwargs`` (with ``declared=True``: only one it names, for arguments that a
    ``**kwargs`` would swallow without effect). False when it has no inspectable signature and
    ``declared`` is set."""
    names = parameter_names(function, declared=declared)
    if names is None:
        return not declared
    return name in names


def accepted_kwargs(function: Callable[..., Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The subset of ``kwargs`` that ``function`` accepts (all of them if it takes **kwargs)."""
    names = parameter_names(function)
    if names is None:
        return dict(kwargs)
    return {k: v for k, v in kwargs.items() if k in names}
