"""Loading models through registered model sources, and tokenizing text for backends."""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .backends import Backend
from .errors import ArchscopeError, InputError, ModelSourceError
from .modules import find_attribute
from .registry import ModelSource

#: ``package.module:function`` or ``path/to/file.py:function``.
_CALLABLE_SPEC = re.compile(r"^(?:[A-Za-z_][\w.]*|[^:]+\.py):[A-Za-z_][\w.]*$")


def load_callable(spec: str) -> tuple[Any, Any]:
    """A model from the user's own code: ``"package.module:build"`` or
    ``"path/to/file.py:build"`` names a function (or class) that takes no argument and returns
    a model, or ``(model, tokenizer)``. The current folder is importable, as for ``python -m``."""
    module_name, _, attr = spec.rpartition(":")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise ModelSourceError(f"{spec!r}: no such file {path}")
            module_spec = importlib.util.spec_from_file_location(path.stem, path)
            assert module_spec is not None and module_spec.loader is not None
            module: Any = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            if "" not in sys.path and os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name.split(".")[0]:
            raise  # nothing of that name: load_model says which sources exist
        raise ModelSourceError(f"{spec!r}: importing {module_name!r} failed: {exc}") from None
    except ImportError as exc:
        raise ModelSourceError(
            f"{spec!r}: cannot import {module_name!r} ({exc}); give "
            "'package.module:function' importable from the current folder, "
            "or 'path/to/file.py:function'"
        ) from None
    obj = find_attribute(module, attr)
    if obj is None:
        raise ModelSourceError(f"{spec!r}: {module_name} has no attribute {attr!r}")
    if not callable(obj):
        raise ModelSourceError(
            f"{spec!r}: {attr} is not callable; name a function that "
            "returns a model or (model, tokenizer)"
        )
    made = obj()
    if isinstance(made, tuple):
        if len(made) != 2:
            raise ModelSourceError(
                f"{spec!r} returned a tuple of {len(made)}; return a model or (model, tokenizer)"
            )
        return made[0], made[1]
    return made, None


def _split(spec: str) -> tuple[str | None, str]:
    prefix, sep, rest = spec.partition(":")
    # "C:\\path" and "./x:y" are not prefixes; prefixes are short identifiers.
    if sep and prefix.replace("-", "").replace("_", "").isalnum() and len(prefix) > 1:
        return prefix, rest
    return None, spec


def find_source(name: str) -> tuple[ModelSource | None, str]:
    """The registered source that loads the spec ``name`` and the rest of the spec it gets
    (None when no source claims it)."""
    from .plugins import get_manager

    manager = get_manager()
    prefix, rest = _split(name)
    if prefix is not None:
        entry = manager.sources.get(prefix)
        if entry is not None:
            return entry.obj, rest
    claimants = sorted(
        (e.obj for e in manager.sources if e.obj.claim(name)), key=lambda s: (-s.priority, s.name)
    )
    return (claimants[0], name) if claimants else (None, name)


