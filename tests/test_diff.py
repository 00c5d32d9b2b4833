"""Model diff on a transformer, a Mamba, a hybrid and an LSTM: a model against itself is exactly
zero, a copy with one perturbed layer changes nothing before it and its local drift peaks at
it; statistics over real tokens only (padding-invariant, checked against a per-text
reference); circuit deltas raise on failure; the 0.2 calls, the method, the report and plot."""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch
from archs import Arch, arch, words

import archscope
from archscope import InputError, ParameterError
from archscope.data import Dataset
from archscope.methods.diff import ModelDiff, compare, diff_backends
from archscope.testing import MethodContract

PERTURBED = 1


def texts(n: int = 6, seed: int = 5) -> list[str]:
    return words(n, seed=seed)


@cache
def perturbed(name: str) -> Arch:
    """A copy of the model with the parameters of layer `PERTURBED` (only) nudged."""
    base = arch(name)
    model = copy.deepcopy(base.model)
    pattern = re.compile(rf"\.{PERTURBED}\.|_l{PERTURBED}(_|$)")
    gen = torch.Generator().manual_seed(0)
    touched = []
    with torch.no_grad():
        for key, p in model.named_parameters():
            if pattern.search(key) and p.numel() > 1:
                p.add_(0.2 * p.std() * torch.randn(p.shape, generator=gen))
                touched.append(key)
    assert touched, f"no parameters of layer {PERTURBED} found in {name}"
    return Arch(name, model, archscope.Backend.for_model(model), base.tokenizer)


def test_a_model_against_itself_is_exactly_zero(any_arch: Arch) -> None:
    twin = copy.deepcopy(any_arch.model)
    for other in (any_arch.model, twin):
        diff = compare(any_arch.model, other, any_arch.tokenizer, texts(), run_circuits=False)
        assert [d.layer_name for d in diff.layer_drift] == any_arch.backend.layer_names()
        for d in diff.layer_drift:
            assert (d.mean_l2_delta, d.relative_drift, d.cosine_similarity, d.local_drift) == (
                0.0,
                0.0,
                1.0,
                0.0,
            )
            assert d.top_shifted_neurons == []


def test_one_perturbed_layer_is_where_the_drift_starts_and_peaks(any_arch: Arch) -> None:
    ft = perturbed(any_arch.name)
    diff = compare(any_arch.model, ft.model, any_arch.tokenizer, texts(), run_circuits=False)
    drift = {d.layer: d for d in diff.layer_drift}
    print(
        any_arch.name,
        [(d.layer, round(d.relative_drift, 4), d.local_drift) for d in diff.layer_drift],
    )
    for layer, d in drift.items():
        if layer < PERTURBED:
            assert d.mean_l2_delta == 0.0 and d.cosine_similarity == 1.0
        else:
            assert d.mean_l2_delta > 1e-3 and d.cosine_similarity < 1.0
        # only the perturbed layer computes anything differently from the same input
        if layer == PERTURBED:
            assert d.local_drift is not None and d.local_drift > 1e-3
        else:
            assert d.local_drift == 0.0
    assert max(diff.layer_drift, key=lambda d: d.local_drift or 0.0).layer == PERTURBED
    assert diff.top_changed_layers(1)[0].layer >= PERTURBED


def test_drift_is_over_real_tokens_and_padding_invariant(any_arch: Arch) -> None:
    ft = perturbed(any_arch.name)
    data = Dataset.from_texts(texts(7, seed=9), tokenizer=any_arch.tokenizer)
    one = diff_backends(any_arch.backend, ft.backend, data, batch_size=1)
    batched = diff_backends(any_arch.backend, ft.backend, data, batch_size=7)
    # an independent reference: each text alone, unpadded, every token
    site = any_arch.backend.layer_names()[-1]
    dists, norms = [], []
    for ids in data.ids():
        a = any_arch.backend.run(torch.tensor([ids]), capture=[site])[site][0].double()
        b = ft.backend.run(torch.tensor([ids]), capture=[site])[site][0].double()
        dists.append((b - a).norm(dim=-1))
        norms.append(a.norm(dim=-1))
    ref = float(torch.cat(dists).mean())
    assert one.n_tokens == batched.n_tokens == sum(len(r) for r in data.ids())
    last = batched.layer_drift[-1]
    assert abs(last.mean_l2_delta - ref) < 1e-5
    assert abs(last.relative_drift - ref / float(torch.cat(norms).mean())) < 1e-5
    for x, y in zip(one.layer_drift, batched.layer_drift, strict=True):
        for field in ("mean_l2_delta", "relative_drift", "cosine_similarity", "local_drift"):
            assert abs(getattr(x, field) - getattr(y, field)) < 1e-5, field
        assert [u for u, _ in x.top_shifted_neurons[:3]] == [
            u for u, _ in y.top_shifted_neurons[:3]
        ]


