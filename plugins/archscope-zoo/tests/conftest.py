"""The zoo's retraining tests (marked ``slow``: minutes of CPU each) are deselected from a plain
run of this package's tests unless asked for with ``pytest -m slow`` or ``ARCHSCOPE_ZOO_RETRAIN=1``
(`make test` sets it, so CI runs them). The deselection touches this package's items only: the
store's slow tests elsewhere in the session always run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

_HERE = Path(__file__).parent.resolve()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if "slow" in (config.getoption("markexpr") or "") or os.environ.get("ARCHSCOPE_ZOO_RETRAIN"):
        return
    ours = [
        item
        for item in items
        if item.get_closest_marker("slow") is not None and _HERE in Path(item.path).parents
    ]
    if ours:
        config.hook.pytest_deselected(items=ours)
        items[:] = [item for item in items if item not in ours]
