"""Class 4 of the reliability issue (API side): a hint naming a backend that cannot serve the
model is refused by `Backend.for_model` with a message naming the model, the backend and the
backends that can serve it, instead of an error from inside that backend; the CLI shows it
without a traceback."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from archs import arch

import archscope
from archscope.errors import BackendError, NoBackendError


@pytest.mark.parametrize(
    ("name", "hint", "fits"),
    [
        ("lstm", "transformer", "recurrent"),
        ("gpt2", "recurrent", "transformer"),
        ("gpt2", "mamba", "transformer"),
    ],
)
def test_hint_that_cannot_serve_the_model(name: str, hint: str, fits: str) -> None:
    model = arch(name).model
    with pytest.raises(BackendError) as info:  # NoBackendError, or the backend's own class
        archscope.Backend.for_model(model, hint=hint)
    message = str(info.value)
    assert f"{hint!r} cannot serve {type(model).__name__}" in message
    assert fits in message  # the backend that can
    assert "hint" in message


def test_hint_that_can_serve_the_model_is_used() -> None:
    model = arch("lstm").model
    assert archscope.Backend.for_model(model, hint="recurrent").name == "recurrent"


def test_unknown_hint_lists_registered_backends() -> None:
    with pytest.raises(NoBackendError, match=r"unknown backend hint 'nope'.*transformer"):
        archscope.Backend.for_model(arch("gpt2").model, hint="nope")


def test_cli_arch_that_cannot_serve_the_model_exits_1_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from archscope.apps.cli import main

    a = arch("gpt2")
    folder = tmp_path / "m"
    # a copy: save_pretrained writes into the model's config (architectures), and the shared
    # model's config hash must not change for later tests (the store compares it across
    # processes)
    copy.deepcopy(a.model).save_pretrained(folder)
    a.tokenizer.save_pretrained(folder)
    with pytest.raises(SystemExit) as code:
        main(["run", "logit-lens", str(folder), "--arch", "recurrent", "--text", "w4 w5"])
    err = capsys.readouterr().err
    assert code.value.code == 1, err
    assert "Traceback" not in err
    assert "'recurrent' cannot serve GPT2LMHeadModel" in err
