"""Circuit tests against ground truth: a GPT-2 whose weights implement induction by hand
(`ground_truth.trained`), its untrained twin, and the four architectures of `archs`."""

from __future__ import annotations

import math

import ground_truth as gt
import pytest
import torch
from archs import ARCH_NAMES, Arch, arch, words

import archscope
from archscope.errors import InputError, ParameterError
from archscope.methods.circuits import (
    CircuitScore,
    candidate_ids,
    copy_score,
    early_token_attention,
    induction_head_score,
    pattern_sites,
    run_all_circuits,
)
from archscope.testing import MethodContract


class ForwardLog:
    """Records every forward call of a module (a pre-hook), with its token ids."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.calls: list[torch.Tensor] = []
        self.handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):  # type: ignore[no-untyped-def]
        ids = kwargs.get("input_ids", kwargs.get("input", args[0] if args else None))
        self.calls.append(ids.detach().clone())

    def __enter__(self) -> ForwardLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny models run faster on one thread on a shared machine."""
    with gt.one_thread():
        yield


def test_induction_on_the_copying_model_is_far_above_chance_and_untrained_sits_at_chance():
    trained = induction_head_score(gt.trained(), n_trials=40)
    untrained = induction_head_score(gt.untrained(), n_trials=40)
    assert trained.baseline == pytest.approx(1 / gt.VOCAB)
    assert trained.relative >= 100, trained
    assert trained.raw["top1_accuracy"] > 0.95
    assert 0.5 < untrained.relative < 2.0, untrained
    # On the first repeat the continuation cannot be known: the copying model is not right there.
    assert trained.raw["first_repeat_prob"] < 10 * trained.baseline


