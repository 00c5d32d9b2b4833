"""pytest plugin (entry point ``pytest11``): makes the conformance kit's marker known.

It imports nothing heavy, so having archscope installed costs pytest runs nothing.
"""

from __future__ import annotations

from typing import Any


def pytest_configure(config: Any) -> None:
    config.addinivalue_line(
        "markers", "archscope_contract: a test inherited from archscope.testing.BackendContract"
    )
