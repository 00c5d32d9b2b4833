"""The extension surface of archscope: every hook a plugin can implement.

A plugin is a module named by an entry point in the group ``archscope``; it implements any of
these functions, decorated with `archscope.hookimpl`. Each hook receives a ``register``
callable, so one plugin can register several things and archscope records who registered what.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("archscope")
hookimpl = pluggy.HookimplMarker("archscope")


@hookspec
def register_backends(register: Callable[..., None]) -> None:
    """Register Backend subclasses: ``register(cls, name=None, aliases=(), replace=False)``.

    ``name`` defaults to ``cls.name``; ``aliases`` are extra names accepted as ``hint=``;
    ``replace=True`` is needed to take over a name that a first-party package registered.
    """


@hookspec
def register_methods(register: Callable[..., None]) -> None:
    """Register analysis methods: ``register(method: archscope.Method, replace=False)``."""


@hookspec
def register_model_sources(register: Callable[..., None]) -> None:
    """Register model sources: ``register(source: archscope.ModelSource, replace=False)``.

    A source loads ``load_model("<prefix>:<rest>")`` and may claim bare specs such as paths.
    """


@hookspec
def register_commands(cli: Any) -> None:
    """Add click commands to the ``archscope`` command group (``cli.add_command(...)``)."""
