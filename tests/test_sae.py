"""Sparse autoencoders: planted-atom recovery for every variant, AuxK reviving dead features,
SAELens layout round trips, metrics against hand computations, the spliced next-token loss on
a transformer, a Mamba, a hybrid and an LSTM, the 0.2 calls and the registered method."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from archs import Arch, arch, words

import archscope
from archscope.backends import Edit
from archscope.errors import ArtifactError, ParameterError
from archscope.methods.sae import (
    SAE,
    BatchTopKSAE,
    DenseSAE,
    Rank1FactoredSAE,
    SAEConfig,
    TopKSAE,
    build_sae,
    export_saelens,
    fit_sae,
    import_saelens,
    reconstruction_metrics,
    spliced_loss,
)

VARIANTS = ("dense", "rank1", "topk", "batchtopk")
#: per-variant settings under which each variant is expected to recover the planted atoms
SETTINGS = {
    "dense": {"sparsity": 0.3},
    "rank1": {"sparsity": 0.3},
    "topk": {"k": 3},
    "batchtopk": {"k": 3},
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny matrices gain nothing from threads, and lose much on a busy shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def planted() -> tuple[torch.Tensor, torch.Tensor]:
    """64 unit atoms in d=32; each of 8192 samples a positive combination of ~3 of them."""
    gen = torch.Generator().manual_seed(0)
    atoms = torch.randn(64, 32, generator=gen)
    atoms = atoms / atoms.norm(dim=1, keepdim=True)
    active = torch.rand(8192, 64, generator=gen) < 3 / 64
    coef = active * (0.5 + torch.rand(8192, 64, generator=gen))
    return atoms, coef @ atoms


def _recovered(sae: SAE, atoms: torch.Tensor) -> float:
    """Share of atoms whose best-matching decoder row has cosine >= 0.9."""
    rows = sae.W_dec.detach()
    rows = rows / rows.norm(dim=1, keepdim=True)
    return float(((atoms @ rows.t()).max(1).values >= 0.9).float().mean())


def _config(sae_type: str, **kw: object) -> SAEConfig:
    base: dict[str, object] = dict(
        input_dim=32, n_features=128, sae_type=sae_type, learning_rate=3e-3, batch_size=256
    )
    base.update(SETTINGS[sae_type])
    base.update(kw)
    return SAEConfig(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def trained(planted: tuple[torch.Tensor, torch.Tensor]) -> dict[str, SAE]:
    _, x = planted
    return {t: fit_sae(x, _config(t), epochs=10) for t in VARIANTS}


# -- ground truth ---------------------------------------------------------------------------
@pytest.mark.parametrize("sae_type", VARIANTS)
def test_every_variant_recovers_the_planted_atoms(
    sae_type: str, trained: dict[str, SAE], planted: tuple[torch.Tensor, torch.Tensor]
) -> None:
    atoms, _ = planted
    assert _recovered(trained[sae_type], atoms) >= 0.9


def test_training_streams_from_chunks(planted: tuple[torch.Tensor, torch.Tensor]) -> None:
    """A list of chunks smaller than a batch, through a small shuffle buffer, trains as well."""
    atoms, x = planted
    chunks = list(x.split(100))
    sae = fit_sae(chunks, _config("topk", buffer_size=2048), epochs=10)
    assert _recovered(sae, atoms) >= 0.9
    one_shot = fit_sae(iter(chunks), _config("topk", buffer_size=2048), epochs=1)
    assert one_shot.last_metrics["l0"] <= 3.0


def test_several_epochs_over_a_one_shot_iterator_are_refused(
    planted: tuple[torch.Tensor, torch.Tensor],
) -> None:
    _, x = planted
    with pytest.raises(ParameterError, match="one-shot iterator"):
        fit_sae(iter(x.split(100)), _config("topk"), epochs=2)


def test_auxk_revives_dead_features(planted: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Half of 64 features start dead (never in the top k); only the AuxK loss gives them a
    gradient, so only with it do they learn the atoms the live half cannot explain."""
    _, x = planted
    dead = {}
    for coefficient in (1 / 32, 0.0):
        cfg = _config(
            "topk", n_features=64, learning_rate=1e-2, aux_coefficient=coefficient, dead_after=2048
        )
        sae = build_sae(cfg)
        with torch.no_grad():
            sae.b_enc[32:] = -1.0
            sae.input_scale.fill_(0.5)
        fit_sae(x, cfg, epochs=10, sae=sae)
        dead[coefficient] = sae.last_metrics["dead_fraction"]
    assert dead[0.0] == 0.5
    assert dead[1 / 32] < 0.3


