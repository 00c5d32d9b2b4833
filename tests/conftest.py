"""Fixtures for the cross-architecture tests; the factories live in ``archs.py``."""

from __future__ import annotations

import pytest
from archs import ARCH_NAMES, Arch, arch


@pytest.fixture(params=ARCH_NAMES)
def any_arch(request: pytest.FixtureRequest) -> Arch:
    """Parametrises a test over a transformer, a Mamba, a hybrid and an LSTM."""
    return arch(request.param)


@pytest.fixture
def run_cli_root():
    """Run ``archscope ARGS`` in a fresh interpreter (the installed entry point)."""
    import os
    import subprocess
    import sys

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ARCHSCOPE_")}
        return subprocess.run(
            [sys.executable, "-m", "archscope", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )

    return run
