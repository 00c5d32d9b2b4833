"""The ``family`` fixture; helpers live in transformer_reference.py (importable by tests)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from archscope_transformer.testing import FAMILY_NAMES

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(params=FAMILY_NAMES)
def family(request: pytest.FixtureRequest) -> str:
    return request.param  # type: ignore[no-any-return]
