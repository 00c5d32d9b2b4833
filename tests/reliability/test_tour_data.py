"""Findings of the hostile tour about data, labels and sparse autoencoders: what used to give a
silently wrong result (training-set metrics reported as held-out, NaN metrics from a
non-finite learning rate or activations, k above n_features, an SAE loaded onto another
model) or an unclear error (NaN / text / fractional labels, a binary data file, save= naming
an existing file). Each test asserts the message or the corrected value."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from archs import arch, words

import archscope
from archscope import ArtifactFit, Dataset
from archscope.errors import ArtifactError, InputError, ParameterError
from archscope.methods.sae import SAEConfig, TopKSAE, fit_sae


def _gpt2() -> archscope.Backend:
    return arch("gpt2").backend


def _texts(n: int = 10) -> Dataset:
    return Dataset.from_texts(words(n, seed=1), tokenizer=arch("gpt2").tokenizer)


QUICK = {"n_features": 16, "k": 4, "epochs": 1, "batch_size": 64}


# -- the sae method ------------------------------------------------------------------------------
def test_sae_without_held_out_texts_says_its_metrics_are_training_metrics() -> None:
    report = archscope.run_method("sae", _gpt2(), _texts(), eval_fraction=0.0, **QUICK)
    assert report.eval_on == "training"
    text = report.to_markdown()
    assert "held-out tokens" not in text
    assert "training-set metrics" in text
    assert f"the same {report.eval.n_inputs} training tokens" in text
    held = archscope.run_method("sae", _gpt2(), _texts(), eval_fraction=0.3, **QUICK)
    assert held.eval_on == "held-out" and "held-out tokens" in held.to_markdown()
    # held-out metrics are on fewer tokens than the training set here (3 of 10 texts)
    assert held.eval.n_inputs < held.n_train_tokens


@pytest.mark.parametrize("rate", [math.inf, math.nan, 0.0, -1e-3])
def test_sae_refuses_a_learning_rate_that_cannot_train(rate: float) -> None:
    with pytest.raises(ParameterError, match=r"learning_rate.* must be (a finite number > 0|>= 0)"):
        archscope.run_method("sae", _gpt2(), _texts(), learning_rate=rate, **QUICK | {"k": 4})
    with pytest.raises(ParameterError, match="learning_rate"):
        SAEConfig(input_dim=8, n_features=16, learning_rate=rate)


def test_sae_refuses_k_above_n_features_in_method_and_config() -> None:
    with pytest.raises(ParameterError, match=r"k=32 .*n_features=8.*k <= 8"):
        archscope.run_method("sae", _gpt2(), _texts(), n_features=8, k=32, epochs=1)
    for kind in ("topk", "batchtopk"):
        with pytest.raises(ParameterError, match=r"k=32"):
            SAEConfig(input_dim=8, n_features=8, k=32, sae_type=kind)
    # k does not apply to the L1-trained SAEs: their default k never gets in the way
    assert SAEConfig(input_dim=8, n_features=8, sae_type="dense").k == 32


def test_sae_save_to_an_existing_file_is_refused_before_training(tmp_path: Path) -> None:
    target = tmp_path / "passwd"
    target.write_text("root:x:0:0\n")
    with pytest.raises(ParameterError, match=r"save=.*passwd.*existing file.*folder"):
        archscope.run_method("sae", _gpt2(), _texts(), save=str(target), **QUICK)
    assert target.read_text() == "root:x:0:0\n"
    with pytest.raises(ParameterError, match=r"saelens_dir=.*lies under .*passwd"):
        archscope.run_method("sae", _gpt2(), _texts(), saelens_dir=str(target / "sub"), **QUICK)


def test_sae_method_on_cli_with_existing_file_prints_one_line(run_cli_root, tmp_path) -> None:
    target = tmp_path / "passwd"
    target.write_text("x")
    done = run_cli_root(
        "run", "sae", "zoo:transformer", "--text", "the chef of iris", "--quick",
        "--param", f"save={target}",
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "existing file" in done.stderr and "Traceback" not in done.stderr
    assert "FileExistsError" not in done.stderr


# -- fit_sae on non-finite activations ---------------------------------------------------------
def test_fit_sae_refuses_all_nan_activations() -> None:
    acts = torch.full((100, 8), float("nan"))
    with pytest.raises(InputError, match=r"800 non-finite values .* in 100 of 100 rows"):
        fit_sae(acts, SAEConfig(input_dim=8, n_features=16, sae_type="topk", k=4), epochs=1)


def test_fit_sae_refuses_one_inf_among_many_values_in_a_tensor_or_chunks() -> None:
    acts = torch.randn(500, 64)
    acts[123, 7] = float("inf")
    config = SAEConfig(input_dim=64, n_features=128, sae_type="topk", k=8, batch_size=100)
    with pytest.raises(InputError, match=r"1 non-finite values \(NaN or inf\) in 1 of 500 rows"):
        fit_sae(acts, config, epochs=1)
    chunks = [acts[:250], acts[250:]]
    with pytest.raises(InputError, match=r"1 non-finite values .* in 1 of 250 rows"):
        fit_sae(chunks, config, epochs=1)
    clean = acts.clone()
    clean[123, 7] = 0.0
    sae = fit_sae(clean, config, epochs=1)
    assert all(math.isfinite(v) for v in sae.last_metrics.values())


# -- where an SAE was fitted ---------------------------------------------------------------------
def test_fit_sae_records_the_fit_it_is_given_and_refuses_another_backend(tmp_path) -> None:
    gpt2, mamba = arch("gpt2").backend, arch("mamba").backend
    site = "layer_0.residual"
    acts = archscope.collect(gpt2, _texts(8), [site], pool=None)[site]
    config = SAEConfig(input_dim=acts.shape[-1], n_features=32, sae_type="topk", k=4)
    sae = fit_sae(acts, config, epochs=1, fitted_on=ArtifactFit.of(gpt2, site))
    folder = sae.save(tmp_path / "sae")
    meta = json.loads((folder / "artifact.json").read_text())
    assert meta["fitted_on"]["backend"] == gpt2.name and meta["fitted_on"]["site"] == site
    with pytest.raises(ArtifactError, match=r"does not fit.*backend"):
        TopKSAE.load(folder, backend=mamba)
    assert TopKSAE.load(folder, backend=gpt2).site == site


def test_sae_of_unknown_origin_warns_on_load_instead_of_pretending(tmp_path) -> None:
    acts = torch.randn(200, arch("mamba").backend.site_info("layer_0.residual").dim)
    config = SAEConfig(input_dim=acts.shape[-1], n_features=32, sae_type="topk", k=4)
    folder = fit_sae(acts, config, epochs=1).save(tmp_path / "sae")
    assert json.loads((folder / "artifact.json").read_text())["fitted_on"] is None
    with pytest.warns(UserWarning, match=r"does not record the model it was fitted on"):
        TopKSAE.load(folder, backend=arch("mamba").backend)


def test_sae_that_knows_its_site_refuses_a_backend_where_the_dimension_differs(tmp_path) -> None:
    config = SAEConfig(input_dim=5, n_features=8, sae_type="topk", k=2)
    sae = fit_sae(torch.randn(64, 5), config, epochs=1)
    sae.site = "layer_0.residual"
    folder = sae.save(tmp_path / "sae")
    with pytest.raises(ArtifactError, match=r"5-dimensional inputs but layer_0.residual"):
        TopKSAE.load(folder, backend=_gpt2())


def test_fit_sae_on_a_store_reader_records_the_store_model(tmp_path) -> None:
    from archscope.apps.store import StoreReader, extract

    gpt2 = _gpt2()
    site = "layer_1.residual"
    extract(
        gpt2, words(6), [site], tmp_path / "s", tokenizer=arch("gpt2").tokenizer, progress=False
    )
    reader = StoreReader(tmp_path / "s", site, batch_size=16)
    config = SAEConfig(input_dim=gpt2.site_info(site).dim, n_features=32, sae_type="topk", k=4)
    sae = fit_sae(reader, config, epochs=1)
    assert sae.fitted_on is not None
    assert (sae.fitted_on.backend, sae.fitted_on.site) == (gpt2.name, site)
    TopKSAE.load(sae.save(tmp_path / "sae"), backend=gpt2)  # fits: no error


# -- labels ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ([1.0, float("nan"), 0.0], r"1 labels are NaN \(at items \[1\]\)"),
        (["pos", "neg", "pos"], r"3 are text \(\['neg', 'pos'\].*\{'neg': 0, 'pos': 1\}"),
        ([0.3, 0.7, 1.0], r"2 are not \(\[0.3, 0.7\].*not rounded"),
        ([0, -1, 1], r"1 are negative"),
        ([0, None, 1], r"labels must be integer class indices; 1 are NoneType"),
    ],
)
def test_dataset_validates_labels_with_a_clear_message(labels: list, message: str) -> None:
    with pytest.raises(InputError, match=message):
        Dataset.from_texts(["a", "b", "c"], labels=labels)


def test_dataset_keeps_whole_float_and_bool_labels_as_ints() -> None:
    data = Dataset.from_ids([[5], [6], [7]], labels=[1.0, False, torch.tensor(1).item()])
    assert data.labels == [1, 0, 1]
    assert Dataset.from_ids([[5], [6]], labels=torch.tensor([1, 0])).labels == [1, 0]
    with pytest.raises(InputError, match="labels are NaN"):
        Dataset.from_ids([[5], [6]], labels=torch.tensor([1.0, float("nan")]))


def test_data_files_with_bad_labels_name_the_line(tmp_path: Path) -> None:
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"text": "a", "label": "pos"}\n{"text": "b", "label": "neg"}\n')
    with pytest.raises(InputError, match=rf"are text .*{jsonl.name}:1"):
        Dataset.from_file(jsonl)
    csv = tmp_path / "d.csv"
    csv.write_text("text,label\na,1\nb,0.5\n")
    with pytest.raises(InputError, match=rf"\[0.5\] at .*{csv.name}:3"):
        Dataset.from_file(csv)
    csv.write_text("text,label\na,1\nb,0\n")
    assert Dataset.from_file(csv).labels == [1, 0]


def test_binary_or_non_utf8_data_file_is_refused_clearly(tmp_path: Path) -> None:
    binary = tmp_path / "model.bin"
    binary.write_bytes(b"\x00\x01\x02garbage" * 50)
    with pytest.raises(InputError, match=r"looks like a binary file"):
        Dataset.from_file(binary)
    latin = tmp_path / "texts.txt"
    latin.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(InputError, match=r"not UTF-8 text \(byte 3 is 0xe9\)"):
        Dataset.from_file(latin)


def test_cli_data_with_string_labels_or_binary_file_prints_one_line(run_cli_root, tmp_path) -> None:
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"text": "it was good", "label": "pos"}\n')
    done = run_cli_root("run", "probe", "zoo:transformer", "--data", str(jsonl))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "are text" in done.stderr and "map them to integers" in done.stderr
    binary = tmp_path / "x.bin"
    binary.write_bytes(bytes(range(256)))
    done = run_cli_root("run", "activation-stats", "zoo:transformer", "--data", str(binary))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "binary file" in done.stderr
