"""archscope-zoo: small transformer, Mamba and LSTM language models trained on a synthetic
corpus with planted structure, loadable offline as ``archscope.load_model("zoo:transformer")``,
and the corpus's labelled sets (probe labels, contrast pairs, held-out text) to analyse them."""

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
from .store import MODEL_NAMES, manifest, models_dir

__version__ = "0.1.0"

#: What `datasets` serves: name -> (kind, default size).
DATASETS: dict[str, tuple[str, int]] = {
    "sentiment": ("labelled", 200),
    "topic": ("labelled", 200),
    "agreement": ("contrast", 64),
    "binding": ("contrast", 64),
    "heldout": ("texts", 256),
    "induction": ("induction", 64),
}


def datasets(
    name: str, n: int | None = None, seed: int | None = None
) -> LabelledSet | ContrastSet | InductionSet | list[str]:
    """A standard zoo data set, the same on every call for the same ``n`` and ``seed``:

    - ``"sentiment"`` / ``"topic"``: a `LabelledSet` (``.texts``, ``.labels``,
      ``.label_names``) of short passages; sentiment is binary, topic has 4 classes;
    - ``"agreement"`` / ``"binding"``: a `ContrastSet` (``.clean``, ``.corrupted``,
      ``.clean_answers``, ``.corrupted_answers``) of one-word-apart prompts;
    - ``"heldout"``: a list of held-out documents (no model saw their seed);
    - ``"induction"``: an `InductionSet` of random spans written twice.

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
    return induction_set(size, **extra)


def load(name: str, device: str = "cpu") -> tuple[Any, Any, Any]:
    """``archscope.load_model("zoo:" + name)``: ``(model, tokenizer, backend)``."""
    import archscope

    return archscope.load_model(f"zoo:{name}", device=device)


__all__ = [
    "DATASETS",
    "MODEL_NAMES",
    "ContrastSet",
    "InductionSet",
    "LabelledSet",
    "datasets",
    "load",
    "manifest",
    "models_dir",
]
