"""Entry point of archscope-recurrent: registers the recurrent backends and the model source
for saved `RecurrentLM` folders. Imports nothing heavy (no torch, no transformers)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import archscope
from archscope import ModelSource
from archscope.errors import ModelSourceError

CONFIG_NAME = "recurrent_lm.json"  # = archscope_recurrent.models.CONFIG_NAME (kept torch-free)


@archscope.hookimpl
def register_backends(register: Callable[..., None]) -> None:
    from .adapter import AdapterBackend
    from .rnn import RNNBackend
    from .rwkv import RWKVBackend
    from .xlstm import XLSTMBackend

    register(RNNBackend)
    register(RWKVBackend)
    register(XLSTMBackend)
    register(AdapterBackend, aliases=("kazdov",))


def claims(spec: str) -> bool:
    """A local folder written by ``RecurrentLM.save_pretrained``."""
    return os.path.isfile(os.path.join(os.path.expanduser(spec), CONFIG_NAME))


def load(rest: str, dtype: Any = None, device: str = "cpu") -> tuple[Any, Any]:
    """``load_model("recurrent:<folder>")`` → (RecurrentLM, tokenizer or None)."""
    from .models import RecurrentLM

    folder = os.path.expanduser(rest)
    if not claims(folder):
        raise ModelSourceError(
            f"recurrent: {rest!r} is not a RecurrentLM folder ({CONFIG_NAME} "
            "is missing); write one with RecurrentLM.save_pretrained(folder)"
        )
    model = RecurrentLM.from_pretrained(folder, dtype=dtype, device=device)
    tokenizer = None
    if os.path.isfile(os.path.join(folder, "tokenizer.json")):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
    return model, tokenizer


@archscope.hookimpl
def register_model_sources(register: Callable[..., None]) -> None:
    register(
        ModelSource(
            name="recurrent",
            load="archscope_recurrent.plugin:load",
            description="RecurrentLM folders (recurrent_lm.json + model.safetensors)",
            claims="archscope_recurrent.plugin:claims",
            priority=10,
        )
    )
