"""The on-disk layout of an activation store: a folder of safetensors shards and a JSON
manifest, each written atomically, and the identity checks that decide whether an existing
folder may be resumed."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...errors import ArtifactError

if TYPE_CHECKING:
    import torch

FORMAT = "archscope-activation-store"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
#: Per-token provenance stored beside the activations in every shard.
INDEX_FIELDS = ("doc", "position", "token_ids")


class StoreError(ArtifactError):
    """An activation store that is malformed, incomplete, or does not match a request."""


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.safetensors"


def fsync_dir(folder: Path) -> None:
    # The rename itself must reach the disk, not only the file's bytes.
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old file or the new one:
    a temporary file in the same folder, flushed and fsynced, then renamed over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def encode_shard(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in tensors.items()}, metadata=dict(metadata))


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def header_problem(path: Path, size: int) -> str | None:
    """What is wrong with the safetensors header of the file at ``path`` (``size`` bytes), or
    None: the header length, its JSON, and that every tensor's bytes lie inside the file."""
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            return "shorter than a safetensors header"
        n = int.from_bytes(head, "little")
        if n <= 0 or 8 + n > size:
            return f"its header claims {n} bytes, more than the file holds"
        try:
            header = json.loads(handle.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return "its safetensors header is not valid JSON (the file is damaged)"
    if not isinstance(header, dict):
        return "its safetensors header is not a JSON object"
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not isinstance(offsets, list) or len(offsets) != 2:
            return f"tensor {name!r} has no data offsets in the header"
        end = max(end, int(offsets[1]))
    if 8 + n + end != size:
        return f"its tensors end at byte {8 + n + end}, but the file has {size} bytes"
    return None


def tokenizer_hash(tokenizer: Any) -> str | None:
    """A hash of what decides a tokenizer's ids: its full serialisation when it has one (fast
    tokenizers), else its vocabulary and special tokens; None without a tokenizer."""
    if tokenizer is None:
        return None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text: str | None = None
    if backend is not None and hasattr(backend, "to_str"):
        text = backend.to_str()
    elif hasattr(tokenizer, "get_vocab"):
        text = json.dumps(
            {
                "vocab": sorted(tokenizer.get_vocab().items()),
                "special": sorted(map(str, getattr(tokenizer, "all_special_tokens", []))),
            }
        )
    if text is None:
        text = repr(tokenizer)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def dataset_fingerprint(rows: Sequence[Sequence[int]]) -> str:
    """A hash of the token ids of every document, in order (texts enter through their ids, so
    the same texts under another tokenizer give another fingerprint)."""
    import numpy as np

    h = hashlib.sha256()
    h.update(np.asarray([len(r) for r in rows], dtype=np.int64).tobytes())
    for start in range(0, len(rows), 4096):  # in blocks: no single huge array
        block = [t for r in rows[start : start + 4096] for t in r]
        h.update(np.asarray(block, dtype=np.int64).tobytes())
    return h.hexdigest()[:32]


def _meta_tensor_source(model: Any, name: str) -> Any:
    """The real tensor behind a parameter that accelerate offloaded (held on the meta device;
    its values live in the hook's weights map, in memory or on disk)."""
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    hook = getattr(module, "_hf_hook", None)
    weights = getattr(hook, "weights_map", None)
    if weights is None:
        raise StoreError(
            f"parameter {name} is on the meta device and no offload map holds it; "
            "load the model fully before extracting"
        )
    return weights[leaf]


def model_weights_hash(model: Any) -> str:
    """A hash of every parameter and buffer (name, shape, dtype, bytes), also for models that
    accelerate dispatched over devices or offloaded to disk."""
    import torch

    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if tensor.device.type == "meta":
            tensor = _meta_tensor_source(model, name)
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


def model_record(model: Any, backend_name: str) -> dict[str, Any]:
    from ...artifacts import model_identity

    identity = model_identity(model)
    return {"backend": backend_name, **identity, "weights_hash": model_weights_hash(model)}


@dataclass
class ShardRecord:
    """One complete shard: its file, the documents it covers, its token count and checksum."""

    index: int
    file: str
    docs: tuple[int, int]
    n_tokens: int
    sha256: str
    bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "file": self.file,
            "docs": list(self.docs),
            "n_tokens": self.n_tokens,
            "sha256": self.sha256,
            "bytes": self.bytes,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ShardRecord:
        return cls(
            int(d["index"]),
            str(d["file"]),
            (int(d["docs"][0]), int(d["docs"][1])),
            int(d["n_tokens"]),
            str(d["sha256"]),
            int(d["bytes"]),
        )


#: Manifest keys that must agree for an existing folder to be resumed, with what they mean.
IDENTITY_KEYS = {
    "model": "model (class, config, weights)",
    "tokenizer_hash": "tokenizer",
    "sites": "site list (names, shapes, dtype)",
    "dataset": "dataset (token ids of every document)",
    "layout": "extraction settings (docs per shard, batch size)",
}


@dataclass
class Manifest:
    """What ``manifest.json`` holds. Everything but ``shards`` and ``complete`` is fixed when
    the store is created; shards are added as they are written."""

    model: dict[str, Any]
    tokenizer_hash: str | None
    sites: dict[str, dict[str, Any]]
    dataset: dict[str, Any]
    layout: dict[str, Any]
    shards: dict[int, ShardRecord] = field(default_factory=dict)
    complete: bool = False
    archscope_version: str = ""

    @property
    def n_shards(self) -> int:
        return int(self.layout["n_shards"])

    @property
    def n_tokens(self) -> int:
        return sum(s.n_tokens for s in self.shards.values())

    def shard_docs(self, index: int) -> tuple[int, int]:
        per = int(self.layout["docs_per_shard"])
        return index * per, min((index + 1) * per, int(self.dataset["n_docs"]))

    def missing(self) -> list[int]:
        return [i for i in range(self.n_shards) if i not in self.shards]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "archscope_version": self.archscope_version,
            "complete": self.complete,
            "n_tokens": self.n_tokens,
            "model": self.model,
            "tokenizer_hash": self.tokenizer_hash,
            "sites": self.sites,
            "dataset": self.dataset,
            "layout": self.layout,
            "shards": [self.shards[i].to_dict() for i in sorted(self.shards)],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "manifest") -> Manifest:
        if d.get("format") != FORMAT:
            raise StoreError(
                f"{where} is not an archscope activation store manifest (format "
                f"{d.get('format')!r}, expected {FORMAT!r})"
            )
        if int(d.get("format_version", -1)) > FORMAT_VERSION:
            raise StoreError(
                f"{where} has format version {d.get('format_version')}; this "
                f"archscope reads up to {FORMAT_VERSION}: upgrade archscope"
            )
        try:
            shards = {int(s["index"]): ShardRecord.from_dict(s) for s in d["shards"]}
            return cls(
                model=dict(d["model"]),
                tokenizer_hash=d["tokenizer_hash"],
                sites=dict(d["sites"]),
                dataset=dict(d["dataset"]),
                layout=dict(d["layout"]),
                shards=shards,
                complete=bool(d["complete"]),
                archscope_version=str(d.get("archscope_version", "")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreError(
                f"{where} is malformed ({type(exc).__name__}: {exc}); delete the "
                "folder and extract again"
            ) from None

    def save(self, folder: Path) -> None:
        atomic_write(folder / MANIFEST, json.dumps(self.to_dict(), indent=1).encode())

    @classmethod
    def load(cls, folder: Path) -> Manifest:
        path = folder / MANIFEST
        if not path.is_file():
            raise StoreError(
                f"{folder} holds no {MANIFEST}: it is not an activation store "
                "(create one with archscope.apps.store.extract or `archscope extract`)"
            )
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise StoreError(
                f"{path} is not valid JSON ({exc.msg}); delete the folder and extract again"
            ) from None
        return cls.from_dict(data, str(path))

    def differences(self, other: Manifest) -> list[str]:
        """What differs between the identities of two manifests, one line per key."""
        lines = []
        for key, what in IDENTITY_KEYS.items():
            mine, theirs = getattr(self, key), getattr(other, key)
            if mine != theirs:
                if isinstance(mine, dict) and isinstance(theirs, dict):
                    keys = sorted(
                        k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k)
                    )
                    detail = "; ".join(
                        f"{k}: store has {mine.get(k)!r}, request has {theirs.get(k)!r}"
                        for k in keys
                    )
                else:
                    detail = f"store has {mine!r}, request has {theirs!r}"
                lines.append(f"{what} differs ({detail})")
        return lines
