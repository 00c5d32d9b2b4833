"""benchmarks/gpu_check.py end to end on the CPU (``--tiny``: small configs of every model
family it measures, float32): the results file holds every workload of every model, the
captures equal the plain forward, and the place for optional methods runs a registered
method (and skips a missing one with its reason)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module
    spec.loader.exec_module(module)
    return module


def test_the_tiny_check_runs_end_to_end(gpu_check, tmp_path, monkeypatch):
    # one registered method stands in for the optional ones, next to one that is missing
    monkeypatch.setattr(
        gpu_check,
        "OPTIONAL_METHODS",
        {"activation-stats": ("a registered method", "batch"), "no-such": ("missing", "batch")},
    )
    out = tmp_path / "tiny.json"
    code = gpu_check.main(["--tiny", "--cpu", "--rounds", "1", "--out", str(out)])
    assert code == 0
    results = json.loads(out.read_text())
    assert results["tiny"] and results["machine"]["dtype"] == "float32"
    assert set(results["models"]) == set(gpu_check.model_specs(True))
    for name, entry in results["models"].items():
        assert entry["parameters"] > 0, name
        ex = entry["extraction"]
        assert ex["logits_max_abs_diff_vs_plain"] == 0.0, name
        assert ex["all_sites_and_logits"]["ratio"] > 0 and ex["early_stop"]["ratio"] > 0
        sweep = entry["patch_sweep"]
        assert sweep["cells"] == sweep["rows"] * sweep["positions"] > 0, name
        assert entry["sae"]["tokens_per_s"] > 0, name
        assert entry["activation-stats"]["seconds"] > 0, name
        assert (
            "is registered" in entry["no-such"]["skipped"]
            or "no method" in entry["no-such"]["skipped"]
        )
    assert results["total_s"] > 0


def test_a_real_size_check_without_cuda_says_so(gpu_check, tmp_path, monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--out", str(tmp_path / "x.json")]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
