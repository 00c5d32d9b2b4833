"""Ground truth on the shipped gated delta net (``zoo:gdn``, a Qwen3.5 text model of recurrent
layers only, trained on multi-query associative recall): it recalls the value bound to an asked
key on held-out sequences far above chance and an untrained copy does not; a linear probe (the
``probe`` method) reads a stored key's value from the residual stream and from the recurrent
state; swapping the state after a context binding k -> v1 for the state after the same context
binding k -> v2 swaps the recalled value; and, through effective attention, its heads attend
from an asked key to the value after that key's earlier occurrence, which an untrained copy's
heads do not."""

from __future__ import annotations

import os
import random
from functools import cache
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may touch the network

import archscope
import archscope_zoo
from archscope.data import Dataset
from archscope.methods.circuits import induction_head_score
from archscope.methods.probes import ProbeConfig, ProbeFit, probe_method
from archscope_zoo import manifest, models_dir, recall
from archscope_zoo.train import RECIPES, build_model, recall_metrics

CHANCE = 1 / len(recall.values())


@cache
def gdn() -> tuple[Any, Any, Any]:
    return archscope.load_model("zoo:gdn")


@cache
def untrained() -> Any:
    """The recipe's starting point: the same config, initialised as training initialises it."""
    _, tokenizer, _ = gdn()
    return build_model("gdn", len(tokenizer), seed=0).eval()


def ids_of(tokenizer: Any, texts: list[str]) -> torch.Tensor:
    """Token ids of texts of equal length (one word, one token)."""
    rows = tokenizer(texts, add_special_tokens=False)["input_ids"]
    assert len({len(r) for r in rows}) == 1
    return torch.tensor(rows)


def last_logits(backend: Any, ids: torch.Tensor) -> torch.Tensor:
    logits: torch.Tensor = backend.run(ids).logits
    return logits[:, -1]


# -- shipping ----------------------------------------------------------------------------------
def test_gdn_ships_as_safetensors_with_a_recurrent_only_config_under_2_mb() -> None:
    folder = models_dir() / "gdn"
    files = {f.name: f.stat().st_size for f in folder.iterdir()}
    assert "model.safetensors" in files and "config.json" in files
    assert not [n for n in files if n.endswith((".bin", ".pt", ".pkl"))]
    record = manifest()["models"]["gdn"]
    assert record["bytes"] == sum(files.values()) < 2e6
    model, tokenizer, backend = gdn()
    assert type(model).__name__ == record["class"] == "Qwen3_5ForCausalLM"
    assert set(model.config.layer_types) == {"linear_attention"}
    assert sum(p.numel() for p in model.parameters()) == record["parameters"]
    assert len(tokenizer) == manifest()["vocab_size"] and not model.training
    assert backend.name == "hybrid" and "state_patch" in backend.capabilities
    states = [n for n, info in backend.sites().items() if info.kind == "state"]
    assert "layer_0.ssm_state" in states and "layer_1.ssm_state" in states


# -- recall ------------------------------------------------------------------------------------
def backend_recall(backend: Any, tokenizer: Any, data: recall.RecallSet) -> tuple[float, float]:
    """Answer loss and accuracy from the backend's logits (one run per group of texts of equal
    length, so no padding), scored against the bindings the texts were written from (not the
    training script's targets)."""
    losses, hits = [], []
    groups: dict[int, list[int]] = {}
    for row, text in enumerate(data.texts):
        groups.setdefault(len(text.split()), []).append(row)
    for rows in groups.values():
        ids = ids_of(tokenizer, [data.texts[r] for r in rows])
        logits = backend.run(ids).logits
        for i, row in enumerate(rows):
            answers = tokenizer.convert_tokens_to_ids(data.answers(row))
            for position, answer in zip(data.answer_positions(row), answers, strict=True):
                assert int(ids[i, position + 1]) == answer
                losses.append(-float(logits[i, position].log_softmax(-1)[answer]))
                hits.append(int(logits[i, position].argmax()) == answer)
    return sum(losses) / len(losses), sum(hits) / len(hits)


