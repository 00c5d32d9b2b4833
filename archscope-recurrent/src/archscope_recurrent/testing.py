"""Tiny random-weight models of each family this package serves, for tests, benchmarks and the
conformance kit. Every factory is seeded and returns a model in eval mode."""

from __future__ import annotations

from typing import Any, cast

import torch

from .models import RecurrentLM, RecurrentLMConfig

VOCAB = 100


def tiny_recurrent_lm(
    cell: str = "gru",
    *,
    num_layers: int = 2,
    d_model: int = 16,
    hidden_size: int = 24,
    bidirectional: bool = False,
    proj_size: int = 0,
    norm: bool = True,
    vocab_size: int = VOCAB,
    seed: int = 0,
) -> RecurrentLM:
    """A `RecurrentLM` (cell: gru, lstm, rnn_tanh, rnn_relu)."""
    torch.manual_seed(seed)
    config = RecurrentLMConfig(
        vocab_size=vocab_size,
        d_model=d_model,
        hidden_size=hidden_size,
        num_layers=num_layers,
        cell=cell,
        bidirectional=bidirectional,
        proj_size=proj_size,
        norm=norm,
    )
    return RecurrentLM(config).eval()


class PlainLSTMLM(torch.nn.Module):
    """A model that is not a RecurrentLM but has the same structure (found by structure)."""

    def __init__(self, vocab_size: int = VOCAB, dim: int = 16, hidden: int = 20) -> None:
        super().__init__()
        self.tok = torch.nn.Embedding(vocab_size, dim)
        self.lstm = torch.nn.LSTM(dim, hidden, num_layers=2, batch_first=True)
        self.out = torch.nn.Linear(hidden, vocab_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return cast("torch.Tensor", self.out(self.lstm(self.tok(input_ids))[0]))


def plain_lstm_lm(seed: int = 0) -> PlainLSTMLM:
    torch.manual_seed(seed)
    return PlainLSTMLM().eval()


def tiny_rwkv(num_layers: int = 2, rescale_every: int = 6, seed: int = 0) -> Any:
    """A Hugging Face ``RwkvForCausalLM`` with hidden size 32."""
    from transformers import RwkvConfig, RwkvForCausalLM

    torch.manual_seed(seed)
    config = RwkvConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=num_layers,
        attention_hidden_size=32,
        intermediate_size=64,
        context_length=64,
        rescale_every=rescale_every,
    )
    return RwkvForCausalLM(config).eval()


def tiny_xlstm(num_layers: int = 2, seed: int = 0, width: int = 64, vocab: int = VOCAB) -> Any:
    """A Hugging Face ``xLSTMForCausalLM`` of 4 heads (``width`` at least 64: the head dims
    round up to 64; ``qk_dim_factor=1.0`` because the default fails on tiny configs)."""
    from transformers import xLSTMConfig, xLSTMForCausalLM

    torch.manual_seed(seed)
    config = xLSTMConfig(
        vocab_size=vocab,
        hidden_size=width,
        embedding_dim=width,
        num_hidden_layers=num_layers,
        num_blocks=num_layers,
        num_heads=4,
        qk_dim_factor=1.0,
        v_dim_factor=1.0,
    )
    return xLSTMForCausalLM(config).eval()


def token_batch(
    batch: int = 2,
    seq: int = 7,
    lengths: list[int] | None = None,
    vocab_size: int = VOCAB,
    seed: int = 1,
) -> dict[str, torch.Tensor]:
    """Random token ids with an attention mask (right-padded to ``seq`` when ``lengths``)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab_size, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    for row, n in enumerate(lengths or []):
        mask[row, n:] = 0
        ids[row, n:] = 0
    return {"input_ids": ids, "attention_mask": mask}
