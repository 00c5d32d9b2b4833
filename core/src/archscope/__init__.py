"""archscope: one mechanistic-interpretability API for every neural architecture.

The core defines the protocols (sites, backends, methods, model sources), discovers plugins
through entry points, runs the hook engine and the built-in methods. Architecture support
comes from separately installed plugins. Importing archscope imports no torch: the public
names below are light; torch is imported when a model runs.
"""

from __future__ import annotations

import importlib
from typing import Any

from . import legacy as _legacy
from ._version import __version__
from .adapter import ModelSpec
from .artifacts import Artifact, ArtifactFit
from .backends import ActivationRecord, Backend, RunRequest, RunResult
from .batch import pool
from .collect import Collected, collect, iter_collect
from .data import Contrast, Dataset
from .detection import Confidence
from .edits import Edit
from .engine import HookBackend
from .errors import (
    ArchscopeError,
    ArtifactError,
    BackendError,
    CapabilityError,
    InputError,
    MethodError,
    ModelSourceError,
    NoBackendError,
    PaddingError,
    ParameterError,
    PluginError,
    SiteError,
)
from .hookpoints import Hookpoint, SiteTable
from .hookspecs import hookimpl
from .legacy import as_backend
from .loader import load_model, make_tokenize_fn
from .params import Param
from .registry import Method, ModelSource, method, run_method
from .results import Result
from .sites import CAPABILITIES, Site, SiteInfo

_legacy.install()  # the 0.2 module paths (archscope.probes, ...) import, with a warning

#: Submodules reachable as attributes (``archscope.probes``), imported on first use.
_SUBMODULES = {
    "adapter",
    "apps",
    "artifacts",
    "attribute",
    "backends",
    "batch",
    "bench",
    "circuits",
    "cli",
    "collect",
    "compat",
    "data",
    "detection",
    "diff",
    "edits",
    "engine",
    "errors",
    "hookpoints",
    "hookspecs",
    "legacy",
    "lens",
    "loader",
    "methods",
    "modules",
    "neurons",
    "params",
    "plugins",
    "pooling",
    "probes",
    "registry",
    "results",
    "sae",
    "sites",
    "store",
    "testing",
    "transfer",
}

__all__ = [
    "CAPABILITIES",
    "ActivationRecord",
    "ArchscopeError",
    "Artifact",
    "ArtifactError",
    "ArtifactFit",
    "Backend",
    "BackendError",
    "CapabilityError",
    "Collected",
    "Confidence",
    "Contrast",
    "Dataset",
    "Edit",
    "HookBackend",
    "Hookpoint",
    "InputError",
    "Method",
    "MethodError",
    "ModelSource",
    "ModelSourceError",
    "ModelSpec",
    "NoBackendError",
    "PaddingError",
    "Param",
    "ParameterError",
    "PluginError",
    "Result",
    "RunRequest",
    "RunResult",
    "Site",
    "SiteError",
    "SiteInfo",
    "SiteTable",
    "__version__",
    "as_backend",
    "collect",
    "hookimpl",
    "iter_collect",
    "load_model",
    "make_tokenize_fn",
    "method",
    "pool",
    "run_method",
]


def __getattr__(name: str) -> Any:
    moved = _legacy.moved_module(f"archscope.{name}")
    if moved is not None:
        _legacy.deprecated(f"module archscope.{name}", moved)
        return importlib.import_module(moved)
    if name in _SUBMODULES:
        return importlib.import_module(f"archscope.{name}")
    raise AttributeError(f"module 'archscope' has no attribute {name!r}")
