"""The synthetic corpus: the same texts for the same seed, and the structure it promises is
really there (checked by parsing the texts, not by asking the generator)."""

from __future__ import annotations

import re

import pytest

import archscope_zoo
from archscope_zoo import corpus
from archscope_zoo.corpus import SENTIMENT_WORDS, TOPIC_WORDS
from archscope_zoo.tokenizer import build_tokenizer

SENTIMENT_OF = {w: s for s, words in SENTIMENT_WORDS.items() for w in words}
TOPIC_OF = {
    w: t for t, (nouns, verbs) in TOPIC_WORDS.items() for pair in (*nouns, *verbs) for w in pair
}
SINGULAR_NOUNS = {p[0] for nouns, _ in TOPIC_WORDS.values() for p in nouns}
PLURAL_NOUNS = {p[1] for nouns, _ in TOPIC_WORDS.values() for p in nouns}
SINGULAR_VERBS = {p[0] for _, verbs in TOPIC_WORDS.values() for p in verbs}
PLURAL_VERBS = {p[1] for _, verbs in TOPIC_WORDS.values() for p in verbs}


def test_same_seed_same_texts_other_seed_other_texts() -> None:
    assert corpus.training_texts(50) == corpus.training_texts(50)
    assert corpus.training_texts(50, seed=7) != corpus.training_texts(50)
    assert corpus.heldout_texts(50) != corpus.training_texts(50)
    for name in archscope_zoo.DATASETS:
        assert archscope_zoo.datasets(name, 20) == archscope_zoo.datasets(name, 20)
    assert archscope_zoo.datasets("sentiment", 20, seed=9) != archscope_zoo.datasets(
        "sentiment", 20
    )


def test_every_word_is_in_the_vocabulary_and_the_tokenizer_maps_words_to_single_ids() -> None:
    tokenizer = build_tokenizer()
    vocab = set(corpus.vocabulary())
    assert 200 <= len(vocab) <= 400 and len(tokenizer) == len(vocab)
    sentiment = archscope_zoo.datasets("sentiment", 50)
    assert isinstance(sentiment, corpus.LabelledSet)
    texts = corpus.training_texts(200) + sentiment.texts
    for text in texts:
        words = text.split()
        assert set(words) <= vocab
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.convert_ids_to_tokens(ids) == words
    assert tokenizer.pad_token_id == 0 and tokenizer.eos_token_id == 2


def test_documents_repeat_their_span_and_recall_a_binding() -> None:
    for text in corpus.training_texts(300):
        said = re.findall(r"(\w+) says : ([\w ]+?) \.", text)
        assert len(said) == 2 and said[0] == said[1], text  # the same speaker, the same span
        assert 3 <= len(said[0][1].split()) <= 8
        bindings = dict(re.findall(r"(?<!so )\b(\w+) likes the (\w+) \.", text))
        recalled = re.findall(r"so (\w+) likes the (\w+) \.", text)
        assert len(bindings) == 2 and len(recalled) == 1, text
        name, thing = recalled[0]
        assert bindings[name] == thing


def test_each_document_closes_with_the_verdict_of_its_mood() -> None:
    moods_seen = set()
    for text in corpus.training_texts(300):
        verdicts = re.findall(r"\. it was (\w+) \.", text)
        assert len(verdicts) == 1, text
        before = text[: text.index(" it was ")].split()
        moods = {SENTIMENT_OF[w] for w in before if w in SENTIMENT_OF}
        assert len(moods) <= 1, text  # one mood per document
        if moods:  # (all sentences neutral leaves nothing to agree with)
            mood = moods.pop()
            assert corpus.VERDICTS[mood] == verdicts[0], text
            moods_seen.add(mood)
    assert moods_seen == set(corpus.SENTIMENTS)


def _clauses(text: str) -> list[list[str]]:
    return [c.split() for c in text.split(" .") if c.strip()]


