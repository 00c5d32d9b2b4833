"""docs/graphs.md's example runs as written (its second block only where the graph computation,
``archscope_graphs.attribution``, is installed)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

import pytest

DOC = Path(__file__).resolve().parents[3] / "docs" / "graphs.md"


def _blocks() -> list[str]:
    text = DOC.read_text()
    example = text[text.index("## Example") :]
    return re.findall(r"```python\n(.*?)```", example, re.S)


def _run_first_block(tmp_path: Path, monkeypatch: Any) -> dict[str, Any]:
    pytest.importorskip("archscope_zoo")
    blocks = _blocks()
    assert len(blocks) == 2
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {"__name__": "docs_example"}
    exec(compile(blocks[0], str(DOC), "exec"), namespace)
    return namespace


def test_the_transcoder_example_runs(tmp_path: Path, monkeypatch: Any) -> None:
    namespace = _run_first_block(tmp_path, monkeypatch)
    metrics = namespace["metrics"]
    assert set(metrics.explained_variance) == {"layer_0.mlp", "layer_1.mlp"}
    assert metrics.replaced_loss < metrics.zero_ablated_loss
    assert (tmp_path / "zoo-transcoders" / "transcoders.json").is_file()
    assert (tmp_path / "zoo-transcoders-ct" / "layer_1.safetensors").is_file()


def test_the_graph_example_runs(tmp_path: Path, monkeypatch: Any) -> None:
    if importlib.util.find_spec("archscope_graphs.attribution") is None:
        pytest.skip("the example's graph block needs archscope_graphs.attribution")
    namespace = _run_first_block(tmp_path, monkeypatch)
    exec(compile(_blocks()[1], str(DOC), "exec"), namespace)
    assert (tmp_path / "zoo-graph" / "cat.json").is_file()
    assert (tmp_path / "zoo-graph" / "cat.html").is_file()
