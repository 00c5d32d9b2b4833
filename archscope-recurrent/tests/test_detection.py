"""Detection through archscope.Backend.for_model, the plugin's registrations, light imports."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import archscope
from archscope import Backend
from archscope.plugins import get_manager
from archscope_recurrent import AdapterBackend
from archscope_recurrent.hf import RWKVBackend, XLSTMBackend
from archscope_recurrent.rnn import RNNBackend
from archscope_recurrent.testing import plain_lstm_lm, tiny_recurrent_lm, tiny_rwkv, tiny_xlstm

OURS = (RNNBackend, RWKVBackend, XLSTMBackend, AdapterBackend)


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda: tiny_recurrent_lm("gru"), RNNBackend),
        (lambda: tiny_recurrent_lm("lstm", bidirectional=True, proj_size=4), RNNBackend),
        (plain_lstm_lm, RNNBackend),
        (tiny_rwkv, RWKVBackend),
        (tiny_xlstm, XLSTMBackend),
    ],
    ids=["recurrent-lm", "bidirectional-lstm", "plain-lstm", "rwkv", "xlstm"],
)
def test_for_model_picks_the_backend_without_a_hint(make, expected):
    backend = Backend.for_model(make())
    assert type(backend) is expected


def _foreign_models():
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        MambaConfig,
        MambaForCausalLM,
    )

    small = {"vocab_size": 100}
    return {
        "gpt2": GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=2, n_head=2, **small)),
        "llama": LlamaForCausalLM(
            LlamaConfig(
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                num_key_value_heads=2,
                **small,
            )
        ),
        "mamba": MambaForCausalLM(MambaConfig(hidden_size=16, num_hidden_layers=2, **small)),
        "linear": torch.nn.Linear(3, 3),
        "gru-cell": torch.nn.GRUCell(3, 3),
        "none": None,
        "text": "an LSTM",
        "object": object(),
    }


def test_can_handle_says_none_for_foreign_models_and_objects():
    for name, model in _foreign_models().items():
        for backend in OURS:
            assert backend.can_handle(model) is None, (name, backend.name)


def test_plugin_registers_backends_alias_and_source():
    manager = get_manager()
    info = next(p for p in manager.plugins.values() if p.distribution == "archscope-recurrent")
    assert info.status == "ok", info.error
    assert set(info.registered["backends"]) == {"recurrent", "rwkv", "xlstm", "custom"}
    assert info.registered["sources"] == ["recurrent"]
    assert manager.backends.get("kazdov").obj is AdapterBackend
    assert manager.backends.get("recurrent").obj is RNNBackend


def test_discovery_and_detection_do_not_import_torch():
    code = (
        "import sys, archscope_recurrent, archscope_recurrent.plugin\n"
        "from archscope.plugins import get_manager\n"
        "m = get_manager()\n"
        "for e in m.backends:\n"
        "    if e.distribution == 'archscope-recurrent':\n"
        "        assert e.obj.can_handle(object()) is None\n"
        "assert archscope_recurrent.plugin.claims('/nonexistent') is False\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_no_backend_error_for_an_undescribed_custom_model_suggests_the_adapter():
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.cell = torch.nn.GRUCell(4, 4)

    with pytest.raises(archscope.NoBackendError, match="Odd.*custom-model adapter"):
        Backend.for_model(Odd())
