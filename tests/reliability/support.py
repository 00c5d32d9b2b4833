"""Shared pieces of the reliability tests: small models and token batches (what a model must
look like after a run is checked with `archscope.testing.unchanged` and `hook_ids`)."""

from __future__ import annotations

from typing import Any

import torch


def forward_attributes(model: Any) -> list[str]:
    """The modules with a ``forward`` of their own (an instance attribute), by name."""
    return [n for n, m in model.named_modules() if "forward" in m.__dict__]


def small_gpt2() -> Any:
    """A seeded random-weight 2-layer GPT-2 (d 32, vocabulary 100) in eval mode."""
    from archscope_transformer.testing import tiny_model

    return tiny_model("gpt2", n_layers=2)


def token_ids(rows: int = 2, cols: int = 6, high: int = 100) -> torch.Tensor:
    """Seeded random token ids 0..high-1 of shape (rows, cols)."""
    return torch.randint(0, high, (rows, cols), generator=torch.Generator().manual_seed(1))


def batch(
    lengths: list[int], side: str = "right", vocab: int = 100, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Random ids 4..vocab-1 for rows of ``lengths`` real tokens, padded on ``side`` with 0."""
    g = torch.Generator().manual_seed(seed)
    seq = max(lengths)
    ids = torch.zeros(len(lengths), seq, dtype=torch.long)
    mask = torch.zeros(len(lengths), seq, dtype=torch.long)
    for r, n in enumerate(lengths):
        row = torch.randint(4, vocab, (n,), generator=g)
        if side == "right":
            ids[r, :n], mask[r, :n] = row, 1
        else:
            ids[r, seq - n :], mask[r, seq - n :] = row, 1
    return {"input_ids": ids, "attention_mask": mask}
