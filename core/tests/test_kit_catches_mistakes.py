"""The conformance kit fails, naming the missing piece, when part of a backend plugin is taken
away. Each case copies plugins/template, removes one piece, installs the copy with pip and runs
the template's own kit tests on it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TEMPLATE = Path(__file__).resolve().parents[2] / "plugins" / "template"

CASES = {
    "no-entry-point": (
        "pyproject.toml",
        '[project.entry-points.archscope]\ntemplate = "archscope_template.plugin"\n',
        "",
        "declares no entry point in the group 'archscope'",
    ),
    "no-registration": (
        "src/archscope_template/plugin.py",
        "    register(MinGRUBackend)\n",
        "    pass\n",
        "no backend named 'mingru' was registered by archscope-template",
    ),
    "no-can-handle": (
        "src/archscope_template/backend.py",
        "            return Confidence.EXACT\n",
        "            return None\n",
        "can_handle returned None for your own model",
    ),
    "heavy-import": (
        "src/archscope_template/plugin.py",
        "import archscope\n",
        "import archscope\nimport torch  # noqa\n",
        "imported ['torch']",
    ),
    "no-unembed": (
        "src/archscope_template/backend.py",
        "        return self.model.head(self.model.norm(residual))\n",
        "        return self.model.head(residual)\n",
        "apply the model's own final norm and head",
    ),
    "hooks-left-behind": (
        "src/archscope_template/backend.py",
        "class MinGRUBackend(HookBackend):\n",
        "class MinGRUBackend(HookBackend):\n"
        "    def _attach(self, name, ctx):\n"
        "        handle = super()._attach(name, ctx)\n"
        "        class Keep:\n"
        "            def remove(self):\n"
        "                pass\n"
        "        return Keep()\n\n",
        "hooks were left on",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_kit_names_what_is_missing(case, tmp_path):
    path, old, new, expected = CASES[case]
    copy = tmp_path / "plugin"
    shutil.copytree(TEMPLATE, copy, ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    target = copy / path
    text = target.read_text()
    assert old in text, f"the template changed: {old!r} not in {path}"
    target.write_text(text.replace(old, new))
    site = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--disable-pip-version-check",
            "--target",
            str(site),
            str(copy),
        ],
        check=True,
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARCHSCOPE_")}
    env["PYTHONPATH"] = str(site)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(copy / "tests")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode != 0, proc.stdout[-3000:]
    assert expected in proc.stdout, proc.stdout[-4000:]
