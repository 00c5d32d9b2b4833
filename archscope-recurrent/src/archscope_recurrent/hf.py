"""Backends for Hugging Face RWKV (``rwkv``) and xLSTM (``xlstm``) causal LMs, one module each
(`archscope_recurrent.rwkv`, `archscope_recurrent.xlstm`) on what they share
(`archscope_recurrent.hf_shared`); their names stay importable from here."""

from __future__ import annotations

from .hf_shared import Family, StateTensor, _HFRecurrentBackend
from .rwkv import RWKV, RWKVBackend
from .xlstm import XLSTM, XLSTMBackend

__all__ = [
    "RWKV",
    "XLSTM",
    "Family",
    "RWKVBackend",
    "StateTensor",
    "XLSTMBackend",
    "_HFRecurrentBackend",
]
