"""What plugins register besides backends: method descriptions and model sources."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


def _resolve(target: str | Callable[..., Any]) -> Callable[..., Any]:
    """``"package.module:attr"`` → the attribute, imported on first use (keeps discovery light)."""
    if callable(target):
        return target
    module, _, attr = target.partition(":")
    if not module or not attr:
        raise ValueError(f"expected 'package.module:function', got {target!r}")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass(frozen=True)
class Method:
    """An analysis method as registered by a plugin.

    ``function`` is called as ``function(backend, inputs, **parameters)`` (``inputs``: a token
    batch as `Backend.run` takes it) and returns a result object
    (a dataclass with ``to_dict()`` / ``to_markdown()``); give it as ``"module:function"`` so
    that discovery imports nothing heavy. ``requires`` lists backend capabilities.
    """

    name: str
    summary: str
    function: str | Callable[..., Any]
    requires: frozenset[str] = frozenset()
    parameters: dict[str, str] = field(default_factory=dict)
    #: Keyword arguments that make the method run in seconds on a tiny model (used by the
    #: conformance kit and ``archscope run --quick``).
    quick: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "requires", frozenset(self.requires))

    def supports(self, capabilities: frozenset[str] | set[str]) -> bool:
        return self.requires <= set(capabilities)

    def missing(self, capabilities: frozenset[str] | set[str]) -> list[str]:
        return sorted(self.requires - set(capabilities))

    def __call__(self, backend: Any, inputs: Any, **kwargs: Any) -> Any:
        caps = set(getattr(backend, "capabilities", ()))
        missing = self.missing(caps)
        if missing:
            raise ValueError(
                f"method {self.name!r} needs capabilities {sorted(self.requires)}; backend "
                f"{getattr(backend, 'name', type(backend).__name__)!r} lacks {missing}"
            )
        return _resolve(self.function)(backend, inputs, **kwargs)


@dataclass(frozen=True)
class ModelSource:
    """Loads models named ``"<prefix>:<rest>"`` (and, if ``claims`` says so, bare specs).

    ``load(rest, dtype=None, device="cpu")`` returns ``(model, tokenizer)``; the tokenizer may
    be None. ``claims(spec) -> bool`` lets a source take specs without a prefix (a local
    folder, say); sources are asked in order of ``priority`` (highest first), then name.
    """

    name: str
    load: str | Callable[..., Any]
    description: str = ""
    claims: str | Callable[[str], bool] | None = None
    priority: int = 0

    def __call__(self, rest: str, **kwargs: Any) -> Any:
        return _resolve(self.load)(rest, **kwargs)

    def claim(self, spec: str) -> bool:
        if self.claims is None:
            return False
        try:
            return bool(_resolve(self.claims)(spec))
        except Exception:
            return False
