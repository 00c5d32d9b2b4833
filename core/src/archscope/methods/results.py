"""Common behaviour of method results: JSON and Markdown output."""

from __future__ import annotations

import dataclasses
import json
from typing import Any


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist"):  # tensors, numpy values
        return value.tolist()
    return value


class Result:
    """Mixin for result dataclasses: ``to_dict``, ``to_json`` and a default ``to_markdown``."""

    def to_dict(self) -> dict[str, Any]:
        return _plain(self)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def to_markdown(self) -> str:
        lines = [f"## {type(self).__name__}", ""]
        for key, value in self.to_dict().items():
            lines.append(f"- **{key}**: {value}")
        return "\n".join(lines)
