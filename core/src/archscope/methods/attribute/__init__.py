"""Causal attribution: activation patching, patching sweeps, attribution patching (AtP, with
GradDrop, and AtP* on attention queries and keys), DIM decomposition and state patching, on any backend, through sites and edits only.

archscope 0.2's names (`activation_patch`, `dim_decompose`, `PatchResult`, `DIMResult`) keep
their signatures. Positions are counted among real tokens; the default metric is `LogitDiff`.
"""

from __future__ import annotations

from ._metric import LogitDiff
from ._patch import activation_patch, attribution_patch, dim_decompose, patch_sweep
from ._qk import attention_node_sweep
from ._results import DIMResult, PatchResult, PatchSweep, StatePatchResult
from ._state import state_patch_sweep

__all__ = [
    "DIMResult",
    "LogitDiff",
    "PatchResult",
    "PatchSweep",
    "StatePatchResult",
    "activation_patch",
    "attention_node_sweep",
    "attribution_patch",
    "dim_decompose",
    "patch_sweep",
    "state_patch_sweep",
]
