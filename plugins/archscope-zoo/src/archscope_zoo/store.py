"""Where the shipped zoo models live and what the manifest says about them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

#: The language models trained on the corpus, in the order they are listed (what `archscope
#: bench` profiles by default and the corpus's ground-truth tests check).
MODEL_NAMES = ("transformer", "mamba", "lstm")
#: Models trained on a task of their own: ``gdn``, a gated delta net trained on associative
#: recall (`archscope_zoo.recall`).
TASK_MODEL_NAMES = ("gdn",)
#: Every shipped model, in the order `archscope zoo list` shows them.
ALL_MODEL_NAMES = MODEL_NAMES + TASK_MODEL_NAMES
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
