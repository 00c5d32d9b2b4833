"""Findings of the hostile tour about tokenizers: a tokenizer that is not the model's accepted
silently, texts whose every word is unknown, lens targets that are unknown or several tokens,
``tokenizer=`` refused by methods, a tokenizer written from the guide failing in the lens, and
the docs' example texts full of words the zoo's vocabulary lacks. Each test asserts the message
or the corrected value."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch

import archscope
from archscope import Dataset
from archscope.errors import InputError
from archscope.methods.lens import logit_lens
from archscope.testing.tokenizers import ByteTokenizer
from archscope.tokens import contract_problems, encode, single_token_id

ROOT = Path(__file__).resolve().parents[2]


@cache
def zoo() -> tuple[Any, Any, Any]:
    return archscope.load_model("zoo:transformer")


def _word_tokenizer(words: list[str]) -> Any:
    """A Hugging Face word-level tokenizer of ``words`` (ids fit any larger vocabulary)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", *words])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>")


# -- unknown words and foreign tokenizers ---------------------------------------------------------
def test_texts_of_unknown_words_warn_instead_of_becoming_identical_unk_rows() -> None:
    _, tok, _ = zoo()
    with pytest.warns(UserWarning, match=r"4 of 4 tokens are unknown to the tokenizer.*'<unk>'"):
        rows = Dataset.from_texts(["one text", "another text"], tokenizer=tok).ids()
    assert rows[0] == [tok.unk_token_id] * 2  # what the model would have seen
    with warnings_as_errors():
        Dataset.from_texts(["the chef of iris", "it was good"], tokenizer=tok).ids()


def test_a_tokenizer_that_is_not_the_models_is_named_once() -> None:
    import warnings

    _, _, backend = zoo()
    words = ["the", "chef", "of", "iris", "it", "was", "good"]
    texts = ["the chef of iris", "it was good"]
    small = _word_tokenizer(words)
    assert len(small) == 9
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        archscope.run_method("activation-stats", backend, texts, tokenizer=small)
        archscope.collect(backend, Dataset.from_texts(texts, tokenizer=small), "layer_0.residual")
    messages = [str(w.message) for w in caught if "probably not" in str(w.message)]
    assert messages == [
        "the tokenizer has 9 tokens but the model's vocabulary has 307: it is probably not the "
        "model's tokenizer, so the ids it gives mean other words to the model. Use the "
        "tokenizer the model was trained with (load_model returns it)"
    ]
    with pytest.warns(UserWarning, match=r"the tokenizer has 9 tokens"):  # a new pair warns
        archscope.collect(
            backend, Dataset.from_texts(texts, tokenizer=_word_tokenizer(words)), "layer_0.residual"
        )
    _, tok, _ = zoo()
    with warnings_as_errors():
        archscope.run_method("activation-stats", backend, texts, tokenizer=tok)


# -- lens targets ----------------------------------------------------------------------------------
def test_lens_refuses_an_unknown_target() -> None:
    _, tok, backend = zoo()
    with pytest.raises(InputError, match=r"'zzzzqqq' is not in the tokenizer's vocabulary.*<unk>"):
        logit_lens(backend, tok, "the chef of iris", target_token="zzzzqqq")


def test_lens_refuses_a_multi_token_target_naming_the_tokens() -> None:
    _, tok, backend = zoo()
    with pytest.raises(
        InputError, match=r"'good day' is 2 tokens \(\['good', 'day'\].*one of them"
    ):
        logit_lens(backend, tok, "the chef of iris", target_token="good day")


def test_lens_tracks_a_one_token_target_by_its_own_id() -> None:
    _, tok, backend = zoo()
    result = logit_lens(backend, tok, "the chef of iris", target_token="cools")
    assert result.target_token_id == tok.get_vocab()["cools"]
    by_id = logit_lens(backend, tok, "the chef of iris", target_token=tok.get_vocab()["cools"])
    assert [p.target_prob for p in result.layers] == [p.target_prob for p in by_id.layers]


def test_cli_lens_with_a_bad_target_prints_one_line(run_cli_root) -> None:
    done = run_cli_root("lens", "zoo:transformer", "the chef of iris", "--target", "zzzzqqq")
    assert done.returncode == 1, done.stderr
    assert "not in the tokenizer's vocabulary" in done.stderr and "Traceback" not in done.stderr


