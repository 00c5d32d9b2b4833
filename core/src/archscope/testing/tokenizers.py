"""A tokenizer that follows only the documented contract (docs/plugin-authors.md), for the
kits: UTF-8 bytes as token ids, so texts of equal length in words can differ in tokens."""

from __future__ import annotations

from typing import Any

from ..errors import InputError, ParameterError, UsageError

__all__ = ["ByteTokenizer"]


class ByteTokenizer:
    """Bytes as ids ``1 + byte % (vocab_size - 1)`` (id 0 pads). Callable only as the guide
    promises: ``tok(texts, return_tensors="pt", padding=True, truncation=False,
    max_length=None)`` with a list of texts; it refuses a bare string, as a tokenizer written
    from the guide alone may."""

    pad_token = "<pad>"
    pad_token_id = 0

    def __init__(self, vocab_size: int = 257) -> None:
        if vocab_size < 2:
            raise ParameterError(f"vocab_size must be >= 2, got {vocab_size}")
        self.vocab_size = int(vocab_size)

    def __len__(self) -> int:
        return self.vocab_size

    def __call__(
        self,
        texts: list[str],
        return_tensors: str | None = None,
        padding: bool = False,
        truncation: bool = False,
        max_length: int | None = None,
    ) -> dict[str, Any]:
        import torch

        if isinstance(texts, str) or return_tensors != "pt":
            raise UsageError(
                'call as tok(list_of_texts, return_tensors="pt", padding=True) '
                f"(got {type(texts).__name__}, return_tensors={return_tensors!r})"
            )
        rows = [[1 + b % (self.vocab_size - 1) for b in t.encode()] for t in texts]
        if truncation and max_length is not None:
            rows = [r[:max_length] for r in rows]
        width = max(len(r) for r in rows)
        if not padding and any(len(r) != width for r in rows):
            raise InputError("texts of different lengths need padding=True")
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def decode(self, ids: list[int]) -> str:
        return bytes((int(i) - 1) % 256 for i in ids if int(i) != 0).decode(errors="replace")
