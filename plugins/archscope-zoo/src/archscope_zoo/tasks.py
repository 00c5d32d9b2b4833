"""The profile tasks of the zoo models: the corpus's planted attributes as labelled probe sets,
held-out documents for the SAE and the lenses, and agreement contrast pairs for patching."""

from __future__ import annotations

from typing import Any

from .corpus import ContrastSet, InductionSet, LabelledSet, code_words


def profile_tasks(rest: str, tokenizer: Any, n: int = 160) -> Any:
    """`archscope.apps.bench.ProfileTasks` for the zoo model ``rest`` (the same for every zoo
    model: they share the corpus and the tokenizer). Topic is made binary (sports vs food)
    so that every probe reports one AUROC; induction draws the code words that the corpus
    repeats."""
    from archscope.apps.bench import ProfileTasks
    from archscope.data import Dataset

    from . import datasets

    sentiment = datasets("sentiment", n)
    topic = datasets("topic", 2 * n)
    heldout = datasets("heldout", 96)
    pairs = datasets("agreement", 4)
    repeats = datasets("induction", 32)
    assert isinstance(sentiment, LabelledSet) and isinstance(topic, LabelledSet)
    assert isinstance(pairs, ContrastSet) and isinstance(heldout, list)
    assert isinstance(repeats, InductionSet)
    keep = [i for i, label in enumerate(topic.labels) if label in (0, 1)]
    return ProfileTasks(
        probes={
            "sentiment": sentiment.to_dataset(tokenizer),
            "topic": Dataset.from_texts(
                [topic.texts[i] for i in keep], [topic.labels[i] for i in keep], tokenizer=tokenizer
            ),
        },
        texts=Dataset.from_texts(heldout, tokenizer=tokenizer),
        contrast=pairs.to_contrast(tokenizer),
        induction_ids=[int(i) for i in tokenizer.convert_tokens_to_ids(list(code_words()))],
        # one token per word (the zoo tokenizer is word-level), so word indices are positions
        induction_rows=[tokenizer(t, add_special_tokens=False)["input_ids"] for t in repeats.texts],
        induction_spans=[
            (a, b, len(span)) for (a, b), span in zip(repeats.starts, repeats.spans, strict=True)
        ],
        answers=pairs.answer_ids(tokenizer),
        source=f"zoo corpus (sentiment; topic {topic.label_names[0]} vs "
        f"{topic.label_names[1]}; agreement pairs)",
    )
