"""Entry point of archscope-transformer: registers its backend and the ``hf:`` model source.

Imports nothing heavy: the backend module is imported inside the hook, and the source is
named by its import path so that it loads only when used.
"""

from __future__ import annotations

from collections.abc import Callable

import archscope
from archscope import ModelSource


@archscope.hookimpl
def register_backends(register: Callable[..., None]) -> None:
    from .backend import TransformerBackend

    register(TransformerBackend)


@archscope.hookimpl
def register_model_sources(register: Callable[..., None]) -> None:
    register(
        ModelSource(
            name="hf",
            load="archscope_transformer.source:load",
            description="Hugging Face causal LMs: a Hub name or a local save_pretrained folder",
            claims="archscope_transformer.source:claims",
        )
    )
