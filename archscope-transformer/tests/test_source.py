"""The hf: model source, on tiny models saved with save_pretrained (no network)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import archscope
from archscope import make_tokenize_fn
from archscope.loader import ModelSourceError
from archscope_transformer.backend import TransformerBackend
from archscope_transformer.testing import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    folder = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_model("llama")
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)  # no pad token: the loader sets one
    return folder, model


def _check(loaded: tuple, original: torch.nn.Module) -> None:
    model, tokenizer, backend = loaded
    assert isinstance(backend, TransformerBackend)
    assert not model.training
    assert tokenizer.pad_token == "</s>"
    batch = make_tokenize_fn(tokenizer)(["w5 w6 w7 w8", "w9 w10"])
    assert batch["input_ids"][0].tolist() == [5, 6, 7, 8]
    with torch.no_grad():
        expected = original(**batch).logits
    torch.testing.assert_close(backend.run(batch, capture=["logits"]).logits, expected)


def test_hf_prefix_loads_a_saved_folder(saved: tuple[Path, torch.nn.Module]) -> None:
    folder, original = saved
    _check(archscope.load_model(f"hf:{folder}"), original)


def test_a_bare_folder_with_config_json_is_claimed(saved: tuple[Path, torch.nn.Module]) -> None:
    folder, original = saved
    _check(archscope.load_model(str(folder)), original)


@pytest.mark.parametrize("dtype", [torch.bfloat16, "float16"])
def test_the_dtype_is_honoured(saved: tuple[Path, torch.nn.Module], dtype: object) -> None:
    model, _, backend = archscope.load_model(f"hf:{saved[0]}", dtype=dtype)
    expected = torch.bfloat16 if dtype is torch.bfloat16 else torch.float16
    assert all(p.dtype == expected for p in model.parameters())
    assert (
        backend.run(torch.tensor([[5, 6, 7]]), capture=["layer_0.residual"])[
            "layer_0.residual"
        ].dtype
        == expected
    )


def test_a_folder_without_tokenizer_loads_with_none(tmp_path: Path) -> None:
    tiny_model("gpt2").save_pretrained(tmp_path)
    _, tokenizer, backend = archscope.load_model(f"hf:{tmp_path}")
    assert tokenizer is None and backend.name == "transformer"


def test_folders_without_config_json_are_not_claimed(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match="no model source claims"):
        archscope.load_model(str(tmp_path))


def test_missing_or_non_model_folders_get_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no such folder"):
        archscope.load_model(f"hf:{tmp_path / 'missing'}")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"has no config.json.*notes.txt"):
        archscope.load_model(f"hf:{tmp_path}")
