"""Class 6 of the reliability issue: ``ARCHSCOPE_PLUGINS`` naming a distribution that is not
installed warns with the unknown name and the installed ones instead of silently disabling
every plugin."""

from __future__ import annotations

import warnings

import pytest

import archscope.plugins as plugins


def test_unknown_plugin_name_warns_with_installed_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ARCHSCOPE_PLUGINS", "archscope-transformer,no-such-plugin")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            manager = plugins.refresh()
            names = manager.backends.names()
        text = " ".join(str(w.message) for w in caught)
        assert "no-such-plugin" in text and "archscope-transformer" in text
        assert "transformer" in names  # the named, installed plugin still loads
    finally:
        monkeypatch.delenv("ARCHSCOPE_PLUGINS")
        plugins.refresh()
