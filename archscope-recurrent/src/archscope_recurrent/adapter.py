"""Kept for 0.2 imports: the declarative custom-model adapter lives in the core
(`archscope.adapter`); this package registers it as the ``custom`` backend."""

from __future__ import annotations

from archscope.adapter import AdapterBackend, ModelSpec, SpecError, describe, resolve_path

__all__ = ["AdapterBackend", "ModelSpec", "SpecError", "describe", "resolve_path"]
