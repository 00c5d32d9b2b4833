"""The zoo tokenizer: one word-level tokenizer over the corpus vocabulary, built offline with
the ``tokenizers`` library and saved in Hugging Face format; every zoo model shares it."""

from __future__ import annotations

from typing import Any

from .corpus import SPECIALS, vocabulary


def build_tokenizer() -> Any:
    """A `transformers.PreTrainedTokenizerFast` mapping each word of `corpus.vocabulary` to its
    index (whitespace-split; unknown words become ``<unk>``; pad id 0, eos id 2)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(vocabulary())}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    pad, bos, eos, unk = SPECIALS
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=pad, bos_token=bos, eos_token=eos, unk_token=unk
    )
