"""Entry point of archscope-hybrid: registers its backend with archscope (imports nothing heavy)."""

from __future__ import annotations

from collections.abc import Callable

import archscope


@archscope.hookimpl
def register_backends(register: Callable[..., None]) -> None:
    """The `hybrid` backend: gated-delta-net and short-convolution hybrids."""
    from .backend import HybridBackend

    register(HybridBackend, aliases=("gated_delta", "short_conv"))
