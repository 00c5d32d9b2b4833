"""A seeded synthetic corpus with planted structure, the training and evaluation data of the zoo
models: a small templated language whose documents repeat random spans and bind names to
objects (so in-context copying pays), carry a sentiment class and a topic (ground truth for
probes), and make verbs agree in number with a noun a few words back (contrast pairs).

Everything is a pure function of its seed: the same call gives the same texts on every machine.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from archscope.errors import ParameterError

#: Special tokens of the zoo tokenizer, in id order (pad=0, bos=1, eos=2, unk=3).
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")

SENTIMENTS = ("negative", "positive")
TOPICS = ("sports", "food", "weather", "music")

#: Seeds of the standard splits; held-out and probe texts never share a seed with training.
TRAIN_SEED = 0
HELDOUT_SEED = 1
PROBE_SEED = 2
CONTRAST_SEED = 3
INDUCTION_SEED = 4
REPEAT_SEED = 5

NAMES = (
    "anna",
    "ben",
    "cara",
    "dan",
    "eva",
    "finn",
    "gina",
    "hugo",
    "iris",
    "jack",
    "kate",
    "leo",
    "mia",
    "nick",
    "olga",
    "paul",
    "rosa",
    "sam",
    "tina",
    "umar",
    "vera",
    "will",
    "zoe",
    "yuri",
)

#: topic -> (nouns as (singular, plural), verbs as (singular, plural)).
TOPIC_WORDS: dict[str, tuple[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]]] = {
    "sports": (
        (
            ("team", "teams"),
            ("player", "players"),
            ("ball", "balls"),
            ("coach", "coaches"),
            ("match", "matches"),
            ("goal", "goals"),
            ("race", "races"),
            ("runner", "runners"),
            ("field", "fields"),
            ("referee", "referees"),
        ),
        (("wins", "win"), ("plays", "play"), ("trains", "train"), ("scores", "score")),
    ),
    "food": (
        (
            ("soup", "soups"),
            ("cake", "cakes"),
            ("bread", "breads"),
            ("apple", "apples"),
            ("chef", "chefs"),
            ("dish", "dishes"),
            ("pie", "pies"),
            ("salad", "salads"),
            ("kitchen", "kitchens"),
            ("baker", "bakers"),
        ),
        (("tastes", "taste"), ("smells", "smell"), ("cools", "cool"), ("boils", "boil")),
    ),
    "weather": (
        (
            ("cloud", "clouds"),
            ("storm", "storms"),
            ("wind", "winds"),
            ("sky", "skies"),
            ("day", "days"),
            ("season", "seasons"),
            ("breeze", "breezes"),
            ("sun", "suns"),
            ("morning", "mornings"),
            ("forecast", "forecasts"),
        ),
        (("changes", "change"), ("passes", "pass"), ("clears", "clear"), ("lingers", "linger")),
    ),
    "music": (
        (
            ("song", "songs"),
            ("band", "bands"),
            ("singer", "singers"),
            ("guitar", "guitars"),
            ("drum", "drums"),
            ("concert", "concerts"),
            ("album", "albums"),
            ("piano", "pianos"),
            ("melody", "melodies"),
            ("choir", "choirs"),
        ),
        (("sounds", "sound"), ("echoes", "echo"), ("starts", "start"), ("fades", "fade")),
    ),
}

#: sentiment -> adjectives of that class.
SENTIMENT_WORDS: dict[str, tuple[str, ...]] = {
    "positive": (
        "good",
        "great",
        "lovely",
        "happy",
        "bright",
        "wonderful",
        "pleasant",
        "cheerful",
        "superb",
        "fine",
        "brilliant",
        "delightful",
        "charming",
        "excellent",
        "joyful",
        "splendid",
    ),
    "negative": (
        "bad",
        "awful",
        "terrible",
        "sad",
        "dull",
        "horrible",
        "nasty",
        "gloomy",
        "poor",
        "dreadful",
        "miserable",
        "ugly",
        "boring",
        "grim",
        "rotten",
        "bitter",
    ),
}
NEUTRAL_ADJECTIVES = (
    "red",
    "blue",
    "green",
    "yellow",
    "small",
    "large",
    "old",
    "new",
    "round",
    "tall",
    "wide",
    "narrow",
)
ADVERBS = (
    "today",
    "often",
    "slowly",
    "quickly",
    "daily",
    "rarely",
    "early",
    "late",
    "soon",
    "twice",
)
FUNCTION_WORDS = (
    "the",
    "of",
    "is",
    "are",
    "thinks",
    "likes",
    "says",
    "so",
    "then",
    ":",
    ".",
    "it",
    "was",
)

#: sentiment -> the closing verdict of a document of that mood (``it was good .``): a word that
#: only the mood of the earlier adjectives predicts, so every model must carry the mood along.
VERDICTS = {"negative": "bad", "positive": "good"}

N_CODE_WORDS = 100


@cache
def code_words() -> tuple[str, ...]:
    """The span vocabulary: meaningless consonant-vowel-consonant-vowel words (``bado``,
    ``kimu``, ...), fixed for all seeds; random spans of them are what induction copies."""
    consonants, vowels = "bdfgklmnprstvz", "aeiou"
    syllables = [c + v for c in consonants for v in vowels]
    # A fixed stride through all pairs spreads the words over many syllables.
    pairs = [a + b for a in syllables for b in syllables]
    words = pairs[::37][:N_CODE_WORDS]
    return tuple(words)


@cache
def vocabulary() -> tuple[str, ...]:
    """Every word of the language in tokenizer id order, specials first."""
    words: list[str] = [*SPECIALS, *FUNCTION_WORDS, *NAMES]
    for topic in TOPICS:
        nouns, verbs = TOPIC_WORDS[topic]
        words += [w for pair in nouns for w in pair] + [w for pair in verbs for w in pair]
    for sentiment in SENTIMENTS:
        words += SENTIMENT_WORDS[sentiment]
    words += [*NEUTRAL_ADJECTIVES, *ADVERBS, *code_words()]
    duplicates = sorted({w for w in words if words.count(w) > 1})
    if duplicates:  # the word lists above must stay disjoint, or labels would be ambiguous
        raise AssertionError(f"words listed twice in the zoo vocabulary: {duplicates}")
    return tuple(words)


@dataclass(frozen=True)
class LabelledSet:
    """Texts with an integer label each; ``label_names[label]`` names the class."""

    task: str
    texts: list[str]
    labels: list[int]
    label_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.texts)

    def to_dataset(self, tokenizer: Any = None) -> Any:
        """The texts and labels as an `archscope.data.Dataset` (zoo tokenizer by default)."""
        from archscope.data import Dataset

        return Dataset.from_texts(self.texts, self.labels, tokenizer=_tokenizer(tokenizer))


@dataclass(frozen=True)
class ContrastSet:
    """Clean/corrupted prompts that differ in exactly one word, which changes the next word:
    ``clean_answers[i]`` is the right next word after ``clean[i]``, ``corrupted_answers[i]``
    the right one after ``corrupted[i]`` (a logit difference between the two measures which
    of the two the model believes)."""

    kind: str
    clean: list[str]
    corrupted: list[str]
    clean_answers: list[str]
    corrupted_answers: list[str]

    def __len__(self) -> int:
        return len(self.clean)

    def to_contrast(self, tokenizer: Any = None) -> Any:
        """The pairs as an `archscope.data.Contrast` (zoo tokenizer by default)."""
        from archscope.data import Contrast

        return Contrast(self.clean, self.corrupted, tokenizer=_tokenizer(tokenizer))

    def answer_ids(self, tokenizer: Any = None) -> tuple[list[int], list[int]]:
        """Token ids of the clean and the corrupted answers (each answer is one word)."""
        tok = _tokenizer(tokenizer)
        return (
            tok.convert_tokens_to_ids(self.clean_answers),
            tok.convert_tokens_to_ids(self.corrupted_answers),
        )


@dataclass(frozen=True)
class InductionSet:
    """Documents of the language whose random span of code words is said twice: in
    ``texts[i]`` the span ``spans[i]`` starts at word index ``starts[i][0]`` and again at
    ``starts[i][1]``; words 2..L of the second copy can be predicted only by copying."""

    texts: list[str]
    spans: list[list[str]] = field(repr=False)
    starts: list[tuple[int, int]] = field(repr=False)


def _tokenizer(tokenizer: Any) -> Any:
    if tokenizer is not None:
        return tokenizer
    from .source import load_tokenizer

    return load_tokenizer()


class Generator:
    """Sentences and documents of the zoo language, drawn from ``random.Random(seed)``."""

    def __init__(self, seed: int = TRAIN_SEED) -> None:
        self.rng = random.Random(seed)

    # -- pieces ----------------------------------------------------------------------------
    def noun(self, topic: str) -> tuple[str, str]:
        return self.rng.choice(TOPIC_WORDS[topic][0])

    def verb(self, topic: str) -> tuple[str, str]:
        return self.rng.choice(TOPIC_WORDS[topic][1])

    def span(self, length: int) -> list[str]:
        return [self.rng.choice(code_words()) for _ in range(length)]

    def clause(self, topic: str, sentiment: str | None, forms: int = 3) -> list[str]:
        """One content sentence about ``topic``; its adjective (if any) is of class
        ``sentiment`` (neutral when None). Verbs agree in number with their noun. ``forms=2``
        keeps to the two forms that have an adjective."""
        rng = self.rng
        plural = rng.random() < 0.5
        n = 1 if plural else 0
        noun, verb = self.noun(topic)[n], self.verb(topic)[n]
        adjective = rng.choice(SENTIMENT_WORDS[sentiment] if sentiment else NEUTRAL_ADJECTIVES)
        form = rng.randrange(forms)
        if form == 0:
            return ["the", adjective, noun, verb, rng.choice(ADVERBS), "."]
        if form == 1:
            return [
                rng.choice(NAMES),
                "thinks",
                "the",
                noun,
                "are" if plural else "is",
                adjective,
                ".",
            ]
        # the verb agrees with a noun two words back, across a name
        return ["the", noun, "of", rng.choice(NAMES), verb, rng.choice(ADVERBS), "."]

    # -- documents -------------------------------------------------------------------------
    def document(self) -> tuple[str, int, int]:
        """``(text, sentiment, topic)``: a span said by someone, two name→object bindings,
        two or three content sentences of one topic and mood, the mood's verdict
        (``it was good .`` or ``it was bad .``), then the binding recalled and the span said
        again."""
        rng = self.rng
        topic, sentiment = rng.randrange(len(TOPICS)), rng.randrange(len(SENTIMENTS))
        t, s = TOPICS[topic], SENTIMENTS[sentiment]
        speaker, first, second = rng.sample(NAMES, 3)
        span = self.span(rng.randint(3, 8))
        objects = rng.sample(TOPIC_WORDS[t][0], 2)
        words = [speaker, "says", ":", *span, "."]
        words += [first, "likes", "the", objects[0][0], "."]
        words += [second, "likes", "the", objects[1][0], "."]
        for _ in range(rng.randint(2, 3)):
            words += self.clause(t, s if rng.random() < 0.8 else None)
        words += ["it", "was", VERDICTS[s], "."]
        who = rng.randrange(2)
        recall = ["so", (first, second)[who], "likes", "the", objects[who][0], "."]
        repeat = ["then", speaker, "says", ":", *span, "."]
        words += recall + repeat if rng.random() < 0.5 else repeat + recall
        return " ".join(words), sentiment, topic

    def documents(self, n: int) -> list[str]:
        return [self.document()[0] for _ in range(n)]


# -- the standard sets ------------------------------------------------------------------------
def training_texts(n: int, seed: int = TRAIN_SEED) -> list[str]:
    """``n`` training documents."""
    return Generator(seed).documents(n)


def heldout_texts(n: int = 256, seed: int = HELDOUT_SEED) -> list[str]:
    """``n`` documents from a seed no model was trained on (held-out loss, lens fitting)."""
    return Generator(seed).documents(n)


TASKS = ("sentiment", "topic")


def probe_set(task: str = "sentiment", n: int = 200, seed: int = PROBE_SEED) -> LabelledSet:
    """Short passages (two or three sentences with an adjective) labelled by ``task``: ``sentiment``
    (0 negative, 1 positive; the topic varies at random) or ``topic`` (0..3 in `TOPICS`
    order; half the adjectives are neutral, the rest of a random mood). Classes balanced."""
    if task not in TASKS:
        raise ParameterError(f"probe_set: task {task!r} is not one of {', '.join(TASKS)}")
    gen = Generator(seed * 1000 + TASKS.index(task))
    names = SENTIMENTS if task == "sentiment" else TOPICS
    texts, labels = [], []
    for i in range(n):
        label = i % len(names)
        if task == "sentiment":
            topic, mood = gen.rng.choice(TOPICS), SENTIMENTS[label]
        else:
            topic, mood = TOPICS[label], gen.rng.choice(SENTIMENTS)
        words: list[str] = []
        for _ in range(gen.rng.randint(2, 3)):
            neutral = task == "topic" and gen.rng.random() < 0.5
            words += gen.clause(topic, None if neutral else mood, forms=2)
        texts.append(" ".join(words))
        labels.append(label)
    order = list(range(n))
    gen.rng.shuffle(order)  # classes interleaved at random, so any split is balanced on average
    return LabelledSet(task, [texts[i] for i in order], [labels[i] for i in order], names)


KINDS = ("agreement", "binding")


def contrast_pairs(kind: str = "agreement", n: int = 64, seed: int = CONTRAST_SEED) -> ContrastSet:
    """``n`` clean/corrupted prompt pairs of ``kind``:

    - ``agreement``: ``the ball of anna`` / ``the balls of anna``: the answers are the
      singular and plural of one verb of the topic (``wins`` / ``win``);
    - ``binding``: ``anna likes the cake . ben likes the pie . so anna likes the`` with ``anna``
      → ``ben`` in the last clause: the answers are ``cake`` / ``pie``.
    """
    if kind not in KINDS:
        raise ParameterError(f"contrast_pairs: kind {kind!r} is not one of {', '.join(KINDS)}")
    gen = Generator(seed * 1000 + KINDS.index(kind))
    rng = gen.rng
    clean, corrupted, good, bad = [], [], [], []
    for _ in range(n):
        topic = rng.choice(TOPICS)
        if kind == "agreement":
            noun, verb, name = gen.noun(topic), gen.verb(topic), rng.choice(NAMES)
            clean.append(f"the {noun[0]} of {name}")
            corrupted.append(f"the {noun[1]} of {name}")
            good.append(verb[0])
            bad.append(verb[1])
        else:
            a, b = rng.sample(NAMES, 2)
            x, y = rng.sample(TOPIC_WORDS[topic][0], 2)
            context = f"{a} likes the {x[0]} . {b} likes the {y[0]} . so"
            clean.append(f"{context} {a} likes the")
            corrupted.append(f"{context} {b} likes the")
            good.append(x[0])
            bad.append(y[0])
    return ContrastSet(kind, clean, corrupted, good, bad)


def induction_set(n: int = 64, seed: int = INDUCTION_SEED) -> InductionSet:
    """``n`` documents (from a seed no model was trained on) with where their repeated span
    of 3-8 random code words sits."""
    texts = Generator(seed).documents(n)
    spans, starts = [], []
    for text in texts:
        words = text.split()
        first = words.index(":") + 1
        end = words.index(".", first)
        second = words.index(":", end) + 1
        spans.append(words[first:end])
        starts.append((first, second))
    return InductionSet(texts, spans, starts)


def with_repeats(texts: list[str], fraction: float, seed: int = REPEAT_SEED) -> list[str]:
    """``texts`` with about ``fraction`` of them (chosen at random) replaced by a random span
    of 4 to 24 code words written twice: extra copying practice, so that a small transformer
    forms its induction head within a short CPU budget."""
    rng = random.Random(seed)
    out = list(texts)
    for i in range(len(out)):
        if rng.random() < fraction:
            span = [rng.choice(code_words()) for _ in range(rng.randint(4, 24))]
            out[i] = " ".join(span + span)
    return out
