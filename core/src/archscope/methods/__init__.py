"""The methods layer: every built-in analysis method, each a function in this package with its
description beside it (the `archscope.registry.method` decorator), registered through the same
hooks as any plugin's.

Discovery imports the modules below, which import no torch; torch is imported when a method
runs.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from ..hookspecs import hookimpl
from ..registry import Method

#: The modules that define built-in methods, in the order `archscope info` lists them.
MODULES = (
    "stats",
    "lens",
    "circuits",
    "neurons",
    "diff",
    "probes",
    "transfer",
    "sae._method",
    "write_sae._method",
    "attribute.methods",
)


def builtin_methods() -> list[Method]:
    """The `Method` objects defined (not merely imported) in `MODULES`."""
    found = []
    for name in MODULES:
        module = importlib.import_module(f"{__name__}.{name}")
        for value in vars(module).values():
            if isinstance(value, Method) and getattr(value.function, "__module__", None) == (
                module.__name__
            ):
                found.append(value)
    return found


@hookimpl
def register_methods(register: Callable[..., None]) -> None:
    for method in builtin_methods():
        register(method)
