"""What methods return: `Result`, a mixin for result dataclasses that gives JSON, Markdown and,
where a picture says more than a table, a PNG figure (matplotlib, the ``plot`` extra)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from .errors import ArchscopeError


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: _plain(getattr(value, f.name))
            for f in dataclasses.fields(value)
            if not f.name.startswith("_")
        }
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist"):  # tensors, numpy values
        return _plain(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, Path):
        return str(value)
    return value


def pyplot() -> Any:
    """matplotlib's pyplot on the non-interactive Agg backend, or a clear error naming the
    extra to install."""
    try:
        import matplotlib
    except ImportError:
        raise ArchscopeError("figures need matplotlib: pip install 'archscope[plot]'") from None
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


class Result:
    """Mixin for result dataclasses: ``to_dict``, ``to_json``, ``to_markdown`` and ``plot``.

    Subclasses override `to_markdown` with a real table and, when a figure helps, `figure`
    (returning a matplotlib Figure); `plot(path)` writes it as a PNG.
    """

    def to_dict(self) -> dict[str, Any]:
        plain = _plain(self)
        assert isinstance(plain, dict), "Result is a mixin for dataclasses"
        return plain

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def to_markdown(self) -> str:
        lines = [f"## {type(self).__name__}", ""]
        for key, value in self.to_dict().items():
            lines.append(f"- **{key}**: {value}")
        return "\n".join(lines)

    def figure(self) -> Any:
        """A matplotlib Figure of this result (override where a picture says more)."""
        raise ArchscopeError(f"{type(self).__name__} has no figure; use to_markdown() or to_json()")

    def plot(self, path: str | Path) -> Path:
        """Write `figure` as a PNG to ``path`` and return the path."""
        plt = pyplot()
        fig = self.figure()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fig.savefig(path, format="png", dpi=110, bbox_inches="tight")
        finally:
            plt.close(fig)
        return path

    def save(self, path: str | Path) -> Path:
        """Write the result by suffix: ``.json``, ``.md`` or ``.png``."""
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix == ".png":
            return self.plot(path)
        if suffix not in (".json", ".md"):
            raise ArchscopeError(
                f"cannot write a result as {suffix or 'a file without suffix'}"
                "; use .json, .md or .png"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json() if suffix == ".json" else self.to_markdown() + "\n")
        return path
