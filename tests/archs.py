"""Cross-architecture fixtures for the method tests: one tiny random-weight model per family
(a transformer of two layouts, a pure SSM, an SSM/attention hybrid, a recurrent LM), each with
its backend and one shared offline word-level tokenizer (ids 0..99, words ``w4`` .. ``w99``).

Import it in tests as ``from archs import arch, ARCH_NAMES`` (the root pyproject puts
``tests/`` on pytest's path). Models are built once per test session; tests must not change
their weights or mode.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any


@dataclass(frozen=True)
class Arch:
    """One architecture under test: its model, backend and the shared tokenizer."""

    name: str
    model: Any
    backend: Any
    tokenizer: Any


def _gpt2() -> Any:
    from archscope_transformer.testing import tiny_model

    return tiny_model("gpt2")


def _llama() -> Any:
    from archscope_transformer.testing import tiny_model

    return tiny_model("llama")


def _mamba() -> Any:
    from archscope_mamba.testing import make_model

    return make_model("mamba")


def _hybrid() -> Any:
    from archscope_mamba.testing import make_model

    return make_model("bamba")


def _lstm() -> Any:
    from archscope_recurrent.testing import tiny_recurrent_lm

    return tiny_recurrent_lm("lstm")


#: name -> factory. ``ARCH_NAMES`` covers a transformer, a Mamba, a hybrid and a recurrent LM.
FACTORIES: dict[str, Callable[[], Any]] = {
    "gpt2": _gpt2,
    "llama": _llama,
    "mamba": _mamba,
    "hybrid": _hybrid,
    "lstm": _lstm,
}
ARCH_NAMES = ("gpt2", "mamba", "hybrid", "lstm")


@cache
def tokenizer() -> Any:
    from archscope_transformer.testing import tiny_tokenizer

    return tiny_tokenizer()


@cache
def arch(name: str) -> Arch:
    """The (cached) architecture ``name`` of `FACTORIES`."""
    import archscope

    model = FACTORIES[name]()
    return Arch(name, model, archscope.Backend.for_model(model), tokenizer())


def words(n: int, seed: int = 0) -> list[str]:
    """``n`` random texts of the tokenizer's words, lengths 3..9 (so batches are ragged)."""
    import random

    rng = random.Random(seed)
    return [
        " ".join(f"w{rng.randrange(4, 100)}" for _ in range(rng.randrange(3, 10))) for _ in range(n)
    ]
