"""archscope-zoo: small transformer, Mamba and LSTM language models trained on a synthetic
corpus with planted structure, and a gated delta net trained on associative recall, loadable
offline as ``archscope.load_model("zoo:transformer")`` (``zoo:gdn``), and the corpus's labelled
sets (probe labels, contrast pairs, held-out text) and the recall sequences to analyse them."""

from __future__ import annotations

from typing import Any

from .corpus import (
    ContrastSet,
    InductionSet,
    LabelledSet,
    contrast_pairs,
    heldout_texts,
    induction_set,
    probe_set,
)
from .recall import RecallSet, recall_set
from .store import ALL_MODEL_NAMES, MODEL_NAMES, TASK_MODEL_NAMES, manifest, models_dir

__version__ = "0.1.0"

#: What `datasets` serves: name -> (kind, default size).
DATASETS: dict[str, tuple[str, int]] = {
    "sentiment": ("labelled", 200),
    "topic": ("labelled", 200),
    "agreement": ("contrast", 64),
    "binding": ("contrast", 64),
    "heldout": ("texts", 256),
    "induction": ("induction", 64),
    "recall": ("recall", 256),
}


def datasets(
    name: str, n: int | None = None, seed: int | None = None
) -> LabelledSet | ContrastSet | InductionSet | RecallSet | list[str]:
    """A standard zoo data set, the same on every call for the same ``n`` and ``seed``:

    - ``"sentiment"`` / ``"topic"``: a `LabelledSet` (``.texts``, ``.labels``,
      ``.label_names``) of short passages; sentiment is binary, topic has 4 classes;
    - ``"agreement"`` / ``"binding"``: a `ContrastSet` (``.clean``, ``.corrupted``,
      ``.clean_answers``, ``.corrupted_answers``) of one-word-apart prompts;
    - ``"heldout"``: a list of held-out documents (no model saw their seed);
    - ``"induction"``: an `InductionSet` of random spans written twice;
    - ``"recall"``: a `RecallSet` of held-out associative-recall sequences (1-8 bindings; the
      task of ``zoo:gdn``, see `archscope_zoo.recall`).

    ``n`` defaults to the size in `DATASETS`; ``seed`` to the set's standard seed.
    """
    if name not in DATASETS:
        from archscope.errors import ParameterError

        raise ParameterError(
            f"archscope_zoo.datasets: no data set {name!r}; the zoo has {', '.join(DATASETS)}"
        )
    kind, default = DATASETS[name]
    size = default if n is None else n
    extra: dict[str, Any] = {} if seed is None else {"seed": seed}
    if kind == "labelled":
        return probe_set(name, size, **extra)
    if kind == "contrast":
        return contrast_pairs(name, size, **extra)
    if kind == "texts":
        return heldout_texts(size, **extra)
    if kind == "recall":
        return recall_set(size, **extra)
    return induction_set(size, **extra)


def load(name: str, device: str = "cpu") -> tuple[Any, Any, Any]:
    """``archscope.load_model("zoo:" + name)``: ``(model, tokenizer, backend)``."""
    import archscope

    return archscope.load_model(f"zoo:{name}", device=device)


__all__ = [
    "ALL_MODEL_NAMES",
    "DATASETS",
    "MODEL_NAMES",
    "TASK_MODEL_NAMES",
    "ContrastSet",
    "InductionSet",
    "LabelledSet",
    "RecallSet",
    "datasets",
    "load",
    "manifest",
    "models_dir",
    "recall_set",
]
