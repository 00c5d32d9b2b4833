"""Sparse autoencoders on any site of any backend: dense (L1), rank-1 factored, TopK and
BatchTopK SAEs, streaming training, reconstruction and spliced-loss metrics, and SAELens's
on-disk layout (export and import)."""

from __future__ import annotations

from ._method import SAEReport, sae_method
from ._metrics import SAEMetrics, SplicedLoss, reconstruction_metrics, spliced_loss
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
)
from ._saelens import export_saelens, import_saelens
from ._train import fit_sae

__all__ = [
    "SAE", "SAE_TYPES", "BatchTopKSAE", "DenseSAE", "Rank1FactoredSAE", "SAEConfig",
    "SAEMetrics", "SAEReport", "SplicedLoss", "TopKSAE", "build_sae", "canonical_sae_type",
    "export_saelens", "fit_sae", "import_saelens", "reconstruction_metrics", "sae_method",
    "spliced_loss",
]
