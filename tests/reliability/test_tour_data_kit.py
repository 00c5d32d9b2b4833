"""The backend kit's tokenizer checks pass on a sound subject and fail, saying what to fix, on a
deliberately broken one: a tokenizer that only follows Hugging Face's single-string call, and a
profile that passes contrast pairs of unequal token lengths to patching (as it used to)."""

from __future__ import annotations

from typing import Any

import pytest
from archs import arch

import archscope.apps.bench
from archscope.testing import BackendContract


class _Kit(BackendContract):
    backend_name = "transformer"
    distribution = "archscope-transformer"

    def make_models(self) -> dict[str, Any]:
        return {"gpt2": arch("gpt2").model}


class _SingleStringTokenizer:
    """What a tokenizer written against the lens's old calls looks like: one string in, a list
    of ids out, no batching, no attention mask."""

    pad_token = "<pad>"

    def __call__(self, text: Any, **kwargs: Any) -> dict[str, Any]:
        return {"input_ids": [4 + ord(c) % 90 for c in str(text)]}

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i) for i in ids)


class _BrokenTokenizerKit(_Kit):
    def make_tokenizer(self, model: Any) -> Any:
        return _SingleStringTokenizer()


def test_guide_tokenizer_check_passes_with_the_kits_byte_tokenizer() -> None:
    _Kit().test_tokenizer_following_the_guide_works_with_lens_and_methods("gpt2")


def test_guide_tokenizer_check_fails_on_a_single_string_tokenizer() -> None:
    with pytest.raises(
        pytest.fail.Exception, match=r"does not follow the contract.*attention_mask"
    ):
        _BrokenTokenizerKit().test_tokenizer_following_the_guide_works_with_lens_and_methods("gpt2")


def test_profile_check_passes_and_names_the_unequal_pair() -> None:
    _Kit().test_profile_names_contrast_pairs_of_unequal_token_lengths("gpt2")


def test_profile_check_fails_when_unequal_pairs_reach_patching(monkeypatch) -> None:
    def all_pairs(profile: Any, pairs: list[Any]) -> list[int]:
        return list(range(len(pairs)))  # keeps every pair, names none

    monkeypatch.setattr(archscope.apps.bench, "_equal_length_pairs", all_pairs)
    # the first pair is equal, so only the unnamed second pair tells: the kit asks for the note
    with pytest.raises(pytest.fail.Exception, match=r"does not name the contrast pair"):
        _Kit().test_profile_names_contrast_pairs_of_unequal_token_lengths("gpt2")

    def unequal_only(profile: Any, pairs: list[Any]) -> list[int]:
        return [i for i, (a, b) in enumerate(pairs) if len(a) != len(b)]

    monkeypatch.setattr(archscope.apps.bench, "_equal_length_pairs", unequal_only)
    with pytest.raises(pytest.fail.Exception, match=r"profile_backend .* failed: InputError"):
        _Kit().test_profile_names_contrast_pairs_of_unequal_token_lengths("gpt2")
