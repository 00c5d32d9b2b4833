"""The Python examples in the docs run as written (each page's blocks in order, in one
namespace), so the guides cannot drift from the code."""

from __future__ import annotations

import re
import sys
import types
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [
    "README.md",
    "docs/methods.md",
    "docs/probes.md",
    "docs/sae.md",
    "docs/patching.md",
    "docs/store.md",
    "docs/architecture.md",
    "docs/backend-transformer.md",
    "docs/backend-mamba.md",
    "docs/backend-recurrent.md",
    "docs/backend-hybrid.md",
    "docs/custom-models.md",
]


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)


@pytest.mark.parametrize("page", PAGES)
def test_python_examples_run(page: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = python_blocks(ROOT / page)
    assert blocks, f"{page} has no python examples"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "texts.jsonl").write_text(
        '{"text": "w5 w6", "label": 1}\n{"text": "w7", "label": 0}\n'
    )
    module = types.ModuleType("doc_example")  # dataclasses look their module up
    monkeypatch.setitem(sys.modules, "doc_example", module)
    namespace = module.__dict__
    # Examples may train briefly and warn about it; none may use a deprecated archscope name.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for number, block in enumerate(blocks, 1):
            try:
                exec(compile(block, f"{page}[block {number}]", "exec"), namespace)
            except Exception as exc:
                raise AssertionError(f"{page}, python block {number} failed: {exc!r}") from exc
    deprecated = [
        str(w.message)
        for w in caught
        if issubclass(w.category, DeprecationWarning) and "archscope" in str(w.message)
    ]
    assert not deprecated, f"{page} uses deprecated names: {deprecated}"
