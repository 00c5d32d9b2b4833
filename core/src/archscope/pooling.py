"""Kept for 0.2 imports: pooling lives in `archscope.batch` (``archscope.pool`` is
`archscope.batch.pool`)."""

from __future__ import annotations

from .batch import Pool, pool, real_tokens

__all__ = ["Pool", "pool", "real_tokens"]
