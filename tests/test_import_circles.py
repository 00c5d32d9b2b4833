"""No import circles in any package of the workspace, and no import from a lower layer of the
core up to a higher one.

Built on `ast` over the sources: an edge A -> B for every ``import`` / ``from ... import`` of
B written anywhere in A, at module level, inside functions and under ``if TYPE_CHECKING:``
alike. A deferred import hides a circle from the interpreter, not from the design: the two
modules still cannot be understood, tested or moved apart. ``from pkg import name`` is an edge
to ``pkg.name`` when that is a module of the package, else to ``pkg``; importing a module does
not count as importing its parent packages.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: package name -> its source folder
PACKAGES = {
    "archscope": ROOT / "core/src/archscope",
    **{path.name: path for path in sorted(ROOT.glob("archscope-*/src/archscope_*"))},
    **{
        path.name: path
        for plugin in sorted((ROOT / "plugins").iterdir())
        for path in sorted((plugin / "src").glob("*"))
        if (path / "__init__.py").is_file()
    },
}


def modules_of(package: str, folder: Path) -> dict[str, Path]:
    out = {}
    for path in sorted(folder.rglob("*.py")):
        parts = [package, *path.relative_to(folder).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports_in(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement of a module, wherever it is."""
    return [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]


def import_graph(package: str, folder: Path) -> dict[str, set[str]]:
    modules = modules_of(package, folder)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        here = name if is_package else name.rpartition(".")[0]
        for node in imports_in(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:
                    base = here.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                targets = [
                    f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source
                    for alias in node.names
                ]
            for target in targets:
                # `import a.b.c` names a module; keep the longest prefix that is one of ours
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


@pytest.mark.parametrize(
    "package",
    list(PACKAGES),
)
def test_no_import_circle(package: str) -> None:
    found = circles(import_graph(package, PACKAGES[package]))
    assert not found, f"import circles in {package}: " + "; ".join(" <-> ".join(c) for c in found)


def test_the_check_sees_a_circle(tmp_path: Path) -> None:
    """The detector itself: a two-module circle is found, also through an import inside a
    function or under TYPE_CHECKING; none is found without the back edge."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("from .a import thing\n")
    assert circles(import_graph("pkg", pkg)) == [["pkg.a", "pkg.b"]]
    (pkg / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import thing\n"
    )
    assert circles(import_graph("pkg", pkg)) == [["pkg.a", "pkg.b"]]
    (pkg / "b.py").write_text("def f():\n    from . import a\n")
    assert circles(import_graph("pkg", pkg)) == [["pkg.a", "pkg.b"]]
    (pkg / "b.py").write_text("import os\n")
    assert circles(import_graph("pkg", pkg)) == []


#: The core's layers, lowest first: a module may import its own layer and those below.
#: The runtime (and the shared foundations: errors, params, results, registry, plugins, the
#: 0.2 home) is every top-level module; methods build on it; applications (the command line,
#: the profile, the store, the conformance kit, ``python -m archscope``) on both.
LAYERS = {"methods": 1, "apps": 2, "testing": 2, "__main__": 2}


def layer_of(module: str) -> int:
    parts = module.split(".")
    return LAYERS.get(parts[1], 0) if len(parts) > 1 and parts[1] in LAYERS else 0


def test_no_import_from_a_lower_layer_up() -> None:
    graph = import_graph("archscope", PACKAGES["archscope"])
    upward = sorted(
        f"{a} -> {b}" for a, targets in graph.items() for b in targets if layer_of(b) > layer_of(a)
    )
    assert not upward, "imports from a lower layer up: " + "; ".join(upward)
