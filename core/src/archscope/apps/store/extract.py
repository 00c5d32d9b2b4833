"""Extraction into an activation store: every real token of a dataset through `iter_collect`,
one shard per block of documents, written atomically by a background thread so that disk
writes overlap the next forward passes; resumable after any interruption."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .format import (
    INDEX_FIELDS,
    MANIFEST,
    Manifest,
    ShardRecord,
    StoreError,
    atomic_write,
    dataset_fingerprint,
    encode_shard,
    model_record,
    sha256,
    shard_name,
    tokenizer_hash,
)

if TYPE_CHECKING:
    import torch

    from ...backends import Backend
    from .reader import ActivationStore

DEFAULT_DOCS_PER_SHARD = 1024


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def resolve_dtype(dtype: Any, model: Any) -> torch.dtype:
    """``dtype`` as a torch dtype (a name such as 'float16' works); None means the dtype of the
    model's first floating parameter."""
    import torch

    if dtype is None:
        for p in model.parameters():
            if p.is_floating_point():
                found: torch.dtype = p.dtype
                return found
        return torch.float32
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype, None)
        if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
            raise StoreError(
                f"unknown activation dtype {dtype!r}; use float32, float16 or bfloat16"
            )
        return resolved
    given: torch.dtype = dtype
    return given


def site_records(
    backend: Backend, sites: Iterable[str] | str, dtype: torch.dtype
) -> dict[str, dict[str, Any]]:
    """``{site: {"shape": [dim], "dtype": ...}}`` for token sites; state sites are refused
    (the store holds one vector per real token)."""
    from ...errors import SiteError

    if isinstance(sites, str):
        sites = [sites]
    out: dict[str, dict[str, Any]] = {}
    for site in sites:
        info = backend.site_info(site)
        if info.kind != "token" or len(info.shape) != 3:
            raise SiteError(
                f"{info.name} has axes {info.shape}: the store holds one vector per "
                "real token, so give token sites with (batch, seq, features) axes "
                f"(this model has: {', '.join(_token_sites(backend))})"
            )
        out[info.name] = {"shape": [int(info.dim)], "dtype": _dtype_name(dtype)}
    if not out:
        raise SiteError("give at least one site to extract")
    return out


def _token_sites(backend: Backend) -> list[str]:
    return [n for n, i in backend.sites().items() if i.kind == "token" and len(i.shape) == 3]


def plan(
    backend: Backend,
    data: Any,
    sites: Iterable[str] | str,
    *,
    tokenizer: Any = None,
    docs_per_shard: int = DEFAULT_DOCS_PER_SHARD,
    batch_size: int = 32,
    dtype: Any = None,
) -> tuple[Manifest, list[list[int]]]:
    """The manifest a fresh extraction of ``data`` would write, and the token ids of every
    document."""
    torch_dtype = resolve_dtype(dtype, backend.model)
    return plan_from(
        model_record(backend.model, backend.name),
        site_records(backend, sites, torch_dtype),
        getattr(backend, "padding", "both"),
        data,
        tokenizer=tokenizer,
        docs_per_shard=docs_per_shard,
        batch_size=batch_size,
    )


