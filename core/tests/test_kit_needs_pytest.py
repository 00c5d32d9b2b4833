"""Importing the conformance kit without pytest says what to install."""

from __future__ import annotations

import subprocess
import sys


def test_kit_without_pytest_names_the_extra():
    code = (
        "import sys\nsys.modules['pytest'] = None\n"
        "try:\n    import archscope.testing\nexcept ImportError as exc:\n    print(exc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "pip install 'archscope[testing]'" in proc.stdout, proc.stdout + proc.stderr
