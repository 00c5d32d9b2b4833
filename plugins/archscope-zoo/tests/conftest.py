"""This package's retraining tests (marked ``slow``: minutes of CPU each, retraining all three
zoo models) run only when asked for with ``pytest -m slow``; the default run loads the shipped
weights and stays fast. The deselection covers this folder's tests only: ``slow`` tests of other
packages in the same session still run."""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if "slow" in (config.getoption("markexpr") or ""):
        return
    slow = [
        item
        for item in items
        if item.get_closest_marker("slow") is not None
        and HERE in Path(str(item.path)).resolve().parents
    ]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if item not in slow]
