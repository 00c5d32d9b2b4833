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
    names = ["report-layers.png", "report-patching.png", "report-sae.png", "report-write.png"]
    assert [p.name for p in pngs] == names  # write SAEs: zoo:mamba has state-write sites
    assert zoo_profiles["zoo:mamba"].write_sae["per_atom_rates"]
    assert not zoo_profiles["zoo:transformer"].write_sae
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
    # what 0.2 computed: one probe layer per task (a quarter / half of the depth), circuits,
    # a dense and a rank-1 SAE at half the depth; no lens, patching map or control
    layers = a.backend.layer_names()
    n = len(layers)
    assert {t: list(v) for t, v in profile.probe_auroc.items()} == {
        "sentiment": [layers[n // 4]],
        "math": [layers[n // 2]],
    }
    assert set(profile.sae) == {"dense", "rank1"} and profile.sae_site == layers[n // 2]
    assert profile.sae_better in ("dense", "rank1") and profile.sae_rank1_recon is not None
    assert profile.induction_head_relative is not None and profile.copy_accuracy is not None
    assert not profile.lens_kl and not profile.patching and profile.untrained is None
    assert not profile.probe_auroc_shuffled


def test_the_02_entry_point_takes_its_layers_and_refuses_missing_ones() -> None:
    a = arch("gpt2")
    tasks = generic_tasks(a.tokenizer, n=16)
    layers = a.backend.layer_names()
    profile = benchmark(
        "tiny",
        a.model,
        a.tokenizer,
        sentiment_layer=0,
        math_layer=0,
        sae_layer=0,
        quick=True,
        tasks=tasks,
    )
    assert [list(v) for v in profile.probe_auroc.values()] == [[layers[0]], [layers[0]]]
    assert profile.sae_site == layers[0]
    with pytest.raises(InputError, match=r"sae_layer=99: the model has layers 0 to"):
        benchmark("tiny", a.model, a.tokenizer, sae_layer=99, quick=True, tasks=tasks)
    full = benchmark("tiny", a.model, a.tokenizer, quick=True, tasks=tasks, full=True)
    assert set(full.probe_auroc["sentiment"]) == set(layers)  # every layer
    assert full.lens_kl and full.untrained is not None


def test_bench_command_writes_the_report(run_cli_root, tmp_path: Path) -> None:
    done = run_cli_root("bench", "zoo:lstm", "--quick", "--out", str(tmp_path / "r.md"))
    assert done.returncode == 0, done.stderr
    assert "zoo:lstm" in done.stdout and "report written to" in done.stderr
    assert (tmp_path / "r-layers.png").is_file()


# -- controls, pooling, all pairs -----------------------------------------------------------------
def test_every_zoo_number_has_its_controls(zoo_profiles: dict[str, InterpProfile]) -> None:
    for profile in zoo_profiles.values():
        control = profile.untrained
        assert control is not None and control.untrained is None
        assert profile.pool == "last" and control.pool == "last"
        for task, curve in profile.probe_auroc.items():
            assert set(control.probe_auroc[task]) == set(curve)
            shuffled = list(profile.probe_auroc_shuffled[task].values())
            assert len(shuffled) == len(curve)
            # shuffled labels leave nothing to learn: chance on average over the layers
            assert abs(sum(shuffled) / len(shuffled) - 0.5) < 0.15, (profile.model_name, task)
        # training adds what the untrained copy cannot give (at its best layer, some task)
        assert any(
            max(curve.values()) >= max(control.probe_auroc[task].values()) + 0.05
            for task, curve in profile.probe_auroc.items()
        ), profile.model_name
        assert control.lens_kl and control.sae and control.patching["matrix"]
    markdown = profile_to_markdown(list(zoo_profiles.values()))
    assert "(untrained " in markdown and "shuffled labels" in markdown
    assert "Probes pool the last real token" in markdown


def test_zoo_models_have_their_recipes_layers(zoo_profiles: dict[str, InterpProfile]) -> None:
    from archscope_zoo.train import N_LAYERS

    for profile in zoo_profiles.values():
        name = profile.model_name.split(":", 1)[1]
        assert profile.n_layers == N_LAYERS[name]
        assert all(len(curve) == profile.n_layers for curve in profile.probe_auroc.values())
        assert len(profile.patching["rows"]) == profile.n_layers + 1  # embed + every layer
    assert max(p.n_layers for p in zoo_profiles.values()) >= 4


def test_patching_averages_every_pair_like_per_pair_runs_by_hand(
    zoo_profiles: dict[str, InterpProfile],
) -> None:
    import math

    import torch

    import archscope
    from archscope import Edit

    profile = zoo_profiles["zoo:transformer"]
    _, tokenizer, backend = archscope.load_model("zoo:transformer")
    from archscope_zoo.tasks import profile_tasks

    tasks = profile_tasks("transformer", tokenizer)
    patch = profile.patching
    pairs = tasks.contrast.pairs()
    assert patch["n_pairs"] == len(pairs) == 4
    assert patch["rows"][0] == "embed" and len(patch["rows"]) == backend.n_layers + 1
    assert patch["tokens"][0] == "the" and "/" in patch["tokens"][patch["changed"][0]]
    good, bad = tasks.answers

    def metric(logits: torch.Tensor, i: int) -> float:
        return float(logits[0, -1, good[i]] - logits[0, -1, bad[i]])

    last_row, last_col = len(patch["rows"]) - 1, len(patch["tokens"]) - 1
    for row, col in [(2, patch["changed"][0]), (last_row, last_col), (last_row - 1, last_col)]:
        site = "embed" if row == 0 else f"layer_{row - 1}.residual"
        fractions = []
        for i, (clean, corrupted) in enumerate(pairs):
            source = backend.run(torch.tensor([clean]), capture=[site, "logits"])
            base = backend.run(torch.tensor([corrupted]), capture=["logits"])
            patched = backend.run(
                torch.tensor([corrupted]),
                capture=["logits"],
                edits=[Edit.replace(site, source[site][0, col], positions=[col])],
            )
            c, r = metric(source["logits"], i), metric(base["logits"], i)
            fractions.append((metric(patched["logits"], i) - r) / (c - r))
        got = torch.tensor(fractions, dtype=torch.float64)
        assert patch["matrix"][row][col] == pytest.approx(float(got.mean()), abs=1e-4)
        assert patch["std"][row][col] == pytest.approx(float(got.std(unbiased=False)), abs=1e-4)
        assert patch["min"][row][col] == pytest.approx(float(got.min()), abs=1e-4)
        assert [p[row][col] for p in patch["per_pair"]] == pytest.approx(fractions, abs=1e-4)
    assert math.isfinite(patch["max"])


@pytest.mark.parametrize("pool", ["last", "mean", 1, -2])
def test_the_pool_parameter_changes_what_probes_read(pool: str | int) -> None:
    import torch

    from archscope.apps.bench import pooled_features

    a = arch("gpt2")
    data = generic_tasks(a.tokenizer, n=6).probes["sentiment"]
    sites = ["layer_0.residual", "layer_2.residual"]
    got = pooled_features(a.backend, data, sites, pool)
    for i, ids in enumerate(data.ids()):
        run = a.backend.run(torch.tensor([ids]), capture=sites)
        for site in sites:
            acts = run[site][0]
            if pool == "mean":
                want = acts.mean(0)
            elif pool == "last":
                want = acts[-1]
            else:
                want = acts[pool]
            torch.testing.assert_close(got[site][i], want.float(), atol=1e-5, rtol=1e-5)


def test_profile_pool_and_controls_parameters() -> None:
    import random

    from archscope.apps.bench import ProfileTasks, check_pool, untrained_copy
    from archscope.data import Dataset

    a = arch("lstm")
    rng = random.Random(0)
    texts = [
        f"w{rng.randrange(20, 99)} w{rng.randrange(20, 99)} {'w7' if i % 2 else 'w9'} w12 w13"
        for i in range(24)
    ]
    planted = Dataset.from_texts(texts, [i % 2 for i in range(24)], tokenizer=a.tokenizer)
    tasks = ProfileTasks(
        probes={"planted": planted}, texts=Dataset.from_texts(texts, tokenizer=a.tokenizer)
    )
    mean = profile_backend(a.backend, a.tokenizer, quick=True, tasks=tasks, pool="mean")
    first = profile_backend(a.backend, a.tokenizer, quick=True, tasks=tasks, pool=0, controls=False)
    assert mean.pool == "mean" and first.pool == "position 0" and first.untrained is None
    assert "the mean over real tokens" in profile_to_markdown(mean)
    # position 0 is random, the label sits at position 2: only the mean reads it
    assert max(first.probe_auroc["planted"].values()) < 0.8
    assert max(mean.probe_auroc["planted"].values()) > 0.95
    assert check_pool("-3") == -3
    with pytest.raises(InputError, match="pool='middle'"):
        check_pool("middle")
    with pytest.raises(InputError, match="only 5 real tokens"):
        profile_backend(a.backend, a.tokenizer, quick=True, tasks=tasks, pool=9, controls=False)
    # the untrained copy: same architecture and seed policy, the original untouched
    before = {k: v.clone() for k, v in a.model.state_dict().items()}
    one, two = untrained_copy(a.model, seed=3), untrained_copy(a.model, seed=3)
    after = a.model.state_dict()
    for key, value in before.items():
        assert torch_equal(after[key], value)
        assert one.state_dict()[key].shape == value.shape
        assert torch_equal(one.state_dict()[key], two.state_dict()[key])
    assert not all(torch_equal(one.state_dict()[k], v) for k, v in before.items())


def torch_equal(x: object, y: object) -> bool:
    import torch

    assert isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)
    return bool(torch.equal(x, y))


def test_summary_sentences_follow_the_numbers() -> None:
    from archscope.apps.bench import summary_sentences

    def fake(name: str, best: float, control: float, takeover: int) -> InterpProfile:
        rows = ["embed", "layer_0", "layer_1", "layer_2"]
        matrix = [[0.0, 1.0, 0.0]] + [
            [0.0, 0.9 if r < takeover else 0.1, 1.0 if r >= takeover else 0.2] for r in range(3)
        ]
        p = InterpProfile(name, "x", 1, 3, 8)
        p.probe_auroc = {"topic": {"layer_0.h": 0.6, "layer_1.h": best, "layer_2.h": 0.7}}
        p.patching = {
            "matrix": matrix,
            "rows": rows,
            "tokens": ["a", "b/c", "d"],
            "changed": [1],
            "n_pairs": 2,
        }
        p.induction_head_relative = 10.0 * best
        p.untrained = InterpProfile(name, "x", 1, 3, 8)
        p.untrained.probe_auroc = {"topic": dict.fromkeys(p.probe_auroc["topic"], control)}
        return p

    first, second = fake("alpha", 0.95, 0.6, 1), fake("beta", 0.8, 0.7, 2)
    sentences = summary_sentences([first, second])
    assert len(sentences) == 3
    assert (
        "topic is decoded furthest above the control in alpha (layer 1: 0.95 vs 0.60"
        in (sentences[0])
    )
    assert "least in beta (0.80 vs 0.70 untrained" in sentences[0]
    assert "alpha carries the 'b/c' contrast on that token through layer 0" in sentences[1]
    assert "and moves it to the last token from layer 1; beta" in sentences[1]
    assert "beta carries the 'b/c' contrast on that token through layer 1" in sentences[1]
    assert sentences[1].endswith("moves it to the last token from layer 2.")
    assert sentences[2].startswith("Repeated spans are copied at") and "alpha 9.5x" in sentences[2]
    swapped = summary_sentences([fake("alpha", 0.8, 0.7, 2), fake("beta", 0.95, 0.6, 1)])
    assert "furthest above the control in beta" in swapped[0]


def test_bench_refuses_a_report_name_before_profiling(run_cli_root, tmp_path: Path) -> None:
    done = run_cli_root("bench", "zoo:no-such-model", "--out", str(tmp_path / "r.txt"))
    assert done.returncode != 0
    assert "write .md or .json" in done.stderr and "r.txt" in done.stderr
    bad_pool = run_cli_root("bench", "zoo:lstm", "--pool", "middle")
    assert bad_pool.returncode != 0 and "pool='middle'" in bad_pool.stderr
