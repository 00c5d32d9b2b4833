"""On a CUDA device: activations stay on the model's device and dtype; nothing moves the model.
(Skipped where no CUDA device is present; the CPU tests cover the same behaviour on CPU.)"""

from __future__ import annotations

import pytest
import torch
from transformer_reference import ids_for

from archscope import Edit
from archscope_transformer.backend import TransformerBackend
from archscope_transformer.testing import tiny_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

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


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"]
)
def test_cuda_models_keep_activations_on_their_device(family: str, dtype: torch.dtype) -> None:
    model = tiny_model(family).to("cuda", dtype)
    backend = TransformerBackend(model)
    ids = ids_for(20).cuda()
    with torch.no_grad():
        reference = model(ids, output_hidden_states=True)
    result = backend.run(ids.cpu(), capture=SITES)  # CPU ids are moved to the model's device
    for site in SITES:
        assert result[site].device.type == "cuda" and result[site].dtype == dtype, site
    assert torch.equal(result["layer_0.residual"], reference.hidden_states[1])
    assert torch.equal(result["final_norm"], reference.hidden_states[-1])
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(result.logits, reference.logits, atol=tol, rtol=tol)
    torch.testing.assert_close(
        backend.unembed(result["layer_2.residual"]), reference.logits, atol=tol, rtol=tol
    )
    pattern = backend.run(ids, capture=["layer_0.attn_pattern"])["layer_0.attn_pattern"]
    assert pattern.device.type == "cuda"
    steered = backend.run(
        ids, capture=["logits"], edits=[Edit.add("layer_0.residual", torch.ones(32), positions=[1])]
    )  # a CPU vector
    assert steered.logits.device.type == "cuda"
    assert all(p.device.type == "cuda" and p.dtype == dtype for p in model.parameters())


def test_left_padding_on_cuda() -> None:
    model = tiny_model("gpt2").cuda()
    backend = TransformerBackend(model)
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]], device="cuda")
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], device="cuda")
    padded = backend.run({"input_ids": ids, "attention_mask": mask}, capture=["logits"])
    alone = backend.run(ids[:1, 2:], capture=["logits"])
    torch.testing.assert_close(padded.logits[0, 2:], alone.logits[0], atol=1e-5, rtol=0)
