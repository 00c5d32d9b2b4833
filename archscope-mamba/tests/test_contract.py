"""The core's conformance kit, run on every family the `mamba` backend serves."""

from __future__ import annotations

import functools
import warnings
from typing import Any

import pytest

from archscope.testing import HEAVY_MODULES, BackendContract
from archscope_mamba.testing import (
    HYBRID_FAMILIES,
    PURE_SSM_FAMILIES,
    make_foreign_models,
    make_model,
    reference_activations,
)

warnings.filterwarnings("ignore", message=".*falling back to its reference PyTorch.*")


@functools.cache
def _model(family: str) -> Any:
    return make_model(family)


@functools.lru_cache(maxsize=1)
def _foreign() -> dict[str, Any]:
    return make_foreign_models()


class _MambaContract(BackendContract):
    backend_name = "mamba"
    distribution = "archscope-mamba"
    heavy_modules = (*HEAVY_MODULES, "mamba_ssm", "causal_conv1d")
    families: tuple[str, ...] = ()

    def make_models(self) -> dict[str, Any]:
        return {family: _model(family) for family in self.families}

    def make_foreign_models(self) -> dict[str, Any]:
        return _foreign()

    def reference_activations(self, model: Any, batch: dict[str, Any]) -> dict[str, Any]:
        family = next(f for f in self.families if _model(f) is model)
        return reference_activations(model, family, batch["input_ids"])


class TestPureSSMContract(_MambaContract):
    families = PURE_SSM_FAMILIES


class TestHybridContract(_MambaContract):
    families = HYBRID_FAMILIES


class TestNativeStandInContract(_MambaContract):
    """mamba_ssm's structure and cache protocol, mimicked in plain PyTorch."""

    families = ("native",)


@pytest.fixture(autouse=True)
def _quiet() -> None:
    warnings.filterwarnings("ignore", message=".*falling back to its reference PyTorch.*")
