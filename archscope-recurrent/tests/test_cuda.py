"""The recurrent backends on a CUDA device (cuDNN RNN kernels, device placement): each value
against the same model's run on the CPU, which the other tests check against references."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from archscope import Edit
from archscope_recurrent.hf import RWKVBackend, XLSTMBackend
from archscope_recurrent.rnn import RNNBackend
from archscope_recurrent.testing import tiny_recurrent_lm, tiny_rwkv, tiny_xlstm, token_batch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(autouse=True)
def _exact_cudnn():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _both(model):
    return RNNBackend(model), RNNBackend(copy.deepcopy(model).cuda())


@pytest.mark.parametrize(
    ("cell", "options"),
    [("gru", {}), ("lstm", {"proj_size": 8}), ("lstm", {"bidirectional": True})],
    ids=str,
)
def test_rnn_sites_on_cuda_equal_the_cpu_run(cell, options):
    cpu, gpu = _both(tiny_recurrent_lm(cell, num_layers=3, **options))
    batch = token_batch(3, 7, lengths=[7, 5, 2])
    names = list(cpu.sites())
    expected = cpu.run(batch, capture=names)
    with warnings.catch_warnings():  # no cuDNN weight-layout warning escapes
        warnings.filterwarnings("error", message="RNN module weights")
        got = gpu.run(batch, capture=names)
    for name in names:
        assert got[name].device.type == "cuda"
        torch.testing.assert_close(got[name].cpu(), expected[name], atol=1e-4, rtol=1e-4, msg=name)
    with torch.no_grad():
        stacked = gpu.model(batch["input_ids"].cuda(), batch["attention_mask"].cuda())
    torch.testing.assert_close(got.logits, stacked, atol=1e-4, rtol=1e-4)


def test_rnn_step_edit_and_state_patch_on_cuda():
    cpu, gpu = _both(tiny_recurrent_lm("lstm", num_layers=2))
    ids = token_batch(2, 8)["input_ids"]
    edit = [Edit.replace("layer_0.cell", torch.linspace(-1, 1, 24), positions=[3])]
    expected = cpu.run(ids, capture=["layer_1.hidden"], edits=edit)
    got = gpu.run(ids, capture=["layer_1.hidden"], edits=edit)
    torch.testing.assert_close(
        got["layer_1.hidden"].cpu(), expected["layer_1.hidden"], atol=1e-4, rtol=1e-4
    )
    patched = gpu.state_patch(ids[:, :5] * 0 + 3, ids[:, :5], ids[:, 5:])
    full = gpu.run(ids, capture=["logits"])
    torch.testing.assert_close(patched.logits, full.logits[:, 5:], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("make", "backend_cls"),
    [(tiny_rwkv, RWKVBackend), (tiny_xlstm, XLSTMBackend)],
    ids=["rwkv", "xlstm"],
)
def test_hf_recurrent_on_cuda_equal_the_cpu_run(make, backend_cls):
    model = make()
    cpu = backend_cls(model)
    gpu = backend_cls(copy.deepcopy(model).cuda())
    batch = token_batch(2, 6, lengths=[6, 4])
    names = list(cpu.sites())
    expected = cpu.run(batch, capture=names, return_state=True)
    got = gpu.run(batch, capture=names, return_state=True)
    for name in names:
        torch.testing.assert_close(got[name].cpu(), expected[name], atol=1e-4, rtol=1e-4, msg=name)
    prefix = gpu.run(batch["input_ids"][:, :3], return_state=True)
    suffix = gpu.run(batch["input_ids"][:, 3:], capture=["logits"], initial_state=prefix.state)
    full = gpu.run(batch["input_ids"], capture=["logits"])
    torch.testing.assert_close(suffix.logits, full.logits[:, 3:], atol=1e-4, rtol=1e-4)
