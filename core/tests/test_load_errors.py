"""Loading a broken saved model gives one ModelSourceError naming the spec and the cause, and
the CLI prints it without a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from archscope import load_model
from archscope.errors import ModelSourceError


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from archscope_transformer.testing import tiny_model

    folder = tmp_path_factory.mktemp("saved") / "gpt2"
    tiny_model("gpt2").save_pretrained(folder)
    return folder


def test_truncated_weights(saved: Path, tmp_path: Path, run_cli) -> None:
    import shutil

    broken = tmp_path / "truncated"
    shutil.copytree(saved, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelSourceError, match=r"could not be loaded by the 'hf' source"):
        load_model(f"hf:{broken}")
    done = run_cli("run", "activation-stats", f"hf:{broken}", "--text", "w5")
    assert done.returncode == 1
    assert "could not be loaded" in done.stderr and "Traceback" not in done.stderr


def test_bad_config(saved: Path, tmp_path: Path) -> None:
    import shutil

    broken = tmp_path / "badconfig"
    shutil.copytree(saved, broken)
    config = json.loads((broken / "config.json").read_text())
    config["model_type"] = "no-such-architecture"
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelSourceError, match="no-such-architecture"):
        load_model(f"hf:{broken}")
