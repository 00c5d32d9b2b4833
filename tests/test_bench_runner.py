"""The benchmark runner's pure parts: arguments, the equality check that guards every timing,
the interleaving order and the result table. No environment is created and nothing is timed."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

RUNNER = Path(__file__).resolve().parents[1] / "benchmarks" / "runner.py"


@pytest.fixture(scope="module")
def runner():
    spec = importlib.util.spec_from_file_location("bench_runner", RUNNER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_runner"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_arguments(runner, tmp_path):
    args = runner.parse_args([])
    assert (args.device, args.only, args.quick, args.rounds, args.threads) == (
        "cpu",
        [],
        False,
        5,
        1,
    )
    args = runner.parse_args(
        ["--only", "9,1,3", "--quick", "--device", "cuda", "--venvs", str(tmp_path)]
    )
    assert (args.only, args.rounds, args.device, args.venvs) == ([1, 3, 9], 3, "cuda", tmp_path)
    for bad in (["--only", "1,x"], ["--only", "12"], ["--device", "tpu"], ["--rounds", "0"]):
        with pytest.raises(SystemExit):
            runner.parse_args(bad)


def test_equal_outputs_pass_with_their_difference(runner):
    ref = {"layer_0.residual": torch.zeros(2, 3, 4), "logits": torch.ones(2, 3, 5)}
    got = {
        "layer_0.residual": torch.full((2, 3, 4), 1e-5),
        "logits": torch.ones(2, 3, 5),
        "extra": torch.zeros(1),
    }
    worst, notes = runner.compare(ref, got)
    assert worst == pytest.approx(1e-5) and notes == []


def test_unequal_outputs_are_refused(runner):
    ref = {"layer_0.residual": torch.zeros(2, 3, 4)}
    off = torch.zeros(2, 3, 4)
    off[1, 2, 3] = 0.5
    with pytest.raises(runner.BenchError, match=r"layer_0.residual differs .* by 0.5"):
        runner.compare(ref, {"layer_0.residual": off})
    with pytest.raises(runner.BenchError, match="shape"):
        runner.compare(ref, {"layer_0.residual": torch.zeros(2, 3, 5)})
    with pytest.raises(runner.BenchError, match="missing 'layer_0.residual'"):
        runner.compare(ref, {"layer_1.residual": torch.zeros(2, 3, 4)})


def test_nan_is_never_equal_by_accident(runner):
    # NaN compares False with everything, so a naive max-difference check would pass it.
    nan = torch.full((2, 3), float("nan"))
    with pytest.raises(runner.BenchError, match="all NaN"):
        runner.compare({"grid": nan}, {"grid": nan.clone()})
    half = torch.zeros(2, 3)
    half[0] = float("nan")
    with pytest.raises(runner.BenchError, match="NaN at other places"):
        runner.compare({"grid": half}, {"grid": torch.zeros(2, 3)})
    worst, _ = runner.compare({"grid": half}, {"grid": half + 1e-6})
    assert worst == pytest.approx(1e-6)


def test_a_waived_site_is_reported_not_hidden(runner):
    ref = {"a": torch.zeros(3), "b": torch.zeros(3)}
    worst, notes = runner.compare(
        ref, {"a": torch.zeros(3), "b": torch.ones(3)}, waive={"b": "taken after the final norm"}
    )
    assert worst == 0.0
    assert notes == ["b differs by 1 (taken after the final norm)"]


def test_round_robin_rotates(runner):
    assert runner.round_robin(3, 4) == [[0, 1, 2], [1, 2, 0], [2, 0, 1], [0, 1, 2]]


def test_table(runner):
    ours = runner.Row(
        "archscope",
        "archscope",
        {"torch": "2", "archscope": "0.3.0"},
        0.0,
        times=[0.010, 0.012, 0.011],
        ratios=[0.9, 1.0, 0.95],
        rss_peak_mb=500.4,
        rss_added_mb=20.0,
    )
    peer = runner.Row(
        "peer",
        "Peer",
        {"peer": "1.0"},
        1e-6,
        note="one site waived",
        times=[0.033, 0.030, 0.036],
        ratios=[3.0, 3.1, 2.9],
    )
    gone = runner.Row("other", "Other", excluded="unequal output: x differs")
    lines = runner.format_table([ours, peer, gone]).splitlines()
    assert lines[0].startswith("| contender |") and len(lines) == 7
    assert lines[2] == (
        "| archscope | archscope 0.3.0 | 0 | 11.0 | 10.0–12.0 | 0.950 | 1.00× | 500 | 20 |"
    )
    assert lines[3] == "| Peer | peer 1.0 | 1e-06 | 33.0 | 30.0–36.0 | 3.000 | 3.00× | - | - |"
    assert "not timed: unequal output: x differs" in lines[4]
    assert lines[6] == "- Peer: one site waived"


def test_time_to_a_held_out_kl(runner):
    curve = ([1.0, 2.5, 4.0], [0.9, 0.62, 0.60])
    assert runner.time_to(curve, 0.62) == 2.5  # the first epoch at or below the target
    assert runner.time_to(curve, 0.60) == 4.0
    assert runner.time_to(curve, 0.5) is None  # never reached: no time is made up


def test_a_workloads_own_rounds_give_way_to_an_explicit_rounds(runner):
    """Long workloads time fewer rounds by default (the profile: 2), an explicit --rounds
    applies to every workload, and a workload without its own count takes the default."""
    profile = next(w for w in runner.workloads(False) if w.number == 8)
    plain = next(w for w in runner.workloads(False) if w.rounds is None)
    default = runner.parse_args([])
    assert runner.rounds_of(profile, default) == profile.rounds == 2
    assert runner.rounds_of(plain, default) == 5
    explicit = runner.parse_args(["--rounds", "7"])
    assert runner.rounds_of(profile, explicit) == runner.rounds_of(plain, explicit) == 7
