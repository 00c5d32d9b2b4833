"""Entry point of the plugin. archscope imports this module to discover what it registers, so it
imports nothing heavy: the backend module is imported inside the hook."""

from __future__ import annotations

from collections.abc import Callable

import archscope


@archscope.hookimpl
def register_backends(register: Callable[..., None]) -> None:
    from .backend import MinGRUBackend

    register(MinGRUBackend)