# -- one tokenizer adapter ---------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["activation-stats", "logit-lens", "tuned-lens"])
def test_methods_take_plain_texts_with_tokenizer(method: str) -> None:
    _, tok, backend = zoo()
    texts = ["the chef of iris cools", "it was good", "the bread of zoe", "so dan likes the soup"]
    params = {"epochs": 1, "batch_size": 2} if method == "tuned-lens" else {}
    from_texts = archscope.run_method(method, backend, texts, tokenizer=tok, **params)
    ids = [tok(t)["input_ids"] for t in texts]
    data: Any = Dataset.from_ids(ids) if method == "tuned-lens" else ids
    from_ids = archscope.run_method(method, backend, data, **params)
    assert from_texts.to_dict() == from_ids.to_dict()


def test_a_tokenizer_written_from_the_guide_works_in_the_lens_and_methods() -> None:
    _, _, backend = zoo()
    tok = ByteTokenizer(307)  # refuses one bare string, as the guide allows
    assert contract_problems(tok) == []
    with pytest.raises(TypeError):
        tok("the chef")  # the single-string call the lens used to make
    result = logit_lens(backend, tok, "the chef", target_token=int(encode(tok, ["e"])[0][0]))
    assert len(result.position_tokens) == len("the chef")
    stats = archscope.run_method("activation-stats", backend, ["ab", "abc"], tokenizer=tok)
    assert stats.to_dict()


def test_contract_check_names_what_a_single_string_tokenizer_lacks() -> None:
    class OneString:
        pad_token = "<pad>"

        def __call__(self, text: str, **kwargs: Any) -> dict[str, Any]:
            return {"input_ids": [ord(c) for c in str(text)]}

    problems = contract_problems(OneString())
    assert problems == ["the result has no 'attention_mask' (keys: ['input_ids'])"]
    with pytest.raises(InputError, match=r"returned input_ids of shape|failed on"):
        encode(OneString(), ["ab", "abc"])


def test_special_tokens_are_left_out_of_a_target_whatever_the_tokenizer() -> None:
    class WithBos(ByteTokenizer):
        bos_token_id = 255  # adds a BOS and takes no add_special_tokens keyword

        def __call__(
            self, texts: list[str], return_tensors: str | None = None, padding: bool = False
        ) -> dict[str, Any]:
            enc = super().__call__(texts, return_tensors=return_tensors, padding=padding)
            ones = torch.ones(len(texts), 1, dtype=torch.long)
            return {
                "input_ids": torch.cat([ones * 255, enc["input_ids"]], 1),
                "attention_mask": torch.cat([ones, enc["attention_mask"]], 1),
            }

    tok = WithBos(300)
    assert encode(tok, ["a"]) == [[255, 1 + ord("a")]]
    assert single_token_id(tok, "a") == 1 + ord("a")


# -- the docs speak the zoo's vocabulary ------------------------------------------------------------
def _example_texts(page: Path) -> list[str]:
    """Texts given to a zoo model in the page's code blocks: quoted strings of lowercase words
    (and the --text/--clean/--corrupt/lens prompts of shell examples)."""
    text = page.read_text()
    blocks = re.findall(r"```(?:python|bash)\n(.*?)```", text, flags=re.S)
    found = []
    for block in blocks:
        if "zoo" not in block and page.name != "README.md":
            continue
        for literal in re.findall(r'"([^"\n]*)"', block):
            if re.fullmatch(r" ?[a-z]+( [a-z]+)+| [a-z]+", literal):
                found.append(literal)
    return found


def _zoo_pages() -> list[Path]:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    return [p for p in pages if "zoo:" in p.read_text()]


@pytest.mark.parametrize("page", _zoo_pages(), ids=lambda p: p.name)
def test_doc_examples_on_zoo_models_use_words_of_its_vocabulary(page: Path) -> None:
    vocab = set(zoo()[1].get_vocab())
    texts = _example_texts(page)
    unknown = sorted({w for t in texts for w in t.split() if w not in vocab})
    assert not unknown, f"{page.name}: example words the zoo's tokenizer does not know: {unknown}"


def test_readme_examples_are_checked_at_all() -> None:
    texts = _example_texts(ROOT / "README.md")
    assert len(texts) >= 3, texts


class warnings_as_errors:
    """A context in which any warning fails the test."""

    def __enter__(self) -> None:
        import warnings

        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("error")

    def __exit__(self, *exc: Any) -> None:
        self._catch.__exit__(*exc)
