"""layer_i.attn_pattern: eager attention for that run only, equal to HF output_attentions."""

from __future__ import annotations

import torch
from transformer_reference import ids_for, model_of

from archscope import Backend, Edit
from archscope_transformer.testing import tiny_model

PATTERNS = [f"layer_{i}.attn_pattern" for i in range(3)]


def test_patterns_equal_hf_output_attentions_and_are_causal_distributions(family: str) -> None:
    model = model_of(family)
    backend = Backend.for_model(model)
    before = model.config._attn_implementation
    ids = ids_for(14)
    result = backend.run(ids, capture=[*PATTERNS, "layer_2.residual", "logits"])
    assert model.config._attn_implementation == before
    eager = tiny_model(family, attn_implementation="eager")  # same seed, same weights
    with torch.no_grad():
        reference = eager(ids, output_attentions=True)
    torch.testing.assert_close(result.logits, reference.logits, atol=1e-5, rtol=0)
    n_heads = model.config.num_attention_heads
    for i, name in enumerate(PATTERNS):
        pattern = result[name]
        assert pattern.shape == (2, n_heads, 7, 7)
        torch.testing.assert_close(pattern.sum(-1), torch.ones(2, n_heads, 7))
        assert torch.all(pattern.triu(diagonal=1) == 0), "attention to later positions"
        torch.testing.assert_close(pattern, reference.attentions[i], atol=1e-6, rtol=0)


def test_the_attention_implementation_is_restored_also_after_an_error() -> None:
    model = tiny_model("llama")
    assert model.config._attn_implementation == "sdpa"
    backend = Backend.for_model(model)
    ids = ids_for(15)
    plain = backend.run(ids, capture=["logits"]).logits

    def fail(value: torch.Tensor) -> torch.Tensor:
        assert model.config._attn_implementation == "eager"  # switched for this run
        raise RuntimeError("edit failed on purpose")

    try:
        backend.run(
            ids,
            capture=["layer_0.attn_pattern"],
            edits=[Edit.apply("layer_0.residual", fail)],
            stop_early=False,
        )
    except RuntimeError as exc:
        assert "on purpose" in str(exc)
    else:
        raise AssertionError("the edit should have raised")
    assert model.config._attn_implementation == "sdpa"
    assert model.model.layers[0].self_attn.config._attn_implementation == "sdpa"
    assert torch.equal(backend.run(ids, capture=["logits"]).logits, plain)


def test_runs_without_patterns_keep_the_fast_attention() -> None:
    model = tiny_model("qwen2")
    backend = Backend.for_model(model)
    seen = []

    def spy(module, args):
        seen.append(model.config._attn_implementation)

    handle = model.model.layers[0].register_forward_pre_hook(spy)
    try:
        backend.run(ids_for(), capture=["layer_0.residual"])
        backend.run(ids_for(), capture=["layer_0.attn_pattern"])
    finally:
        handle.remove()
    assert seen == ["sdpa", "eager"]