def test_topk_keeps_k_features_per_input_and_batchtopk_k_on_average(
    trained: dict[str, SAE], planted: tuple[torch.Tensor, torch.Tensor]
) -> None:
    _, x = planted
    z = trained["topk"].encode(x[:512])
    assert int((z != 0).sum(1).max()) <= 3
    assert trained["batchtopk"].last_metrics["l0"] == pytest.approx(3.0, abs=0.05)
    assert torch.allclose(trained["topk"].W_dec.norm(dim=1), torch.ones(128), atol=1e-5)


# -- metrics --------------------------------------------------------------------------------
def test_reconstruction_metrics_match_a_hand_computation(
    trained: dict[str, SAE], planted: tuple[torch.Tensor, torch.Tensor]
) -> None:
    _, x = planted
    sae = trained["dense"]
    got = reconstruction_metrics(sae, list(x[:1000].split(300)), batch_size=128)
    with torch.no_grad():
        xs = x[:1000] * sae.input_scale
        z = torch.relu((xs - sae.b_dec) @ sae.W_enc + sae.b_enc)
        recon = (z @ sae.W_dec + sae.b_dec) / sae.input_scale
    err = (recon - x[:1000]).double()
    assert got.mse == pytest.approx(float(err.pow(2).mean()), rel=1e-4)
    total = (x[:1000] - x[:1000].mean(0)).double().pow(2).sum()
    assert got.explained_variance == pytest.approx(1 - float(err.pow(2).sum() / total), rel=1e-4)
    assert got.l0 == pytest.approx(float((z > 0).sum(1).double().mean()), rel=1e-6)
    assert got.dead_fraction == pytest.approx(float((~(z > 0).any(0)).double().mean()))
    assert got.n_inputs == 1000


def _identity_sae(dim: int) -> DenseSAE:
    """relu(x) - relu(-x) = x exactly: 2*dim features, no biases in effect."""
    sae = DenseSAE(SAEConfig(dim, 2 * dim))
    eye = torch.eye(dim)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def _hand_loss(a: Arch, texts: list[str], edit: Edit | None) -> float:
    """Mean next-token cross-entropy, one unpadded text at a time."""
    total, count = 0.0, 0
    for text in texts:
        ids = torch.tensor([a.tokenizer(text)["input_ids"]])
        edits = (
            []
            if edit is None
            else [
                Edit.replace(
                    edit.site, torch.zeros(1, ids.shape[1], a.backend.site_info(edit.site).dim)
                )
            ]
        )
        logits = a.backend.run(
            {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
            capture=["logits"],
            edits=edits,
        ).logits
        total += float(F.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="sum"))
        count += ids.shape[1] - 1
    return total / count


def test_spliced_loss_identity_is_clean_and_zero_ablation_matches_hand(any_arch: Arch) -> None:
    backend = any_arch.backend
    site = backend.layer_names()[0]
    texts = words(6, seed=3)
    sae = _identity_sae(backend.site_info(site).dim)
    got = spliced_loss(sae, backend, texts, site, batch_size=4, tokenizer=any_arch.tokenizer)
    assert got.spliced == got.clean
    assert got.clean == pytest.approx(_hand_loss(any_arch, texts, None), abs=1e-5)
    assert got.zero_ablated == pytest.approx(
        _hand_loss(any_arch, texts, Edit.replace(site, 0.0)), abs=1e-5
    )
    assert got.n_tokens == sum(len(t.split()) - 1 for t in texts)


