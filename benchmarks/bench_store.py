"""Throughput of the activation store against in-memory work on the same machine, same run.

1. Extraction: ``archscope.apps.store.extract`` (forward, gathering real tokens, writing shards
   with checksums and manifest updates) against a plain ``model(**batch)`` under
   ``torch.no_grad()`` over the same padded batches, and against `iter_collect` alone (the
   same forward with nothing written), in real tokens/s. Target: >= 0.9x the plain forward.
2. Reading: ``StoreReader`` (shuffled, memory-mapped) against shuffled minibatches of an
   in-memory tensor, alone and feeding TopK-SAE training steps. Target (training): >= 0.9x.
3. Ray: ``--engine ray`` with 2 single-thread actors against 1, start-up (ray.init, actors
   loading the model) stated separately. Target: >= 1.5x (needs 2 idle cores).

Rounds alternate the cases so that a shared machine's load drifting hits both alike; the
reported ratio is the median of the paired ratios.

    .venv/bin/python benchmarks/bench_store.py [--repeats 3] [--parts extraction,reading,ray]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).parent))
from machine import describe

import archscope
from archscope.apps.store import StoreReader, extract
from archscope.data import Dataset, padding_for

N_LAYERS, D_MODEL = 6, 256
SITES = ["layer_2.residual", "layer_5.residual"]
MODEL_FILE = Path(__file__).resolve()


def build() -> object:
    """The benchmark model (a model spec for Ray actors: ``bench_store.py:build``)."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=N_LAYERS, n_embd=D_MODEL, n_head=8)
    return transformers.GPT2LMHeadModel(config).eval()


