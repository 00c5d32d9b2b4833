"""Entry point of archscope-mamba: registers its backends with archscope (imports nothing heavy)."""

from __future__ import annotations

from collections.abc import Callable

import archscope


@archscope.hookimpl
def register_backends(register: Callable[..., None]) -> None:
    """The `mamba` backend: HF Mamba/Mamba-2/hybrids and native mamba_ssm models."""
    from .backend import MambaBackend

    register(MambaBackend, aliases=("ssm", "mamba2"))
