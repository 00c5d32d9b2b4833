"""The conformance kit on a backend written outside the packages, as a third-party author
would write it from docs/plugin-authors.md: a gated linear recurrence LM (blocks return
``(hidden, state)``, the model returns a dict) whose per-layer state is read after each row's
last real token. The plugin is a real distribution, installed with pip."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import archscope.plugins
from archscope.testing import BackendContract

PLUGIN = Path(__file__).parent / "plugins" / "glr"


@pytest.fixture(scope="session")
def glr_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("glr-site")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--disable-pip-version-check",
            "--target",
            str(target),
            str(PLUGIN),
        ],
        check=True,
    )
    return target


@pytest.fixture
def with_glr(glr_site: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(glr_site))
    monkeypatch.setenv("PYTHONPATH", str(glr_site))  # the kit starts fresh interpreters
    importlib.invalidate_caches()
    yield archscope.plugins.refresh()
    monkeypatch.undo()
    for name in [m for m in sys.modules if m.startswith("archscope_testplugin_glr")]:
        del sys.modules[name]
    importlib.invalidate_caches()
    archscope.plugins.refresh()


def _unroll(model, ids):
    """Independent reference: the recurrence unrolled by hand from the model's weights."""
    out = {}
    x = model.embed(ids)
    out["embed"] = x
    for i, block in enumerate(model.blocks):
        value, gate = block.mixer.proj(block.norm(x)).chunk(2, dim=-1)
        a = torch.sigmoid(gate)
        s = torch.zeros_like(value[:, 0])
        steps = []
        for t in range(ids.shape[1]):
            s = a[:, t] * s + (1 - a[:, t]) * value[:, t]
            steps.append(s)
        mixed = block.mixer.out(torch.stack(steps, 1))
        x = x + mixed
        out[f"layer_{i}.mixer"], out[f"layer_{i}.residual"], out[f"layer_{i}.state"] = mixed, x, s
    out["final_norm"] = model.norm(x)
    out["logits"] = model.head(out["final_norm"])
    return out


class TestGLRBackendContract(BackendContract):
    backend_name = "glr"
    distribution = "archscope-testplugin-glr"

    @pytest.fixture(autouse=True)
    def _installed(self, with_glr):
        yield

    def model_names(self):
        return ["glr-3", "glr-2-wide"]

    def make_models(self):
        from archscope_testplugin_glr.model import build_glr

        return {"glr-3": build_glr(0), "glr-2-wide": build_glr(1, d_model=12, n_layers=2)}

    def make_foreign_models(self):
        return {"sequential": nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 5))}

    def reference_activations(self, model, batch):
        return _unroll(model, batch["input_ids"])


def test_state_after_last_real_token_under_right_padding(with_glr):
    from archscope_testplugin_glr.model import build_glr

    model = build_glr(2)
    backend = archscope.Backend.for_model(model)
    assert backend.name == "glr"
    ids = torch.randint(1, 23, (3, 7), generator=torch.Generator().manual_seed(0))
    lengths = [7, 3, 5]
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    sites = ["layer_0.state", "layer_2.state", "layer_1.residual"]
    result = backend.run(
        {"input_ids": ids * mask, "attention_mask": mask}, capture=sites, return_state=True
    )
    with torch.no_grad():
        for row, n in enumerate(lengths):
            alone = _unroll(model, ids[row : row + 1, :n])
            for site in ("layer_0.state", "layer_2.state"):
                torch.testing.assert_close(result[site][row], alone[site][0])
                torch.testing.assert_close(result.state[site][row], alone[site][0])
            torch.testing.assert_close(
                result["layer_1.residual"][row, :n], alone["layer_1.residual"][0]
            )
    # the model's own final state (after the padding) differs for the short rows
    with torch.no_grad():
        after_padding = model(ids * mask)["states"][0]
    assert not torch.allclose(after_padding[1], result["layer_0.state"][1])


def test_backend_and_registration_fit_in_80_lines():
    src = PLUGIN / "src" / "archscope_testplugin_glr"
    lines = [
        line
        for f in ("backend.py", "plugin.py")
        for line in (src / f).read_text().splitlines()
        if line.strip()
    ]
    assert len(lines) <= 80, len(lines)
