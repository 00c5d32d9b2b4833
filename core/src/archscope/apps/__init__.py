"""The applications layer, built on the runtime and the methods: the command line
(`apps.cli`), the per-model profile (`apps.bench`) and the activation store (`apps.store`).
Registered as a built-in plugin for the store's commands."""

from __future__ import annotations

from typing import Any

from ..hookspecs import hookimpl


@hookimpl
def register_commands(cli: Any) -> None:
    from .store.cli import add_commands

    add_commands(cli)
