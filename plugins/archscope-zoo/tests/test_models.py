"""Ground truth on the shipped zoo models, measured here with torch and the backend protocol:
they load offline through ``zoo:``, their held-out loss is what the manifest says, a linear
probe finds the planted attributes, the transformer copies repeated spans with an induction
head, and state patching on the Mamba and the LSTM reproduces the source run."""

from __future__ import annotations

import os
from functools import cache
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may touch the network

import archscope
import archscope_zoo
from archscope.errors import ModelSourceError
from archscope_zoo import ALL_MODEL_NAMES, MODEL_NAMES, manifest, models_dir


@cache
def zoo(name: str) -> tuple[Any, Any, Any]:
    return archscope.load_model(f"zoo:{name}")


def batch_of(tokenizer: Any, texts: list[str], eos: bool = False) -> dict[str, torch.Tensor]:
    """Right-padded ids and mask of ``texts`` (each followed by ``</s>`` when ``eos``)."""
    rows = [
        tokenizer(t, add_special_tokens=False)["input_ids"] + ([2] if eos else []) for t in texts
    ]
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Probability that a random positive outscores a random negative (ties count half)."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    greater = (pos[:, None] > neg[None, :]).float().mean()
    ties = (pos[:, None] == neg[None, :]).float().mean()
    return float(greater + 0.5 * ties)


def fit_logistic(x: torch.Tensor, y: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Multinomial logistic regression with a small L2 penalty, by L-BFGS: weights
    (d + 1, n_classes) for standardised features with a bias column appended."""
    weights = torch.zeros(x.shape[1] + 1, n_classes, requires_grad=True)
    features = torch.cat([x, torch.ones(len(x), 1)], dim=1)
    optimiser = torch.optim.LBFGS([weights], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = (
            torch.nn.functional.cross_entropy(features @ weights, y)
            + 1e-2 * weights[:-1].pow(2).sum()
        )
        loss.backward()
        return loss

    optimiser.step(closure)
    return weights.detach()


def probe_auroc(features: torch.Tensor, labels: torch.Tensor, n_classes: int) -> float:
    """Held-out AUROC (one-vs-rest, averaged over classes) of a logistic probe fitted on the
    first half and scored on the second half."""
    half = len(labels) // 2
    mean, std = features[:half].mean(0), features[:half].std(0) + 1e-6
    x = (features - mean) / std
    weights = fit_logistic(x[:half], labels[:half], n_classes)
    scores = torch.cat([x[half:], torch.ones(len(x) - half, 1)], dim=1) @ weights
    test = labels[half:]
    return (
        sum(
            auroc(scores[:, k] - scores.logsumexp(-1), (test == k).long()) for k in range(n_classes)
        )
        / n_classes
        if n_classes > 2
        else auroc(scores[:, 1] - scores[:, 0], test)
    )


# -- shipping ----------------------------------------------------------------------------------
def test_every_model_is_shipped_with_weights_and_the_shared_tokenizer_under_20_mb() -> None:
    folder = models_dir()
    total = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert total < 20e6
    data = manifest()
    assert set(data["models"]) == set(ALL_MODEL_NAMES)
    for name in ALL_MODEL_NAMES:
        record = data["models"][name]
        files = {f.name for f in (folder / name).iterdir()}
        assert "model.safetensors" in files
        assert record["bytes"] == sum(f.stat().st_size for f in (folder / name).iterdir())
        assert record["train_steps"] > 0 and record["train_wall_s"] > 0
    assert (folder / "tokenizer" / "tokenizer.json").is_file()


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_zoo_models_load_offline_and_match_the_manifest_held_out_loss(name: str) -> None:
    model, tokenizer, backend = zoo(name)
    record = manifest()["models"][name]
    assert type(model).__name__ == record["class"] and not model.training
    assert sum(p.numel() for p in model.parameters()) == record["parameters"]
    assert len(tokenizer) == manifest()["vocab_size"]
    # the held-out loss, recomputed from the backend's logits (each text then </s>, cut to
    # the training length, positions that predict a real token)
    texts = archscope_zoo.datasets("heldout")
    assert isinstance(texts, list) and len(texts) == record["heldout_docs"]
    batch = batch_of(tokenizer, texts, eos=True)
    seq = manifest()["seq_len"]
    ids, mask = batch["input_ids"][:, :seq], batch["attention_mask"][:, :seq]
    logits = backend.run({"input_ids": ids, "attention_mask": mask}).logits
    nll = -logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
    real = mask[:, 1:].bool()
    loss = float(nll[real].mean())
    assert abs(loss - record["heldout_loss"]) < 2e-4, (loss, record["heldout_loss"])
    assert loss < 0.6 * torch.log(torch.tensor(len(tokenizer))).item()  # far below uniform


def test_unknown_zoo_names_list_the_shipped_ones() -> None:
    with pytest.raises(ModelSourceError, match="zoo:transformer, zoo:mamba, zoo:lstm, zoo:gdn"):
        archscope.load_model("zoo:gpt5")


# -- planted attributes ------------------------------------------------------------------------
#: Held-out AUROC each probe must reach. Topic is written in every noun and verb; the mood
#: of a training document decides its closing verdict (``it was good .``), so every model
#: carries it along from the sentiment adjectives (measured values in the package README).
PROBE_FLOOR = {"topic": 0.95, "sentiment": 0.95}


@pytest.mark.parametrize("task", ["sentiment", "topic"])
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_a_linear_probe_on_a_middle_layer_finds_the_planted_attribute(name: str, task: str) -> None:
    _, tokenizer, backend = zoo(name)
    data = archscope_zoo.datasets(task, 400)
    assert isinstance(data, archscope_zoo.LabelledSet)
    site = backend.layer_names()[(backend.n_layers - 1) // 2]
    batch = batch_of(tokenizer, data.texts)
    acts = backend.run(batch, capture=[site])[site]
    features = archscope.pool(acts, batch["attention_mask"], "mean")
    labels = torch.tensor(data.labels)
    n_classes = len(data.label_names)
    assert probe_auroc(features, labels, n_classes) >= PROBE_FLOOR[task]
    shuffled = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]
    assert abs(probe_auroc(features, shuffled, n_classes) - 0.5) < 0.15


# -- induction ---------------------------------------------------------------------------------
def copy_probability(model: Any, tokenizer: Any, data: archscope_zoo.InductionSet) -> float:
    """Mean probability of the right word at words 2..L of each span's second occurrence."""
    probs = []
    for text, span, (_, second) in zip(data.texts, data.spans, data.starts, strict=True):
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0]
        positions = torch.arange(second, second + len(span) - 1)
        probs.append(logits[positions].softmax(-1).gather(-1, ids[0, positions + 1, None]))
    return float(torch.cat(probs).mean())


