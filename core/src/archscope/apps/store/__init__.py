"""The activation store: every real token's activations of a dataset, written to a folder of
safetensors shards with a JSON manifest, resumable, and read back in bounded memory as
shuffled minibatches (split per rank for distributed training).

``extract(backend, data, sites, out)`` writes one; ``ActivationStore(path)`` opens one;
``StoreReader(store, site, batch_size, seed=..., rank=..., world_size=...)`` streams it.
Ray extraction lives in `archscope.apps.store.ray_engine`, torchrun training in
`archscope.apps.store.train_distributed`, the CLI commands in `archscope.apps.store.cli`.
"""

from __future__ import annotations

from .extract import extract
from .format import Manifest, ShardRecord, StoreError
from .reader import ActivationStore, StoreInfo, StoreReader

__all__ = [
    "ActivationStore",
    "Manifest",
    "ShardRecord",
    "StoreError",
    "StoreInfo",
    "StoreReader",
    "extract",
]
