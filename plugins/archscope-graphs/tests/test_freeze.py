"""The freezing contract (`archscope.freeze`) on every family: a frozen run reproduces the
prompt's logits, is affine in the embeddings (checked against the model itself, which is
not), and leaves no hook, weight or mode changed."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from click.testing import CliRunner

import archscope
from archscope import Edit
from archscope.freeze import FreezeError, freeze
from archscope.testing import check_frozen

FAMILIES = ["llama", "gpt2", "zoo-mamba", "zoo-lstm", "qwen3.5-hybrid"]


def _backend(family: str, request: Any) -> Any:
    if family.startswith("zoo-"):
        return request.getfixturevalue("zoo")[family[4:]][2]
    name = {"llama": "tiny_llama", "gpt2": "tiny_gpt2", "qwen3.5-hybrid": "tiny_hybrid"}
    return request.getfixturevalue(name[family])


def _ids(backend: Any, seq: int = 6, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    vocab = backend.sites()["logits"].dim
    return torch.randint(4, min(vocab, 90), (1, seq), generator=g)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_frozen_run_is_the_model_at_the_prompt_and_affine_around_it(
    family: str, request: Any
) -> None:
    backend = _backend(family, request)
    check_frozen(backend, _ids(backend))


def test_a_frozen_run_uses_eager_attention_and_gives_the_model_back_as_it_was(
    tiny_llama: Any,
) -> None:
    """Eager attention inside (the pattern a constant of the held scores: a backward pass
    does not compute the held queries' and keys' gradients); the model's own setting after."""
    config = tiny_llama.model.config
    before = config._attn_implementation
    config._attn_implementation = "sdpa"
    try:
        ids = _ids(tiny_llama)
        with freeze(tiny_llama, ids):
            assert config._attn_implementation == "eager"
            embed = tiny_llama.run(ids, capture=["embed"]).activations["embed"].detach()
            leaf = embed.clone().requires_grad_(True)
            edits = [Edit.replace("embed", leaf)]
            logits = tiny_llama.run(ids, capture=["logits"], edits=edits, grad=True).logits
            (grad,) = torch.autograd.grad(logits[0, -1, 0], leaf)
            assert torch.isfinite(grad).all() and bool(grad.abs().sum() > 0)
        assert config._attn_implementation == "sdpa"
    finally:
        config._attn_implementation = before


def test_a_frozen_run_refuses_another_length(tiny_llama: Any) -> None:
    ids = _ids(tiny_llama)
    with freeze(tiny_llama, ids), pytest.raises(FreezeError, match="prompt's run"):
        tiny_llama.run(_ids(tiny_llama, seq=8), capture=["logits"])


def test_a_backend_without_the_capability_is_named() -> None:
    from archscope_transformer.testing import tiny_model

    backend = archscope.Backend.for_model(tiny_model("llama", n_layers=1))
    backend.capabilities = backend.capabilities - {"freeze"}
    with pytest.raises(FreezeError, match="lacks the capability 'freeze'"):
        with freeze(backend, torch.tensor([[5, 6, 7]])):
            pass


def test_what_a_backend_cannot_freeze_is_said(tiny_llama: Any) -> None:
    with pytest.raises(FreezeError, match="cannot freeze router .*mixture-of-experts"):
        with freeze(tiny_llama, _ids(tiny_llama), require=["router"]):
            pass
    from archscope_transformer.testing import tiny_model

    gemma2 = archscope.Backend.for_model(tiny_model("gemma2", n_layers=1))
    with pytest.raises(FreezeError, match="soft-capping"):
        with freeze(gemma2, torch.tensor([[5, 6, 7]])):
            pass


def test_archscope_info_shows_freezing() -> None:
    from archscope.apps.cli import cli

    out = CliRunner().invoke(cli, ["info", "transformer"], terminal_width=200)
    assert out.exit_code == 0, out.output
    assert "freeze" in out.output and "attention_pattern" in out.output
    assert "cannot freeze logit_softcap" in out.output
    listed = CliRunner().invoke(cli, ["info", "--json"])
    import json

    backends = {b["name"]: b for b in json.loads(listed.output)["backends"]}
    assert "ssm_parameters" in backends["mamba"]["freezes"]
    assert "gate" in backends["recurrent"]["freezes"]
    methods = {m["name"] for m in json.loads(listed.output)["methods"]}
    assert "graph" in methods
