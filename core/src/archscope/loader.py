"""Loading models through registered model sources, and tokenizing text for backends."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .backends import Backend
from .errors import ModelSourceError


def _split(spec: str) -> tuple[str | None, str]:
    prefix, sep, rest = spec.partition(":")
    # "C:\\path" and "./x:y" are not prefixes; prefixes are short identifiers.
    if sep and prefix.replace("-", "").replace("_", "").isalnum() and len(prefix) > 1:
        return prefix, rest
    return None, spec


def load_model(name: str, arch: str | None = None, dtype: Any = None,
               device: str = "cpu") -> tuple[Any, Any, Backend]:
    """``load_model("<source>:<name>")`` or ``load_model("./folder")`` →
    ``(model, tokenizer, backend)``. ``arch`` is a backend hint; ``dtype`` a torch dtype or
    its name."""
    from .plugins import get_manager

    if not isinstance(name, str) or not name:
        raise ModelSourceError(f"a model spec is a non-empty string such as '<source>:<name>', got {name!r}")
    manager = get_manager()
    prefix, rest = _split(name)
    source = None
    if prefix is not None:
        entry = manager.sources.get(prefix)
        if entry is not None:
            source = entry.obj
    if source is None:
        claimants = sorted((e.obj for e in manager.sources if e.obj.claim(name)),
                           key=lambda s: (-s.priority, s.name))
        if claimants:
            source, rest = claimants[0], name
    if source is None:
        known = ", ".join(f"{e.name}: ({e.distribution})" for e in manager.sources) or "(none)"
        what = f"no model source is registered for prefix {prefix!r}" if prefix else \
            f"no model source claims {name!r}"
        raise ModelSourceError(
            f"{what}. Registered sources: {known}. Use '<source>:<name>' with a registered source "
            "(`archscope info` lists them), or install the plugin that provides it."
        )
    if isinstance(dtype, str):
        import torch

        resolved = getattr(torch, dtype, None)
        if not isinstance(resolved, torch.dtype):
            raise ModelSourceError(f"unknown dtype {dtype!r}; use e.g. 'float32', 'bfloat16'")
        dtype = resolved
    loaded = source(rest, dtype=dtype, device=device)
    model, tokenizer = loaded[0], loaded[1]
    return model, tokenizer, Backend.for_model(model, hint=arch)


def make_tokenize_fn(tokenizer: Any, max_length: int = 32,
                     attention_mask_bool: bool = False) -> Callable[[Any], dict[str, Any]]:
    """A function ``texts -> {"input_ids", "attention_mask"}`` (padded, truncated to
    ``max_length``), ready for `Backend.run` / `extract`. Sets a pad token when missing."""
    if tokenizer is None:
        raise ValueError("make_tokenize_fn needs a tokenizer; this model was loaded without one")
    if getattr(tokenizer, "pad_token", None) is None:
        fallback = getattr(tokenizer, "eos_token", None) or getattr(tokenizer, "unk_token", None)
        if fallback is None:
            raise ValueError("the tokenizer has no pad, eos or unk token to pad with; set "
                             "tokenizer.pad_token first")
        tokenizer.pad_token = fallback

    def tokenize(texts: str | list[str]) -> dict[str, Any]:
        if isinstance(texts, str):
            texts = [texts]
        if not texts:
            raise ValueError("tokenize: give at least one text")
        enc = tokenizer(list(texts), return_tensors="pt", padding=True, truncation=True,
                        max_length=max_length)
        mask = enc["attention_mask"]
        return {"input_ids": enc["input_ids"],
                "attention_mask": mask.bool() if attention_mask_bool else mask}

    return tokenize
