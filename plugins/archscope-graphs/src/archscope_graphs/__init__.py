"""Transcoders and attribution graphs for every archscope backend (a method plugin)."""

from __future__ import annotations

from .types import AttributionGraph, Node, NodeKind, Transcoder

__all__ = ["AttributionGraph", "Node", "NodeKind", "Transcoder"]
