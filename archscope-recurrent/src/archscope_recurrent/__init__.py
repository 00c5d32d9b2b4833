"""archscope backends for recurrent models: torch RNN/GRU/LSTM language models, Hugging Face
RWKV and xLSTM, and a declarative adapter (`ModelSpec`) for custom models.

Importing the package is light; torch-dependent names load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from .adapter import AdapterBackend, ModelSpec, SpecError, describe

__version__ = "0.3.0"

_LAZY = {
    "RecurrentLM": "archscope_recurrent.models",
    "RecurrentLMConfig": "archscope_recurrent.models",
    "RNNBackend": "archscope_recurrent.rnn",
    "RWKVBackend": "archscope_recurrent.rwkv",
    "XLSTMBackend": "archscope_recurrent.xlstm",
}

__all__ = ["AdapterBackend", "ModelSpec", "SpecError", "__version__", "describe", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'archscope_recurrent' has no attribute {name!r}")
