"""The archscope conformance kit, run on the recurrent, rwkv and xlstm backends (the custom
adapter runs it in test_adapter.py, next to the hybrid model it is checked on)."""

from __future__ import annotations

import torch
from torch import nn

from archscope.testing import BackendContract
from archscope_recurrent.testing import plain_lstm_lm, tiny_recurrent_lm, tiny_rwkv, tiny_xlstm


class TestRNNBackend(BackendContract):
    backend_name = "recurrent"
    distribution = "archscope-recurrent"

    def make_models(self):
        return {
            "gru": tiny_recurrent_lm("gru"),
            "lstm-proj": tiny_recurrent_lm("lstm", proj_size=8),
            "bidirectional-lstm": tiny_recurrent_lm("lstm", bidirectional=True),
            "plain-lstm": plain_lstm_lm(),
        }

    def make_foreign_models(self):
        return {"rwkv": tiny_rwkv(), "gru-module": nn.GRU(4, 4)}

    def reference_activations(self, model, batch):
        # torch's own stacked module and its h_n / c_n
        embed = model.embed if hasattr(model, "embed") else model.tok
        rnn = model.rnn if hasattr(model, "rnn") else model.lstm
        x = embed(batch["input_ids"])
        out, state = rnn(x)
        h_n, c_n = state if isinstance(state, tuple) else (state, None)
        last = rnn.num_layers - 1
        dirs = 2 if rnn.bidirectional else 1

        def flat(s):
            return s[-dirs:].transpose(0, 1).reshape(s.shape[1], -1)

        ref = {
            "embed": x,
            f"layer_{last}.hidden": out,
            f"layer_{last}.hidden_state": flat(h_n),
            "logits": model(batch["input_ids"]),
        }
        if c_n is not None:
            ref[f"layer_{last}.cell_state"] = flat(c_n)
        return ref


def _hooked(model, blocks, mixer, mlp, ids):
    seen = {}
    handles = []
    for i, block in enumerate(model.get_submodule(blocks)):
        for role, module in (
            ("residual", block),
            ("mixer", getattr(block, mixer)),
            ("mlp", getattr(block, mlp)),
        ):
            handles.append(
                module.register_forward_hook(
                    lambda _m, _a, o, key=f"layer_{i}.{role}": seen.__setitem__(
                        key, (o[0] if isinstance(o, tuple) else o).clone()
                    )
                )
            )
    try:
        seen["logits"] = model(ids).logits
    finally:
        for h in handles:
            h.remove()
    return seen


class TestRWKVBackend(BackendContract):
    backend_name = "rwkv"
    distribution = "archscope-recurrent"

    def make_models(self):
        return {"rwkv-2": tiny_rwkv()}

    def make_foreign_models(self):
        return {"xlstm": tiny_xlstm(), "gru-lm": tiny_recurrent_lm("gru")}

    def reference_activations(self, model, batch):
        return _hooked(model, "rwkv.blocks", "attention", "feed_forward", batch["input_ids"])


class TestXLSTMBackend(BackendContract):
    backend_name = "xlstm"
    distribution = "archscope-recurrent"

    def make_models(self):
        return {"xlstm-2": tiny_xlstm()}

    def make_foreign_models(self):
        return {"rwkv": tiny_rwkv(), "gru-lm": tiny_recurrent_lm("gru")}

    def reference_activations(self, model, batch):
        ref = _hooked(model, "backbone.blocks", "mlstm_layer", "ffn", batch["input_ids"])
        with torch.no_grad():
            out = model(batch["input_ids"], use_cache=True)
        cache = out.cache if hasattr(out, "cache") else out.cache_params  # renamed within 5.x
        ref["layer_1.c_state"] = cache.rnn_state[1][0]
        return ref
