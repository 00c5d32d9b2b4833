"""The activation store: stored vectors against unbatched runs and HF hidden states on every
architecture, resume after SIGKILL, refusal of a mismatched store, the shuffled reader's
determinism and rank split, bounded reading memory, and the CLI."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from archs import arch, words
from click.testing import CliRunner
from store_models import MODELS

import archscope
from archscope.apps.store import ActivationStore, StoreError, StoreReader, extract
from archscope.apps.store.format import MANIFEST


def _cli() -> object:
    import click

    from archscope.apps.store.cli import add_commands

    group = click.Group("archscope")
    add_commands(group)
    return group


def _shards_equal(a: ActivationStore, b: ActivationStore) -> None:
    assert sorted(a.manifest.shards) == sorted(b.manifest.shards)
    for index in a.manifest.shards:
        ta, tb = a.shard(index), b.shard(index)
        assert sorted(ta) == sorted(tb)
        for key in ta:
            assert torch.equal(ta[key], tb[key]), f"shard {index}: {key} differs"


# -- what is stored ------------------------------------------------------------------------------
def test_store_holds_every_real_token_as_an_unbatched_run_gives_it(any_arch, tmp_path):
    texts = words(13, seed=3)
    sites = [any_arch.backend.layer_names()[0], any_arch.backend.layer_names()[-1]]
    store = extract(
        any_arch.backend,
        texts,
        sites,
        tmp_path / "s",
        tokenizer=any_arch.tokenizer,
        docs_per_shard=4,
        batch_size=3,
        progress=False,
    )
    ids = [any_arch.tokenizer(t)["input_ids"] for t in texts]
    assert store.complete and store.n_tokens == sum(map(len, ids))  # no padding stored
    assert len(store.manifest.shards) == 4 and store.verify() == []
    stored = {site: store.read(site, with_index=True) for site in sites}
    for d, row in enumerate(ids):
        # Reference: the document alone, no padding, no batch neighbours.
        alone = any_arch.backend.run({"input_ids": torch.tensor([row])}, capture=sites)
        for site in sites:
            acts, doc, position, token_ids = stored[site]
            assert acts.shape == (store.n_tokens, any_arch.backend.site_info(site).dim)
            sel = doc == d
            assert position[sel].tolist() == list(range(len(row)))
            assert token_ids[sel].tolist() == row
            torch.testing.assert_close(acts[sel], alone.activations[site][0], atol=2e-5, rtol=1e-4)


def test_residuals_match_hf_hidden_states(tmp_path):
    a = arch("gpt2")
    texts = words(9, seed=5)
    store = extract(
        a.backend,
        texts,
        ["layer_1.residual"],
        tmp_path / "s",
        tokenizer=a.tokenizer,
        docs_per_shard=4,
        batch_size=3,
        progress=False,
    )
    acts, doc, _, _ = store.read("layer_1.residual", with_index=True)
    for d, text in enumerate(texts):
        ids = torch.tensor([a.tokenizer(text)["input_ids"]])
        with torch.no_grad():
            hidden = a.model(input_ids=ids, output_hidden_states=True).hidden_states[2][0]
        torch.testing.assert_close(acts[doc == d], hidden, atol=2e-5, rtol=1e-4)


def test_manifest_records_identity_and_shards(tmp_path):
    a = arch("gpt2")
    store = extract(
        a.backend,
        words(10),
        ["layer_0.residual"],
        tmp_path / "s",
        tokenizer=a.tokenizer,
        docs_per_shard=4,
        dtype="float16",
        progress=False,
    )
    m = json.loads((tmp_path / "s" / MANIFEST).read_text())
    assert m["complete"] is True and m["archscope_version"] == archscope.__version__
    assert m["model"]["class"].endswith("GPT2LMHeadModel") and len(m["model"]["weights_hash"])
    assert m["tokenizer_hash"] and m["dataset"]["n_docs"] == 10
    assert m["sites"] == {"layer_0.residual": {"shape": [32], "dtype": "float16"}}
    assert [s["docs"] for s in m["shards"]] == [[0, 4], [4, 8], [8, 10]]
    assert sum(s["n_tokens"] for s in m["shards"]) == m["n_tokens"] == store.n_tokens
    assert store.read("layer_0.residual").dtype == torch.float16
    # A corrupted shard is caught by its checksum.
    path = tmp_path / "s" / m["shards"][1]["file"]
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    assert store.verify() == [f"{path.name}: checksum differs from the manifest"]


def test_state_sites_are_refused():
    a = arch("lstm")
    state = next(n for n, i in a.backend.sites().items() if i.kind == "state")
    with pytest.raises(archscope.SiteError, match="one vector per real token"):
        extract(
            a.backend,
            words(2),
            [state],
            "/nonexistent/never-created",
            tokenizer=a.tokenizer,
            progress=False,
        )


# -- resume --------------------------------------------------------------------------------------
def _extract_cmd(data: Path, out: Path) -> list[str]:
    code = (
        "from archscope.apps.cli import cli; from archscope.apps.store.cli import add_commands; "
        "add_commands(cli); cli()"
    )
    return [
        sys.executable,
        "-c",
        code,
        "extract",
        f"{MODELS}:gpt2",
        str(data),
        "--sites",
        "layer_0.residual,layer_2.residual",
        "--out",
        str(out),
        "--docs-per-shard",
        "3",
        "--batch-size",
        "3",
        "--no-progress",
    ]


@pytest.mark.slow
def test_resume_after_sigkill_gives_the_uninterrupted_store(tmp_path):
    texts = words(120, seed=11)
    data = tmp_path / "data.txt"
    data.write_text("\n".join(texts) + "\n")
    a = arch("gpt2")
    reference = extract(
        a.backend,
        texts,
        ["layer_0.residual", "layer_2.residual"],
        tmp_path / "ref",
        tokenizer=a.tokenizer,
        docs_per_shard=3,
        batch_size=3,
        progress=False,
    )
    n_shards = reference.manifest.n_shards
    seed = random.SystemRandom().randrange(2**32)
    rng = random.Random(seed)
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        _extract_cmd(data, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    target = rng.randrange(1, n_shards // 2)
    deadline = time.monotonic() + 120
    written = 0
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / MANIFEST).is_file():
            written = len(json.loads((out / MANIFEST).read_text())["shards"])
            if written >= target:
                break
        time.sleep(0.002)
    time.sleep(rng.uniform(0, 0.03))  # land anywhere inside a shard or a write
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed = json.loads((out / MANIFEST).read_text())
    assert written >= 1 and not killed["complete"], (
        f"seed {seed}: the run was not interrupted ({len(killed['shards'])} shards)"
    )
    result = CliRunner().invoke(_cli(), _extract_cmd(data, out)[3:])
    assert result.exit_code == 0, result.output
    resumed = ActivationStore(out)
    assert resumed.complete and resumed.manifest.n_shards == n_shards
    _shards_equal(resumed, reference)
    assert [r.sha256 for r in resumed.manifest.shards.values()] == [
        r.sha256 for r in reference.manifest.shards.values()
    ]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        p.name for p in (tmp_path / "ref").iterdir()
    ), "stray files remain"


def test_a_store_of_another_extraction_is_refused(tmp_path):
    from archscope_transformer.testing import tiny_model, tiny_tokenizer

    a = arch("gpt2")
    texts = words(12, seed=2)
    out = tmp_path / "s"
    extract(
        a.backend,
        texts,
        ["layer_1.residual"],
        out,
        tokenizer=a.tokenizer,
        docs_per_shard=5,
        progress=False,
    )
    other_model = archscope.Backend.for_model(tiny_model("gpt2", seed=1))
    other_tok = tiny_tokenizer([f"w{i}" for i in reversed(range(4, 100))])
    cases = [
        (other_model, texts, ["layer_1.residual"], a.tokenizer, r"model .*weights_hash"),
        (a.backend, texts, ["layer_1.residual"], other_tok, r"tokenizer differs"),
        (
            a.backend,
            texts,
            ["layer_1.residual", "layer_2.residual"],
            a.tokenizer,
            r"site list .*layer_2.residual",
        ),
        (a.backend, texts[:-1], ["layer_1.residual"], a.tokenizer, r"dataset .*fingerprint"),
    ]
    for backend, data, sites, tok, what in cases:
        with pytest.raises(StoreError, match=what) as info:
            extract(backend, data, sites, out, tokenizer=tok, docs_per_shard=5, progress=False)
        assert isinstance(info.value, archscope.ArchscopeError)
        assert "cannot be resumed" in str(info.value)
    # Overwriting is explicit; a foreign folder is never written into.
    extract(
        a.backend,
        texts[:-1],
        ["layer_1.residual"],
        out,
        tokenizer=a.tokenizer,
        docs_per_shard=5,
        overwrite=True,
        progress=False,
    )
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(StoreError, match="not empty"):
        extract(
            a.backend,
            texts,
            ["layer_1.residual"],
            tmp_path / "mine",
            tokenizer=a.tokenizer,
            progress=False,
        )


# -- reading -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_store(tmp_path_factory: pytest.TempPathFactory) -> ActivationStore:
    a = arch("gpt2")
    return extract(
        a.backend,
        words(60, seed=4),
        ["layer_2.residual"],
        tmp_path_factory.mktemp("store") / "s",
        tokenizer=a.tokenizer,
        docs_per_shard=5,
        batch_size=8,
        progress=False,
    )


def _batches(store: ActivationStore, **kw: object) -> list[tuple[torch.Tensor, ...]]:
    return list(
        StoreReader(
            store, "layer_2.residual", 16, with_index=True, buffer_size=64, chunk_size=12, **kw
        )
    )  # type: ignore[arg-type]


def test_reader_is_deterministic_shuffled_and_complete(small_store):
    acts, doc, position, _ = small_store.read("layer_2.residual", with_index=True)
    first, again, other = (_batches(small_store, seed=s) for s in (0, 0, 1))
    assert all(
        torch.equal(x, y)
        for b, c in zip(first, again, strict=True)
        for x, y in zip(b, c, strict=True)
    )
    order = torch.cat([b[1] * 1000 + b[2] for b in first])
    assert not torch.equal(order, torch.cat([b[1] * 1000 + b[2] for b in other]))
    assert not torch.equal(order, doc * 1000 + position)  # shuffled, not document order
    # Every stored token exactly once, with its own vector.
    assert sorted(order.tolist()) == sorted((doc * 1000 + position).tolist())
    lookup = {int(k): i for i, k in enumerate(doc * 1000 + position)}
    for x, d, p, _ in first:
        rows = torch.tensor([lookup[int(k)] for k in d * 1000 + p])
        assert torch.equal(x, acts[rows])
    # Mixed across shards: the first batch holds tokens of several shards (5 docs each).
    assert len(set((first[0][1] // 5).tolist())) >= 3
    assert all(len(b[0]) == 16 for b in first[:-1])
    plain = _batches(small_store, shuffle=False)
    assert torch.equal(torch.cat([b[0] for b in plain]), acts)


def test_reader_ranks_are_disjoint_and_cover_the_store(small_store):
    keys = []
    for rank in range(3):
        reader = StoreReader(
            small_store, "layer_2.residual", 8, rank=rank, world_size=3, with_index=True, seed=7
        )
        got = [b[1] * 1000 + b[2] for b in reader]
        assert len(got) == len(reader)
        assert sum(len(g) for g in got) == reader.tokens_of(rank)
        keys.append(set(torch.cat(got).tolist()))
        assert reader.steps() <= len(reader)
    assert not (keys[0] & keys[1]) and not (keys[0] & keys[2]) and not (keys[1] & keys[2])
    assert len(keys[0] | keys[1] | keys[2]) == small_store.n_tokens
    with pytest.raises(StoreError, match="rank must be"):
        StoreReader(small_store, "layer_2.residual", rank=3, world_size=3)
    with pytest.raises(archscope.SiteError, match="layer_2.residual"):
        StoreReader(small_store, "layer_0.residual")


BOUNDED_READ = textwrap.dedent("""
    import sys, torch
    import safetensors.torch  # imported before the baseline: its code is not store data
    from archscope.apps.store import StoreReader

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    reader = StoreReader(sys.argv[1], "layer_0.residual", 1024, seed=0, buffer_size=8192,
                         chunk_size=2048)
    torch.zeros(1) + 1  # warm torch's allocator before the baseline
    # Anonymous memory (what the reader allocates), sampled after every batch: the shards are
    # memory-mapped, and their file pages count towards VmRSS/VmHWM as page cache that the
    # kernel keeps or drops depending on the load of the machine, not on the reader.
    base = status("RssAnon")
    n, col0, peak = 0, 0.0, 0
    for batch in reader:
        n += batch.shape[0]
        col0 += float(batch[:, 0].double().sum())
        peak = max(peak, status("RssAnon") - base)
    print(n, col0, peak)
