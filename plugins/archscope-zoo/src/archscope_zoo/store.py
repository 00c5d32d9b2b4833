"""Where the shipped zoo models live and what the manifest says about them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

#: The shipped models, in the order they are listed.
MODEL_NAMES = ("transformer", "mamba", "lstm")
MANIFEST_NAME = "manifest.json"
TOKENIZER_DIR = "tokenizer"


def models_dir() -> Path:
    """The package-data folder holding the tokenizer, one folder per model and the manifest."""
    return Path(__file__).resolve().parent / "models"


def manifest() -> dict[str, Any]:
    """The shipped manifest: per model its class, parameter count, size in bytes, held-out
    loss, training steps and wall time (see `archscope_zoo.train`)."""
    path = models_dir() / MANIFEST_NAME
    if not path.is_file():
        from archscope.errors import ModelSourceError

        raise ModelSourceError(
            f"the zoo manifest {path} is missing: this installation of "
            "archscope-zoo ships no models; reinstall it, or run "
            "`python -m archscope_zoo.train` to train them"
        )
    data: dict[str, Any] = json.loads(path.read_text())
    return data
