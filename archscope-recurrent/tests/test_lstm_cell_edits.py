"""Editing an LSTM's cell state: by default the step's hidden state stays as computed; with
``backend.cell_edits = "recompute_hidden"`` it becomes ``o·tanh(edited c)``. Both checked
against an LSTM stepped by hand from the module's weights."""

from __future__ import annotations

import pytest
import torch

from archscope import Edit
from archscope.backends import BackendError
from archscope_recurrent.rnn import RNNBackend
from archscope_recurrent.testing import tiny_recurrent_lm


def manual_lm(model, ids, layer, step, cell, recompute):
    """Logits of ``model`` (embedding → stacked LSTM → norm → head) on ``ids`` (1, seq), stepped
    by hand, with the cell of ``layer`` replaced by ``cell`` at ``step``."""
    rnn = model.rnn
    x = model.embed(ids)[0]  # (seq, d)
    for i in range(rnn.num_layers):
        w_ih, w_hh = getattr(rnn, f"weight_ih_l{i}"), getattr(rnn, f"weight_hh_l{i}")
        b = getattr(rnn, f"bias_ih_l{i}") + getattr(rnn, f"bias_hh_l{i}")
        h = torch.zeros(rnn.hidden_size)
        c = torch.zeros(rnn.hidden_size)
        outs = []
        for t in range(x.shape[0]):
            gi, gf, gg, go = (w_ih @ x[t] + w_hh @ h + b).chunk(4)
            c = torch.sigmoid(gf) * c + torch.sigmoid(gi) * torch.tanh(gg)
            h_new = torch.sigmoid(go) * torch.tanh(c)
            if i == layer and t == step:
                c = cell
                if recompute:
                    h_new = torch.sigmoid(go) * torch.tanh(c)
            h = h_new
            outs.append(h)
        x = torch.stack(outs)
    if model.norm is not None:
        x = model.norm(x)
    return model.head(x)


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("layer", [0, 1])
def test_cell_edit_against_a_manual_lstm_step(layer: int, recompute: bool) -> None:
    model = tiny_recurrent_lm("lstm", num_layers=2)
    backend = RNNBackend(model)
    ids = torch.tensor([[5, 17, 42, 8, 63, 21]])
    step = 2
    cell = torch.linspace(-2, 2, model.rnn.hidden_size)
    backend.cell_edits = "recompute_hidden" if recompute else "keep_hidden"
    try:
        run = backend.run(
            ids,
            capture=["logits", f"layer_{layer}.hidden"],
            edits=[Edit.replace(f"layer_{layer}.cell", cell, positions=[step])],
        )
    finally:
        backend.cell_edits = "keep_hidden"
    with torch.no_grad():
        expected = manual_lm(model, ids, layer, step, cell, recompute)
    torch.testing.assert_close(run["logits"][0], expected, atol=1e-5, rtol=0)
    plain = backend.run(ids, capture=[f"layer_{layer}.hidden"])[f"layer_{layer}.hidden"][0]
    edited = run[f"layer_{layer}.hidden"][0]
    torch.testing.assert_close(edited[:step], plain[:step])  # earlier steps untouched
    # keep_hidden: the edited step's hidden state is the unedited one; recompute: it moves
    assert torch.allclose(edited[step], plain[step], atol=1e-6) != recompute


def test_recompute_leaves_rows_the_edit_does_not_touch_and_padding_alone() -> None:
    model = tiny_recurrent_lm("lstm", num_layers=2)
    backend = RNNBackend(model)
    ids = torch.tensor([[5, 17, 42, 8], [9, 3, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    plain = backend.run({"input_ids": ids, "attention_mask": mask}, capture=["layer_0.hidden"])
    backend.cell_edits = "recompute_hidden"
    try:
        # an edit at real token 1 whose value is zero in the second row: that row (and its
        # padding) must come out exactly as in the plain run
        value = torch.zeros(2, 1, backend.site_info("layer_0.cell").dim)
        value[0] = 1.0
        run = backend.run(
            {"input_ids": ids, "attention_mask": mask},
            capture=["layer_0.hidden"],
            edits=[Edit.add("layer_0.cell", value, positions=[1])],
        )
    finally:
        backend.cell_edits = "keep_hidden"
    torch.testing.assert_close(run["layer_0.hidden"][1], plain["layer_0.hidden"][1])
    assert not torch.allclose(run["layer_0.hidden"][0, 1], plain["layer_0.hidden"][0, 1])


def test_unknown_mode_is_refused() -> None:
    backend = RNNBackend(tiny_recurrent_lm("lstm"))
    with pytest.raises(BackendError, match="keep_hidden.*recompute_hidden"):
        backend.cell_edits = "both"
    assert backend.cell_edits == "keep_hidden"
