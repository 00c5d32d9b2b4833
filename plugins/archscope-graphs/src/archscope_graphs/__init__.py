"""Transcoders and attribution graphs for every archscope backend (a method plugin)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .types import AttributionGraph, Node, NodeKind, Transcoder

if TYPE_CHECKING:
    from .site_features import SiteFeatures, site_features

#: names from modules that import torch, loaded on first use (importing the package does not)
_LAZY = {"SiteFeatures": ".site_features", "site_features": ".site_features"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["AttributionGraph", "Node", "NodeKind", "SiteFeatures", "Transcoder", "site_features"]
