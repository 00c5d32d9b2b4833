"""Model specs for tests that load a model by name in another process (a subprocess, a Ray
actor, a torchrun rank): ``load_model(f"{MODELS}:gpt2")`` builds the same seeded tiny model and
offline tokenizer as `archs.arch("gpt2")`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

MODELS = str(Path(__file__).resolve())


def gpt2() -> tuple[Any, Any]:
    from archscope_transformer.testing import tiny_model, tiny_tokenizer

    return tiny_model("gpt2"), tiny_tokenizer()


def gpt2_other_weights() -> tuple[Any, Any]:
    from archscope_transformer.testing import tiny_model, tiny_tokenizer

    return tiny_model("gpt2", seed=1), tiny_tokenizer()


def topk_sae(input_dim: int, config: Any) -> Any:
    """A minimal TopK sparse autoencoder with ``loss(x)``: the factory the torchrun test
    trains (any module with ``loss`` works with `archscope.apps.store.train_distributed`)."""
    import torch

    class TopK(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.W_enc = torch.nn.Parameter(torch.randn(input_dim, config.d_sae) / input_dim**0.5)
            self.b_enc = torch.nn.Parameter(torch.zeros(config.d_sae))
            self.W_dec = torch.nn.Parameter(self.W_enc.detach().t().clone())
            self.b_dec = torch.nn.Parameter(torch.zeros(input_dim))

        def loss(self, x: torch.Tensor) -> torch.Tensor:
            pre = (x - self.b_dec) @ self.W_enc + self.b_enc
            values, index = pre.topk(config.k, dim=-1)
            z = torch.zeros_like(pre).scatter(-1, index, values.relu())
            return (z @ self.W_dec + self.b_dec - x).pow(2).sum(-1).mean()

    return TopK()
