"""archscope 0.2 compatibility, all in one place.

- The 0.2 module paths (``archscope.probes``, ``archscope.sae``, ``archscope.bench``, ...) import
  the modules that moved into the layers (`archscope.methods`, `archscope.apps`): the same
  module objects, so classes, functions and monkeypatching behave as through the new path.
- `deprecated` warns once per old name with a `DeprecationWarning` that names the replacement
  and the release that removes the old name (`REMOVED_IN`).
- `as_backend` is the one coercion of "a model or a Backend" that 0.2's functions accept.
- `outputs_metric` adapts 0.2's one-argument patching metrics (``metric(outputs)``).

Importing this module imports no torch.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from collections.abc import Callable, Sequence
from types import ModuleType, SimpleNamespace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from .backends import Backend

__all__ = ["MOVED_MODULES", "REMOVED_IN", "as_backend", "deprecated", "outputs_metric"]

#: The release that removes the names this module keeps alive.
REMOVED_IN = "0.5.0"

#: 0.2 module path → where the module lives now (its sub-modules move with it).
MOVED_MODULES = {
    "archscope.probes": "archscope.methods.probes",
    "archscope._probe_net": "archscope.methods._probe_net",
    "archscope.neurons": "archscope.methods.neurons",
    "archscope.lens": "archscope.methods.lens",
    "archscope.circuits": "archscope.methods.circuits",
    "archscope.diff": "archscope.methods.diff",
    "archscope.transfer": "archscope.methods.transfer",
    "archscope.sae": "archscope.methods.sae",
    "archscope.attribute": "archscope.methods.attribute",
    "archscope.bench": "archscope.apps.bench",
    "archscope.cli": "archscope.apps.cli",
    "archscope.store": "archscope.apps.store",
    "archscope.pooling": "archscope.batch",
}

_warned: set[str] = set()


def deprecated(old: str, new: str, *, stacklevel: int = 3) -> None:
    """Warn, once per process for each ``old`` name, that it is deprecated in favour of
    ``new`` and goes away in `REMOVED_IN`."""
    if old in _warned:
        return
    _warned.add(old)
    warnings.warn(
        f"{old} is deprecated: use {new} instead (removed in archscope {REMOVED_IN})",
        DeprecationWarning,
        stacklevel=stacklevel,
    )


def moved_module(name: str) -> str | None:
    """The current name of a module imported by its 0.2 path (None when it did not move)."""
    for old, new in MOVED_MODULES.items():
        if name == old or name.startswith(old + "."):
            return new + name[len(old) :]
    return None


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves ``import archscope.<0.2 path>`` with the module at its new path (one object)."""

    def __init__(self) -> None:
        self._specs: dict[str, importlib.machinery.ModuleSpec | None] = {}

    def find_spec(
        self, fullname: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if moved_module(fullname) is None:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        new = moved_module(spec.name)
        assert new is not None
        deprecated(f"module {spec.name}", new, stacklevel=3)
        module = importlib.import_module(new)
        self._specs[spec.name] = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        # The import system stamps the alias's spec on the module; give it its own back.
        own = self._specs.pop(module.__spec__.name if module.__spec__ else "", None)
        if own is not None:
            module.__spec__ = own


def _backends_getattr(name: str) -> Any:
    """``archscope.backends.<Family>Backend``: 0.2 exposed one class per architecture there;
    they now live in plugins, found through the registry (with a warning)."""
    if name.endswith("Backend") and not name.startswith("_"):
        from .plugins import get_manager

        for entry in get_manager().backends:
            if entry.obj.__name__ == name:
                deprecated(
                    f"archscope.backends.{name}",
                    f"{entry.obj.__module__}.{name}, or Backend.for_model(model, "
                    f"hint={entry.name!r})",
                )
                return entry.obj
        raise AttributeError(
            f"archscope.backends has no {name!r}: no installed plugin registers a backend class "
            f"of that name (installed: {', '.join(e.obj.__name__ for e in get_manager().backends)})"
        )
    raise AttributeError(f"module 'archscope.backends' has no attribute {name!r}")


def install() -> None:
    """Let the 0.2 module paths import (idempotent; `archscope` calls it on import)."""
    if not any(isinstance(f, _MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _MovedModuleFinder())
    backends = sys.modules.get("archscope.backends")
    if backends is not None:  # the old per-family class names, served from the registry
        backends.__getattr__ = _backends_getattr  # type: ignore[method-assign]


def as_backend(model: Any, hint: str | None = None) -> Backend:
    """``model`` itself when it is an `archscope.Backend`, else ``Backend.for_model(model,
    hint=hint)``: the one place that accepts "a model or a Backend"."""
    from .backends import Backend

    if isinstance(model, Backend):
        return model
    return Backend.for_model(model, hint=hint)


def outputs_metric(
    metric_fn: Callable[..., Any],
) -> Callable[[torch.Tensor, torch.Tensor], Any]:
    """0.2's patching metric ``metric(outputs)`` (``outputs.logits``, ``outputs.attention_mask``)
    as a ``metric(logits, mask)`` of today."""
    deprecated(
        "a one-argument patching metric, metric(outputs)",
        "a metric taking (logits, mask)",
        stacklevel=5,
    )

    def metric(logits: torch.Tensor, mask: torch.Tensor) -> Any:
        return metric_fn(SimpleNamespace(logits=logits, attention_mask=mask))

    metric.__name__ = getattr(metric_fn, "__name__", "metric")
    return metric
