"""Every error a first-party package raises derives from `archscope.ArchscopeError` and from the
builtin a caller expects: checked over the sources (no ``raise ValueError(...)`` and the like),
over the exception classes the packages define, and on the cases that escaped before."""

from __future__ import annotations

import ast
import builtins
import importlib
import pkgutil
from pathlib import Path

import pytest
import torch
from archs import arch

import archscope
from archscope import ArchscopeError, Edit, SiteError
from archscope.edits import EditError
from archscope.errors import NotCapturedError

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [
    ROOT / "core/src/archscope",
    *sorted(ROOT.glob("archscope-*/src/archscope_*")),
    *sorted(ROOT.glob("plugins/*/src/*")),
]
PACKAGES = [p.name for p in SOURCES if (p / "__init__.py").is_file()]

#: Builtin exceptions that stay builtin: the protocols of abstract methods and of module
#: ``__getattr__``, broken invariants (bugs, like a failed ``assert``) and a command's exit.
PROTOCOL = {
    "NotImplementedError",
    "AttributeError",
    "AssertionError",
    "StopIteration",
    "SystemExit",
}
#: (file, function) pairs allowed to raise a builtin, with why.
ALLOWED = {
    # internal to parameter parsing: ParamSpec.parse / check turn these into ParameterError
    ("core/src/archscope/params.py", "_parse"),
    ("core/src/archscope/params.py", "_coerce"),
    # the conformance kit's model that fails on purpose, to check that hooks are removed
    ("core/src/archscope/testing/backend_contract.py", "boom"),
}
#: Exception classes that are control flow, never seen by a caller.
CONTROL_FLOW = {"archscope.engine.StopForward"}


def raises_in(tree: ast.AST, function: str = "") -> list[tuple[str, ast.Raise]]:
    """(innermost enclosing function name, raise statement) for every raise in ``tree``."""
    found = []
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found += raises_in(node, node.name)
        else:
            if isinstance(node, ast.Raise):
                found.append((function, node))
            found += raises_in(node, function)
    return found


def builtin_raises() -> list[str]:
    found = []
    for folder in SOURCES:
        for path in sorted(folder.rglob("*.py")):
            rel = str(path.relative_to(ROOT))
            for function, node in raises_in(ast.parse(path.read_text(), rel)):
                if not isinstance(node.exc, ast.Call) or not isinstance(node.exc.func, ast.Name):
                    continue
                cls = getattr(builtins, node.exc.func.id, None)
                if (
                    isinstance(cls, type)
                    and issubclass(cls, BaseException)
                    and cls.__name__ not in PROTOCOL
                    and (rel, function) not in ALLOWED
                ):
                    found.append(f"{rel}:{node.lineno} raises {cls.__name__}")
    return found


def test_no_first_party_code_raises_a_bare_builtin() -> None:
    found = builtin_raises()
    assert not found, "raise an archscope error instead: " + "; ".join(found)


def exception_classes(package: str) -> list[type]:
    root = importlib.import_module(package)
    names = [package] + [
        m.name
        for m in pkgutil.walk_packages(root.__path__, package + ".")
        if ".testing.pytest_plugin" not in m.name and not m.name.endswith("__main__")
    ]
    found = []
    for name in names:
        module = importlib.import_module(name)
        for value in vars(module).values():
            if (
                isinstance(value, type)
                and issubclass(value, Exception)
                and not issubclass(value, Warning)
                and value.__module__ == name
            ):
                found.append(value)
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_every_exception_class_is_an_archscope_error(package: str) -> None:
    outside = [
        f"{c.__module__}.{c.__qualname__}"
        for c in exception_classes(package)
        if not issubclass(c, ArchscopeError)
        and f"{c.__module__}.{c.__qualname__}" not in CONTROL_FLOW
    ]
    assert not outside, f"{package} defines errors outside ArchscopeError: {outside}"


def test_structure_error_is_an_archscope_error_and_a_value_error() -> None:
    from archscope_transformer.structure import StructureError

    assert issubclass(StructureError, ArchscopeError) and issubclass(StructureError, ValueError)


def test_run_result_lookup_names_the_captured_sites() -> None:
    backend = arch("gpt2").backend
    result = backend.run([[5, 6, 7]], capture=["layer_0.residual"])
    with pytest.raises(NotCapturedError, match="layer_0.residual") as caught:
        result["layer_1.residual"]
    assert isinstance(caught.value, KeyError) and isinstance(caught.value, SiteError)
    with pytest.raises(SiteError):
        result["not a site!"]


def test_the_same_bad_edit_raises_the_same_error_on_every_path() -> None:
    backend = arch("gpt2").backend
    bad = ["layer_0.residual"]  # a site name where an Edit belongs
    with pytest.raises(EditError) as through_run:
        backend.run([[5, 6, 7]], edits=bad)
    with pytest.raises(EditError) as through_check:
        backend.check_request([], bad)
    for caught in (through_run, through_check):
        assert isinstance(caught.value, TypeError)  # as 0.2 raised
        assert "archscope.Edit" in str(caught.value) and "str" in str(caught.value)
    good = Edit.add("layer_0.residual", torch.zeros(backend.site_info("layer_0.residual").dim))
    assert backend.check_request([], [good])[1]


def test_public_error_names_are_exported() -> None:
    for name in ("NotCapturedError", "MissingKeyError", "UsageError", "DependencyError"):
        assert issubclass(getattr(archscope.errors, name), ArchscopeError)
