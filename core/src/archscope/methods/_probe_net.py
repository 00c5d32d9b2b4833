"""The probe network (torch): a linear layer, or a one-hidden-layer MLP, giving one logit per
row. Kept apart from `archscope.methods.probes` so that importing that module needs no torch."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from ..errors import ParameterError


class ProbeShape(Protocol):
    """What the network reads of a `ProbeConfig`."""

    probe_type: str
    hidden_dim: int


class Probe(nn.Module):
    """A binary classifier on (N, input_dim) activations returning one logit per row."""

    def __init__(self, input_dim: int, config: ProbeShape) -> None:
        super().__init__()
        if int(input_dim) < 1:
            raise ParameterError(f"Probe input_dim must be >= 1, got {input_dim}")
        self.input_dim = int(input_dim)
        self.config = config
        self.net: nn.Module
        if config.probe_type == "linear":
            self.net = nn.Linear(self.input_dim, 1)
        else:
            self.net = nn.Sequential(
                nn.Linear(self.input_dim, config.hidden_dim),
                nn.ReLU(),
                nn.Linear(config.hidden_dim, 1),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.net(x)
        return logits.squeeze(-1)
