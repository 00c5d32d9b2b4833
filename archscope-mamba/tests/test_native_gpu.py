"""Native mamba_ssm models (the `archscope-mamba[cuda]` extra) on a CUDA device.

Skipped where ``mamba_ssm`` cannot be imported or no GPU is present (it needs its compiled CUDA
kernels). The same mapping is tested on CPU through `NativeStandIn` in test_contract.py.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from archscope import Backend, Edit

mamba_ssm = pytest.importorskip("mamba_ssm", reason="mamba_ssm (archscope-mamba[cuda]) is not "
                                "importable here")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

ATOL = 1e-4  # fp32 CUDA kernels against one another


def _model(layer: str) -> Any:
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    torch.manual_seed(0)
    ssm_cfg = {"layer": layer}
    if layer == "Mamba2":
        ssm_cfg.update(headdim=32, d_state=64, chunk_size=64)
    config = MambaConfig(d_model=128, n_layer=2, vocab_size=128, ssm_cfg=ssm_cfg)
    return MambaLMHeadModel(config, device="cuda", dtype=torch.float32).eval()


def _ids(batch: int, seq: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 128, (batch, seq), generator=gen).cuda()


@pytest.mark.parametrize("layer", ["Mamba1", "Mamba2"])
def test_native_sites_match_own_hooks_and_logits(layer: str) -> None:
    model = _model(layer)
    backend = Backend.for_model(model)
    assert backend.name == "mamba" and backend.native
    ids = _ids(2, 16, 1)
    sums: dict[str, torch.Tensor] = {}
    handles = [block.register_forward_hook(
        lambda m, a, out, i=i: sums.__setitem__(f"layer_{i}.residual", out[0] + out[1]))
        for i, block in enumerate(model.backbone.layers)]
    try:
        with torch.no_grad():
            logits = model(ids).logits
    finally:
        for handle in handles:
            handle.remove()
    result = backend.run(ids, capture=[*sums, "logits"])
    for name, value in sums.items():
        assert torch.allclose(result[name], value, atol=ATOL), name
    assert torch.allclose(result.logits, logits, atol=ATOL)
    last = backend.unembed(result[f"layer_{backend.n_layers - 1}.residual"])
    assert torch.allclose(last, logits, atol=1e-3)
    same = backend.run(ids, edits=[Edit.apply("layer_0.residual", lambda x: x)]).logits
    assert torch.equal(same, backend.run(ids).logits)


@pytest.mark.parametrize("layer", ["Mamba1", "Mamba2"])
def test_native_state_equals_stepping_through_inference_params(layer: str) -> None:
    from mamba_ssm.utils.generation import InferenceParams

    model = _model(layer)
    backend = Backend.for_model(model)
    ids = _ids(2, 12, 2)
    params = InferenceParams(max_seqlen=12, max_batch_size=2)
    with torch.no_grad():
        for t in range(12):
            model(ids[:, t: t + 1], inference_params=params)
            params.seqlen_offset += 1
    names = [n for n, i in backend.sites().items() if i.kind == "state"]
    result = backend.run(ids, capture=names)
    for name in names:
        conv, ssm = params.key_value_memory_dict[backend.sites()[name].site.layer]
        want = conv if name.endswith("conv_state") else ssm
        assert torch.allclose(result[name], want, atol=ATOL), name


@pytest.mark.parametrize("layer", ["Mamba1", "Mamba2"])
def test_native_state_patch_continues_the_source_prompt(layer: str) -> None:
    model = _model(layer)
    backend = Backend.for_model(model)
    a, b, suffix = _ids(2, 6, 3), _ids(2, 8, 4), _ids(2, 4, 5)
    patched = backend.state_patch(a, b, suffix)
    full = backend.run(torch.cat([b, suffix], dim=1)).logits[:, 8:]
    assert torch.allclose(patched.logits, full, atol=1e-3)
