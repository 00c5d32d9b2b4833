"""The model: each block mixes tokens with a gated linear recurrence
``s_t = a_t * s_{t-1} + (1 - a_t) * v_t`` and returns ``(hidden, state)``; the LM returns a
dict ``{"logits", "states"}`` and can start from given per-layer states. It ignores any
attention mask, so right padding is exact at real tokens but the returned states are the ones
after the padding."""

from __future__ import annotations

from typing import Any


def build_glr(seed: int = 0, vocab_size: int = 23, d_model: int = 8, n_layers: int = 3) -> Any:
    import torch
    from torch import nn

    class Mixer(nn.Module):
        def __init__(self, d: int) -> None:
            super().__init__()
            self.proj = nn.Linear(d, 2 * d)
            self.out = nn.Linear(d, d)

        def forward(self, x: Any, state: Any = None) -> Any:
            value, gate = self.proj(x).chunk(2, dim=-1)
            decay = torch.sigmoid(gate)
            s = torch.zeros_like(value[:, 0]) if state is None else state
            steps = []
            for t in range(x.shape[1]):
                s = decay[:, t] * s + (1 - decay[:, t]) * value[:, t]
                steps.append(s)
            return self.out(torch.stack(steps, dim=1)), s

    class Block(nn.Module):
        def __init__(self, d: int) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(d)
            self.mixer = Mixer(d)

        def forward(self, x: Any, state: Any = None) -> Any:
            mixed, new_state = self.mixer(self.norm(x), state)
            return x + mixed, new_state

    class GLRLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.vocab_size = vocab_size
            self.embed = nn.Embedding(vocab_size, d_model)
            self.blocks = nn.ModuleList(Block(d_model) for _ in range(n_layers))
            self.norm = nn.LayerNorm(d_model)
            self.head = nn.Linear(d_model, vocab_size)

        def forward(self, input_ids: Any, states: Any = None) -> dict[str, Any]:
            x = self.embed(input_ids)
            new_states = []
            for i, block in enumerate(self.blocks):
                x, s = block(x, None if states is None else states[i])
                new_states.append(s)
            return {"logits": self.head(self.norm(x)), "states": new_states}

    torch.manual_seed(seed)
    return GLRLM().eval()
