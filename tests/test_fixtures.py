"""The shared fixtures build every architecture with the backend that serves it."""

from __future__ import annotations

from archs import ARCH_NAMES, arch


def test_each_architecture_gets_its_own_backend() -> None:
    names = {arch(n).backend.name for n in ARCH_NAMES}
    assert {"transformer", "mamba", "recurrent"} <= names