def test_verbs_agree_in_number_with_their_noun() -> None:
    checked = 0
    for text in corpus.training_texts(200):
        for words in _clauses(text):
            nouns = [w for w in words if w in SINGULAR_NOUNS | PLURAL_NOUNS]
            verbs = [w for w in words if w in SINGULAR_VERBS | PLURAL_VERBS]
            if verbs:
                assert len(nouns) == 1 and len(verbs) == 1
                assert (nouns[0] in SINGULAR_NOUNS) == (verbs[0] in SINGULAR_VERBS), words
                checked += 1
            if "is" in words or "are" in words:
                assert (nouns[0] in SINGULAR_NOUNS) == ("is" in words), words
    assert checked > 200


@pytest.mark.parametrize("task", ["sentiment", "topic"])
def test_probe_labels_are_the_planted_attribute(task: str) -> None:
    data = archscope_zoo.datasets(task, 200)
    assert isinstance(data, archscope_zoo.LabelledSet) and len(data) == 200
    counts = [data.labels.count(k) for k in range(len(data.label_names))]
    assert max(counts) - min(counts) <= 1  # balanced classes
    lookup = SENTIMENT_OF if task == "sentiment" else TOPIC_OF
    for text, label in zip(data.texts, data.labels, strict=True):
        found = {lookup[w] for w in text.split() if w in lookup}
        assert found == {data.label_names[label]}, text
    other = TOPIC_OF if task == "sentiment" else SENTIMENT_OF
    values = {frozenset(other[w] for w in t.split() if w in other) for t in data.texts}
    assert len(values) > 2  # the other attribute varies, so it cannot stand in for the label
    dataset = data.to_dataset(build_tokenizer())
    assert dataset.labels == data.labels and len(dataset.ids()) == 200


def test_agreement_pairs_differ_in_one_word_that_flips_the_verb_number() -> None:
    data = archscope_zoo.datasets("agreement", 40)
    assert isinstance(data, archscope_zoo.ContrastSet)
    for clean, corrupt, good, bad in zip(
        data.clean, data.corrupted, data.clean_answers, data.corrupted_answers, strict=True
    ):
        a, b = clean.split(), corrupt.split()
        assert len(a) == len(b) and sum(x != y for x, y in zip(a, b, strict=True)) == 1
        assert a[1] in SINGULAR_NOUNS and b[1] in PLURAL_NOUNS
        assert good in SINGULAR_VERBS and bad in PLURAL_VERBS and TOPIC_OF[good] == TOPIC_OF[a[1]]
    good_ids, bad_ids = data.answer_ids(build_tokenizer())
    assert all(g != b and g > 3 and b > 3 for g, b in zip(good_ids, bad_ids, strict=True))


def test_binding_pairs_ask_for_the_object_bound_to_the_queried_name() -> None:
    data = archscope_zoo.datasets("binding", 40)
    assert isinstance(data, archscope_zoo.ContrastSet)
    for clean, corrupt, good, bad in zip(
        data.clean, data.corrupted, data.clean_answers, data.corrupted_answers, strict=True
    ):
        a, b = clean.split(), corrupt.split()
        assert len(a) == len(b) and [i for i in range(len(a)) if a[i] != b[i]] == [len(a) - 3]
        bindings = dict(re.findall(r"(\w+) likes the (\w+) \.", clean))
        assert bindings[a[-3]] == good and bindings[b[-3]] == bad and good != bad


def test_induction_sets_locate_the_repeated_span() -> None:
    data = archscope_zoo.datasets("induction", 30)
    assert isinstance(data, archscope_zoo.InductionSet)
    for text, span, (first, second) in zip(data.texts, data.spans, data.starts, strict=True):
        words = text.split()
        assert 3 <= len(span) <= 8 and set(span) <= set(corpus.code_words())
        assert words[first : first + len(span)] == span == words[second : second + len(span)]
        assert second > first + len(span) and words[second - 3 : second] == [words[0], "says", ":"]
    assert set(data.texts).isdisjoint(corpus.training_texts(2000))


def test_unknown_data_set_names_say_what_exists() -> None:
    from archscope.errors import ParameterError

    with pytest.raises(ParameterError, match="sentiment, topic, agreement"):
        archscope_zoo.datasets("sentiments")
    with pytest.raises(ValueError, match="sentiment, topic"):
        corpus.probe_set("colour")