def plan_from(
    model: dict[str, Any],
    sites: dict[str, dict[str, Any]],
    padding: str,
    data: Any,
    *,
    tokenizer: Any = None,
    docs_per_shard: int = DEFAULT_DOCS_PER_SHARD,
    batch_size: int = 32,
) -> tuple[Manifest, list[list[int]]]:
    """`plan` from a model record and site records made elsewhere (a Ray actor holds the
    model)."""
    from ..._version import __version__
    from ...data import as_dataset

    if docs_per_shard < 1 or batch_size < 1:
        raise StoreError(
            f"docs_per_shard and batch_size must be >= 1, got {docs_per_shard} and {batch_size}"
        )
    dataset = as_dataset(data, tokenizer)
    rows = dataset.ids()
    manifest = Manifest(
        model=model,
        tokenizer_hash=tokenizer_hash(
            dataset.tokenizer if dataset.texts is not None else tokenizer
        ),
        sites=sites,
        dataset={
            "fingerprint": dataset_fingerprint(rows),
            "n_docs": len(rows),
            "n_tokens": sum(len(r) for r in rows),
        },
        layout={
            "docs_per_shard": docs_per_shard,
            "batch_size": batch_size,
            "n_shards": -(-len(rows) // docs_per_shard),
            "padding": padding,
        },
        archscope_version=__version__,
    )
    return manifest, rows


def prepare(folder: str | Path, wanted: Manifest, *, overwrite: bool = False) -> Manifest:
    """Create ``folder`` for ``wanted``, or reopen an interrupted extraction of the same model,
    tokenizer, sites and dataset: shards the manifest lists are kept, anything else (temporary
    files of a killed run, shards written after the last manifest update) is removed.
    A folder holding another extraction is refused with what differs."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise StoreError(f"{folder} exists and is not a folder; give a new or store folder")
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / MANIFEST).is_file() and not overwrite:
        existing = Manifest.load(folder)
        diff = existing.differences(wanted)
        if diff:
            raise StoreError(
                f"{folder} holds a store of another extraction, so it cannot be resumed: "
                + "; ".join(diff)
                + ". Give another --out folder, or overwrite=True "
                "(--overwrite) to replace it."
            )
        for index, record in list(existing.shards.items()):
            path = folder / record.file
            if not path.is_file() or path.stat().st_size != record.bytes:
                del existing.shards[index]  # listed but lost: extract it again
        manifest = existing
    else:
        if any(folder.iterdir()) and not (folder / MANIFEST).is_file():
            raise StoreError(
                f"{folder} is not empty and holds no store manifest; give an empty "
                "or new folder so no file of yours is overwritten"
            )
        manifest = wanted
    keep = {MANIFEST, *(r.file for r in manifest.shards.values())}
    for path in folder.iterdir():
        if path.name not in keep and (path.name.startswith((".shard-", ".manifest", "shard-"))):
            path.unlink()
    manifest.complete = not manifest.missing()
    manifest.save(folder)
    return manifest


def block_tensors(
    backend: Backend,
    rows: Sequence[Sequence[int]],
    doc_offset: int,
    sites: Sequence[str],
    batch_size: int,
    dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """Every real token's activations of ``sites`` for one block of documents, with ``doc``
    (global document index), ``position`` and ``token_ids``."""
    import torch

    from ...collect import iter_collect
    from ...data import Dataset

    parts = list(
        iter_collect(
            backend,
            Dataset.from_ids(rows),
            list(sites),
            pool=None,
            batch_size=batch_size,
            progress=False,
            dtype=dtype,
        )
    )
    out = {site: torch.cat([p.activations[site] for p in parts]) for site in sites}
    out["doc"] = torch.cat([p.doc for p in parts]) + doc_offset
    out["position"] = torch.cat([p.position for p in parts if p.position is not None])
    out["token_ids"] = torch.cat([p.token_ids for p in parts if p.token_ids is not None])
    return out


def write_shard(
    folder: Path, index: int, docs: tuple[int, int], tensors: dict[str, torch.Tensor]
) -> ShardRecord:
    """Write one shard atomically and return its record (checksum of the exact bytes)."""
    # One metadata key: safetensors orders several keys arbitrarily, and the bytes (so the
    # checksum) of a shard must not depend on the run that wrote it.
    data = encode_shard(tensors, {"archscope": f"shard {index} docs {docs[0]}:{docs[1]}"})
    name = shard_name(index)
    atomic_write(folder / name, data)
    return ShardRecord(index, name, docs, int(tensors["doc"].shape[0]), sha256(data), len(data))


class _Writer:
    """One background thread that writes shards and then the manifest, in submission order,
    so writing overlaps the next forward passes; an error surfaces on the next call."""

    def __init__(self, folder: Path, manifest: Manifest, on_written: Any = None) -> None:
        self.folder, self.manifest, self.on_written = folder, manifest, on_written
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.thread = threading.Thread(
            target=self._loop, name="archscope-store-writer", daemon=True
        )
        self.thread.start()

    def _loop(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            if self.error is not None:
                continue
            index, docs, tensors = item
            try:
                record = write_shard(self.folder, index, docs, tensors)
                self.manifest.shards[index] = record
                self.manifest.complete = not self.manifest.missing()
                self.manifest.save(self.folder)
            except BaseException as exc:
                self.error = exc

    def _check(self) -> None:
        if self.error is not None:
            raise StoreError(
                f"writing the store in {self.folder} failed: "
                f"{type(self.error).__name__}: {self.error}"
            ) from self.error

    def submit(self, index: int, docs: tuple[int, int], tensors: dict[str, Any]) -> None:
        self._check()
        self.queue.put((index, docs, tensors))

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        self._check()


def _progress(manifest: Manifest, rows: Sequence[Sequence[int]], progress: bool | None) -> Any:
    from tqdm.auto import tqdm

    done = sum(r.n_tokens for r in manifest.shards.values())
    return tqdm(
        total=int(manifest.dataset["n_tokens"]),
        initial=done,
        unit="tok",
        unit_scale=True,
        desc="extract",
        smoothing=0.1,
        disable=None if progress is None else not progress,
    )


def extract(
    backend: Backend,
    data: Any,
    sites: Iterable[str] | str,
    out: str | Path,
    *,
    tokenizer: Any = None,
    docs_per_shard: int = DEFAULT_DOCS_PER_SHARD,
    batch_size: int = 32,
    dtype: Any = None,
    overwrite: bool = False,
    progress: bool | None = None,
) -> ActivationStore:
    """Run ``data`` through ``backend`` and store every real token's activations of ``sites``
    in the folder ``out``, one shard per ``docs_per_shard`` documents.

    An interrupted extraction into the same folder resumes from its last complete shard and
    ends with the same vectors as an uninterrupted one; a folder holding another model,
    tokenizer, site list or dataset is refused (`StoreError` saying what differs).
    ``dtype``: activation dtype on disk (default: the model's). Returns the opened store.
    """
    from .reader import ActivationStore

    folder = Path(out)
    wanted, rows = plan(
        backend,
        data,
        sites,
        tokenizer=tokenizer,
        docs_per_shard=docs_per_shard,
        batch_size=batch_size,
        dtype=dtype,
    )
    manifest = prepare(folder, wanted, overwrite=overwrite)
    site_names = list(manifest.sites)
    torch_dtype = resolve_dtype(manifest.sites[site_names[0]]["dtype"], backend.model)
    bar = _progress(manifest, rows, progress)
    writer = _Writer(folder, manifest)
    try:
        for index in manifest.missing():
            start, end = manifest.shard_docs(index)
            tensors = block_tensors(
                backend, rows[start:end], start, site_names, batch_size, torch_dtype
            )
            writer.submit(index, (start, end), tensors)
            bar.update(int(tensors["doc"].shape[0]))
    finally:
        writer.close()
        bar.close()
    if not manifest.complete:  # pragma: no cover - every missing shard was submitted above
        raise StoreError(f"{folder}: shards {manifest.missing()} were not written")
    return ActivationStore(folder)


__all__ = ["INDEX_FIELDS", "extract", "plan", "prepare"]