def load_model(
    name: str, arch: str | None = None, dtype: Any = None, device: str = "cpu"
) -> tuple[Any, Any, Backend]:
    """``load_model("<source>:<name>")`` or ``load_model("./folder")`` →
    ``(model, tokenizer, backend)``. ``arch`` is a backend hint; ``dtype`` a torch dtype or
    its name."""
    from .plugins import get_manager

    if not isinstance(name, str) or not name:
        raise ModelSourceError(
            f"a model spec is a non-empty string such as '<source>:<name>', got {name!r}"
        )
    manager = get_manager()
    prefix, _ = _split(name)
    source, rest = find_source(name)
    own_code = source is None and bool(_CALLABLE_SPEC.match(name))
    if source is None and not own_code:
        known = ", ".join(f"{e.name}: ({e.distribution})" for e in manager.sources) or "(none)"
        what = (
            f"no model source is registered for prefix {prefix!r}"
            if prefix
            else f"no model source claims {name!r}"
        )
        raise ModelSourceError(
            f"{what}. Registered sources: {known}. Use '<source>:<name>' with a registered source "
            "(`archscope info` lists them), install the plugin that provides it, or name your "
            "own code as 'package.module:function' or 'path/to/file.py:function' (a function "
            "returning a model, or (model, tokenizer))."
        )
    if isinstance(dtype, str):
        import torch

        resolved = getattr(torch, dtype, None)
        if not isinstance(resolved, torch.dtype):
            raise ModelSourceError(f"unknown dtype {dtype!r}; use e.g. 'float32', 'bfloat16'")
        dtype = resolved
    if own_code:
        try:
            model, tokenizer = load_callable(name)
        except ModuleNotFoundError:
            known = ", ".join(f"{e.name}: ({e.distribution})" for e in manager.sources) or "(none)"
            what = (
                f"no model source is registered for prefix {prefix!r}, and no module "
                f"{prefix!r} can be imported"
                if prefix
                else f"{name!r}: no module {name.rpartition(':')[0]!r} can be imported"
            )
            raise ModelSourceError(
                f"{what}. Registered sources: {known}. Use '<source>:<name>' with a registered "
                "source, or name your own code as 'package.module:function' (importable from "
                "the current folder) or 'path/to/file.py:function'."
            ) from None
        if dtype is not None or device != "cpu":
            model = model.to(device=device, dtype=dtype)
        return model, tokenizer, Backend.for_model(model, hint=arch)
    assert source is not None
    try:
        loaded = source(rest, dtype=dtype, device=device)
    except ArchscopeError:
        raise
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # a truncated file, a bad config, ...: one clear message
        raise ModelSourceError(
            f"{name!r} could not be loaded by the {source.name!r} source: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    model, tokenizer = loaded[0], loaded[1]
    return model, tokenizer, Backend.for_model(model, hint=arch)


def make_tokenize_fn(
    tokenizer: Any, max_length: int | None = None, attention_mask_bool: bool = False
) -> Callable[[Any], dict[str, Any]]:
    """A function ``texts -> {"input_ids", "attention_mask"}`` (right-padded), ready for
    `Backend.run` / `extract`. Texts are not cut unless ``max_length`` is given, and then with
    a warning naming how many were. Sets a pad token when the tokenizer has none."""
    import warnings

    if tokenizer is None:
        raise InputError("make_tokenize_fn needs a tokenizer; this model was loaded without one")
    if max_length is not None and max_length < 1:
        raise InputError(
            f"max_length must be a positive number of tokens or None, got {max_length}"
        )
    if getattr(tokenizer, "pad_token", None) is None:
        fallback = getattr(tokenizer, "eos_token", None) or getattr(tokenizer, "unk_token", None)
        if fallback is None:
            raise InputError(
                "the tokenizer has no pad, eos or unk token to pad with; set "
                "tokenizer.pad_token first"
            )
        tokenizer.pad_token = fallback

    def tokenize(texts: str | list[str]) -> dict[str, Any]:
        if isinstance(texts, str):
            texts = [texts]
        if not texts:
            raise InputError("tokenize: give at least one text")
        if max_length is not None:
            lengths = [len(ids) for ids in tokenizer(list(texts))["input_ids"]]
            cut = sum(n > max_length for n in lengths)
            if cut:
                warnings.warn(
                    f"archscope: {cut} of {len(lengths)} texts are longer than "
                    f"max_length={max_length} tokens (longest {max(lengths)}) and "
                    "were truncated",
                    stacklevel=2,
                )
        enc = tokenizer(
            list(texts),
            return_tensors="pt",
            padding=True,
            truncation=max_length is not None,
            max_length=max_length,
        )
        mask = enc["attention_mask"]
        return {
            "input_ids": enc["input_ids"],
            "attention_mask": mask.bool() if attention_mask_bool else mask,
        }

    return tokenize