def documents(n: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(64, 129, (n,), generator=gen)
    return [torch.randint(0, 50257, (int(k),), generator=gen).tolist() for k in lengths]


def bench_extraction(repeats: int, tmp: Path) -> dict[str, object]:
    model = build()
    backend = archscope.Backend.for_model(model)
    rows = documents(192)
    n_tokens = sum(map(len, rows))
    data = Dataset.from_ids(rows)
    batches = [b for _, b in data.batches(16, padding_for(backend))]

    def plain() -> None:
        with torch.no_grad():
            for batch in batches:
                model(**batch)

    def collect_only() -> None:
        for _ in archscope.iter_collect(
            backend, data, SITES, pool=None, batch_size=16, progress=False
        ):
            pass

    def store() -> None:
        shutil.rmtree(tmp / "x", ignore_errors=True)
        extract(backend, data, SITES, tmp / "x", docs_per_shard=32, batch_size=16, progress=False)

    def timed(fn: object) -> float:
        start = time.perf_counter()
        fn()  # type: ignore[operator]
        return time.perf_counter() - start

    plain(), store()  # warm-up
    times: dict[str, list[float]] = {"plain": [], "collect": [], "store": []}
    for _ in range(repeats):
        for name, fn in (("plain", plain), ("collect", collect_only), ("store", store)):
            times[name].append(timed(fn))
    ratio_plain = statistics.median(
        p / s for p, s in zip(times["plain"], times["store"], strict=True)
    )
    ratio_collect = statistics.median(
        c / s for c, s in zip(times["collect"], times["store"], strict=True)
    )
    size = sum(f.stat().st_size for f in (tmp / "x").iterdir())
    return {
        "n_tokens": n_tokens,
        "bytes": size,
        **{f"{k}_tok_s": n_tokens / statistics.median(v) for k, v in times.items()},
        "ratio_vs_plain": ratio_plain,
        "ratio_vs_collect": ratio_collect,
    }


def bench_reading(repeats: int, tmp: Path) -> dict[str, object]:
    from archscope.apps.store.extract import write_shard
    from archscope.apps.store.format import Manifest

    d, per_shard, n_shards = 256, 8192, 8  # 64 MiB of float32 activations
    folder = tmp / "read"
    folder.mkdir()
    manifest = Manifest(
        model={},
        tokenizer_hash=None,
        sites={"layer_0.residual": {"shape": [d], "dtype": "float32"}},
        dataset={"fingerprint": "synthetic", "n_docs": n_shards, "n_tokens": n_shards * per_shard},
        layout={"docs_per_shard": 1, "batch_size": 1, "n_shards": n_shards},
    )
    gen = torch.Generator().manual_seed(0)
    parts = []
    for i in range(n_shards):
        x = torch.randn(per_shard, d, generator=gen)
        parts.append(x)
        idx = torch.full((per_shard,), i)
        manifest.shards[i] = write_shard(
            folder,
            i,
            (i, i + 1),
            {
                "layer_0.residual": x,
                "doc": idx,
                "position": torch.arange(per_shard),
                "token_ids": idx.clone(),
            },
        )
    manifest.complete = True
    manifest.save(folder)
    memory = torch.cat(parts)
    batch = 4096

    def from_memory(seed: int) -> object:
        perm = torch.randperm(len(memory), generator=torch.Generator().manual_seed(seed))
        for s in range(0, len(memory), batch):
            yield memory[perm[s : s + batch]]

    def from_store(seed: int) -> object:
        return StoreReader(folder, "layer_0.residual", batch, seed=seed, buffer_size=65536)

    torch.manual_seed(0)
    sae_in, d_sae, k = d, 512, 32
    w_enc = torch.nn.Parameter(torch.randn(sae_in, d_sae) / sae_in**0.5)
    w_dec = torch.nn.Parameter(w_enc.detach().t().clone())
    opt = torch.optim.Adam([w_enc, w_dec], lr=1e-4)

    def train(source: object) -> None:
        for x in source:  # type: ignore[attr-defined]
            pre = x @ w_enc
            values, index = pre.topk(k, dim=-1)
            z = torch.zeros_like(pre).scatter(-1, index, values.relu())
            loss = (z @ w_dec - x).pow(2).sum(-1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()

    def drain(source: object) -> None:
        for _ in source:  # type: ignore[attr-defined]
            pass

    cases = {
        "read memory": lambda s: drain(from_memory(s)),
        "read store": lambda s: drain(from_store(s)),
        "train memory": lambda s: train(from_memory(s)),
        "train store": lambda s: train(from_store(s)),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for name in ("read memory", "read store"):  # warm-up (page cache, allocator)
        cases[name](0)
    for r in range(repeats):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn(r + 1)
            times[name].append(time.perf_counter() - start)
    n = len(memory)
    return {
        "rows": n,
        "bytes": sum(rec.bytes for rec in manifest.shards.values()),
        **{f"{name} rows/s": n / statistics.median(v) for name, v in times.items()},
        "read ratio": statistics.median(
            m / s for m, s in zip(times["read memory"], times["read store"], strict=True)
        ),
        "train ratio": statistics.median(
            m / s for m, s in zip(times["train memory"], times["train store"], strict=True)
        ),
    }


def bench_ray(tmp: Path, n_docs: int) -> dict[str, object]:
    import ray

    from archscope.apps.store.ray_engine import extract_ray

    rows = documents(n_docs, seed=1)
    spec = f"{MODEL_FILE}:build"
    start = time.perf_counter()
    ray.init(
        num_cpus=2, include_dashboard=False, object_store_memory=200 * 2**20, log_to_driver=False
    )
    out: dict[str, object] = {
        "n_tokens": sum(map(len, rows)),
        "n_docs": n_docs,
        "ray_init_s": time.perf_counter() - start,
    }
    try:
        for workers in (1, 2):
            timings: dict[str, float] = {}
            extract_ray(
                spec,
                rows,
                SITES,
                tmp / f"ray{workers}",
                docs_per_shard=32,
                batch_size=16,
                workers=workers,
                cpus_per_worker=1.0,
                threads_per_worker=1,
                progress=False,
                timings=timings,
            )
            out[f"{workers}w_startup_s"] = timings["startup_s"]
            out[f"{workers}w_work_s"] = timings["work_s"]
            out[f"{workers}w_total_s"] = timings["startup_s"] + timings["work_s"]
    finally:
        ray.shutdown()
    out["speedup_total"] = out["1w_total_s"] / out["2w_total_s"]  # type: ignore[operator]
    out["speedup_after_startup"] = out["1w_work_s"] / out["2w_work_s"]  # type: ignore[operator]
    return out


def extraction_lines(ext: dict[str, object]) -> list[str]:
    return [
        f"## Extraction ({N_LAYERS}-layer GPT-2, d {D_MODEL}, sites {', '.join(SITES)}, "
        f"{ext['n_tokens']:,} real tokens in 192 documents of 64-128 tokens, batch 16, "
        f"{float(ext['bytes']) / 2**20:.1f} MiB written)",
        "",  # type: ignore[arg-type]
        "| case | tokens/s |",
        "| --- | --- |",
        f"| plain `model(**batch)` (no_grad) | {ext['plain_tok_s']:,.0f} |",
        f"| `iter_collect`, nothing written | {ext['collect_tok_s']:,.0f} |",
        f"| `store.extract` (shards, checksums, manifest) | {ext['store_tok_s']:,.0f} |",
        "",
        f"Extraction including writing: **{ext['ratio_vs_plain']:.2f}x** the plain forward "
        f"(target >= 0.9x; it stops after the deepest site, the plain forward runs the "
        f"unembedding too); {ext['ratio_vs_collect']:.2f}x collecting without writing.",
        "",
    ]


def reading_lines(read: dict[str, object]) -> list[str]:
    return [
        f"## Reading ({read['rows']:,} rows of d 256, "
        f"{float(read['bytes']) / 2**20:.0f} MiB in 8 shards; batches of 4096, shuffle "  # type: ignore[arg-type]
        "buffer 65,536 rows)",
        "",
        "| case | rows/s |",
        "| --- | --- |",
        *[
            f"| {k.removesuffix(' rows/s')} | {v:,.0f} |"
            for k, v in read.items()
            if k.endswith("rows/s")
        ],
        "",
        f"Shuffled reading from the store: {read['read ratio']:.2f}x the in-memory tensor; "
        f"TopK-SAE training (d_sae 512, k 32) from the store: **{read['train ratio']:.2f}x** "
        "the throughput from memory (target >= 0.9x).",
        "",
    ]


def ray_lines(r: dict[str, object]) -> list[str]:
    return [
        f"## Ray ({r['n_tokens']:,} tokens in {r['n_docs']} documents, shards of 32 "
        "documents; single-thread actors with 1 CPU each)",
        "",
        "| actors | total s | start-up s (actors loading the model) | extraction s |",
        "| --- | --- | --- | --- |",
        *[
            f"| {w} | {r[f'{w}w_total_s']:.1f} | {r[f'{w}w_startup_s']:.1f} | "
            f"{r[f'{w}w_work_s']:.1f} |"
            for w in (1, 2)
        ],
        "",
        f"`ray.init` (local, once): {r['ray_init_s']:.1f} s. Speed-up of 2 actors over 1: "
        f"**{r['speedup_after_startup']:.2f}x** after start-up, "
        f"{r['speedup_total']:.2f}x including it (target >= 1.5x).",
        "",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--parts",
        default="extraction,reading,ray",
        help="comma-separated subset of extraction, reading, ray",
    )
    parser.add_argument("--ray-docs", type=int, default=384)
    parser.add_argument(
        "--append", action="store_true", help="add the sections to --out instead of replacing it"
    )
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "store.md"))
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    load = os.getloadavg()[0]
    lines: list[str] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        if "extraction" in parts:
            ext = bench_extraction(args.repeats, tmp)
            print(ext, flush=True)
            lines += extraction_lines(ext)
        if "reading" in parts:
            read = bench_reading(args.repeats, tmp)
            print(read, flush=True)
            lines += reading_lines(read)
        if "ray" in parts:
            result = bench_ray(tmp, args.ray_docs)
            print(result, flush=True)
            lines += ray_lines(result)
    lines.insert(0, f"Load average (1 min) when these sections started: {load:.1f}.\n")
    out = Path(args.out)
    if args.append and out.is_file():
        text = out.read_text().rstrip() + "\n\n" + "\n".join(lines)
    else:
        text = "\n".join(["# Activation store throughput", "", describe(), "", *lines])
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
