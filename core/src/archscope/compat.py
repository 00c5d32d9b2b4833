"""Differences between releases of the libraries that backends wrap (today: the keyword a
Hugging Face ``forward`` takes its recurrent cache by), kept in one place for every package."""

from __future__ import annotations

from typing import Any

from .errors import BackendError
from .modules import parameter_names

__all__ = ["CACHE_ARGUMENTS", "cache_argument"]

#: Names a recurrent cache has been passed by, newest first: ``cache`` in recent transformers
#: releases, ``cache_params`` (pure SSMs, RNN-like models) or ``past_key_values`` (hybrids)
#: in earlier 5.x ones.
CACHE_ARGUMENTS = ("cache", "cache_params", "past_key_values")


def cache_argument(
    model: Any, names: tuple[str, ...] = CACHE_ARGUMENTS, fallback: str | None = None
) -> str:
    """The keyword ``model.forward`` takes its cache by: the first of ``names`` it declares,
    else ``fallback`` (for a model known to read it from ``**kwargs``). A cache passed under a
    name the model does not know would be swallowed by ``**kwargs`` and ignored, so without a
    fallback an undeclared one raises."""
    params = parameter_names(model.forward, declared=True) or []
    for name in names:
        if name in params:
            return name
    if fallback is not None:
        return fallback
    raise BackendError(
        f"{type(model).__name__}.forward takes no cache argument (looked for "
        f"{', '.join(names)}), so a run cannot continue from a state"
    )
