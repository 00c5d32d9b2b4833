"""The documentation keeps up with the code: every hook, role and capability is described."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

from archscope import hookspecs
from archscope.sites import CAPABILITIES, LAYER_ROLES, MODEL_ROLES
from archscope.testing import BackendContract

DOCS = Path(__file__).resolve().parents[2] / "docs"


def _hookspec_names() -> list[str]:
    return [
        name
        for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
        if hasattr(fn, "archscope_spec")
    ]


def test_every_hookspec_is_documented_for_plugin_authors():
    text = (DOCS / "plugin-authors.md").read_text()
    names = _hookspec_names()
    assert len(names) >= 4
    missing = [n for n in names if f"### `{n}`" not in text]
    assert not missing, f"docs/plugin-authors.md has no section for hookspecs {missing}"


def test_every_kit_test_is_listed_for_plugin_authors():
    text = (DOCS / "plugin-authors.md").read_text()
    tests = [n for n in dir(BackendContract) if n.startswith("test_")]
    missing = [n for n in tests if f"`{n}`" not in text]
    assert not missing, f"docs/plugin-authors.md does not describe kit tests {missing}"


def test_site_vocabulary_and_capabilities_are_documented():
    text = (DOCS / "architecture.md").read_text()
    for role in LAYER_ROLES:
        assert f"layer_i.{role}" in text, role
    for role in MODEL_ROLES:
        assert f"`{role}`" in text, role
    for capability in CAPABILITIES:
        assert f"`{capability}`" in text, capability


def _guide_program() -> str:
    """The Python blocks of the backend walk-through (sections 3 to 5) as one program; imports
    of the walk-through's own package are dropped, since everything lives in one namespace."""
    text = (DOCS / "plugin-authors.md").read_text()
    walk = text[text.index("## 3. The backend") : text.index("## 6. Publishing")]
    blocks = re.findall(r"```python\n(.*?)```", walk, re.S)
    lines = [
        line
        for block in blocks
        for line in block.splitlines()
        if not re.match(r"\s*from (\.|archscope_mymodel)", line)
    ]
    return "\n".join(lines)


def test_backend_walk_through_runs_and_its_backend_passes_the_kit():
    from archscope.plugins import _manager, refresh

    program = _guide_program()
    assert "class MyModelBackend" in program and "class TestMyModelBackend" in program
    namespace: dict[str, object] = {"__name__": "guide"}
    try:
        # runs the walk-through, which registers MyModelBackend in this process
        exec(compile(program, "docs/plugin-authors.md", "exec"), namespace)
        # the kit's checks that need no installed distribution, on the guide's own backend
        contract = namespace["TestMyModelBackend"]()
        for name in contract.model_names():
            for check in (
                "test_run_returns_logits",
                "test_site_metadata_matches_real_tensors",
                "test_extraction_matches_independent_reference",
                "test_early_stop_gives_identical_activations",
                "test_padding_handled_as_declared",
                "test_state_patch_reproduces_the_source_run",
                "test_unembed_reproduces_logits",
            ):
                getattr(contract, check)(name)
    finally:
        _manager._in_process[:] = [t for t in _manager._in_process if t[1].name != "mymodel"]
        refresh()
