"""Differences between releases of the libraries that backends wrap (the keyword a Hugging Face
``forward`` takes its recurrent cache by; which transformers release is installed), kept in one
place for every package."""

from __future__ import annotations

from typing import Any

from .errors import BackendError, ParameterError
from .modules import parameter_names

__all__ = ["CACHE_ARGUMENTS", "cache_argument", "release", "transformers_release"]

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


def release(version: str) -> tuple[int, int]:
    """(major, minor) of a version string: "5.25.0", "5.26.0.dev0" and "5.25rc1" give (5, 25)
    (a part's leading digits; a missing minor is 0). Raises ParameterError where the major part
    has no leading digit."""
    numbers = []
    for part in [*version.strip().split("."), "0"][:2]:
        digits = ""
        for char in part:
            if not char.isdigit():
                break
            digits += char
        numbers.append(int(digits) if digits else None)
    major, minor = numbers
    if major is None:
        raise ParameterError(
            f"cannot read a release from version {version!r}; valid: 'MAJOR.MINOR...' such as "
            "'5.25.0'"
        )
    return major, minor or 0


def transformers_release() -> tuple[int, int]:
    """(major, minor) of the installed transformers, to compare with a release such as
    ``(5, 25)``."""
    import transformers

    return release(transformers.__version__)
