"""Entry point of archscope-zoo: registers the ``zoo:`` model source and the ``archscope zoo``
commands. Imports nothing heavy (no torch, no transformers)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import archscope
from archscope import ModelSource


@archscope.hookimpl
def register_model_sources(register: Callable[..., None]) -> None:
    register(
        ModelSource(
            name="zoo",
            load="archscope_zoo.source:load",
            description="trained reference models shipped with archscope-zoo "
            "(zoo:transformer, zoo:mamba, zoo:lstm; zoo:gdn, a gated delta net trained on "
            "associative recall)",
            examples=("zoo:transformer", "zoo:mamba", "zoo:lstm"),
            tasks="archscope_zoo.tasks:profile_tasks",
        )
    )


@archscope.hookimpl
def register_commands(cli: Any) -> None:
    from .cli import zoo

    cli.add_command(zoo)
