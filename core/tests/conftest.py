"""Fixtures for the core's tests: real, pip-installed test plugins in a private folder."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

import archscope.plugins

PLUGINS = Path(__file__).parent / "plugins"


@pytest.fixture(scope="session")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder where the test plugin distributions are installed with pip (their
    dist-info and entry points are real); put it on a path to make them visible."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--disable-pip-version-check",
            "--target",
            str(target),
            *(str(PLUGINS / name) for name in ("good", "broken", "conflict")),
        ],
        check=True,
    )
    return target


@pytest.fixture
def with_plugins(plugin_site: Path, monkeypatch: pytest.MonkeyPatch):
    """Make the installed test plugins visible to this process and rediscover (without the
    plugin whose names conflict with the others; `with_all_plugins` includes it)."""
    monkeypatch.setenv("ARCHSCOPE_DISABLE_PLUGINS", "conflict")
    yield from _visible(plugin_site, monkeypatch)


@pytest.fixture
def with_all_plugins(plugin_site: Path, monkeypatch: pytest.MonkeyPatch):
    yield from _visible(plugin_site, monkeypatch)


def _visible(plugin_site: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(plugin_site))
    monkeypatch.setenv("PYTHONPATH", str(plugin_site))  # for subprocesses (the kit starts some)
    importlib.invalidate_caches()
    yield archscope.plugins.refresh()
    monkeypatch.undo()
    for name in [m for m in sys.modules if m.startswith("archscope_testplugin_")]:
        del sys.modules[name]
    importlib.invalidate_caches()
    archscope.plugins.refresh()


def _run_cli(
    *args: str, site: Path | None = None, env: dict[str, str] | None = None, code: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `archscope ARGS` (or python -c CODE) in a fresh interpreter."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("ARCHSCOPE_")}
    if site is not None:
        full_env["PYTHONPATH"] = str(site)
    full_env.update(env or {})
    command = [sys.executable, "-c", code] if code else [sys.executable, "-m", "archscope", *args]
    return subprocess.run(command, capture_output=True, text=True, env=full_env, timeout=120)


@pytest.fixture
def run_cli():
    return _run_cli
