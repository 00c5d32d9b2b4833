"""The documentation keeps up with the code: every hook, role and capability is described."""

from __future__ import annotations

import inspect
from pathlib import Path

from archscope import hookspecs
from archscope.sites import CAPABILITIES, LAYER_ROLES, MODEL_ROLES
from archscope.testing import BackendContract

DOCS = Path(__file__).resolve().parents[2] / "docs"


def _hookspec_names() -> list[str]:
    return [name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
            if hasattr(fn, "archscope_spec")]


def test_every_hookspec_is_documented_for_plugin_authors():
    text = (DOCS / "plugin-authors.md").read_text()
    names = _hookspec_names()
    assert len(names) >= 4
    missing = [n for n in names if f"### `{n}`" not in text]
    assert not missing, f"docs/plugin-authors.md has no section for hookspecs {missing}"


def test_every_kit_test_is_listed_for_plugin_authors():
    text = (DOCS / "plugin-authors.md").read_text()
    tests = [n for n in dir(BackendContract) if n.startswith("test_")]
    missing = [n for n in tests if f"`{n}`" not in text]
    assert not missing, f"docs/plugin-authors.md does not describe kit tests {missing}"


def test_site_vocabulary_and_capabilities_are_documented():
    text = (DOCS / "architecture.md").read_text()
    for role in LAYER_ROLES:
        assert f"layer_i.{role}" in text, role
    for role in MODEL_ROLES:
        assert f"`{role}`" in text, role
    for capability in CAPABILITIES:
        assert f"`{capability}`" in text, capability
