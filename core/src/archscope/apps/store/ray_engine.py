"""Extraction with Ray (``archscope[ray]``): the dataset's shards are handed to Ray actors,
each of which loads the model once from its spec string and writes whole shards into the store
folder; the driver only tokenizes, schedules and keeps the manifest. Shards are the same
blocks of documents, batched the same way, as in a single-process extraction, so the store
holds the same vectors. On several machines the store folder must be on a shared filesystem."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .extract import (
    DEFAULT_DOCS_PER_SHARD,
    block_tensors,
    plan_from,
    prepare,
    resolve_dtype,
    site_records,
    write_shard,
)
from .format import ShardRecord, StoreError, model_record


class ExtractWorker:
    """What each Ray actor runs: the model loaded once, then one shard per call."""

    def __init__(self, model: str, arch: str | None, device: str, threads: int) -> None:
        import torch

        from ...loader import load_model

        torch.set_num_threads(threads)
        self.model, self.tokenizer, self.backend = load_model(model, arch=arch, device=device)

    def describe(self, sites: Sequence[str], dtype: str | None) -> dict[str, Any]:
        torch_dtype = resolve_dtype(dtype, self.backend.model)
        return {
            "model": model_record(self.backend.model, self.backend.name),
            "sites": site_records(self.backend, sites, torch_dtype),
            "padding": getattr(self.backend, "padding", "both"),
            "tokenizer": self.tokenizer,
        }

    def run(
        self,
        folder: str,
        index: int,
        docs: tuple[int, int],
        rows: list[list[int]],
        sites: list[str],
        batch_size: int,
        dtype: str,
    ) -> dict[str, Any]:
        torch_dtype = resolve_dtype(dtype, self.backend.model)
        tensors = block_tensors(self.backend, rows, docs[0], sites, batch_size, torch_dtype)
        return write_shard(Path(folder), index, docs, tensors).to_dict()


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise StoreError("--engine ray needs Ray: pip install 'archscope[ray]'") from None
    return ray


def extract_ray(
    model: str,
    data: Any,
    sites: Sequence[str],
    out: str | Path,
    *,
    arch: str | None = None,
    batch_size: int = 32,
    docs_per_shard: int = DEFAULT_DOCS_PER_SHARD,
    dtype: str | None = None,
    max_length: int | None = None,
    text_column: str = "text",
    split: str | None = None,
    workers: int = 2,
    cpus_per_worker: float = 1.0,
    gpus_per_worker: float = 0.0,
    threads_per_worker: int = 1,
    address: str | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
    timings: dict[str, float] | None = None,
) -> Any:
    """Extract like `archscope.apps.store.extract`, with ``workers`` Ray actors.

    ``model`` is a model spec (``load_model``'s argument), loaded once in each actor.
    ``data``: a data file or folder (as for ``archscope extract``), texts, token-id lists or
    a `Dataset`. Connects to ``address`` (``"auto"``, ``"HOST:6379"``) or, if Ray is not yet
    initialised, starts a local Ray. Resumes an interrupted store like the local engine.
    ``timings``, when given, receives ``startup_s`` (until every actor has loaded the model)
    and ``work_s`` (extracting and writing the shards).
    """
    import time

    from .extract import _progress
    from .inputs import load_data
    from .reader import ActivationStore

    ray = _ray()
    started = False
    clock = time.perf_counter()
    if not ray.is_initialized():
        ray.init(
            address=address, include_dashboard=False, log_to_driver=False, configure_logging=False
        )
        started = True
    try:
        device = "cuda" if gpus_per_worker > 0 else "cpu"
        actor_cls = ray.remote(ExtractWorker).options(
            num_cpus=cpus_per_worker, num_gpus=gpus_per_worker
        )
        actors = [actor_cls.remote(model, arch, device, threads_per_worker) for _ in range(workers)]
        # Every actor describes its model: all have loaded it (or failed) before work starts.
        described = ray.get([a.describe.remote(list(sites), dtype) for a in actors])[0]
        if timings is not None:
            timings["startup_s"] = time.perf_counter() - clock
            clock = time.perf_counter()
        tokenizer = described["tokenizer"]
        if isinstance(data, (str, Path)) and Path(data).exists():
            data = load_data(
                data, tokenizer, text_column=text_column, split=split, max_length=max_length
            )
        wanted, rows = plan_from(
            described["model"],
            described["sites"],
            described["padding"],
            data,
            tokenizer=tokenizer,
            docs_per_shard=docs_per_shard,
            batch_size=batch_size,
        )
        folder = Path(out)
        manifest = prepare(folder, wanted, overwrite=overwrite)
        names = list(manifest.sites)
        dtype_name = manifest.sites[names[0]]["dtype"]
        bar = _progress(manifest, rows, progress)
        pool = ray.util.ActorPool(actors)

        def submit(actor: Any, index: int) -> Any:
            start, end = manifest.shard_docs(index)
            return actor.run.remote(
                str(folder.resolve()),
                index,
                (start, end),
                rows[start:end],
                names,
                batch_size,
                dtype_name,
            )

        try:
            for record in pool.map_unordered(submit, manifest.missing()):
                shard = ShardRecord.from_dict(record)
                manifest.shards[shard.index] = shard
                manifest.complete = not manifest.missing()
                manifest.save(folder)  # after each shard, as the local engine does
                bar.update(shard.n_tokens)
        finally:
            bar.close()
        if timings is not None:
            timings["work_s"] = time.perf_counter() - clock
        for actor in actors:
            ray.kill(actor)
    finally:
        if started:
            ray.shutdown()
    return ActivationStore(folder)
