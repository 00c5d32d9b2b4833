"""Shared checks of the reliability tests: what a model looks like before and after a run
(hooks, mode, weights) and small token batches."""

from __future__ import annotations

from typing import Any

import torch


def hook_ids(model: Any) -> set[tuple[str, str, int]]:
    """Every forward / pre-forward / backward hook on every module, by module and id."""
    found = set()
    for name, module in model.named_modules():
        for kind in (
            "_forward_hooks",
            "_forward_pre_hooks",
            "_backward_hooks",
            "_backward_pre_hooks",
        ):
            for key in getattr(module, kind, {}):
                found.add((name, kind, int(key)))
    return found


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


def snapshot(model: Any) -> tuple[dict[str, torch.Tensor], dict[str, bool]]:
    """The model's weights (copied) and the training flag of every module."""
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    modes = {n: m.training for n, m in model.named_modules()}
    return weights, modes


def assert_unchanged(model: Any, before: tuple[dict[str, torch.Tensor], dict[str, bool]]) -> None:
    weights, modes = before
    now = model.state_dict()
    assert set(now) == set(weights)
    for k, v in weights.items():
        assert torch.equal(now[k], v), f"weight {k} changed"
    assert {n: m.training for n, m in model.named_modules()} == modes, "module modes changed"


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
