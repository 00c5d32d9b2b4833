"""Sparse autoencoders on any site of any backend: dense (L1), rank-1 factored, TopK and
BatchTopK SAEs, streaming training, reconstruction and spliced-loss metrics, and SAELens's
on-disk layout (export and import)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._method import SAEReport, sae_method

if TYPE_CHECKING:
    from ._many import train_saes
    from ._metrics import (
        SAEMetrics,
        SplicedLoss,
        next_token_loss,
        reconstruction_metrics,
        spliced_loss,
    )
    from ._models import (
        SAE,
        SAE_TYPES,
        BatchTopKSAE,
        DenseSAE,
        Rank1FactoredSAE,
        SAEConfig,
        TopKSAE,
        build_sae,
        canonical_sae_type,
        power_of_two_scale,
    )
    from ._saelens import export_saelens, import_saelens
    from ._train import DictionaryJob, SAEJob, fit_sae, train_dictionaries

#: Public names defined in modules that import torch, loaded on first use so that reading the
#: ``sae`` method's parameters (``archscope info``) imports no torch.
_LAZY = {
    **dict.fromkeys(
        ["SAEMetrics", "SplicedLoss", "next_token_loss", "reconstruction_metrics", "spliced_loss"],
        "._metrics",
    ),
    **dict.fromkeys(
        [
            "SAE",
            "SAE_TYPES",
            "BatchTopKSAE",
            "DenseSAE",
            "Rank1FactoredSAE",
            "SAEConfig",
            "TopKSAE",
            "build_sae",
            "canonical_sae_type",
            "power_of_two_scale",
        ],
        "._models",
    ),
    **dict.fromkeys(["export_saelens", "import_saelens"], "._saelens"),
    **dict.fromkeys(["DictionaryJob", "SAEJob", "fit_sae", "train_dictionaries"], "._train"),
    "train_saes": "._many",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "SAE",
    "SAE_TYPES",
    "BatchTopKSAE",
    "DenseSAE",
    "DictionaryJob",
    "Rank1FactoredSAE",
    "SAEConfig",
    "SAEJob",
    "SAEMetrics",
    "SAEReport",
    "SplicedLoss",
    "TopKSAE",
    "build_sae",
    "canonical_sae_type",
    "export_saelens",
    "fit_sae",
    "import_saelens",
    "next_token_loss",
    "power_of_two_scale",
    "reconstruction_metrics",
    "sae_method",
    "spliced_loss",
    "train_dictionaries",
    "train_saes",
]