def _hand_attention(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Attention probabilities straight from the Hugging Face model (no archscope)."""
    with torch.no_grad():
        return model(input_ids=ids, output_attentions=True).attentions


def test_per_head_scores_single_out_the_planted_heads_as_the_attention_shows():
    model = gt.trained()
    score = induction_head_score(model, n_pairs=12, seq_len=4, n_trials=16)
    heads = score.raw["heads"]["per_layer"]
    induction = torch.tensor([heads[f"layer_{i}"]["induction"] for i in range(2)])
    previous = torch.tensor([heads[f"layer_{i}"]["previous_token"] for i in range(2)])
    assert divmod(int(induction.argmax()), gt.HEADS) == gt.INDUCTION_HEAD
    assert divmod(int(previous.argmax()), gt.HEADS) == gt.PREV_HEAD
    assert induction[gt.INDUCTION_HEAD] > 0.95 and previous[gt.PREV_HEAD] > 0.95
    top = score.raw["heads"]["top_induction"][0]
    assert (top["layer"], top["head"]) == gt.INDUCTION_HEAD

    # By hand, on one sequence: lead-in 4, block of 13, block again.
    g = torch.Generator().manual_seed(3)
    block = torch.randperm(gt.VOCAB - 4, generator=g)[:13] + 4
    ids = torch.cat([torch.tensor([7, 8, 9, 10]), block, block]).unsqueeze(0)
    att = _hand_attention(model, ids)
    q = torch.arange(4 + 13, 4 + 13 + 12)  # second repeat, tokens with a continuation
    k = torch.arange(4 + 1, 4 + 1 + 12)  # the token after their first occurrence
    hand_induction = att[1][0, :, q, k].mean(-1)
    pos = torch.arange(1, ids.shape[1])
    hand_previous = att[0][0, :, pos, pos - 1].mean(-1)
    assert int(hand_induction.argmax()) == gt.INDUCTION_HEAD[1] and hand_induction.max() > 0.95
    assert int(hand_previous.argmax()) == gt.PREV_HEAD[1] and hand_previous.max() > 0.95
    # The zero heads attend uniformly: their scores are averages of 1 / (query + 1).
    uniform_induction = (1.0 / (q + 1).double()).mean()
    uniform_previous = (1.0 / (pos + 1).double()).mean()
    for layer, head in [(0, 1), (0, 3), (1, 2)]:
        assert induction[layer, head] == pytest.approx(float(uniform_induction), abs=1e-5)
        assert previous[layer, head] == pytest.approx(float(uniform_previous), abs=1e-5)


def test_one_forward_per_batch_of_trials():
    model = gt.untrained()
    with ForwardLog(model) as log:
        score = induction_head_score(model, n_trials=50, batch_size=16)
    assert len(log.calls) == 4 == score.raw["n_forwards"]
    assert [c.shape[0] for c in log.calls] == [16, 16, 16, 2]
    with ForwardLog(model) as log:
        copied = copy_score(model, None, n_trials=30, batch_size=8)
    assert len(log.calls) == 4 == copied.raw["n_forwards"]


@pytest.mark.parametrize("name", ARCH_NAMES)
def test_vocabulary_of_100_and_special_ids_left_out(name: str):
    a: Arch = arch(name)
    embedding = next(m for m in a.model.modules() if isinstance(m, torch.nn.Embedding))
    with ForwardLog(embedding) as log:
        score = induction_head_score(a.model, n_trials=6, tokenizer=a.tokenizer)
        copy_score(a.model, a.tokenizer, n_trials=4)
    drawn = torch.cat([c.flatten() for c in log.calls])
    special = set(a.tokenizer.all_special_ids)
    assert int(drawn.max()) < 100 and not special & set(drawn.tolist())
    assert score.baseline == pytest.approx(0.01)
    assert 0 <= score.score <= 1 and math.isfinite(score.relative)
    assert score.raw["candidate_ids"] == 100 - len(special)
    # per-head scores wherever a layer has softmax or effective attention
    assert ("heads" in score.raw) == bool(pattern_sites(a.backend))
    if "attention_patterns" in a.backend.capabilities:
        assert "heads" in score.raw


def test_candidate_ids_refuse_a_too_large_vocab_size():
    backend = arch("gpt2").backend
    with pytest.raises(ParameterError, match="outside the model's vocabulary of 100"):
        candidate_ids(backend, vocab_size=1000)
    with pytest.raises(ParameterError, match="needs 200 distinct token ids"):
        induction_head_score(backend, n_pairs=199)


def test_copy_scores_every_token_of_each_word():
    copier = copy_score(gt.trained(), None, n_trials=20, n_words=5, max_word_tokens=3)
    one_token = copy_score(gt.trained(), None, n_trials=20, n_words=5, max_word_tokens=1)
    # Multi-token words: more tokens scored than words, each word judged on all its tokens.
    assert copier.raw["tokens_scored"] > 20 * 5 == one_token.raw["tokens_scored"]
    assert (
        one_token.raw["word_accuracy"] == one_token.raw["first_token_accuracy"] == one_token.score
    )
    assert copier.score > 0.9 and copier.raw["word_accuracy"] > 0.85
    assert copier.relative > 100
    blank = copy_score(gt.untrained(), None, n_trials=20)
    assert blank.score < 0.05
    assert blank.raw["word_accuracy"] <= blank.raw["first_token_accuracy"]


@pytest.mark.parametrize("name", ARCH_NAMES)
def test_concentration_matches_entropies_computed_by_hand(name: str):
    a = arch(name)
    texts = words(5, seed=4)  # ragged lengths: padding must not count
    score = early_token_attention(a.model, a.tokenizer, texts=texts)
    hand = []
    for text in texts:
        ids = torch.tensor([a.tokenizer(text)["input_ids"]])
        with torch.no_grad():
            out = a.model(input_ids=ids)
        logits = out if isinstance(out, torch.Tensor) else out.logits
        logp = torch.log_softmax(logits[0, -1].float(), -1)
        hand.append(float(-(logp.exp() * logp).sum()))
    assert score.raw["per_text_entropy"] == pytest.approx(hand, abs=1e-4)
    assert score.baseline == pytest.approx(math.log(100))
    assert score.relative == pytest.approx(sum(hand) / len(hand) / math.log(100), abs=1e-5)


def test_concentration_separates_a_sharp_model_from_a_random_one():
    sharp = early_token_attention(gt.trained())
    flat = early_token_attention(gt.untrained())
    assert sharp.relative < 0.5 < 0.9 < flat.relative
    assert set(flat.raw["first_token_attention"]) == {"layer_0", "layer_1"}


def test_texts_without_a_tokenizer_are_refused():
    with pytest.raises(InputError, match="no tokenizer"):
        early_token_attention(arch("gpt2").model, None, texts=["w5 w6"])


def test_run_all_and_the_registered_method():
    results = run_all_circuits(arch("lstm").model, arch("lstm").tokenizer)
    assert set(results) == {"induction_head", "copy_circuit", "early_token_concentration"}
    assert all(isinstance(r, CircuitScore) for r in results.values())
    backend = archscope.Backend.for_model(gt.trained())
    report = archscope.run_method("circuits", backend, None, n_trials=10, n_pairs=8)
    assert report.scores["induction_head"].relative > 100
    assert "layer 1 head 0" in report.to_markdown()
    with pytest.raises(ParameterError, match="n_trials"):
        archscope.run_method("circuits", backend, None, n_trials=0)


class TestCircuitsMethodContract(MethodContract):
    method_name = "circuits"


@pytest.mark.parametrize("name", ARCH_NAMES)
def test_scores_from_unembedded_positions_equal_scores_from_the_full_logits(name: str):
    """Induction and copy read the logits of a few positions: a backend that can unembed runs
    to its last layer and unembeds only those; the scores equal those read from the model's
    full logits (a copy of the backend without 'unembed')."""
    a = arch(name)
    if "unembed" not in a.backend.capabilities:
        pytest.skip(f"{name}: no unembed, the full logits are the only path")
    full = type(a.backend)(a.model)
    full.capabilities = frozenset(a.backend.capabilities - {"unembed"})
    ind_a = induction_head_score(a.backend, tokenizer=a.tokenizer, n_trials=12, n_pairs=5)
    ind_b = induction_head_score(full, tokenizer=a.tokenizer, n_trials=12, n_pairs=5)
    assert ind_a.score == pytest.approx(ind_b.score, rel=1e-5, abs=1e-9)
    for key in ("first_repeat_prob", "top1_accuracy"):
        assert ind_a.raw[key] == pytest.approx(ind_b.raw[key], rel=1e-5, abs=1e-9)
    copy_a = copy_score(a.backend, a.tokenizer, n_trials=10)
    copy_b = copy_score(full, a.tokenizer, n_trials=10)
    for key in ("token_accuracy", "word_accuracy", "list_accuracy", "tokens_scored"):
        assert copy_a.raw[key] == copy_b.raw[key]


def test_top1_without_argmax_equals_argmax_with_ties_and_nans():
    """`_is_top1` (the maximum the logsumexp needs anyway, argmax only for ties and NaNs)
    equals ``argmax == target`` wherever argmax's first-index rule decides: ties for the
    maximum before and after the target, NaN rows, random rows hit and missed."""
    from archscope.methods.circuits import _is_top1

    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 40, 50, generator=g)
    targets = torch.randint(50, (6, 40), generator=g)
    z[0, :20] = 0.0  # ties everywhere: argmax is id 0
    z[1, :10].scatter_(-1, targets[1, :10, None], 9.0)  # the target is the unique maximum
    z[1, 10:20].scatter_(-1, targets[1, 10:20, None], 9.0)
    z[1, 10:20, 0] = 9.0  # ... tied with id 0: only a target of 0 is argmax's
    z[2, :5, 7] = float("nan")  # argmax takes the NaN's id
    z[2, 5:10, 3] = float("inf")
    targets[2, 5:8] = 3
    want = z.argmax(-1) == targets
    got = _is_top1(z, targets, z.amax(-1))
    assert torch.equal(got, want)
    assert 0 < int(want.sum()) < want.numel()  # hits and misses both tested


@pytest.mark.parametrize("name", ["gpt2", "mamba"])
def test_induction_and_copy_equal_their_argmax_and_full_read_references(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scores equal those of the previous computation: top-1 by argmax over the whole
    vocabulary, and copy's rectangular read with its padding unembedded too."""
    from archscope.methods import circuits

    a = arch(name)
    ind = induction_head_score(a.backend, tokenizer=a.tokenizer, n_trials=12, n_pairs=5)
    copy = copy_score(a.backend, a.tokenizer, n_trials=10)
    copier = copy_score(gt.trained(), None, n_trials=20, n_words=5, max_word_tokens=3)
    logits_at = circuits._logits_at

    def rectangular(backend, batch, read, capture=(), keep=None):  # type: ignore[no-untyped-def]
        result, logits = logits_at(backend, batch, read, capture)
        return result, logits if keep is None else logits[keep]

    monkeypatch.setattr(circuits, "_is_top1", lambda z, t, top: z.argmax(-1) == t)
    monkeypatch.setattr(circuits, "_logits_at", rectangular)
    ref_ind = induction_head_score(a.backend, tokenizer=a.tokenizer, n_trials=12, n_pairs=5)
    ref_copy = copy_score(a.backend, a.tokenizer, n_trials=10)
    ref_copier = copy_score(gt.trained(), None, n_trials=20, n_words=5, max_word_tokens=3)
    assert ind.raw == ref_ind.raw and ind.score == ref_ind.score
    assert copy.raw == ref_copy.raw
    assert copier.raw == ref_copier.raw
    assert copier.score > 0.9  # the hit path (targets at the maximum) is exercised
