"""archscope backend package: Hugging Face decoder-only language models (GPT-2, Llama, Qwen, ...).

`TransformerBackend` maps a model's blocks, norms and head to archscope sites by structure;
the ``hf:`` model source loads models with ``from_pretrained``. Nothing heavy is imported here.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.3.0"
__all__ = ["TransformerBackend", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "TransformerBackend":
        return importlib.import_module(".backend", __name__).TransformerBackend
    raise AttributeError(f"module 'archscope_transformer' has no attribute {name!r}")
