"""Reading an activation store: `ActivationStore` (the manifest, lazy per-shard access,
checksums) and `StoreReader`, shuffled minibatches of one site in bounded memory, split
disjointly across the ranks of a distributed job."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...errors import SiteError
from .format import INDEX_FIELDS, Manifest, StoreError, file_sha256, header_problem

if TYPE_CHECKING:
    import torch


@dataclass
class StoreInfo:
    """A summary of a store: what `archscope store info` prints."""

    path: str
    complete: bool
    n_docs: int
    n_tokens: int
    n_shards: int
    shards_written: int
    bytes: int
    sites: dict[str, dict[str, Any]]
    model: dict[str, Any]
    tokenizer_hash: str | None
    dataset_fingerprint: str
    archscope_version: str

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)

    def to_markdown(self) -> str:
        status = (
            "complete"
            if self.complete
            else f"INCOMPLETE ({self.shards_written}/{self.n_shards} shards; extract again to resume)"
        )
        lines = [
            f"# Activation store {self.path}",
            "",
            f"- status: {status}",
            f"- tokens: {self.n_tokens:,} stored from {self.n_docs:,} documents",
            f"- shards: {self.shards_written} ({self.bytes / 2**20:.1f} MiB)",
            f"- model: {self.model.get('class')} (backend {self.model.get('backend')}, "
            f"{self.model.get('n_params')} parameters, weights {self.model.get('weights_hash')})",
            f"- tokenizer: {self.tokenizer_hash}",
            f"- dataset: {self.dataset_fingerprint}",
            f"- written by archscope {self.archscope_version}",
            "",
            "| site | dim | dtype |",
            "| --- | --- | --- |",
        ]
        lines += [f"| {s} | {r['shape'][0]} | {r['dtype']} |" for s, r in self.sites.items()]
        return "\n".join(lines)


class ActivationStore:
    """An activation store folder opened for reading (nothing but the manifest is loaded)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.manifest = Manifest.load(self.path)

    @property
    def sites(self) -> list[str]:
        return list(self.manifest.sites)

    @property
    def complete(self) -> bool:
        """Every shard was written and every shard file is still there."""
        return self.manifest.complete and not self.missing_files()

    def missing_files(self) -> list[str]:
        """Shards the manifest lists whose file is gone from the folder."""
        return [
            r.file
            for _, r in sorted(self.manifest.shards.items())
            if not (self.path / r.file).is_file()
        ]

    @property
    def n_tokens(self) -> int:
        return self.manifest.n_tokens

    def dim(self, site: str) -> int:
        return int(self.manifest.sites[self.site_name(site)]["shape"][0])

    def site_name(self, site: str) -> str:
        from ...sites import Site

        try:
            name = str(Site.parse(site))
        except SiteError:
            name = site
        if name not in self.manifest.sites:
            raise SiteError(
                f"{site!r} is not in the store {self.path}; it holds "
                f"{', '.join(self.manifest.sites)}"
            )
        return name

    def shard_files(self) -> list[Path]:
        return [self.path / self.manifest.shards[i].file for i in sorted(self.manifest.shards)]

    def require_complete(self) -> None:
        lost = self.missing_files()
        if lost:
            raise StoreError(
                f"{self.path}: {len(lost)} shard files the manifest lists are missing "
                f"({', '.join(lost[:3])}{', ...' if len(lost) > 3 else ''}): run the same "
                "extraction again into this folder to rewrite them (it resumes), or pass "
                "allow_incomplete=True to read the rest"
            )
        if not self.manifest.complete:
            raise StoreError(
                f"{self.path} is incomplete ({len(self.manifest.shards)} of "
                f"{self.manifest.n_shards} shards): run the same extraction again "
                "to resume it, or pass allow_incomplete=True"
            )

    def shard_problem(self, index: int, checksum: bool = False) -> str | None:
        """What is wrong with shard ``index`` on disk, or None. Always checked (cheap): the
        file exists, has the size the manifest recorded, and its safetensors header parses
        and fits the file. With ``checksum``: also its SHA-256 (reads the whole file)."""
        record = self.manifest.shards[index]
        path = self.path / record.file
        if not path.is_file():
            return "missing"
        size = path.stat().st_size
        if size != record.bytes:
            return f"{size} bytes, but the manifest recorded {record.bytes} (truncated or replaced)"
        problem = header_problem(path, size)
        if problem is None and checksum and file_sha256(path) != record.sha256:
            problem = "checksum differs from the manifest"
        return problem

    def check_shard(self, index: int, checksum: bool = False) -> Path:
        """The path of shard ``index`` after `shard_problem` found nothing; else a
        `StoreError` naming the shard and what to do."""
        problem = self.shard_problem(index, checksum)
        record = self.manifest.shards[index]
        if problem is not None:
            raise StoreError(
                f"{self.path}: shard {record.file} (documents {record.docs[0]}..."
                f"{record.docs[1] - 1}) is damaged: {problem}. Delete that file and run the "
                "same extraction again into this folder: it resumes and rewrites only the "
                "missing shards"
            )
        return self.path / record.file

    def shard(self, index: int, fields: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
        """The tensors of one shard (all of them, or ``fields``), read from disk after the
        cheap checks of `shard_problem`."""
        from safetensors import SafetensorError, safe_open

        path = self.check_shard(index)
        try:
            with safe_open(path, framework="pt") as handle:
                keys = list(handle.keys()) if fields is None else list(fields)
                return {k: handle.get_tensor(k) for k in keys}
        except SafetensorError as exc:
            raise self._damaged(index, exc) from None

    def _damaged(self, index: int, exc: Exception) -> StoreError:
        record = self.manifest.shards[index]
        return StoreError(
            f"{self.path}: shard {record.file} cannot be read ({exc}). Delete that file and run "
            "the same extraction again into this folder: it resumes and rewrites the missing "
            "shards"
        )

    def read(self, site: str, with_index: bool = False, checksum: bool = True) -> Any:
        """A whole site in memory, in document order (small stores only; use `reader` to
        stream). With ``with_index``: ``(acts, doc, position, token_ids)``. Each shard's
        checksum is checked first (``checksum=False``: sizes and headers only)."""
        import torch

        name = self.site_name(site)
        fields = (name, *INDEX_FIELDS) if with_index else (name,)
        for index in sorted(self.manifest.shards):
            self.check_shard(index, checksum)
        parts = [self.shard(i, fields) for i in sorted(self.manifest.shards)]
        cat = [torch.cat([p[f] for p in parts]) for f in fields]
        return tuple(cat) if with_index else cat[0]

    def verify(self) -> list[str]:
        """Shards that are missing, damaged or whose checksum differs from the manifest's,
        as ``"file: what"`` lines (empty when every shard is intact)."""
        bad = []
        for index, record in sorted(self.manifest.shards.items()):
            problem = self.shard_problem(index, checksum=True)
            if problem is not None:
                bad.append(f"{record.file}: {problem}")
        return bad

    def info(self) -> StoreInfo:
        m = self.manifest
        lost = self.missing_files()
        return StoreInfo(
            path=str(self.path),
            complete=m.complete and not lost,
            n_docs=int(m.dataset["n_docs"]),
            n_tokens=m.n_tokens,
            n_shards=m.n_shards,
            shards_written=len(m.shards) - len(lost),
            bytes=sum(r.bytes for r in m.shards.values()),
            sites=m.sites,
            model=m.model,
            tokenizer_hash=m.tokenizer_hash,
            dataset_fingerprint=m.dataset["fingerprint"],
            archscope_version=m.archscope_version,
        )

    def reader(self, site: str, batch_size: int = 4096, **kwargs: Any) -> StoreReader:
        return StoreReader(self, site, batch_size, **kwargs)

    def __repr__(self) -> str:
        return (
            f"ActivationStore({str(self.path)!r}, sites={self.sites}, "
            f"tokens={self.n_tokens}, complete={self.complete})"
        )


class StoreReader:
    """Minibatches of one site, read lazily from the memory-mapped shards.

    Memory stays bounded by ``buffer_size`` rows plus one chunk of ``chunk_size`` rows,
    whatever the store's size. With ``shuffle``, chunks of every shard this rank reads are
    visited in a seeded random order and rows are mixed in a buffer, so a batch holds tokens
    of many shards and documents; the order depends only on ``seed``, ``epoch``, ``rank`` and
    ``world_size``. ``rank``/``world_size`` give each rank of a distributed job a disjoint set
    of shards (shard ``i`` of a seeded permutation goes to rank ``i % world_size``).
    Iterating yields (batch_size, d) tensors, or with ``with_index`` tuples
    ``(acts, doc, position, token_ids)``.
    """

    def __init__(
        self,
        store: ActivationStore | str | Path,
        site: str,
        batch_size: int = 4096,
        *,
        shuffle: bool = True,
        seed: int = 0,
        buffer_size: int = 65536,
        chunk_size: int = 8192,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        with_index: bool = False,
        allow_incomplete: bool = False,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.store = store if isinstance(store, ActivationStore) else ActivationStore(store)
        if not allow_incomplete:
            self.store.require_complete()
        self.site = self.store.site_name(site)
        if batch_size < 1 or chunk_size < 1:
            raise StoreError(
                f"batch_size and chunk_size must be >= 1, got {batch_size} and {chunk_size}"
            )
        if world_size < 1 or not 0 <= rank < world_size:
            raise StoreError(
                f"rank must be in 0..world_size-1, got rank={rank}, world_size={world_size}"
            )
        n_shards = len(self.store.manifest.shards)
        if world_size > n_shards:
            raise StoreError(
                f"world_size={world_size} ranks but the store has only {n_shards} "
                "shards, and ranks split by shard: extract with fewer "
                "docs_per_shard, or use fewer ranks"
            )
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.buffer_size = max(buffer_size, batch_size) if shuffle else 0
        self.chunk_size, self.rank, self.world_size = chunk_size, rank, world_size
        self.drop_last, self.with_index, self.dtype = drop_last, with_index, dtype
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Another shuffling order for each epoch (as with a DistributedSampler)."""
        self.epoch = epoch

    def _generator(self, salt: int) -> torch.Generator:
        import torch

        gen = torch.Generator()
        gen.manual_seed((self.seed * 1_000_003 + self.epoch * 7919 + salt) % (2**63))
        return gen

    def shards_of(self, rank: int) -> list[int]:
        """The shard indices ``rank`` reads this epoch (the same on every rank)."""
        import torch

        indices = sorted(self.store.manifest.shards)
        if self.shuffle:  # shard-to-rank assignment is shared by all ranks: one common seed
            order = torch.randperm(len(indices), generator=self._generator(0)).tolist()
            indices = [indices[i] for i in order]
        return sorted(indices[rank :: self.world_size])

    def tokens_of(self, rank: int) -> int:
        shards = self.store.manifest.shards
        return sum(shards[i].n_tokens for i in self.shards_of(rank))

    def steps(self) -> int:
        """Full batches every rank can take this epoch (ranks of a distributed job must step
        together, so the smallest rank decides)."""
        return min(self.tokens_of(r) for r in range(self.world_size)) // self.batch_size

    def __len__(self) -> int:
        n = self.tokens_of(self.rank)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _chunks(self) -> Iterator[tuple[int, int, int]]:
        import torch

        chunks = []
        for index in self.shards_of(self.rank):
            n = self.store.manifest.shards[index].n_tokens
            chunks += [
                (index, start, min(start + self.chunk_size, n))
                for start in range(0, n, self.chunk_size)
            ]
        if self.shuffle:
            order = torch.randperm(len(chunks), generator=self._generator(1 + self.rank))
            chunks = [chunks[i] for i in order.tolist()]
        yield from chunks

    def _read(self, index: int, start: int, end: int) -> list[torch.Tensor]:
        from safetensors import SafetensorError, safe_open

        fields = (self.site, *INDEX_FIELDS) if self.with_index else (self.site,)
        if index not in self._checked:  # sizes and header, once per shard and iteration
            self.store.check_shard(index)
            self._checked.add(index)
        path = self.store.path / self.store.manifest.shards[index].file
        # One mapping per chunk: only the rows asked for are read and copied.
        try:
            with safe_open(path, framework="pt") as handle:
                out = [handle.get_slice(f)[start:end] for f in fields]
        except (SafetensorError, FileNotFoundError) as exc:
            raise self.store._damaged(index, exc) from None
        if self.dtype is not None:
            out[0] = out[0].to(self.dtype)
        return out

    def _emit(self, parts: list[torch.Tensor]) -> Any:
        return tuple(parts) if self.with_index else parts[0]

    def __iter__(self) -> Iterator[Any]:
        import torch

        gen = self._generator(10_007 + self.rank)
        self._checked: set[int] = set()
        pending: list[list[torch.Tensor]] = []
        held = 0
        for index, start, end in self._chunks():
            pending.append(self._read(index, start, end))
            held += end - start
            if not self.shuffle:
                while held >= self.batch_size:
                    buf = [torch.cat(cols) for cols in zip(*pending, strict=True)]
                    yield self._emit([b[: self.batch_size] for b in buf])
                    pending, held = [[b[self.batch_size :] for b in buf]], held - self.batch_size
            elif held >= self.buffer_size:
                perm = torch.randperm(held, generator=gen)
                buf = [torch.cat(cols)[perm] for cols in zip(*pending, strict=True)]
                # Emit half the buffer, keep the rest to mix with the next chunks.
                n_out = max(self.batch_size, (held // 2) // self.batch_size * self.batch_size)
                for s in range(0, n_out, self.batch_size):
                    yield self._emit([b[s : s + self.batch_size] for b in buf])
                pending, held = [[b[n_out:] for b in buf]], held - n_out
        if held:
            perm = torch.randperm(held, generator=gen) if self.shuffle else torch.arange(held)
            buf = [torch.cat(cols)[perm] for cols in zip(*pending, strict=True)]
            for s in range(0, held, self.batch_size):
                if self.drop_last and s + self.batch_size > held:
                    break
                yield self._emit([b[s : s + self.batch_size] for b in buf])
