"""Contract rules for backend packages: a backend is written against the core's public contract
only. These tests read the packages' source with `ast` and fail on any reference to an
underscored member of the core: a private method or attribute of a core class (``x._table``,
overriding ``_attach``), a private name imported from the core (``from archscope.x import _y``)
or a private core module (``archscope.methods.attribute._engine``)."""

from __future__ import annotations

import ast
import functools
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORE = ROOT / "core" / "src" / "archscope"
#: Every backend package's source: the first-party backends and every plugin.
BACKEND_SOURCES = [
    ROOT / "archscope-transformer" / "src",
    ROOT / "archscope-mamba" / "src",
    ROOT / "archscope-recurrent" / "src",
    ROOT / "archscope-hybrid" / "src",
    *sorted(p / "src" for p in (ROOT / "plugins").iterdir() if (p / "src").is_dir()),
    *sorted(
        p / "src" for p in (ROOT / "core" / "tests" / "plugins").iterdir() if (p / "src").is_dir()
    ),
]


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


@functools.cache
def core_private_members(core: Path = CORE) -> frozenset[str]:
    """Underscored names the core's classes define: methods, class attributes and attributes
    their methods set on ``self`` / ``cls``."""
    names: set[str] = set()
    for path in core.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
            for node in ast.walk(cls):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    if _private(node.name):
                        names.add(node.name)
                elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                    if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                        if _private(node.attr):
                            names.add(node.attr)
                elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                    names.update(
                        t.id for t in targets if isinstance(t, ast.Name) and _private(t.id)
                    )
    return frozenset(names)


def _import_violations(node: ast.Import | ast.ImportFrom, bound: set[str]) -> Iterator[str]:
    """Private core modules or names imported by ``node``; adds the names bound to core
    modules or objects to ``bound``."""
    if isinstance(node, ast.Import):
        for alias in node.names:
            if alias.name.split(".")[0] == "archscope":
                bound.add(alias.asname or "archscope")
                if any(_private(part) for part in alias.name.split(".")):
                    yield f"imports the private core module {alias.name}"
        return
    if node.level or not node.module or node.module.split(".")[0] != "archscope":
        return
    if any(_private(part) for part in node.module.split(".")):
        yield f"imports from the private core module {node.module}"
    for alias in node.names:
        if _private(alias.name):
            yield f"imports {alias.name} from {node.module}"
        else:
            bound.add(alias.asname or alias.name)


def _overrides(node: ast.ClassDef, private_members: frozenset[str]) -> Iterator[str]:
    """Private core members that the class ``node`` defines again (overrides)."""
    for item in node.body:
        if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
            defined = [item.name]
        elif isinstance(item, ast.Assign):
            defined = [t.id for t in item.targets if isinstance(t, ast.Name)]
        elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
            defined = [item.target.id]
        else:
            continue
        for name in defined:
            if name in private_members:
                yield f"{node.name} overrides {name}, a private member of a core class"


def violations(
    source: str, private_members: frozenset[str], where: str = "<source>"
) -> Iterator[str]:
    """Each reference of ``source`` to an underscored member of the core, as ``where:line: what``."""
    tree = ast.parse(source)
    bound: set[str] = set()  # local names bound to archscope modules and objects
    for node in ast.walk(tree):
        found: list[str] = []
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found = list(_import_violations(node, bound))
        elif isinstance(node, ast.Attribute) and _private(node.attr):
            if node.attr in private_members:
                found = [f"uses {node.attr}, a private member of a core class"]
            elif isinstance(node.value, ast.Name) and node.value.id in bound:
                found = [f"uses {node.value.id}.{node.attr}, private to the core"]
        elif isinstance(node, ast.ClassDef):
            found = list(_overrides(node, private_members))
        for what in found:
            yield f"{where}:{getattr(node, 'lineno', 0)}: {what}"


def _backend_files() -> list[Path]:
    return [f for src in BACKEND_SOURCES for f in sorted(src.rglob("*.py"))]


def test_the_rule_reads_every_backend_package() -> None:
    packages = {src.parent.name for src in BACKEND_SOURCES}
    assert {
        "archscope-transformer",
        "archscope-mamba",
        "archscope-recurrent",
        "archscope-hybrid",
        "template",
    } <= packages
    assert len(_backend_files()) > 20
    # the engine's privates are among the names the rule knows
    assert {"_attach", "_start", "_find_logits"} <= core_private_members()


def test_no_backend_package_touches_a_private_member_of_the_core() -> None:
    members = core_private_members()
    found = [
        v
        for path in _backend_files()
        for v in violations(path.read_text(encoding="utf-8"), members, str(path.relative_to(ROOT)))
    ]
    assert not found, "backend packages must use the core's public contract:\n" + "\n".join(found)


@pytest.mark.parametrize(
    "line",
    [
        "run = backend._start(request)",
        "handle = super()._attach(name, ctx)",
        "from archscope.plugins import _manager",
        "from archscope.methods.attribute._engine import sweep",
        "import archscope.methods._probe_net",
        "import archscope.plugins as p\np._manager.clear()",
        "class B(HookBackend):\n    def _attach(self, name, ctx):\n        return None",
    ],
)
def test_the_rule_catches_each_kind_of_private_access(line: str) -> None:
    assert list(violations(line, core_private_members())), line


def test_public_use_and_own_private_names_pass() -> None:
    source = (
        "from archscope.engine import HookBackend, SiteTable\n"
        "class B(HookBackend):\n"
        "    def _own_helper(self):\n"
        "        return self.table.info('embed'), self._own_helper\n"
    )
    assert not list(violations(source, core_private_members()))