@dataclass
class _Score:
    name: str
    score: float
    baseline: float = 0.0
    relative: float = 0.0
    raw: Any = None


def test_circuit_deltas_are_computed_and_failures_raise(monkeypatch: pytest.MonkeyPatch) -> None:
    a = arch("gpt2")
    ft = perturbed("gpt2")
    scores = {
        id(a.model): [_Score("induction", 0.5), _Score("copy", 0.0)],
        id(ft.model): [_Score("induction", 0.8), _Score("copy", 0.0)],
    }
    calls: list[Any] = []

    def run_all(model: Any, tokenizer: Any = None, device: str = "cpu") -> list[_Score]:
        calls.append((tokenizer, device))
        return scores[id(model)]

    monkeypatch.setattr(archscope.methods.circuits, "run_all_circuits", run_all)
    diff = compare(a.model, ft.model, a.tokenizer, texts(4))
    assert calls == [(a.tokenizer, "cpu")] * 2
    got = {c.name: c for c in diff.circuit_deltas}
    assert got["induction"].delta == pytest.approx(0.3)
    assert got["induction"].relative_change == pytest.approx(0.6)
    assert got["copy"].delta == 0.0 and got["copy"].relative_change == 0.0
    assert "| induction | 0.5 | 0.8 | +0.3 | +60.0% |" in diff.to_markdown()

    def broken(model: Any, tokenizer: Any = None, device: str = "cpu") -> list[_Score]:
        raise RuntimeError("circuit test failed")

    monkeypatch.setattr(archscope.methods.circuits, "run_all_circuits", broken)
    with pytest.raises(RuntimeError, match="circuit test failed"):
        compare(a.model, ft.model, a.tokenizer, texts(4))


def test_02_call_report_and_plot(tmp_path: Path) -> None:
    a = arch("gpt2")
    ft = perturbed("gpt2")
    diff = compare(
        a.model,
        ft.model,
        a.tokenizer,
        texts(4),
        backend_hint="transformer",
        run_circuits=False,
        max_length=32,
        device="cpu",
    )
    assert isinstance(diff, ModelDiff)
    assert (diff.arch_family, diff.n_layers, diff.n_calibration_texts) == ("transformer", 3, 4)
    top = diff.top_changed_layers(k=2)
    assert len(top) == 2 and top[0].relative_drift >= top[1].relative_drift
    md = diff.to_markdown()
    assert "| 1 | layer_1.residual |" in md and "Most changed layers" in md
    assert diff.to_dict()["layer_drift"][0]["layer_name"] == "layer_0.residual"
    try:
        import matplotlib  # noqa: F401  (the optional plot extra)
    except ImportError:  # without it, plotting says which extra to install
        with pytest.raises(archscope.ArchscopeError, match=r"archscope\[plot\]"):
            diff.plot(tmp_path / "drift.png")
        return
    png = diff.plot(tmp_path / "drift.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fig = diff.figure()
    line = fig.axes[0].lines[0]
    assert list(line.get_ydata()) == [d.relative_drift for d in diff.layer_drift]


def test_registered_method_matches_compare() -> None:
    a, ft = arch("lstm"), perturbed("lstm")
    data = Dataset.from_texts(texts(4), tokenizer=a.tokenizer)
    got = archscope.run_method("diff", a.backend, ft.backend, data, top_k_units=3)
    direct = compare(a.model, ft.model, a.tokenizer, texts(4), run_circuits=False)
    for x, y in zip(got.layer_drift, direct.layer_drift, strict=True):
        assert x.mean_l2_delta == pytest.approx(y.mean_l2_delta, abs=1e-6)
        assert len(x.top_shifted_neurons) <= 3
    with pytest.raises(ParameterError, match="top_k_units"):
        archscope.run_method("diff", a.backend, ft.backend, data, top_k_units=0)


def test_bad_input_gets_typed_errors() -> None:
    a = arch("gpt2")
    with pytest.raises(InputError, match="one architecture"):
        compare(a.model, arch("lstm").model, a.tokenizer, texts(2), run_circuits=False)
    with pytest.raises(InputError, match="calibration_texts"):
        compare(a.model, a.model, a.tokenizer, [], run_circuits=False)
    with pytest.raises(InputError, match="calibration_texts"):
        compare(a.model, a.model, a.tokenizer, "w4 w5", run_circuits=False)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="tokenizer"):
        diff_backends(a.backend, a.backend, texts(2))
    with pytest.raises(ParameterError, match="top_k_units"):
        compare(a.model, a.model, a.tokenizer, texts(2), run_circuits=False, top_k_units=0)


class TestDiffMethodContract(MethodContract):
    """The method conformance kit on the registered ``diff`` method."""

    method_name = "diff"
