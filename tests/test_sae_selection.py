"""The ``sae`` method's token selection (pooling, positions) and its labelled report: the best
single feature per label, checked against the trained SAE's codes computed by hand."""

from __future__ import annotations

import random

import pytest
import torch
from archs import arch

import archscope
from archscope.data import Dataset
from archscope.errors import ParameterError


def _labelled(tokenizer, n: int = 40) -> Dataset:
    """Texts whose label is whether they start with w7 (else w9)."""
    rng = random.Random(3)
    texts, labels = [], []
    for i in range(n):
        label = i % 2
        rest = " ".join(f"w{rng.randrange(20, 100)}" for _ in range(rng.randrange(3, 7)))
        texts.append(f"{'w7' if label else 'w9'} {rest}")
        labels.append(label)
    return Dataset.from_texts(texts, labels, tokenizer=tokenizer)


def _pairwise_auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    pos, neg = scores[labels == 1], scores[labels == 0]
    greater = (pos[:, None] > neg[None, :]).double().mean()
    ties = (pos[:, None] == neg[None, :]).double().mean()
    return float(greater + 0.5 * ties)


def test_best_single_feature_auroc_matches_a_hand_computation() -> None:
    a = arch("gpt2")
    data = _labelled(a.tokenizer)
    site = "layer_1.residual"
    report = archscope.run_method(
        "sae", a.backend, data, site=site, n_features=32, k=4, epochs=3, batch_size=64
    )
    assert set(report.feature_auroc) == {"1"}
    best = report.feature_auroc["1"]
    # the held-out texts: the method's seeded split (eval_fraction 0.2, seed 0)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0)).tolist()
    held = sorted(order[: round(len(data) * 0.2)])
    assert best["n_texts"] == len(held)
    per_text = []
    with torch.no_grad():
        for i in held:
            acts = a.backend.run(torch.tensor([data.ids()[i]]), capture=[site])[site][0]
            per_text.append(report.sae.encode(acts).double().mean(0))
    codes = torch.stack(per_text)
    labels = torch.tensor([data.labels[i] for i in held])
    aurocs = [_pairwise_auroc(codes[:, f], labels) for f in range(codes.shape[1])]
    f = max(range(len(aurocs)), key=lambda j: abs(aurocs[j] - 0.5))
    assert best["feature"] == f
    assert best["auroc"] == pytest.approx(max(aurocs[f], 1 - aurocs[f]), abs=1e-9)
    assert best["direction"] == ("higher" if aurocs[f] >= 0.5 else "lower")
    assert "| 1 | " in report.to_markdown()


def test_positions_and_pooling_select_what_the_sae_trains_on() -> None:
    a = arch("gpt2")
    data = _labelled(a.tokenizer, n=20)
    kwargs = {"site": "layer_0.residual", "n_features": 16, "k": 2, "epochs": 1, "batch_size": 32}
    n_train = 20 - round(20 * 0.2)
    first = archscope.run_method("sae", a.backend, data, positions="0", **kwargs)
    assert first.n_train_tokens == n_train and first.positions == [0]
    # position 0 holds w7 or w9 in every text, and the model is causal: two distinct vectors
    assert first.feature_auroc["1"]["auroc"] == pytest.approx(1.0)
    last = archscope.run_method("sae", a.backend, data, positions="last", **kwargs)
    pooled = archscope.run_method("sae", a.backend, data, pool="last", **kwargs)
    assert last.n_train_tokens == pooled.n_train_tokens == n_train
    assert pooled.pool == "last" and last.pool == "tokens"
    assert last.eval.mse == pytest.approx(pooled.eval.mse, rel=1e-5)
    with pytest.raises(ParameterError, match="use one of the two"):
        archscope.run_method("sae", a.backend, data, pool="mean", positions="0", **kwargs)
    with pytest.raises(ParameterError, match="selects no token"):
        archscope.run_method("sae", a.backend, data, positions="30", **kwargs)


def test_a_state_site_trains_on_one_vector_per_text() -> None:
    m = arch("mamba")
    data = _labelled(m.tokenizer, n=20)
    report = archscope.run_method(
        "sae", m.backend, data, site="layer_0.ssm_state", n_features=16, k=2, epochs=1
    )
    assert report.pool == "last" and report.n_train_tokens == 16
