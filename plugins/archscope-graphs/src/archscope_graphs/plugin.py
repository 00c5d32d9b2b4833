"""Entry point of the plugin: archscope imports this module to discover its methods, so it
imports nothing heavy; the methods' modules are imported inside the hook."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import archscope


@archscope.hookimpl
def register_methods(register: Callable[..., None]) -> None:
    """The ``graph`` method (`archscope_graphs.method`)."""
    from .method import graph_method

    register(graph_method)


@archscope.hookimpl
def register_commands(cli: Any) -> None:
    """``archscope graph`` and ``archscope train transcoders``."""
    from .cli import register

    register(cli)
