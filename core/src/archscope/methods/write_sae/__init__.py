"""Write SAEs: sparse autoencoders with rank-1 atoms on recurrent state writes (the
``state_write`` site of any backend that declares it through `archscope.recurrence`), the
substitution test, its closed-form prediction, and installing an atom (see docs/sae.md)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._method import WriteSAEOptions, WriteSAEReport, write_sae_method

if TYPE_CHECKING:
    from ._effects import (
        InstallResult,
        SubstitutionResult,
        install,
        substitution_test,
        wilson_interval,
    )
    from ._fit import WriteLoss, collect_writes, fit_write_sae, write_layout, write_loss, write_site
    from ._model import WRITE_SAE_TYPES, WriteLayout, WriteSAE, build_write_sae, rank1_factors

#: Public names defined in modules that import torch, loaded on first use.
_LAZY = {
    **dict.fromkeys(
        ["InstallResult", "SubstitutionResult", "install", "substitution_test", "wilson_interval"],
        "._effects",
    ),
    **dict.fromkeys(
        [
            "WriteLoss",
            "collect_writes",
            "fit_write_sae",
            "write_layout",
            "write_loss",
            "write_site",
        ],
        "._fit",
    ),
    **dict.fromkeys(
        ["WRITE_SAE_TYPES", "WriteLayout", "WriteSAE", "build_write_sae", "rank1_factors"],
        "._model",
    ),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "WRITE_SAE_TYPES",
    "InstallResult",
    "SubstitutionResult",
    "WriteLayout",
    "WriteLoss",
    "WriteSAE",
    "WriteSAEOptions",
    "WriteSAEReport",
    "build_write_sae",
    "collect_writes",
    "fit_write_sae",
    "install",
    "rank1_factors",
    "substitution_test",
    "wilson_interval",
    "write_layout",
    "write_loss",
    "write_sae_method",
    "write_site",
]
