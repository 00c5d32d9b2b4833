"""Scale-out of the activation store: Ray extraction gives the single-process store, torchrun
training over rank-split readers gives single-process training on the same global batches,
and a model dispatched by accelerate over CPU and disk extracts and edits like the whole one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from archs import arch, words
from store_models import MODELS

import archscope
from archscope.apps.store import extract


@pytest.fixture
def one_thread() -> Iterator[None]:
    # Ray actors run single-threaded; the reference must sum in the same order to be bitwise.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_ray_extraction_gives_the_single_process_store(tmp_path, one_thread):
    import ray  # the archscope[ray] extra (installed by make setup)

    from archscope.apps.store.ray_engine import extract_ray

    texts = words(40, seed=1)
    sites = ["layer_0.residual", "layer_2.residual"]
    a = arch("gpt2")
    local = extract(
        a.backend,
        texts,
        sites,
        tmp_path / "local",
        tokenizer=a.tokenizer,
        docs_per_shard=4,
        batch_size=3,
        progress=False,
    )
    # Two cores here: fractional CPUs, or the actors wait for each other's CPU forever.
    ray.init(
        num_cpus=2, include_dashboard=False, object_store_memory=80 * 2**20, log_to_driver=False
    )
    try:
        distributed = extract_ray(
            f"{MODELS}:gpt2",
            texts,
            sites,
            tmp_path / "ray",
            docs_per_shard=4,
            batch_size=3,
            workers=2,
            cpus_per_worker=0.5,
            progress=False,
        )
    finally:
        ray.shutdown()
    m_local, m_ray = local.manifest.to_dict(), distributed.manifest.to_dict()
    for key in ("model", "tokenizer_hash", "sites", "dataset", "layout", "complete", "n_tokens"):
        assert m_local[key] == m_ray[key], key
    for index in local.manifest.shards:
        want, got = local.shard(index), distributed.shard(index)
        assert sorted(want) == sorted(got)
        for key in want:
            assert torch.equal(want[key], got[key]), f"shard {index}: {key} differs"
    assert distributed.verify() == []


# -- torchrun ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_torchrun_training_matches_single_process_training(tmp_path):
    from archscope.apps.store.train_distributed import TrainConfig, global_batches, train

    a = arch("gpt2")
    store = extract(
        a.backend,
        words(80, seed=6),
        ["layer_1.residual"],
        tmp_path / "s",
        tokenizer=a.tokenizer,
        docs_per_shard=8,
        batch_size=8,
        progress=False,
    )
    config = TrainConfig(
        site="layer_1.residual",
        batch_size=32,
        steps=12,
        d_sae=64,
        k=4,
        lr=3e-3,
        seed=3,
        sae="store_models:topk_sae",
    )
    out = tmp_path / "ddp"
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert torchrun is not None
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]
        ),
    }
    done = subprocess.run(
        [
            torchrun,
            "--nproc_per_node=2",
            "--standalone",
            "-m",
            "archscope.apps.store.train_distributed",
            str(store.path),
            "--out",
            str(out),
            "--config",
            json.dumps(config.to_dict()),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    from safetensors.torch import load_file

    ddp = load_file(out / "weights.safetensors")
    losses_ddp = json.loads((out / "train.json").read_text())["losses"]
    # Reference: one process, the same global batches (rank 0's rows then rank 1's), same seed.
    reference, losses = train(
        global_batches(store, config, world_size=2), store.dim(config.site), config
    )
    assert len(losses) == len(losses_ddp) == config.steps
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(ddp[name], tensor, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.tensor(losses_ddp), torch.tensor(losses), atol=1e-5, rtol=1e-4)
    assert losses[-1] < losses[0]  # it trained


# -- models larger than one device ----------------------------------------------------------------
def test_dispatched_model_extracts_and_edits_like_the_whole_model(tmp_path):
    import accelerate  # the archscope[accelerate] extra (installed by make setup)

    from archscope_transformer.testing import tiny_model

    whole = arch("gpt2")
    model = tiny_model("gpt2")
    # Embeddings and block 0 in memory, blocks 1-2 and the head offloaded to disk.
    device_map = {
        "transformer.wte": "cpu",
        "transformer.wpe": "cpu",
        "transformer.drop": "cpu",
        "transformer.h.0": "cpu",
        "transformer.h.1": "disk",
        "transformer.h.2": "disk",
        "transformer.ln_f": "disk",
        "lm_head": "disk",
    }
    dispatched = accelerate.dispatch_model(
        model, device_map=device_map, offload_dir=str(tmp_path / "offload")
    )
    assert any((tmp_path / "offload").iterdir())
    assert dispatched.transformer.h[2].mlp.c_fc.weight.device.type == "meta"
    backend = archscope.Backend.for_model(dispatched)
    texts = words(10, seed=9)
    sites = ["layer_0.residual", "layer_2.residual", "layer_2.mlp"]
    got = extract(
        backend,
        texts,
        sites,
        tmp_path / "d",
        tokenizer=whole.tokenizer,
        docs_per_shard=4,
        batch_size=3,
        progress=False,
    )
    want = extract(
        whole.backend,
        texts,
        sites,
        tmp_path / "w",
        tokenizer=whole.tokenizer,
        docs_per_shard=4,
        batch_size=3,
        progress=False,
    )
    # The same weights, so the same identity: a store of one resumes with the other.
    assert got.manifest.model["weights_hash"] == want.manifest.model["weights_hash"]
    for site in sites:
        torch.testing.assert_close(got.read(site), want.read(site), atol=1e-5, rtol=1e-4)
    batch = {"input_ids": torch.tensor([whole.tokenizer(texts[0])["input_ids"]])}
    edit = archscope.Edit.add("layer_1.residual", torch.linspace(-1, 1, 32), positions="last")
    edited_d = backend.run(batch, capture=["layer_2.residual"], edits=[edit])
    edited_w = whole.backend.run(batch, capture=["layer_2.residual"], edits=[edit])
    plain = whole.backend.run(batch, capture=["layer_2.residual"])
    torch.testing.assert_close(
        edited_d.activations["layer_2.residual"],
        edited_w.activations["layer_2.residual"],
        atol=1e-5,
        rtol=1e-4,
    )
    torch.testing.assert_close(edited_d.logits, edited_w.logits, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(
        plain.activations["layer_2.residual"], edited_w.activations["layer_2.residual"]
    )
    # No hook stays behind on the dispatched model after runs with edits.
    assert torch.allclose(
        backend.run(batch, capture=["layer_2.residual"]).activations["layer_2.residual"],
        plain.activations["layer_2.residual"],
        atol=1e-5,
        rtol=1e-4,
    )