def test_recall_of_held_out_bindings_is_far_above_chance_and_matches_the_manifest() -> None:
    _, tokenizer, backend = gdn()
    record = manifest()["models"]["gdn"]
    data = archscope_zoo.datasets("recall", record["heldout_docs"])
    assert isinstance(data, recall.RecallSet)
    # sequences of 4 or more bindings are never among the training ones (of 1 or 2 bindings
    # there are only 2,400 and 11 million, so the training set holds some of those too)
    recipe = RECIPES["gdn"]
    seen = set(recall.training_set(recipe.steps * recipe.batch, seed=recipe.seed).texts)
    long = [t for t, b in zip(data.texts, data.bindings, strict=True) if len(b) >= 4]
    assert len(long) > len(data) // 2 and seen.isdisjoint(long)
    loss, accuracy = backend_recall(backend, tokenizer, data)
    assert abs(loss - record["heldout_loss"]) < 2e-4, (loss, record["heldout_loss"])
    assert abs(accuracy - record["recall_accuracy"]) < 1e-3
    assert accuracy >= 0.9 and accuracy >= 20 * CHANCE
    # eight bindings, the most the model was trained on, are still recalled
    eight = recall.recall_set(128, pairs=8)
    assert backend_recall(backend, tokenizer, eight)[1] >= 0.75


def test_an_untrained_copy_recalls_at_chance() -> None:
    _, tokenizer, _ = gdn()
    data = recall.recall_set(128)
    accuracy = recall_metrics(untrained(), tokenizer, data)["accuracy"]
    assert accuracy < 2 * CHANCE


# -- probes ------------------------------------------------------------------------------------
KEY = recall.keys()[0]
VALUES = recall.values()[:2]  # what KEY is bound to: label 0 for the first, 1 for the second


def probe_contexts(n: int, seed: int) -> tuple[list[str], list[int]]:
    """Contexts of 6 bindings in random order: KEY -> VALUES[label], another key -> the other
    of VALUES, four more keys -> other values; labels balanced. Both VALUES occur in every
    context, so only the binding, not the presence of a word, tells the label."""
    rng = random.Random(seed)
    texts, labels = [], []
    others_keys = [k for k in recall.keys() if k != KEY]
    others_values = [v for v in recall.values() if v not in VALUES]
    for i in range(n):
        label = i % 2
        keys = rng.sample(others_keys, 5)
        pairs = [(KEY, VALUES[label]), (keys[0], VALUES[1 - label])]
        pairs += list(zip(keys[1:], rng.sample(others_values, 4), strict=True))
        rng.shuffle(pairs)
        texts.append(" ".join(w for pair in pairs for w in pair))
        labels.append(label)
    return texts, labels


def test_a_probe_reads_the_value_bound_to_a_key_from_the_residual_at_its_query() -> None:
    _, tokenizer, backend = gdn()
    texts, labels = probe_contexts(200, seed=0)
    asked = [f"{t} {recall.SEPARATOR} {KEY}" for t in texts]  # the residual where KEY is asked
    site = backend.layer_names()[-1]
    options = dict(site=site, pool="last", solver="newton", folds=4, epochs=30)
    report = probe_method(
        backend, Dataset.from_texts(asked, labels, tokenizer=tokenizer), **options
    )
    assert report.heldout_auroc >= 0.95, report
    shuffled = Dataset.from_texts(asked, random.Random(1).sample(labels, len(labels)), tokenizer)
    control = probe_method(backend, shuffled, **options)
    assert abs(control.heldout_auroc - 0.5) < 0.15, control
    # without the question the last residual is a random value's: nothing to read there
    untouched = probe_method(backend, Dataset.from_texts(texts, labels, tokenizer), **options)
    assert untouched.heldout_auroc < report.heldout_auroc - 0.2, untouched


def test_a_probe_reads_the_value_bound_to_a_key_from_the_recurrent_state() -> None:
    _, tokenizer, backend = gdn()
    train_texts, train_labels = probe_contexts(200, seed=0)
    test_texts, test_labels = probe_contexts(200, seed=1)

    def states(texts: list[str], site: str) -> torch.Tensor:
        ids = ids_of(tokenizer, texts)
        state: torch.Tensor = backend.run(ids, return_state=True, stop_early=False).state[site]
        return state.flatten(1).float()  # (batch, heads * key_dim * value_dim)

    aurocs = {}
    for i in range(backend.n_layers):
        site = f"layer_{i}.ssm_state"
        probe = ProbeFit(ProbeConfig(layer_name=site, solver="newton", weight_decay=1e-2), 1024)
        metrics = probe.train(
            states(train_texts, site),
            torch.tensor(train_labels),
            epochs=30,
            held_out=(states(test_texts, site), torch.tensor(test_labels)),
        )
        aurocs[site] = metrics.val_auroc
    assert max(aurocs.values()) >= 0.95, aurocs


