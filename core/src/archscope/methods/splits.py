"""The one held-out split every method uses: which rows train and which are held out, seeded,
optionally stratified by a 0/1 label."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import ParameterError

if TYPE_CHECKING:
    import torch


def held_out_split(
    n: int, fraction: float, seed: int, labels: torch.Tensor | None = None
) -> tuple[list[int], list[int]]:
    """``(train, held_out)`` row indices, each sorted: a seeded random ``fraction`` of the ``n``
    rows held out. With ``fraction > 0`` and two rows or more, at least one row is held out
    and one kept; ``fraction == 0`` holds none out. With ``labels`` (0/1 per row) the split is
    made per class, so both parts keep the class balance (a class of two rows or more gives
    at least one row to each part)."""
    import torch

    if not 0 <= fraction < 1:
        raise ParameterError(f"the held-out fraction must be in [0, 1), got {fraction}")
    g = torch.Generator().manual_seed(seed)
    groups = (
        [torch.arange(n)]
        if labels is None
        else [torch.nonzero(labels.flatten() == c).flatten() for c in (0, 1)]
    )
    train: list[int] = []
    held: list[int] = []
    for rows in groups:
        rows = rows[torch.randperm(len(rows), generator=g)]
        k = round(len(rows) * fraction)
        if fraction > 0 and len(rows) >= 2:
            k = min(max(k, 1), len(rows) - 1)
        held += rows[:k].tolist()
        train += rows[k:].tolist()
    return sorted(train), sorted(held)
