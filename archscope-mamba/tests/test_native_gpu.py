"""Native mamba_ssm models (the `archscope-mamba[cuda]` extra) on a CUDA device.

Skipped where ``mamba_ssm`` cannot be imported or no GPU is present (it needs its compiled CUDA
kernels). The same mapping is tested on CPU through `NativeStandIn` in test_contract.py.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from archscope import Backend, Edit
from archscope_mamba.testing import make_native_model, reference_activations

mamba_ssm = pytest.importorskip(
    "mamba_ssm", reason="mamba_ssm (archscope-mamba[cuda]) is not importable here"
)
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

ATOL = 1e-4  # fp32 CUDA kernels against one another


def _model(layer: str) -> Any:
    return make_native_model(layer, n_layer=2, vocab_size=128)


def _ids(batch: int, seq: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 128, (batch, seq), generator=gen).cuda()


@pytest.mark.parametrize("layer", ["Mamba1", "Mamba2"])
def test_native_sites_match_own_hooks_logits_and_stepped_states(layer: str) -> None:
    model = _model(layer)
    backend = Backend.for_model(model)
    assert backend.name == "mamba" and backend.native
    ids = _ids(2, 16, 1)
    # Residual sums from the tests' own block hooks, logits of the fused forward, and states
    # reached by stepping mamba_ssm's own InferenceParams one token at a time.
    reference = reference_activations(model, "native", ids)
    result = backend.run(ids, capture=list(reference))
    for name, value in reference.items():
        assert torch.allclose(result[name], value, atol=ATOL), name
    last = backend.unembed(result[f"layer_{backend.n_layers - 1}.residual"])
    assert torch.allclose(last, reference["logits"], atol=1e-3)
    same = backend.run(ids, edits=[Edit.apply("layer_0.residual", lambda x: x)]).logits
    assert torch.equal(same, backend.run(ids).logits)


@pytest.mark.parametrize("layer", ["Mamba1", "Mamba2"])
def test_native_state_patch_continues_the_source_prompt(layer: str) -> None:
    model = _model(layer)
    backend = Backend.for_model(model)
    a, b, suffix = _ids(2, 6, 3), _ids(2, 8, 4), _ids(2, 4, 5)
    patched = backend.state_patch(a, b, suffix)
    full = backend.run(torch.cat([b, suffix], dim=1)).logits[:, 8:]
    assert torch.allclose(patched.logits, full, atol=1e-3)