# -- state patching ----------------------------------------------------------------------------
def test_swapping_the_state_of_one_binding_swaps_the_recalled_value() -> None:
    _, tokenizer, backend = gdn()
    rng = random.Random(3)
    rows = []
    for _ in range(48):
        keys = rng.sample(recall.keys(), 6)
        values = rng.sample(recall.values(), 7)
        where = rng.randrange(6)
        pairs = list(zip(keys, values[:6], strict=True))
        other = list(pairs)
        other[where] = (keys[where], values[6])
        rows.append((pairs, other, keys[where], values[where], values[6]))

    def text(pairs: list[tuple[str, str]]) -> str:
        return " ".join(w for pair in pairs for w in pair)

    prefix = ids_of(tokenizer, [text(r[0]) for r in rows])  # k -> v1
    source = ids_of(tokenizer, [text(r[1]) for r in rows])  # the same context, k -> v2
    suffix = ids_of(tokenizer, [f"{recall.SEPARATOR} {r[2]}" for r in rows])
    v1 = torch.tensor(tokenizer.convert_tokens_to_ids([r[3] for r in rows]))
    v2 = torch.tensor(tokenizer.convert_tokens_to_ids([r[4] for r in rows]))
    clean = last_logits(backend, torch.cat([prefix, suffix], dim=1)).argmax(-1)
    assert float((clean == v1).float().mean()) >= 0.8  # the model recalls v1 unpatched

    patched = backend.state_patch(prefix, source, suffix).logits[:, -1].argmax(-1)
    assert float((patched == v2).float().mean()) >= 0.8
    assert float((patched == v1).float().mean()) <= 0.1
    # the same through run(initial_state=...): continue the question from the other context
    start = backend.run(source, return_state=True, stop_early=False).state
    continued = backend.run(suffix, initial_state=start).logits[:, -1]
    full = last_logits(backend, torch.cat([source, suffix], dim=1))
    torch.testing.assert_close(continued, full, atol=1e-5, rtol=0)
    # the matrix states alone carry the binding: the conv windows (the context's last three
    # words) are left as they were and the recalled value still follows the patched states
    matrices = [f"layer_{i}.ssm_state" for i in range(backend.n_layers)]
    only_matrices = backend.state_patch(prefix, source, suffix, sites=matrices).logits[:, -1]
    moved = float((only_matrices.argmax(-1) == v2).float().mean())
    assert moved >= 0.7, moved


# -- induction through effective attention -------------------------------------------------------
def head_scores(result: Any, name: str) -> torch.Tensor:
    """Every head's induction score, (layer, head), from the circuits method's head table."""
    heads = result.raw.get("heads")
    assert heads, f"the circuits method reported no per-head scores for the {name} model"
    layers = sorted(heads["per_layer"], key=lambda k: int(k.split("_")[1]))
    return torch.tensor([heads["per_layer"][k]["induction"] for k in layers])


def test_heads_attend_from_a_repeated_value_to_the_one_after_it_and_untrained_heads_do_not() -> (
    None
):
    """The circuits method's induction test on blocks of values written twice: the model
    stores each value under the word before it (its short convolution mixes the previous
    word into the key), so reading a value back retrieves the word written after its first
    occurrence: effective attention from position t of the second copy to the position after
    the same word's first copy. Values only: keys are never stored under (the model writes at
    value positions). Measured with a hand-written unroll of the recurrence on the shipped
    weights: head 2 of layer 0 scores 0.044, every head of the recipe's initialisation at
    most 0.004 in absolute value."""
    _, tokenizer, backend = gdn()
    if "layer_0.effective_attention" not in backend.sites():
        pytest.skip("needs layer_i.effective_attention on gated delta nets")
    candidates = tokenizer.convert_tokens_to_ids(list(recall.values()))
    scores = {}
    for name, model in (("trained", backend), ("untrained", untrained())):
        result = induction_head_score(
            model, n_pairs=8, seq_len=4, n_trials=32, tokenizer=tokenizer, candidates=candidates
        )
        scores[name] = head_scores(result, name)
    trained = scores["trained"].flatten()
    best = float(trained.max())
    others = trained[torch.arange(trained.numel()) != trained.argmax()].abs()
    assert best >= 5 * float(scores["untrained"].abs().max()), scores
    assert best >= 5 * float(others.median()), scores
