"""Measurements the training script records in the manifest (and `archscope zoo list` shows)."""

from __future__ import annotations

from typing import Any

from . import corpus


def induction_score(model: Any, tokenizer: Any, n: int = 64) -> dict:
    """How well ``model`` copies a repeated random span (`corpus.induction_set`): the mean
    probability it gives the right word at words 2..L of the span's second occurrence (only
    copying can predict them), and that probability divided by chance (1 / vocabulary)."""
    import torch

    data = corpus.induction_set(n)
    probs: list[float] = []
    with torch.no_grad():
        for text, span, (_, second) in zip(data.texts, data.spans, data.starts, strict=True):
            ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
            out = model(input_ids=ids)
            logits = out.logits if hasattr(out, "logits") else out
            # position p predicts word p + 1
            positions = torch.arange(second, second + len(span) - 1)
            p = logits[0, positions].float().softmax(-1).gather(-1, ids[0, positions + 1, None])
            probs += p[:, 0].tolist()
    vocab = len(tokenizer)
    mean = sum(probs) / len(probs)
    return {"probability": mean, "chance": 1 / vocab, "score": mean * vocab}
