"""The profile (archscope.apps.bench) on the zoo's trained models, where the ground truth is known,
and on random-weight models of every family; the report and its figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from archs import ARCH_NAMES, arch

from archscope.apps.bench import (
    InterpProfile,
    benchmark,
    default_models,
    generic_tasks,
    profile_backend,
    profile_models,
    profile_to_markdown,
    write_report,
)
from archscope.errors import InputError


@pytest.fixture(scope="module")
def zoo_profiles() -> dict[str, InterpProfile]:
    specs = default_models()
    assert specs == ["zoo:transformer", "zoo:mamba", "zoo:lstm"]
    return {p.model_name: p for p in profile_models(specs)}


def test_planted_attributes_are_found_by_held_out_probes(
    zoo_profiles: dict[str, InterpProfile],
) -> None:
    for profile in zoo_profiles.values():
        for task in ("topic", "sentiment"):
            assert max(profile.probe_auroc[task].values()) >= 0.95, (profile.model_name, task)
            # held-out next to train, never train alone
            assert set(profile.probe_train_auroc[task]) == set(profile.probe_auroc[task])


def test_the_zoo_transformer_copies_and_the_lenses_and_patching_behave(
    zoo_profiles: dict[str, InterpProfile],
) -> None:
    transformer = zoo_profiles["zoo:transformer"]
    assert transformer.induction_head_relative is not None
    assert transformer.induction_head_relative >= 100
    for profile in zoo_profiles.values():
        layers = list(profile.lens_kl.values())
        assert all(v["tuned"] < v["logit"] for v in layers[:-1]), profile.model_name
        assert layers[-1]["logit"] == pytest.approx(0.0, abs=1e-5)
        # patching the last layer's residual at the last position restores the whole gap
        assert profile.patching["matrix"][-1][-1] == pytest.approx(1.0, abs=1e-4)
        assert profile.patching["matrix"][0][0] == pytest.approx(0.0, abs=1e-4)
        for kind in ("dense", "rank1", "topk"):
            assert profile.sae[kind]["explained_variance"] > 0.5
        assert profile.sae["topk"]["l0"] <= profile.hidden_dim // 16 + 1e-6
    assert zoo_profiles["zoo:mamba"].ssm_state_variance_ratio is not None
    assert zoo_profiles["zoo:transformer"].ssm_state_variance_ratio is None


def test_report_with_figures(zoo_profiles: dict[str, InterpProfile], tmp_path: Path) -> None:
    from matplotlib.image import imread

    report = write_report(list(zoo_profiles.values()), tmp_path / "report.md")
    text = report.read_text()
    assert "| induction (x chance) |" in text
    pngs = sorted(tmp_path.glob("*.png"))
    assert [p.name for p in pngs] == ["report-layers.png", "report-patching.png", "report-sae.png"]
    for png in pngs:
        assert f"]({png.name})" in text
        image = imread(png)
        assert image.shape[0] > 100 and image.shape[1] > 100
    data = json.loads(write_report(list(zoo_profiles.values()), tmp_path / "r.json").read_text())
    assert [d["model_name"] for d in data] == list(zoo_profiles)
    with pytest.raises(InputError, match=r"\.md .*or \.json"):
        write_report(list(zoo_profiles.values()), tmp_path / "r.txt")


@pytest.mark.parametrize("name", ARCH_NAMES)
def test_every_family_profiles_with_generic_tasks(name: str) -> None:
    a = arch(name)
    profile = profile_backend(a.backend, a.tokenizer, name=name, quick=True)
    assert set(profile.probe_auroc) == {"sentiment", "math"}
    assert profile.n_layers == len(a.backend.layer_names())
    assert profile.timings and profile.runtime_seconds > 0
    assert "sentiment" in profile_to_markdown(profile)
    json.loads(profile.to_json())


def test_the_02_entry_point_still_works() -> None:
    a = arch("gpt2")
    profile = benchmark(
        "tiny",
        a.model,
        a.tokenizer,
        "transformer",
        quick=True,
        tasks=generic_tasks(a.tokenizer, n=16),
    )
    assert profile.model_name == "tiny" and profile.arch_family == "transformer"
    assert profile.probe_sentiment_auroc is not None


def test_bench_command_writes_the_report(run_cli_root, tmp_path: Path) -> None:
    done = run_cli_root("bench", "zoo:lstm", "--quick", "--out", str(tmp_path / "r.md"))
    assert done.returncode == 0, done.stderr
    assert "zoo:lstm" in done.stdout and "report written to" in done.stderr
    assert (tmp_path / "r-layers.png").is_file()
