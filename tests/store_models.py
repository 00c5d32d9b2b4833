"""Model specs for tests that load a model by name in another process (a subprocess, a Ray
actor, a torchrun rank): ``load_model(f"{MODELS}:gpt2")`` builds the same seeded tiny model and
offline tokenizer as `archs.arch("gpt2")`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

MODELS = str(Path(__file__).resolve())


def gpt2() -> tuple[Any, Any]:
    from archscope_transformer.testing import tiny_model, tiny_tokenizer

    return tiny_model("gpt2"), tiny_tokenizer()


def gpt2_other_weights() -> tuple[Any, Any]:
    from archscope_transformer.testing import tiny_model, tiny_tokenizer

    return tiny_model("gpt2", seed=1), tiny_tokenizer()
