"""Entry point: registers the GLR backend."""

from __future__ import annotations

from typing import Any

import archscope


@archscope.hookimpl
def register_backends(register: Any) -> None:
    from .backend import GLRBackend

    register(GLRBackend)