# -- saving and SAELens -------------------------------------------------------------------------
def _scaled_trained(sae_type: str, planted: tuple[torch.Tensor, torch.Tensor]) -> SAE:
    """A briefly trained SAE on inputs 10x larger, so its input scale is not 1."""
    _, x = planted
    sae = fit_sae(x[:2048] * 10, _config(sae_type), epochs=2)
    sae.site = "layer_1.residual"
    assert float(sae.input_scale) != 1.0
    return sae


@pytest.mark.parametrize("sae_type", VARIANTS)
def test_saelens_export_then_import_is_bit_exact(
    sae_type: str, tmp_path, planted: tuple[torch.Tensor, torch.Tensor]
) -> None:
    sae = _scaled_trained(sae_type, planted)
    export_saelens(sae, tmp_path / "a", model_name="tiny")
    back = import_saelens(tmp_path / "a")
    assert type(back) is type(sae)
    assert back.cfg == sae.cfg and back.site == sae.site
    mine, theirs = sae.state_tensors(), back.state_tensors()
    assert mine.keys() == theirs.keys()
    for name in mine:
        assert torch.equal(mine[name], theirs[name]), name
    export_saelens(back, tmp_path / "b", model_name="tiny")
    for file in ("cfg.json", "sae_weights.safetensors"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes()


@pytest.mark.parametrize("sae_type", VARIANTS)
def test_saelens_files_reconstruct_raw_activations_by_saelens_rules(
    sae_type: str, tmp_path, planted: tuple[torch.Tensor, torch.Tensor]
) -> None:
    """SAELens's forward (read from its docs), applied to the exported tensors on raw inputs,
    gives the archscope SAE's reconstruction."""
    from safetensors.torch import load_file

    sae = _scaled_trained(sae_type, planted)
    export_saelens(sae, tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    w = load_file(str(tmp_path / "sae_weights.safetensors"))
    assert {"W_enc", "b_enc", "W_dec", "b_dec"} <= set(w)
    assert w["W_enc"].shape == (32, 128) and w["W_dec"].shape == (128, 32)
    assert cfg["d_in"] == 32 and cfg["d_sae"] == 128 and cfg["normalize_activations"] == "none"
    x = planted[1][:256] * 10
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    if cfg["architecture"] == "standard":
        acts = pre.relu()
    elif cfg["architecture"] == "topk":
        top = pre.topk(cfg["k"], dim=-1)
        acts = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    else:
        assert cfg["architecture"] == "jumprelu"
        acts = pre * (pre > w["threshold"])
    expected = acts @ w["W_dec"] + w["b_dec"]
    with torch.no_grad():
        assert torch.allclose(sae.reconstruct(x), expected, atol=1e-4, rtol=1e-4)


def test_saelens_import_of_a_file_written_elsewhere(tmp_path) -> None:
    """A SAELens-style TopK SAE that does not subtract b_dec, on a TransformerLens hook."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(1)
    w = {
        "W_enc": torch.randn(8, 20, generator=gen),
        "b_enc": torch.randn(20, generator=gen),
        "W_dec": torch.randn(20, 8, generator=gen),
        "b_dec": torch.randn(8, generator=gen),
    }
    save_file(w, str(tmp_path / "sae_weights.safetensors"))
    (tmp_path / "cfg.json").write_text(
        json.dumps(
            {
                "architecture": "topk",
                "d_in": 8,
                "d_sae": 20,
                "k": 5,
                "dtype": "float32",
                "apply_b_dec_to_input": False,
                "normalize_activations": "none",
                "meta": {"hook_name": "blocks.3.hook_resid_post", "model_name": "gpt2"},
            }
        )
    )
    sae = import_saelens(tmp_path)
    assert isinstance(sae, TopKSAE) and sae.cfg.k == 5
    assert sae.site == "layer_3.residual" and sae.hook_name == "blocks.3.hook_resid_post"
    x = torch.randn(16, 8, generator=gen)
    pre = x @ w["W_enc"] + w["b_enc"]
    top = pre.topk(5, dim=-1)
    expected = (
        torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu()) @ w["W_dec"] + w["b_dec"]
    )
    with torch.no_grad():
        assert torch.allclose(sae.reconstruct(x), expected, atol=1e-4)
    (tmp_path / "cfg.json").write_text(json.dumps({"architecture": "gated", "d_in": 8}))
    with pytest.raises(ArtifactError, match="gated"):
        import_saelens(tmp_path)


def test_artifact_save_load_round_trip_and_fit_check(tmp_path) -> None:
    a = arch("gpt2")
    sae = build_sae(
        SAEConfig(a.backend.site_info("layer_0.residual").dim, 16, sae_type="batchtopk", k=4)
    )
    with torch.no_grad():
        sae.threshold.fill_(0.25)
    sae.site = "layer_0.residual"
    sae.fitted_on = archscope.artifacts.ArtifactFit.of(a.backend, "layer_0.residual")
    sae.save(tmp_path)
    back = SAE.load(tmp_path, backend=a.backend)
    assert isinstance(back, BatchTopKSAE) and back.cfg == sae.cfg
    assert all(torch.equal(v, back.state_tensors()[k]) for k, v in sae.state_tensors().items())
    with pytest.raises(ArtifactError):
        SAE.load(tmp_path, backend=arch("lstm").backend)


# -- 0.2 API and errors -----------------------------------------------------------------------
def test_unknown_sae_type_names_the_valid_ones() -> None:
    with pytest.raises(ParameterError) as info:
        build_sae(SAEConfig(8, 16, 1e-3, "gated"))
    assert isinstance(info.value, ValueError)
    for valid in VARIANTS:
        assert valid in str(info.value)
    assert "'gated'" in str(info.value)


def test_calls_of_archscope_0_2() -> None:
    torch.manual_seed(0)
    config = SAEConfig(
        input_dim=16,
        n_features=32,
        sparsity=1e-3,
        sae_type="dense",
        learning_rate=1e-3,
        batch_size=64,
    )
    dense = build_sae(config)
    assert isinstance(dense, DenseSAE)
    x = torch.randn(10, 16)
    z = dense.encode(x)
    assert z.shape == (10, 32) and bool((z >= 0).all())
    assert dense.decode(z).shape == (10, 16)
    recon, codes = dense(x)
    assert torch.equal(codes, z) and recon.shape == x.shape
    assert dense.loss(x).ndim == 0

    rank1 = build_sae(SAEConfig(16, 32, 1e-3, "rank1", 1e-3, 64))
    assert isinstance(rank1, Rank1FactoredSAE)
    with torch.no_grad():
        firing = torch.relu(x @ rank1.W_enc)  # relu(<w_i, x>), scale 1 before fitting
        assert torch.allclose(rank1.fire(x), firing)
        assert torch.allclose(rank1.reconstruct(x), firing @ rank1.W_dec, atol=1e-6)
    assert rank1.loss(x).ndim == 0 and rank1(x)[0].shape == x.shape

    fitted = fit_sae(torch.randn(300, 16), config, epochs=2, device="cpu")
    assert {"recon", "l1", "n_active"} <= set(fitted.last_metrics)


# -- the registered method -----------------------------------------------------------------------
def test_sae_method_runs_on_every_architecture(any_arch: Arch) -> None:
    from archscope.data import Dataset

    data = Dataset.from_texts(words(12, seed=5), tokenizer=any_arch.tokenizer)
    site = any_arch.backend.layer_names()[0]
    report = archscope.run_method(
        "sae", any_arch.backend, data, site=site, n_features=32, k=4, epochs=2, batch_size=64
    )
    assert report.site == site and report.sae.site == site
    assert report.eval.l0 <= 4.0 and report.eval.n_inputs > 0
    assert report.loss is not None and report.loss.n_tokens > 0
    assert report.n_train_tokens + report.eval.n_inputs == sum(
        len(t.split()) for t in words(12, seed=5)
    )
    assert "| loss recovered |" in report.to_markdown()
    json.loads(report.to_json())
