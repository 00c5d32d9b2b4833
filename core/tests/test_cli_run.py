"""`archscope run` on a model from the user's own code, typed --param parsing, `info`'s
parameter listing, and errors without tracebacks (exit 2 for usage, 1 for runtime)."""

from __future__ import annotations

import json
from pathlib import Path

USER_CODE = """
import torch
from torch import nn

class TinyRNN(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(20, 8)
        self.rnn = nn.GRU(8, 8, num_layers=2, batch_first=True)
        self.head = nn.Linear(8, 20)

    def forward(self, input_ids):
        return self.head(self.rnn(self.embed(input_ids))[0])

def build():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {f"t{i}": i for i in range(20)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="t0", pad_token="t0")
    return TinyRNN().eval(), tok
"""


def test_run_on_a_model_from_a_file_of_the_users_code(run_cli, tmp_path: Path) -> None:
    (tmp_path / "mymodel.py").write_text(USER_CODE)
    out = tmp_path / "stats.json"
    done = run_cli(
        "run",
        "activation-stats",
        f"{tmp_path / 'mymodel.py'}:build",
        "--text",
        "t1 t2 t3",
        "--text",
        "t4 t5",
        "--param",
        "sites=layer_0.hidden,layer_1.hidden",
        "--out",
        str(out),
        "--json",
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert [s["site"] for s in result["sites"]] == ["layer_0.hidden", "layer_1.hidden"]
    assert result["sites"][0]["n_vectors"] == 5  # real tokens only


def test_run_on_a_module_importable_from_the_current_folder(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    (tmp_path / "mymodel.py").write_text(USER_CODE)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARCHSCOPE_")}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "archscope",
            "run",
            "activation-stats",
            "mymodel:build",
            "--text",
            "t1 t2",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "layer_0.hidden" in done.stdout


def test_bad_parameter_is_a_usage_error_listing_valid_ones(run_cli, tmp_path: Path) -> None:
    (tmp_path / "m.py").write_text(USER_CODE)
    done = run_cli(
        "run",
        "activation-stats",
        f"{tmp_path / 'm.py'}:build",
        "--text",
        "t1",
        "--param",
        "site=layer_0.hidden",
    )
    assert done.returncode == 2
    assert "has no parameter 'site'; its parameters: sites: list[str] | None" in done.stderr
    assert "Traceback" not in done.stderr


def test_runtime_errors_have_no_traceback_unless_debug(run_cli, tmp_path: Path) -> None:
    done = run_cli("run", "activation-stats", f"{tmp_path / 'missing.py'}:build", "--text", "x")
    assert done.returncode == 1 and "no such file" in done.stderr
    assert "Traceback" not in done.stderr
    debug = run_cli(
        "--debug", "run", "activation-stats", f"{tmp_path / 'missing.py'}:build", "--text", "x"
    )
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_info_lists_each_parameter_with_type_and_default(run_cli) -> None:
    done = run_cli("info", "--json")
    assert done.returncode == 0, done.stderr
    methods = {m["name"]: m for m in json.loads(done.stdout)["methods"]}
    params = {p["name"]: p for p in methods["logit-lens"]["parameters"]}
    assert params["top_k"]["type"] == "int" and params["top_k"]["default"] == "5"
    assert methods["logit-lens"]["input"] == "batch" and methods["logit-lens"]["arity"] == 1
