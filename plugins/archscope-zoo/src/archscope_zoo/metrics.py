"""Measurements the training script records in the manifest (and `archscope zoo list` shows)."""

from __future__ import annotations

from typing import Any

from . import corpus


def induction_score(model: Any, tokenizer: Any, n: int = 64, span_length: int = 10) -> dict:
    """How well ``model`` copies a repeated random span (`corpus.induction_set`): the mean
    probability it gives the right word at positions 2..L of the second copy (only copying
    can predict them), and that probability divided by chance (1 / vocabulary size)."""
    import torch

    data = corpus.induction_set(n, span_length)
    ids = torch.tensor([tokenizer(t, add_special_tokens=False)["input_ids"] for t in data.texts])
    with torch.no_grad():
        out = model(input_ids=ids)
    logits = out.logits if hasattr(out, "logits") else out
    probs = logits.float().softmax(-1)
    # position p predicts token p + 1; second copy starts at L; its first word is unpredictable
    positions = torch.arange(span_length, 2 * span_length - 1)
    targets = ids[:, positions + 1]
    p = probs[:, positions].gather(-1, targets[..., None])[..., 0]
    mean = float(p.mean())
    return {"probability": mean, "chance": 1 / probs.shape[-1],
            "score": mean * probs.shape[-1]}
