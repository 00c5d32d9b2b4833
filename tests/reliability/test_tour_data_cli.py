"""Findings of the hostile tour about the command line: warnings printed with Python source
lines, the "Loading weights" bar on every command, a 516-line `archscope info`, `bench --out
x.txt` refusing only after the whole profile, `--debug` missing from the help, `patch` on
inputs that are the same tokens, a plugin whose every registration was rejected listed as
"ok", and long methods that print nothing. Each test asserts the message or the value."""

from __future__ import annotations

import io
import sys
import time
import types
from typing import Any

import pytest
from click.testing import CliRunner

import archscope
from archscope.apps.cli import cli
from archscope.plugins import PluginInfo, PluginManager
from archscope.registry import Method


def test_warnings_print_as_one_line_without_source_or_loading_bar(run_cli_root) -> None:
    done = run_cli_root(
        "run", "activation-stats", "zoo:transformer", "--text", "one text", "--text", "another text"
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "warning: 4 of 4 tokens are unknown to the tokenizer" in done.stderr
    assert "Loading weights" not in done.stderr
    assert ".py:" not in done.stderr and "archscope:0:" not in done.stderr
    assert "UserWarning" not in done.stderr and "\narchscope: " not in done.stderr


def test_info_is_compact_and_details_come_per_method(run_cli_root) -> None:
    done = run_cli_root("info")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    # 516 lines when every method's parameters were listed; now a few wrapped lines per backend
    # and per method (8 backends and 18 methods installed in the test environment)
    assert len(lines) < 200, f"{len(lines)} lines"
    assert "learning_rate" not in done.stdout  # parameters come per method, below
    assert "archscope info METHOD" in done.stdout
    one = run_cli_root("info", "sae")
    assert one.returncode == 0, one.stderr
    rows = {line.split("│")[1].strip() for line in one.stdout.splitlines() if line.count("│") >= 4}
    assert {"learning_rate", "eval_fraction", "k", "save"} <= rows
    assert "float" in one.stdout and "runs on:" in one.stdout
    # the help column is not folded to a narrow width: one line per parameter here
    assert any("share of texts held out" in line for line in one.stdout.splitlines())
    backend = run_cli_root("info", "transformer")
    assert backend.returncode == 0 and "methods it can run:" in backend.stdout
    bad = run_cli_root("info", "nosuch")
    assert bad.returncode == 2 and "no method or backend named 'nosuch'" in bad.stderr


def test_bench_refuses_an_out_suffix_before_profiling(run_cli_root, tmp_path) -> None:
    start = time.perf_counter()
    done = run_cli_root("bench", "zoo:transformer", "--out", str(tmp_path / "x.txt"))
    took = time.perf_counter() - start
    assert done.returncode == 2, done.stderr
    assert "write .md or .json" in done.stderr and "profiling" not in done.stderr
    assert took < 30  # the quick profile of one zoo model alone takes longer than this


def test_run_refuses_an_out_suffix_before_loading(run_cli_root, tmp_path) -> None:
    done = run_cli_root(
        "run", "activation-stats", "zoo:transformer", "--text", "it was good",
        "--out", str(tmp_path / "r.txt"),
    )  # fmt: skip
    assert done.returncode == 2 and "write .json or .md or .png" in done.stderr


@pytest.mark.parametrize("command", [["run"], ["lens"], ["bench"], ["info"], []])
def test_debug_is_in_every_help(run_cli_root, command: list[str]) -> None:
    done = run_cli_root(*command, "--help")
    assert done.returncode == 0, done.stderr
    assert "--debug" in done.stdout and "traceback" in done.stdout


def test_patch_on_inputs_that_are_the_same_tokens_says_so(run_cli_root) -> None:
    done = run_cli_root(
        "patch", "zoo:transformer", "--clean", "the zzz of iris", "--corrupt", "the qqq of iris"
    )
    assert done.returncode == 1, done.stderr
    assert "are the same tokens" in done.stderr and "'the <unk> of iris'" in done.stderr
    assert "metrics are equal" not in done.stderr


def _fake_plugin(name: str) -> types.ModuleType:
    module = types.ModuleType(f"fake_{name}")

    @archscope.hookimpl
    def register_methods(register: Any) -> None:
        register(Method(name="probe", summary="a second probe", function=lambda b, d: None))

    module.register_methods = register_methods  # type: ignore[attr-defined]
    return module


def test_plugin_whose_every_registration_lost_is_listed_as_rejected(monkeypatch) -> None:
    manager = PluginManager().ensure_loaded()
    info = PluginInfo(name="clash", distribution="archscope-clash", version="1.0", module="m")
    manager.plugins["archscope-clash:clash"] = info
    manager.pm.register(_fake_plugin("clash"), name="archscope-clash:clash")
    with pytest.warns(UserWarning, match="registered by both"):
        manager._register_from("archscope-clash:clash", info, _fake_plugin("clash"))
    manager._settle()
    assert info.status == "rejected" and info.registered["methods"] == []
    assert info.rejected["methods"] == ["probe"]
    assert "methods probe" in (info.error or "")
    assert manager.methods.get("probe").distribution == "archscope"
    monkeypatch.setattr("archscope.plugins.get_manager", lambda: manager)
    out = CliRunner().invoke(cli, ["plugins"], env={"COLUMNS": "250"}).output
    row = next(line for line in out.splitlines() if "archscope-clash" in line)
    assert "rejected" in row and "ok" not in row.split("│")[4]
    assert manager.plugins["archscope-clash:clash"].to_dict()["rejected"] == {"methods": ["probe"]}


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("method", ["tuned-lens", "sae"])
def test_long_methods_show_progress_on_a_terminal_only(monkeypatch, method: str) -> None:
    from archs import arch, words

    a = arch("gpt2")
    data = archscope.Dataset.from_texts(words(6), tokenizer=a.tokenizer)
    params: dict[str, Any] = (
        {"epochs": 2, "batch_size": 3}
        if method == "tuned-lens"
        else {"epochs": 2, "n_features": 16, "k": 2, "batch_size": 32}
    )
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    archscope.run_method(method, a.backend, data, **params)
    shown = terminal.getvalue()
    assert ("tuned lens" if method == "tuned-lens" else "sae on layer_") in shown
    assert "/2 [" in shown and "epoch" in shown  # a bar over the 2 epochs
    pipe = io.StringIO()
    monkeypatch.setattr(sys, "stderr", pipe)
    archscope.run_method(method, a.backend, data, **params)
    assert pipe.getvalue() == ""
