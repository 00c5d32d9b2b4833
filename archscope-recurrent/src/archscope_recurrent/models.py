"""`RecurrentLM`: a small reference language model (embedding → stacked GRU/LSTM/RNN → optional
norm → head) that saves and loads as safetensors + a JSON config."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from archscope.errors import MissingFileError, ParameterError

#: File names of a saved RecurrentLM folder (the model source claims folders holding CONFIG_NAME).
CONFIG_NAME = "recurrent_lm.json"
WEIGHTS_NAME = "model.safetensors"
CELLS = ("gru", "lstm", "rnn_tanh", "rnn_relu")


@dataclass
class RecurrentLMConfig:
    """Shape of a `RecurrentLM`. ``cell`` is one of gru, lstm, rnn_tanh, rnn_relu;
    ``proj_size`` (LSTM only) projects the hidden state; ``norm`` adds a LayerNorm before
    the head."""

    vocab_size: int = 100
    d_model: int = 32
    hidden_size: int = 32
    num_layers: int = 2
    cell: str = "gru"
    bidirectional: bool = False
    proj_size: int = 0
    norm: bool = True
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.cell not in CELLS:
            raise ParameterError(
                f"RecurrentLMConfig.cell must be one of {', '.join(CELLS)}, got {self.cell!r}"
            )
        if self.proj_size and self.cell != "lstm":
            raise ParameterError(
                f"proj_size is only supported by LSTM cells, got cell={self.cell!r}"
            )

    @property
    def output_size(self) -> int:
        """Feature size of the recurrent stack's output (input of the norm and head)."""
        return (self.proj_size or self.hidden_size) * (2 if self.bidirectional else 1)

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": "archscope_recurrent_lm", **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RecurrentLMConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known - {"model_type"})
        if unknown:
            raise ParameterError(
                f"unknown RecurrentLM config keys {unknown}; known: {sorted(known)}"
            )
        return cls(**{k: v for k, v in data.items() if k in known})


class RecurrentLM(nn.Module):
    """Embedding → stacked ``nn.GRU`` / ``nn.LSTM`` / ``nn.RNN`` → optional LayerNorm → head.

    ``forward(input_ids, attention_mask=None, hx=None)`` returns logits (batch, seq, vocab).
    Right-padded batches (``attention_mask``) are packed, so every row's recurrence ends at its
    last real token (pad positions of the recurrent output are zeros).
    """

    def __init__(self, config: RecurrentLMConfig | None = None, **kwargs: Any) -> None:
        super().__init__()
        self.config = config if config is not None else RecurrentLMConfig(**kwargs)
        c = self.config
        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        common: dict[str, Any] = {
            "num_layers": c.num_layers,
            "batch_first": True,
            "bidirectional": c.bidirectional,
            "dropout": c.dropout,
        }
        if c.cell == "gru":
            self.rnn: nn.RNNBase = nn.GRU(c.d_model, c.hidden_size, **common)
        elif c.cell == "lstm":
            self.rnn = nn.LSTM(c.d_model, c.hidden_size, proj_size=c.proj_size, **common)
        else:
            self.rnn = nn.RNN(c.d_model, c.hidden_size, nonlinearity=c.cell[4:], **common)
        self.norm = nn.LayerNorm(c.output_size) if c.norm else None
        self.head = nn.Linear(c.output_size, c.vocab_size)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, hx: Any = None
    ) -> torch.Tensor:
        x = self.embed(input_ids)
        if attention_mask is not None and not bool(attention_mask.all()):
            lengths = attention_mask.sum(-1).cpu()
            packed = nn.utils.rnn.pack_padded_sequence(
                x, lengths, batch_first=True, enforce_sorted=False
            )
            out, _ = self.rnn(packed, hx)
            y, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        else:
            y, _ = self.rnn(x, hx)
        if self.norm is not None:
            y = self.norm(y)
        return cast("torch.Tensor", self.head(y))

    # -- persistence ---------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``recurrent_lm.json`` and ``model.safetensors`` into ``directory``."""
        from safetensors.torch import save_file

        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_NAME).write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(path / WEIGHTS_NAME), metadata={"format": "pt"})
        return path

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, dtype: Any = None, device: Any = "cpu"
    ) -> RecurrentLM:
        """Load a folder written by `save_pretrained` (weights must match the config exactly)."""
        from safetensors.torch import load_file

        path = Path(directory)
        config_file = path / CONFIG_NAME
        if not config_file.is_file():
            raise MissingFileError(f"{path} is not a RecurrentLM folder: {CONFIG_NAME} is missing")
        config = RecurrentLMConfig.from_dict(json.loads(config_file.read_text()))
        model = cls(config)
        model.load_state_dict(load_file(str(path / WEIGHTS_NAME)), strict=True)
        model.to(device=device, dtype=dtype)
        return model.eval()
