"""Edits of a hidden site inside a frozen run (`archscope.freeze`): the layer is stepped with
its gates and slopes held at the prompt's values and continues from the edited hidden state,
checked against an LSTM stepped by hand with the prompt's gates; and a function edit in a
gradient run keeps its gradient even where it leaves every value as it was."""

from __future__ import annotations

import torch

from archscope import Edit
from archscope.freeze import freeze
from archscope_recurrent.rnn import RNNBackend
from archscope_recurrent.testing import tiny_recurrent_lm


def held_lstm(model, ids, layer, step, push):
    """Logits of ``model`` (embedding → stacked LSTM → head, no norm) on ``ids`` (1, seq),
    stepped by hand with every gate, ``tanh(g)/g`` and ``tanh(c)/c`` held at the values of the
    unedited run, and ``push`` added to the hidden state of ``layer`` at ``step``."""
    rnn = model.rnn
    held: dict = {}
    for edited in (False, True):
        x = model.embed(ids)[0]
        for i in range(rnn.num_layers):
            w_ih, w_hh = getattr(rnn, f"weight_ih_l{i}"), getattr(rnn, f"weight_hh_l{i}")
            b = getattr(rnn, f"bias_ih_l{i}") + getattr(rnn, f"bias_hh_l{i}")
            h = torch.zeros(rnn.hidden_size)
            c = torch.zeros(rnn.hidden_size)
            outs = []
            for t in range(x.shape[0]):
                gi, gf, gg, go = (w_ih @ x[t] + w_hh @ h + b).chunk(4)
                if not edited:
                    held[i, t] = (
                        torch.sigmoid(gi),
                        torch.sigmoid(gf),
                        torch.sigmoid(go),
                        torch.tanh(gg) / gg,
                    )
                si, sf, so, slope_g = held[i, t]
                c = sf * c + si * (slope_g * gg)
                if not edited:
                    held[i, t, "c"] = torch.tanh(c) / c
                h = so * held[i, t, "c"] * c
                if edited and i == layer and t == step:
                    h = h + push
                outs.append(h)
            x = torch.stack(outs)
    return model.head(x)


def test_a_hidden_edit_in_a_frozen_run_is_the_held_lstm_continued_from_the_edit() -> None:
    model = tiny_recurrent_lm("lstm", norm=False, seed=3)
    backend = RNNBackend(model)
    ids = torch.randint(4, 60, (1, 7), generator=torch.Generator().manual_seed(1))
    push = torch.randn(24, generator=torch.Generator().manual_seed(2))
    for layer in (0, 1):
        edit = Edit.add(f"layer_{layer}.hidden", push, positions=2)
        with freeze(backend, ids), torch.no_grad():
            frozen = backend.run(ids, capture=["logits"], edits=[edit]).logits[0]
            again = backend.run(ids, capture=["logits"], edits=[edit]).logits[0]
        with torch.no_grad():
            expected = held_lstm(model, ids, layer, 2, push)
            real = backend.run(ids, capture=["logits"], edits=[edit]).logits[0]
        torch.testing.assert_close(frozen, expected, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(again, frozen)  # the held values replay run after run
        assert float((real - frozen)[3:].abs().max()) > 1e-4  # the real model's gates move


def test_a_function_edit_in_a_gradient_run_keeps_its_gradient() -> None:
    """A zero added through a function edit changes no value, but the gradient with respect
    to it is the gradient at the site (as a zero ``add`` of a tensor gives)."""
    model = tiny_recurrent_lm("lstm", seed=4)
    backend = RNNBackend(model)
    ids = torch.randint(4, 60, (1, 6), generator=torch.Generator().manual_seed(5))
    leaf = torch.zeros(24, requires_grad=True)

    def add(x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        out[:, 2] = out[:, 2] + leaf
        return out

    by_fn = backend.run(ids, edits=[Edit.apply("layer_0.hidden", add)], grad=True)
    (grad_fn,) = torch.autograd.grad(by_fn.logits[0, -1, 7], [leaf])
    tensor = torch.zeros(24, requires_grad=True)
    by_add = backend.run(ids, edits=[Edit.add("layer_0.hidden", tensor, positions=2)], grad=True)
    (grad_add,) = torch.autograd.grad(by_add.logits[0, -1, 7], [tensor])
    assert float(grad_add.abs().max()) > 1e-4
    torch.testing.assert_close(grad_fn, grad_add)
