"""Small helpers the kit's checks share: padded batches and the list of heavy modules."""

from __future__ import annotations

from typing import Any

from ..errors import ParameterError

__all__ = ["HEAVY_MODULES", "padded_batch"]

#: Modules that discovery and `can_handle` must not import.
HEAVY_MODULES = ("torch", "transformers", "jax", "tensorflow")


def padded_batch(ids: Any, lengths: list[int], side: str = "right") -> dict[str, Any]:
    """A batch whose row ``r`` keeps ``lengths[r]`` real tokens of ``ids`` (batch, width),
    padded on ``side`` ("right" or "left") with id 0 and a matching attention mask."""
    import torch

    if side not in ("right", "left"):
        raise ParameterError(f"side must be 'right' or 'left', got {side!r}")
    width = ids.shape[1]
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        if side == "right":
            mask[row, :n] = 1
        else:
            mask[row, width - n :] = 1
    return {"input_ids": ids * mask, "attention_mask": mask}
