"""The plugin's commands: ``archscope train transcoders`` end to end on the zoo transformer (a
fresh interpreter, the installed entry point) and ``archscope graph``."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest

_spec = importlib.util.spec_from_file_location(
    "archscope_graphs_test_fixtures", Path(__file__).with_name("graph_fixtures.py")
)
assert _spec is not None and _spec.loader is not None
fixtures = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = fixtures
_spec.loader.exec_module(fixtures)

pytest.importorskip("archscope_zoo")


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARCHSCOPE_")}
    return subprocess.run(
        [sys.executable, "-m", "archscope", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )


def test_commands_are_registered_by_the_plugin() -> None:
    done = _run("train", "transcoders", "--help")
    assert done.returncode == 0, done.stderr
    assert "--cross-layer" in done.stdout and "--activation" in done.stdout
    done = _run("graph", "--help")
    assert done.returncode == 0, done.stderr
    assert "--prompt" in done.stdout and "--target" in done.stdout and "--out" in done.stdout


def test_train_transcoders_end_to_end(tmp_path: Path) -> None:
    from archscope_graphs.transcoders import load_transcoders

    out = tmp_path / "tc"
    done = _run(
        "train", "transcoders", "zoo:transformer", "--out", str(out), "--texts", "24",
        "--eval-texts", "6", "--features", "32", "--epochs", "3", "--layers", "0,1",
        "--batch-size", "32",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "explained variance: layer_0.mlp" in done.stdout
    assert "wrote 2 transcoders" in done.stdout
    tcs = load_transcoders(out)
    assert [t.read_site for t in tcs] == ["layer_0.mlp_in", "layer_1.mlp_in"]
    assert all(t.n_features == 32 for t in tcs)
    summary = json.loads((out / "metrics.json").read_text())
    metrics = summary["metrics"]
    assert summary["train_texts"] == 24 and metrics["n_tokens"] > 0
    assert metrics["zero_ablated_loss"] > metrics["replaced_loss"] > metrics["clean_loss"]
    # the circuit-tracer layout of the same command
    ct = tmp_path / "ct"
    done = _run(
        "train", "transcoders", "zoo:transformer", "--out", str(ct), "--texts", "8",
        "--eval-texts", "0", "--features", "16", "--epochs", "1", "--layers", "1",
        "--format", "circuit-tracer",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert (ct / "layer_1.safetensors").is_file()


def test_train_transcoders_refuses_bad_options(tmp_path: Path) -> None:
    done = _run("train", "transcoders", "zoo:transformer", "--out", str(tmp_path), "--layers", "a")
    assert done.returncode == 2 and "comma-separated integers" in done.stderr
    done = _run(
        "train", "transcoders", "zoo:transformer", "--out", str(tmp_path), "--cross-layer",
        "--format", "saelens",
    )  # fmt: skip
    assert done.returncode == 2 and "single-layer" in done.stderr


@pytest.fixture
def cli_group() -> Any:
    from archscope.apps.cli import cli
    from archscope.plugins import get_manager

    get_manager().add_commands(cli)
    return cli


def test_graph_command_writes_json_and_html(
    tmp_path: Path, monkeypatch: Any, cli_group: Any
) -> None:
    """The command's own work (loading, labels, the two files) around a stand-in for
    `attribute` that returns the hand-built graph and records how it was called."""
    from click.testing import CliRunner

    from archscope_graphs.transcoders import LayerTranscoder, save_transcoders

    calls: list[dict[str, Any]] = []

    def attribute(backend: Any, prompt: str, **kw: Any) -> Any:
        calls.append({"backend": backend.name, "prompt": prompt, **kw})
        return fixtures.small_graph()

    fake = types.ModuleType("archscope_graphs.attribution")
    fake.attribute = attribute  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "archscope_graphs.attribution", fake)
    import torch

    d = 64  # the zoo transformer's width
    gen = torch.Generator().manual_seed(0)
    tcs = [
        LayerTranscoder(
            layer=i,
            W_enc=torch.randn(d, 8, generator=gen),
            b_enc=torch.zeros(8),
            W_dec={f"layer_{i}.mlp": torch.randn(8, d, generator=gen)},
            b_dec=torch.zeros(d),
        )
        for i in (0, 1)
    ]
    save_transcoders(tcs, tmp_path / "tc")
    result = CliRunner().invoke(
        cli_group,
        [
            "graph", "zoo:transformer", "--prompt", "the cat sat", "--target", " on",
            "--out", str(tmp_path / "g"), "--transcoders", str(tmp_path / "tc"),
            "--label-texts", "4", "--node-threshold", "0.7",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    (call,) = calls
    assert call["prompt"] == "the cat sat" and call["target"] == " on"
    assert call["node_threshold"] == 0.7 and call["edge_threshold"] == 0.98
    assert call["linearise"] == "frozen"  # the default
    assert [t.read_site for t in call["transcoders"]] == ["layer_0.mlp_in", "layer_1.mlp_in"]
    data = json.loads((tmp_path / "g" / "graph.json").read_text())
    assert len(data["nodes"]) == 7 and len(data["links"]) == 7
    assert data["metadata"]["prompt"] == "the cat sat"
    features = [n for n in data["nodes"] if n["feature_type"] == "cross layer transcoder"]
    # labels: the top-activating tokens of each feature over the zoo corpus (quoted strings)
    assert all(n["clerp"].startswith('"') for n in features), features
    page = (tmp_path / "g" / "graph.html").read_text()
    assert "zoo:transformer: the cat sat" in page
    assert (tmp_path / "g" / "graph-metadata.json").is_file()


def test_graph_command_end_to_end(tmp_path: Path) -> None:
    if importlib.util.find_spec("archscope_graphs.attribution") is None:
        pytest.skip("needs archscope_graphs.attribution")
    done = _run(
        "graph", "zoo:transformer", "--prompt", "the cat sat on the mat . the cat",
        "--out", str(tmp_path), "--label-texts", "8",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads((tmp_path / "graph.json").read_text())
    assert any(n["is_target_logit"] for n in data["nodes"])
    assert (tmp_path / "graph.html").is_file()


def test_graph_command_takes_the_linearisation(tmp_path: Path, cli_group: Any) -> None:
    """``--linearise gradient`` builds the first-order graph (named in the exported files and
    the page); an unknown linearisation is refused with the valid ones."""
    from click.testing import CliRunner

    prompt = "dan likes the soup . paul likes the pie . so dan likes the"  # the corpus's words
    args = ["graph", "zoo:transformer", "--prompt", prompt]
    result = CliRunner().invoke(
        cli_group, [*args, "--out", str(tmp_path), "--linearise", "gradient", "--label-texts", "2"]
    )
    assert result.exit_code == 0, result.output
    assert "gradient linearisation" in result.output
    data = json.loads((tmp_path / "graph.json").read_text())
    assert data["metadata"]["archscope"]["linearisation"] == "gradient"
    assert '"linearisation": "gradient"' in (tmp_path / "graph.html").read_text()
    refused = CliRunner().invoke(cli_group, [*args, "--out", str(tmp_path), "--linearise", "exact"])
    assert refused.exit_code == 2
    assert "'exact' is not one of 'frozen', 'gradient'" in refused.output
