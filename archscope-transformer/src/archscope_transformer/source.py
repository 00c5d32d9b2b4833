"""The ``hf:`` model source: `from_pretrained` for a Hub name or a local folder."""

from __future__ import annotations

import os
from typing import Any

from archscope.errors import ModelSourceError

#: Files any of which means a saved folder has a tokenizer.
TOKENIZER_FILES = {
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "vocab.txt",
    "tokenizer.model",
    "spiece.model",
    "merges.txt",
}


def claims(spec: str) -> bool:
    """Bare specs this source takes: a local folder holding a Hugging Face ``config.json``."""
    return os.path.isdir(spec) and os.path.isfile(os.path.join(spec, "config.json"))


def load(name: str, dtype: Any = None, device: str = "cpu") -> tuple[Any, Any]:
    """``(model, tokenizer)``: the causal LM in eval mode on ``device`` (in ``dtype`` when
    given) and its tokenizer with a pad token set; the tokenizer is None when the folder or
    repository has none."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not name:
        raise ModelSourceError(
            "hf: needs a model name or folder, e.g. 'hf:gpt2' or 'hf:./my_model'"
        )
    # Hub names are "model" or "org/model"; anything else path-like is a local folder.
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or os.path.exists(name):
        folder = os.path.expanduser(name)
        if not os.path.isdir(folder):
            raise ModelSourceError(
                f"hf:{name}: no such folder (give a folder written by "
                "save_pretrained, or a Hub name such as 'org/model')"
            )
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise ModelSourceError(
                f"hf:{name}: the folder has no config.json, so it is not a saved "
                f"Hugging Face model; it holds {sorted(os.listdir(folder))[:10]}"
            )
        name = folder
    kwargs = {"dtype": dtype} if dtype is not None else {}
    model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    model.to(device)  # type: ignore[arg-type]  # (mypy misreads the decorated .to)
    model.eval()
    tokenizer = None
    # A folder without tokenizer files would get an empty tokenizer from AutoTokenizer.
    if not os.path.isdir(name) or set(os.listdir(name)) & TOKENIZER_FILES:
        tokenizer = AutoTokenizer.from_pretrained(name)
    if tokenizer is not None and tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is not None:
            tokenizer.pad_token = fallback
    return model, tokenizer
