"""Entry point of the plugin: archscope imports this module to discover its methods, so it
imports nothing heavy; the methods' modules are imported inside the hook."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import archscope


@archscope.hookimpl
def register_methods(register: Callable[..., None]) -> None:
    """Nothing is registered until the methods exist (each module adds its own line here)."""


@archscope.hookimpl
def register_commands(cli: Any) -> None:
    """``archscope graph`` and ``archscope train transcoders``."""
    from .cli import register

    register(cli)
