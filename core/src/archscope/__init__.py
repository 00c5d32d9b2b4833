"""archscope: one mechanistic-interpretability API for every neural architecture.

The core defines the protocols (sites, backends, methods, model sources), discovers plugins
through entry points, runs the hook engine and the built-in methods. Architecture support
comes from separately installed plugins. Heavy modules are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.3.0"

from .hookspecs import hookimpl
from .registry import Method, ModelSource
from .sites import CAPABILITIES, Site, SiteError, SiteInfo

_LAZY = {
    "Backend": "archscope.backends",
    "ActivationRecord": "archscope.backends",
    "Edit": "archscope.backends",
    "RunResult": "archscope.backends",
    "BackendError": "archscope.backends",
    "NoBackendError": "archscope.backends",
    "PaddingError": "archscope.backends",
    "HookBackend": "archscope.engine",
    "Hookpoint": "archscope.engine",
    "load_model": "archscope.loader",
    "make_tokenize_fn": "archscope.loader",
    "pool": "archscope.pooling",
}
_SUBMODULES = {"backends", "engine", "loader", "plugins", "pooling", "sites", "registry",
               "methods", "testing", "cli", "hookspecs"}

__all__ = ["CAPABILITIES", "Method", "ModelSource", "Site", "SiteError", "SiteInfo",
           "__version__", "hookimpl", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"archscope.{name}")
    raise AttributeError(f"module 'archscope' has no attribute {name!r}")
