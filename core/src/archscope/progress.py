"""Progress bars of long loops (training epochs, batches): tqdm on stderr when it is a terminal,
nothing otherwise (logs and pipes stay clean)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def bar(
    iterable: Iterable[Any] | None = None,
    *,
    total: int | None = None,
    desc: str,
    unit: str = "it",
    enabled: bool | None = None,
) -> Any:
    """A tqdm bar over ``iterable`` (or one to ``update`` by hand). ``enabled``: None = only
    when stderr is a terminal, True / False = always / never."""
    from tqdm.auto import tqdm

    return tqdm(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        leave=False,
        dynamic_ncols=True,
        disable=None if enabled is None else not enabled,
    )
