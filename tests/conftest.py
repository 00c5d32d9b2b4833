"""Fixtures for the cross-architecture tests; the factories live in ``archs.py``."""

from __future__ import annotations

import pytest
from archs import ARCH_NAMES, Arch, arch


@pytest.fixture(params=ARCH_NAMES)
def any_arch(request: pytest.FixtureRequest) -> Arch:
    """Parametrises a test over a transformer, a Mamba, a hybrid and an LSTM."""
    return arch(request.param)
