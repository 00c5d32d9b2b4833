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


#: The template made stateful: each minGRU layer's recurrent state h, as (heads, head_dim), is
#: the state site layer_i.state; runs can start from it (ctx.initial_state) and state_patch.
STATEFUL = [
    (
        "src/archscope_template/model.py",
        "    def forward(self, x: torch.Tensor) -> torch.Tensor:\n"
        "        z = torch.sigmoid(self.to_z(x))\n"
        "        candidate = self.to_h(x)\n"
        "        h = torch.zeros_like(x[:, 0])\n",
        "    def forward(self, x, h0=None):\n"
        "        z = torch.sigmoid(self.to_z(x))\n"
        "        candidate = self.to_h(x)\n"
        "        h = torch.zeros_like(x[:, 0]) if h0 is None else h0.reshape(x[:, 0].shape)\n",
    ),
    (
        "src/archscope_template/model.py",
        "    def forward(self, x: torch.Tensor) -> torch.Tensor:\n"
        "        x = x + self.mixer(self.norm1(x))\n",
        "    def forward(self, x, h0=None):\n        x = x + self.mixer(self.norm1(x), h0)\n",
    ),
    (
        "src/archscope_template/model.py",
        "        for block in self.blocks:\n            x = block(x)\n",
        "        for i, block in enumerate(self.blocks):\n"
        "            x = block(x, None if initial_state is None else initial_state[i])\n",
    ),
    (
        "src/archscope_template/model.py",
        "        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None\n",
        "        self, input_ids, attention_mask=None, initial_state=None\n",
    ),
    (
        "src/archscope_template/backend.py",
        '    capabilities = frozenset({"residual", "components", "unembed", "logits", "edit"})\n',
        "    capabilities = frozenset(\n"
        '        {"residual", "components", "unembed", "logits", "edit", "recurrent_state",\n'
        '         "state_patch"}\n'
        "    )\n"
        "    regroup_states = True\n"
        "\n"
        "    def forward(self, ctx):\n"
        "        given = ctx.initial_state or {}\n"
        '        states = [given.get(f"layer_{i}.state") for i in range(len(self.model.blocks))]\n'
        '        return self.model(ctx.batch["input_ids"], initial_state=states)\n',
    ),
    (
        "src/archscope_template/backend.py",
        '            table.add(f"layer_{i}.mixer", Hookpoint(block.mixer), dim=d)\n',
        '            table.add(f"layer_{i}.mixer", Hookpoint(block.mixer), dim=d)\n'
        "            table.add(\n"
        '                f"layer_{i}.state",\n'
        "                Hookpoint(block.mixer, to_site=lambda h: h[:, -1].reshape(len(h), 4, -1)),\n"
        "                dim=d // 4,\n"
        '                kind="state",\n'
        '                shape=("batch", "heads", "head_dim"),\n'
        "                writable=False,\n"
        "            )\n",
    ),
]

#: Mistakes of a stateful backend: (replacement in backend.py after STATEFUL, what the kit says).
STATEFUL_CASES = {
    "stateful-template-passes": None,
    "initial-state-not-checked": (
        (
            "    def forward(self, ctx):\n        given = ctx.initial_state or {}\n",
            "    def run(self, inputs, capture=(), edits=(), *, initial_state=None, **options):\n"
            "        self.given = initial_state  # kept on the backend: Backend.run never sees it\n"
            "        try:\n"
            "            return super().run(inputs, capture, edits, **options)\n"
            "        finally:\n"
            "            self.given = None\n"
            "\n"
            "    def forward(self, ctx):\n"
            '        given = getattr(self, "given", None) or {}\n',
        ),
        "Let Backend.run check it",
    ),
    "initial-state-ignored": (
        (
            '        return self.model(ctx.batch["input_ids"], initial_state=states)\n',
            '        return self.model(ctx.batch["input_ids"])\n',
        ),
        "must start the model from ctx.initial_state",
    ),
    "states-of-padded-rows": (
        ("    regroup_states = True\n", "\n"),
        "regroup_states = True",
    ),
    "limits-without-vocabulary": (
        (
            "    regroup_states = True\n",
            "    regroup_states = True\n"
            "\n"
            "    def input_limits(self):\n"
            "        from archscope.guards import InputLimits\n"
            "\n"
            "        return InputLimits(max_positions=4096)  # the vocabulary is left out\n",
        ),
        "override input_limits() to return archscope.guards.InputLimits(vocab_size=...)",
    ),
}


def _mutate(copy, path, old, new):
    target = copy / path
    text = target.read_text()
    assert old in text, f"the template changed: {old!r} not in {path}"
    target.write_text(text.replace(old, new))


@pytest.mark.parametrize("case", sorted(STATEFUL_CASES))
def test_kit_catches_mistakes_of_a_stateful_backend(case, tmp_path):
    copy = tmp_path / "plugin"
    shutil.copytree(TEMPLATE, copy, ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    for path, old, new in STATEFUL:
        _mutate(copy, path, old, new)
    spec = STATEFUL_CASES[case]
    if spec is not None:
        (old, new), _ = spec
        _mutate(copy, "src/archscope_template/backend.py", old, new)
    proc = _run_kit(copy, tmp_path)
    if spec is None:  # the stateful template itself passes, so each failure below is the mistake
        assert proc.returncode == 0, proc.stdout[-4000:]
        assert "wrong_axis" in proc.stdout and "vocabulary_id" in proc.stdout
        return
    assert proc.returncode != 0, proc.stdout[-3000:]
    assert spec[1] in proc.stdout, proc.stdout[-4000:]


@pytest.mark.parametrize("case", sorted(CASES))
def test_kit_names_what_is_missing(case, tmp_path):
    path, old, new, expected = CASES[case]
    copy = tmp_path / "plugin"
    shutil.copytree(TEMPLATE, copy, ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    _mutate(copy, path, old, new)
    proc = _run_kit(copy, tmp_path)
    assert proc.returncode != 0, proc.stdout[-3000:]
    assert expected in proc.stdout, proc.stdout[-4000:]


def _run_kit(copy, tmp_path):
    """Install the plugin folder ``copy`` and run its own kit tests on it."""
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
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-rA",
            "-p",
            "no:cacheprovider",
            str(copy / "tests"),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
