"""The core's conformance kit, run on every family the `hybrid` backend serves."""

from __future__ import annotations

import functools
import warnings
from typing import Any

import pytest

from archscope.testing import BackendContract
from archscope_hybrid.testing import (
    FAMILIES,
    RECURRENT_FAMILIES,
    make_foreign_models,
    make_model,
    missing,
    reference_activations,
)

warnings.filterwarnings("ignore", message=".*falling back to its reference PyTorch.*")


@functools.cache
def _model(family: str) -> Any:
    return make_model(family)


@functools.lru_cache(maxsize=1)
def _foreign() -> dict[str, Any]:
    return make_foreign_models()


class _HybridContract(BackendContract):
    backend_name = "hybrid"
    distribution = "archscope-hybrid"
    families: tuple[str, ...] = ()

    def model_names(self) -> list[str]:
        return [f for f in self.families if missing(f) is None]

    def make_models(self) -> dict[str, Any]:
        return {family: _model(family) for family in self.model_names()}

    def make_foreign_models(self) -> dict[str, Any]:
        return _foreign()

    def reference_activations(self, model: Any, batch: dict[str, Any]) -> dict[str, Any]:
        return reference_activations(model, batch["input_ids"])


class TestHybridContract(_HybridContract):
    """Recurrent layers beside attention layers."""

    families = FAMILIES


class TestRecurrentStackContract(_HybridContract):
    """Recurrent layers only: state patching is claimed and checked."""

    families = RECURRENT_FAMILIES


@pytest.fixture(autouse=True)
def _quiet() -> None:
    warnings.filterwarnings("ignore", message=".*falling back to its reference PyTorch.*")
