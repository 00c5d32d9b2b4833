"""Detection: which registered backend serves a model. `Backend.for_model` is the entry point;
`select_backend` holds the logic, and `Confidence` names the levels `can_handle` returns."""

from __future__ import annotations

import warnings
from typing import Any

from .errors import NoBackendError

#: A backend class (`archscope.backends.Backend` subclass). Detection works on the registry's
#: entries and never imports the Backend module, which imports this one.
BackendClass = type

__all__ = ["Confidence", "backend_for", "select_backend"]


class Confidence:
    """Named confidence levels for `Backend.can_handle` (any value in (0, 1] is allowed; these
    keep first-party backends ordered consistently).

    - ``EXACT``: the model is one this backend was written for (its own class or model type).
    - ``KNOWN``: recognised as a family the backend serves (its module, its class names, a
      structure only that family has); above ``STRUCTURAL`` so specialised backends win.
    - ``STRUCTURAL``: recognised by its structure (a decoder stack, a recurrent core) rather
      than by name; more specific backends win over it.
    - ``FALLBACK``: the backend could serve the model, but a dedicated one should win.
    - ``LAST_RESORT``: the model is of the backend's kind but could not be mapped; choosing
      the backend lets its constructor say what is missing.
    """

    EXACT = 1.0
    KNOWN = 0.95
    STRUCTURAL = 0.9
    FALLBACK = 0.7
    LAST_RESORT = 0.1


def _unknown_hint(hint: str, manager: Any) -> NoBackendError:
    aliases = manager.backends.aliases()
    return NoBackendError(
        f"unknown backend hint {hint!r}; registered backends: "
        f"{', '.join(manager.backends.names()) or '(none)'}"
        + (
            f"; aliases: {', '.join(f'{a}->{n}' for a, n in sorted(aliases.items()))}"
            if aliases
            else ""
        )
    )


def _no_backend(model: Any, manager: Any) -> NoBackendError:
    from .plugins import suggest_distribution

    model_cls = type(model)
    installed = ", ".join(f"{e.name} ({e.distribution})" for e in manager.backends) or "(none)"
    suggestion = suggest_distribution(model)
    hint_text = (
        f"install {suggestion} (pip install {suggestion})"
        if suggestion and suggestion not in {e.distribution for e in manager.backends}
        else "describe the model with a custom-model adapter or write a backend plugin "
        "(see docs/plugin-authors.md), or pass hint=<backend name>"
    )
    return NoBackendError(
        f"no installed archscope backend can handle {model_cls.__qualname__} "
        f"(module {model_cls.__module__}). Installed backends: {installed}. "
        f"To fix: {hint_text}."
    )


def _confidence(entry: Any, model: Any) -> float:
    """``entry``'s `can_handle` for ``model`` (0 for None, or when it raises, with a warning)."""
    try:
        score = entry.obj.can_handle(model)
    except Exception as exc:  # can_handle must not raise; do not let one break detection
        warnings.warn(
            f"archscope: {entry.name}.can_handle raised {exc!r}; ignoring it", stacklevel=4
        )
        return 0.0
    return float(score) if score is not None and score > 0 else 0.0


def _hint_refused(hint: str, name: str, model: Any, manager: Any, cause: Exception) -> Exception:
    """The error for a hinted backend that declines ``model`` and fails to wrap it: the
    backend's own error class when it is an archscope error (its message kept after ours),
    else `NoBackendError`."""
    from .errors import ArchscopeError

    able = [e.name for e in manager.backends if e.name != name and _confidence(e, model)]
    label = hint if hint == name else f"{hint} ({name})"
    message = (
        f"backend {label!r} cannot serve {type(model).__qualname__} (module "
        f"{type(model).__module__}): its can_handle declines the model and it reports "
        f"{type(cause).__name__}: {cause}. "
        + (
            f"Backends that can: {', '.join(able)}; pass one of them as hint (--arch) or none "
            "to detect it"
            if able
            else "No installed backend recognises it: describe it with a custom-model adapter or "
            "write a backend plugin (docs/plugin-authors.md)"
        )
    )
    if isinstance(cause, ArchscopeError):
        try:
            return type(cause)(message)
        except Exception:  # an error class with another constructor
            pass
    return NoBackendError(message)


def backend_for(model: Any, hint: str | None = None) -> Any:
    """`select_backend`, then the backend instance. A hinted backend whose `can_handle`
    declines the model is still tried (it may explain what is missing); if it fails, the
    error says which backend cannot serve which model and which backends can."""
    from .plugins import get_manager

    chosen = select_backend(model, hint)
    if hint is None:
        return chosen(model)
    entry = get_manager().backends.get(hint)
    if entry is not None and _confidence(entry, model):
        return chosen(model)
    try:
        backend = chosen(model)
        backend.sites()  # a site table is built on first use: fail here, not in the first run
    except Exception as exc:
        raise _hint_refused(hint, entry.name if entry else hint, model, get_manager(), exc) from exc
    return backend


def select_backend(model: Any, hint: str | None = None) -> BackendClass:
    """The backend class for ``model``: the registered one named by ``hint``, else the one whose
    `can_handle` is most confident (ties: priority, then name, with a warning)."""
    from .plugins import get_manager

    manager = get_manager()
    if hint is not None:
        entry = manager.backends.get(hint)
        if entry is None:
            raise _unknown_hint(hint, manager)
        chosen: BackendClass = entry.obj
        return chosen

    scored: list[tuple[float, int, str, BackendClass]] = []
    for entry in manager.backends:
        score = _confidence(entry, model)
        if score:
            scored.append((score, int(entry.obj.priority), entry.name, entry.obj))
    if not scored:
        raise _no_backend(model, manager)
    scored.sort(key=lambda t: (-t[0], -t[1], t[2]))
    best = scored[0]
    ties = [s for s in scored if s[0] == best[0]]
    if len(ties) > 1:
        warnings.warn(
            f"archscope: backends {', '.join(t[2] for t in ties)} are equally confident "
            f"({best[0]}) for {type(model).__name__}; using {best[2]} (pass hint= to choose)",
            stacklevel=3,
        )
    return best[3]
