"""Half-precision models, and a model left exactly as it was found."""

from __future__ import annotations

import pytest
import torch
from transformer_reference import hook_snapshot, ids_for, model_of

from archscope import Backend, Edit
from archscope_transformer.testing import tiny_model

SITES = [
    "embed",
    "layer_0.residual",
    "layer_1.attn",
    "layer_1.mlp",
    "layer_1.mlp_hidden",
    "layer_2.residual",
    "final_norm",
    "logits",
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_models_run_in_their_own_dtype(family: str, dtype: torch.dtype) -> None:
    model = tiny_model(family).to(dtype)
    backend = Backend.for_model(model)
    ids = ids_for(16)
    with torch.no_grad():
        reference = model(ids, output_hidden_states=True)
    result = backend.run(ids, capture=SITES)
    for site in SITES:
        value = result[site]
        assert value.dtype == dtype and value.device.type == "cpu", site
        assert torch.isfinite(value).all(), site
    assert torch.equal(result["embed"], reference.hidden_states[0])
    assert torch.equal(result["layer_0.residual"], reference.hidden_states[1])
    assert torch.equal(result["final_norm"], reference.hidden_states[-1])
    assert torch.equal(result.logits, reference.logits)
    unembedded = backend.unembed(result["layer_2.residual"])
    assert unembedded.dtype == dtype
    torch.testing.assert_close(unembedded, reference.logits)
    pattern = backend.run(ids, capture=["layer_1.attn_pattern"])["layer_1.attn_pattern"]
    assert pattern.dtype == dtype
    torch.testing.assert_close(
        pattern.float().sum(-1), torch.ones(pattern.shape[:-1]), atol=2e-2, rtol=0
    )
    assert all(p.dtype == dtype and p.device.type == "cpu" for p in model.parameters())


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_runs_leave_weights_mode_and_hooks_unchanged(family: str) -> None:
    model = model_of(family)
    backend = Backend.for_model(model)
    weights, hooks = _state(model), hook_snapshot(model)
    ids = ids_for(17)
    backend.run(
        ids,
        capture=[*SITES, "layer_0.attn_pattern"],
        edits=[Edit.scale("layer_1.mlp_hidden", 0.0, units=[1]), Edit.add("layer_0.residual", 1.0)],
    )
    backend.run(ids, capture=["layer_0.residual"])  # stopped early
    with pytest.raises(RuntimeError, match="on purpose"):
        backend.run(
            ids,
            capture=["logits"],
            edits=[
                Edit.apply(
                    "layer_1.mlp", lambda v: (_ for _ in ()).throw(RuntimeError("on purpose"))
                )
            ],
        )
    assert not model.training
    assert hook_snapshot(model) == hooks
    after = model.state_dict()
    assert all(torch.equal(weights[k], after[k]) for k in weights)


def test_a_model_in_training_mode_stays_in_training_mode() -> None:
    model = tiny_model("llama").train()
    backend = Backend.for_model(model)
    backend.run(ids_for(), capture=["layer_1.residual"])
    assert model.training and all(m.training for m in model.modules())


def test_gradients_flow_when_asked() -> None:
    backend = Backend.for_model(model_of("gpt2"))
    result = backend.run(ids_for(), capture=["layer_1.residual"], grad=True)
    assert result["layer_1.residual"].requires_grad
    assert not backend.run(ids_for(), capture=["layer_1.residual"])[
        "layer_1.residual"
    ].requires_grad