""")


@pytest.mark.slow
def test_reader_memory_stays_bounded_for_a_store_larger_than_it(tmp_path):
    from archscope.apps.store.extract import write_shard
    from archscope.apps.store.format import Manifest

    d, rows_per_shard, n_shards = 256, 4096, 48  # 48 x 4 MiB = 192 MiB of activations
    folder = tmp_path / "big"
    folder.mkdir()
    manifest = Manifest(
        model={},
        tokenizer_hash=None,
        sites={"layer_0.residual": {"shape": [d], "dtype": "float32"}},
        dataset={
            "fingerprint": "synthetic",
            "n_docs": n_shards,
            "n_tokens": n_shards * rows_per_shard,
        },
        layout={"docs_per_shard": 1, "batch_size": 1, "n_shards": n_shards},
    )
    gen = torch.Generator().manual_seed(0)
    for i in range(n_shards):
        x = torch.randn(rows_per_shard, d, generator=gen)
        x[:, 0] = torch.arange(i * rows_per_shard, (i + 1) * rows_per_shard)  # row id
        idx = torch.full((rows_per_shard,), i)
        manifest.shards[i] = write_shard(
            folder,
            i,
            (i, i + 1),
            {
                "layer_0.residual": x,
                "doc": idx,
                "position": torch.arange(rows_per_shard),
                "token_ids": idx.clone(),
            },
        )
    manifest.complete = True
    manifest.save(folder)
    size = sum(r.bytes for r in manifest.shards.values())
    # Bounded: well under the store's size (the reader's buffer is 8 MiB of rows; torch's and
    # glibc's allocators keep freed blocks, measured 32-72 MiB on a 192 MiB store)
    limit = size // 2
    out = subprocess.run(
        [sys.executable, "-c", BOUNDED_READ, str(folder)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    n, col0, peak = int(out[0]), float(out[1]), int(out[2])
    total = n_shards * rows_per_shard
    assert n == total and col0 == total * (total - 1) / 2  # every row read once
    assert peak < limit, f"reading {size / 2**20:.0f} MiB grew RSS by {peak / 2**20:.0f} MiB"


# -- CLI -----------------------------------------------------------------------------------------
def test_cli_extracts_jsonl_and_saved_hf_datasets_alike(tmp_path):
    import datasets  # the archscope[datasets] extra (installed by make setup)

    texts = words(14, seed=8)
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": texts})}).save_to_disk(
        str(tmp_path / "hf")
    )
    cli = _cli()
    runner = CliRunner()
    for source, out in ((jsonl, "a"), (tmp_path / "hf", "b")):
        result = runner.invoke(
            cli,
            [
                "extract",
                f"{MODELS}:gpt2",
                str(source),
                "--sites",
                "layer_1.residual",
                "--out",
                str(tmp_path / out),
                "--docs-per-shard",
                "4",
            ],
        )
        assert result.exit_code == 0, result.output
        assert "stored" in result.output
    _shards_equal(ActivationStore(tmp_path / "a"), ActivationStore(tmp_path / "b"))
    info = runner.invoke(cli, ["store", "info", str(tmp_path / "a"), "--json", "--verify"])
    assert info.exit_code == 0, info.output
    parsed = json.loads(info.output)
    assert parsed["complete"] and parsed["verify"] == [] and parsed["n_docs"] == 14
    text = runner.invoke(cli, ["store", "info", str(tmp_path / "a")]).output
    assert "| layer_1.residual | 32 | float32 |" in text and "complete" in text
    bad = runner.invoke(
        cli,
        [
            "extract",
            f"{MODELS}:gpt2",
            str(jsonl),
            "--sites",
            "layer_9.bogus",
            "--out",
            str(tmp_path / "c"),
        ],
    )
    assert bad.exit_code != 0 and "layer_9" in bad.output
    missing = runner.invoke(cli, ["store", "info", str(tmp_path)])
    assert missing.exit_code != 0 and "not an activation store" in missing.output
