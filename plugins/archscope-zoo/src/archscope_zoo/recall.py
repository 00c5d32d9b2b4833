"""Multi-query associative recall (MQAR), the task of the zoo's gated-delta-net model: a context
binds keys to values, then the keys are asked for again in another order, and the word after
each asked key must be the value bound to it. Only a model that stores the bindings in its
state can answer, so the task has a known ground truth for every stored binding.

A sequence, in the zoo's words (keys are code words, values are names, ``:`` separates the
context from the queries)::

    lezi anna kade ben migi cara : kade ben lezi anna migi cara

Keys are distinct within a sequence, and so are values. Everything is a pure function of its
seed, like `archscope_zoo.corpus`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from archscope.errors import ParameterError

from .corpus import NAMES, code_words

#: Seeds of the recall splits (the corpus uses 0-5): training and held-out never share one.
RECALL_TRAIN_SEED = 10
RECALL_HELDOUT_SEED = 11
#: Bindings per training sequence: drawn uniformly from this range.
MIN_PAIRS, MAX_PAIRS = 1, 8
SEPARATOR = ":"


def keys() -> tuple[str, ...]:
    """The words that can be keys: the corpus's 100 code words."""
    return code_words()


def values() -> tuple[str, ...]:
    """The words that can be values: the corpus's 24 names (chance of a blind guess: 1/24)."""
    return NAMES


@dataclass(frozen=True)
class RecallSet:
    """Recall sequences: ``texts`` (words separated by spaces), ``bindings`` (per text, the
    context's (key, value) pairs in order) and ``queries`` (per text, the asked keys in order).
    Position ``p`` of a text's words holds word ``p``; `answer_positions` gives where each
    answer is predicted."""

    texts: list[str]
    bindings: list[list[tuple[str, str]]]
    queries: list[list[str]]

    def __len__(self) -> int:
        return len(self.texts)

    def answer_positions(self, row: int) -> list[int]:
        """The positions of text ``row`` whose next word is an answer: the asked keys."""
        start = 2 * len(self.bindings[row]) + 1  # after the context and the separator
        return [start + 2 * j for j in range(len(self.queries[row]))]

    def answers(self, row: int) -> list[str]:
        """The values bound to text ``row``'s asked keys, in query order."""
        bound = dict(self.bindings[row])
        return [bound[k] for k in self.queries[row]]


def sequence(bindings: list[tuple[str, str]], queries: list[str]) -> str:
    """The text of one recall sequence: the context, the separator, each query and its answer.
    A query of a key the context does not bind is refused."""
    bound = dict(bindings)
    unknown = [k for k in queries if k not in bound]
    if unknown:
        raise ParameterError(
            f"recall.sequence: queried keys {unknown} are not bound in the context "
            f"(bound: {sorted(bound)}); query bound keys only"
        )
    words = [w for pair in bindings for w in pair] + [SEPARATOR]
    for key in queries:
        words += [key, bound[key]]
    return " ".join(words)


def _draw(rng: random.Random, n_pairs: int) -> tuple[list[tuple[str, str]], list[str]]:
    chosen_keys = rng.sample(keys(), n_pairs)
    chosen_values = rng.sample(values(), n_pairs)
    bindings = list(zip(chosen_keys, chosen_values, strict=True))
    queries = rng.sample(chosen_keys, n_pairs)  # every key asked once, in another order
    return bindings, queries


def recall_set(
    n: int,
    seed: int = RECALL_HELDOUT_SEED,
    pairs: int | tuple[int, int] = (MIN_PAIRS, MAX_PAIRS),
) -> RecallSet:
    """``n`` recall sequences from ``seed``, each binding ``pairs`` keys (an int, or a
    ``(low, high)`` range drawn from uniformly) and asking every one of them once."""
    low, high = (pairs, pairs) if isinstance(pairs, int) else pairs
    if not 1 <= low <= high <= len(values()):
        raise ParameterError(
            f"recall_set: pairs={pairs!r} must lie in 1..{len(values())} (the number of "
            "distinct values) with low <= high"
        )
    if n < 0:
        raise ParameterError(f"recall_set: n must be >= 0, got {n}")
    rng = random.Random(f"recall-{seed}")
    texts, all_bindings, all_queries = [], [], []
    for _ in range(n):
        bindings, queries = _draw(rng, rng.randint(low, high))
        texts.append(sequence(bindings, queries))
        all_bindings.append(bindings)
        all_queries.append(queries)
    return RecallSet(texts, all_bindings, all_queries)


def training_set(n: int, seed: int = 0) -> RecallSet:
    """The training sequences of recipe seed ``seed`` (never the held-out seed)."""
    return recall_set(n, seed=RECALL_TRAIN_SEED + 2 * seed)


def encode(tokenizer: Any, data: RecallSet) -> tuple[Any, Any, Any]:
    """``(input_ids, attention_mask, targets)`` of ``data``, right-padded to its longest text:
    ``targets[b, p]`` is the id of the answer predicted at position ``p`` (-100 elsewhere), so
    a cross-entropy over ``targets`` scores the answers only."""
    import torch

    rows = tokenizer(list(data.texts), add_special_tokens=False)["input_ids"]
    width = max(map(len, rows)) if rows else 0
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    targets = torch.full((len(rows), width), -100, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, : len(row)] = torch.tensor(row)
        mask[b, : len(row)] = 1
        for p in data.answer_positions(b):
            targets[b, p] = row[p + 1]
    return ids, mask, targets
