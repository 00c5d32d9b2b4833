"""RNN backend against a step-by-step unroll written here with the explicit gate equations."""

from __future__ import annotations

import pytest
import torch

from archscope import Edit
from archscope_recurrent.rnn import RNNBackend
from archscope_recurrent.testing import tiny_recurrent_lm, token_batch

ATOL = 1e-5


def cell_step(
    kind: str, w: dict[str, torch.Tensor], x: torch.Tensor, h: torch.Tensor, c: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One time step of torch's GRU / LSTM / tanh-RNN, written out gate by gate."""
    gi = x @ w["weight_ih"].T + w["bias_ih"]
    gh = h @ w["weight_hh"].T + w["bias_hh"]
    if kind == "gru":
        i_r, i_z, i_n = gi.chunk(3, -1)
        h_r, h_z, h_n = gh.chunk(3, -1)
        r = torch.sigmoid(i_r + h_r)
        z = torch.sigmoid(i_z + h_z)
        n = torch.tanh(i_n + r * h_n)
        return (1 - z) * n + z * h, None
    if kind == "lstm":
        i, f, g, o = (gi + gh).chunk(4, -1)
        assert c is not None
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h_new = torch.sigmoid(o) * torch.tanh(c_new)
        if "weight_hr" in w:
            h_new = h_new @ w["weight_hr"].T
        return h_new, c_new
    return torch.tanh(gi + gh), None


def weights(rnn: torch.nn.RNNBase, layer: int, reverse: bool) -> dict[str, torch.Tensor]:
    suffix = f"_l{layer}" + ("_reverse" if reverse else "")
    names = ["weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr"]
    return {n: getattr(rnn, n + suffix) for n in names if hasattr(rnn, n + suffix)}


def manual_unroll(model, ids, edit=None):
    """Per-layer per-step hidden outputs and cells of ``model`` by explicit unrolling.
    ``edit = (layer, role, t, value)`` replaces that state at step t and continues from it."""
    rnn = model.rnn
    kind = (
        "gru"
        if isinstance(rnn, torch.nn.GRU)
        else "lstm"
        if isinstance(rnn, torch.nn.LSTM)
        else "rnn"
    )
    x = model.embed(ids)
    b, seq = ids.shape
    h_dim = rnn.proj_size or rnn.hidden_size
    hiddens, cells = [], []
    for layer in range(rnn.num_layers):
        outs, cs = [], []
        for reverse in [False, True] if rnn.bidirectional else [False]:
            w = weights(rnn, layer, reverse)
            h = torch.zeros(b, h_dim)
            c = torch.zeros(b, rnn.hidden_size) if kind == "lstm" else None
            out = [None] * seq
            cell = [None] * seq
            for t in reversed(range(seq)) if reverse else range(seq):
                h, c = cell_step(kind, w, x[:, t], h, c)
                if edit is not None and edit[0] == layer and edit[2] == t:
                    if edit[1] == "hidden":
                        h = edit[3].expand_as(h)
                    else:
                        c = edit[3].expand_as(c)
                out[t], cell[t] = h, c
            outs.append(torch.stack(out, 1))
            if kind == "lstm":
                cs.append(torch.stack(cell, 1))
        x = torch.cat(outs, -1)
        hiddens.append(x)
        cells.append(torch.cat(cs, -1) if cs else None)
    logits = model.head(model.norm(x) if model.norm is not None else x)
    return hiddens, cells, logits


CASES = [
    ("gru", {}),
    ("lstm", {}),
    ("lstm", {"proj_size": 8}),
    ("rnn_tanh", {}),
    ("gru", {"bidirectional": True}),
    ("lstm", {"bidirectional": True, "proj_size": 8}),
]


@pytest.mark.parametrize(("cell", "options"), CASES, ids=lambda v: str(v))
def test_every_layer_every_step_equals_manual_unroll(cell, options):
    model = tiny_recurrent_lm(cell, num_layers=3, **options)
    backend = RNNBackend(model)
    ids = token_batch(2, 6)["input_ids"]
    names = [n for n in backend.sites() if n.endswith((".hidden", ".cell"))]
    result = backend.run(ids, capture=[*names, "logits"])
    with torch.no_grad():
        hiddens, cells, logits = manual_unroll(model, ids)
    for i in range(3):
        torch.testing.assert_close(result[f"layer_{i}.hidden"], hiddens[i], atol=ATOL, rtol=0)
        if cell == "lstm":
            torch.testing.assert_close(result[f"layer_{i}.cell"], cells[i], atol=ATOL, rtol=0)
    torch.testing.assert_close(result.logits, logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize(("cell", "options"), CASES, ids=lambda v: str(v))
def test_last_layer_equals_stacked_module_output(cell, options):
    model = tiny_recurrent_lm(cell, num_layers=3, **options)
    ids = token_batch(3, 5)["input_ids"]
    result = RNNBackend(model).run(ids, capture=["layer_2.hidden"])
    with torch.no_grad():
        stacked, _ = model.rnn(model.embed(ids))
    torch.testing.assert_close(result["layer_2.hidden"], stacked, atol=1e-6, rtol=0)
    assert result.logits is None  # stopped after the last layer: no head


@pytest.mark.parametrize(
    ("cell", "options", "role"),
    [
        ("gru", {}, "hidden"),
        ("rnn_tanh", {}, "hidden"),
        ("lstm", {}, "hidden"),
        ("lstm", {}, "cell"),
        ("lstm", {"proj_size": 8}, "hidden"),
        ("lstm", {"proj_size": 8}, "cell"),
    ],
    ids=lambda v: str(v),
)
def test_state_edit_at_step_t_equals_manual_recomputation(cell, options, role):
    model = tiny_recurrent_lm(cell, num_layers=2, **options)
    backend = RNNBackend(model)
    ids = token_batch(2, 7)["input_ids"]
    dim = backend.sites()[f"layer_0.{role}"].dim
    value = torch.linspace(-1, 1, dim)
    edited = backend.run(
        ids,
        capture=["layer_0.hidden", "layer_1.hidden", "logits"],
        edits=[Edit.replace(f"layer_0.{role}", value, positions=[3])],
    )
    with torch.no_grad():
        hiddens, _, logits = manual_unroll(model, ids, edit=(0, role, 3, value))
        plain, _, _ = manual_unroll(model, ids)
    torch.testing.assert_close(edited["layer_0.hidden"], hiddens[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(edited["layer_1.hidden"], hiddens[1], atol=ATOL, rtol=0)
    torch.testing.assert_close(edited.logits, logits, atol=ATOL, rtol=0)
    # the edit changed the steps after t, not those before
    torch.testing.assert_close(edited["layer_1.hidden"][:, :3], plain[1][:, :3], atol=ATOL, rtol=0)
    assert (edited["layer_1.hidden"][:, 4:] - plain[1][:, 4:]).abs().max() > 1e-3
