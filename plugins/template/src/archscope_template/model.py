"""MinGRULM: embedding -> blocks (x + minGRU(norm x); x + MLP(norm x)) -> norm -> head."""

from __future__ import annotations

from typing import cast

import torch
from torch import nn


class MinGRU(nn.Module):
    """h_t = (1 - z_t) * h_{t-1} + z_t * h~_t with z_t, h~_t computed from x_t alone."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.to_z = nn.Linear(d_model, d_model)
        self.to_h = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.sigmoid(self.to_z(x))
        candidate = self.to_h(x)
        h = torch.zeros_like(x[:, 0])
        outputs = []
        for t in range(x.shape[1]):
            h = (1 - z[:, t]) * h + z[:, t] * candidate[:, t]
            outputs.append(h)
        return torch.stack(outputs, dim=1)


class Block(nn.Module):
    def __init__(self, d_model: int, d_mlp: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.mixer = MinGRU(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, d_mlp), nn.GELU(), nn.Linear(d_mlp, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mixer(self.norm1(x))
        return cast("torch.Tensor", x + self.mlp(self.norm2(x)))


class MinGRULM(nn.Module):
    def __init__(
        self, vocab_size: int = 64, d_model: int = 32, n_layers: int = 3, d_mlp: int = 64
    ) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.embed = nn.Embedding(vocab_size, d_model)
        self.blocks = nn.ModuleList(Block(d_model, d_mlp) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        # A causal recurrence: right padding never reaches real tokens, so the mask is unused.
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x)
        return cast("torch.Tensor", self.head(self.norm(x)))