def test_the_transformer_copies_repeated_spans_and_an_untrained_copy_does_not() -> None:
    model, tokenizer, _ = zoo("transformer")
    data = archscope_zoo.datasets("induction", 64)
    assert isinstance(data, archscope_zoo.InductionSet)
    chance = 1 / len(tokenizer)
    trained = copy_probability(model, tokenizer, data)
    assert trained >= 100 * chance
    torch.manual_seed(0)
    untrained = type(model)(model.config).eval()
    assert copy_probability(untrained, tokenizer, data) < 3 * chance
    assert abs(manifest()["models"]["transformer"]["induction_score"] - trained / chance) < 0.5


def test_one_head_attends_from_each_word_to_the_word_after_its_earlier_copy() -> None:
    _, tokenizer, backend = zoo("transformer")
    data = archscope_zoo.datasets("induction", 32)
    assert isinstance(data, archscope_zoo.InductionSet)
    sites = [f"layer_{i}.attn_pattern" for i in range(backend.n_layers)]
    per_text = []
    for text, span, (first, second) in zip(data.texts, data.spans, data.starts, strict=True):
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        result = backend.run(ids, capture=sites)
        queries = torch.arange(second + 1, second + len(span))  # second copy, 2nd word on
        keys = queries - (second - first) + 1  # the word after the same word's first copy
        per_text.append(torch.stack([result[s][0][:, queries, keys].mean(-1) for s in sites]))
    scores = torch.stack(per_text).mean(0)  # (layer, head)
    layer, head = divmod(int(scores.argmax()), scores.shape[1])
    best = float(scores[layer, head])
    others = scores.flatten()[torch.arange(scores.numel()) != scores.argmax()]
    assert layer >= 1  # an induction head needs an earlier layer's previous-token information
    assert best > 0.5 and best > 3 * float(others.median()), scores


# -- state patching ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mamba", "lstm"])
def test_state_patching_reproduces_the_source_run(name: str) -> None:
    model, tokenizer, backend = zoo(name)
    texts = archscope_zoo.datasets("heldout", 6)
    assert isinstance(texts, list)
    ids = batch_of(tokenizer, texts)["input_ids"][:, :24]
    target, source, suffix = ids[:3, :12], ids[3:, :12], ids[3:, 12:24]
    patched = backend.state_patch(target, source, suffix).logits
    with torch.no_grad():
        out = model(input_ids=torch.cat([source, suffix], dim=1))
    reference = (out.logits if hasattr(out, "logits") else out)[:, 12:]
    torch.testing.assert_close(patched, reference, atol=1e-5, rtol=0)
    with torch.no_grad():
        out = model(input_ids=torch.cat([target, suffix], dim=1))
    unpatched = (out.logits if hasattr(out, "logits") else out)[:, 12:]
    assert (patched - unpatched).abs().max() > 1e-2  # the state carried real information
