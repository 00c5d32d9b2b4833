"""Pooling over real tokens: the one place that turns (batch, seq, d) into (batch, d)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

Pool = Literal["mean", "last"]


def pool(acts: torch.Tensor, mask: torch.Tensor | None, how: Pool = "mean") -> torch.Tensor:
    """Mean over real tokens, or the last real token, of a token site; padding never counts.

    A (batch, features) tensor (a state site, one value per sequence) passes through.
    """
    import torch

    if acts.dim() == 2:
        return acts
    if mask is None:
        mask = torch.ones(acts.shape[:2], dtype=torch.long, device=acts.device)
    if mask.shape != acts.shape[:2]:
        raise ValueError(f"attention mask {tuple(mask.shape)} does not match activations "
                         f"{tuple(acts.shape[:2])}")
    if how == "mean":
        weights = mask.to(acts.dtype).unsqueeze(-1)
        return (acts * weights).sum(1) / weights.sum(1).clamp_min(1.0)
    if how == "last":
        from .engine import last_real_index

        rows = torch.arange(acts.shape[0], device=acts.device)
        return acts[rows, last_real_index(mask)]
    raise ValueError(f"unknown pooling {how!r}: use 'mean' or 'last'")


def real_tokens(acts: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """All real-token vectors of a token site, stacked: (n_real_tokens, d)."""
    if mask is None:
        return acts.reshape(-1, acts.shape[-1])
    return acts[mask.bool()]
