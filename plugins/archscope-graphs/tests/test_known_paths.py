"""Hand-built models with one known path from a token to a logit: the pruned graph holds
exactly that path, and no edge outside it survives the thresholds."""

from __future__ import annotations

from typing import Any

import torch

import archscope
from archscope_graphs.attribution import attribute

A, B = 10, 20  # the copied token and the logit it drives
PROMPT = [31, 47, 58, A]


def _edges(graph: Any) -> set[tuple[str, str]]:
    return {(graph.nodes[t].id, graph.nodes[s].id) for t, s in graph.adjacency.nonzero().tolist()}


def _copying_transformer(transcoder_class: Any) -> tuple[Any, Any]:
    """Two llama blocks whose attention writes nothing; the layer-1 MLP has one unit that
    fires on token A's embedding and writes the unembedding direction of B, which is
    orthogonal to A's embedding (so the only path from A to B's logit is the MLP unit). The
    transcoder has that unit as feature 0 (three more features that never fire)."""
    from archscope_transformer.testing import tiny_model

    model = tiny_model("llama", n_layers=2, seed=3)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            for proj in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                proj.weight.zero_()
        emb = model.model.embed_tokens.weight
        e_a = emb[A] / emb[A].norm()
        for t in PROMPT[:-1]:  # the other prompt tokens do not look like A
            emb[t] -= (emb[t] @ e_a) * e_a
        u_b = torch.randn(emb.shape[1], generator=g)
        u_b -= (u_b @ e_a) * e_a
        model.lm_head.weight[B] = 3 * u_b / u_b.norm()
        mlp = model.model.layers[1].mlp
        mlp.gate_proj.weight[0] = 2 * e_a
        mlp.up_proj.weight[0] = 2 * e_a
        mlp.down_proj.weight[:, 0] = u_b / u_b.norm()
    backend = archscope.Backend.for_model(model)
    ids = torch.tensor([PROMPT])
    acts = backend.run(ids, capture=["layer_1.mlp_in", "layer_1.mlp"]).activations
    x_last, m_last = acts["layer_1.mlp_in"][0, -1], acts["layer_1.mlp"][0, -1]
    d = x_last.shape[0]
    w_enc = torch.zeros(4, d)
    w_enc[0] = e_a
    w_enc[1:] = torch.randn(3, d, generator=g)
    b_enc = torch.tensor([0.0, -100.0, -100.0, -100.0])
    a_last = float(x_last @ e_a)
    w_dec = torch.zeros(4, d)
    w_dec[0] = m_last / a_last  # the unit's write at the prompt, per unit of activation
    w_dec[1:] = torch.randn(3, d, generator=g)
    site = "layer_1.mlp"
    tc = transcoder_class(
        "layer_1.mlp_in", (site,), w_enc, b_enc, {site: w_dec}, {site: torch.zeros(d)}
    )
    return backend, tc


def test_the_transformer_path_is_exactly_token_feature_logit(transcoder_class: Any) -> None:
    backend, tc = _copying_transformer(transcoder_class)
    graph = attribute(backend, torch.tensor([PROMPT]), transcoders=[tc], target=B)
    last = len(PROMPT) - 1
    feature = f"1_0_{last}"
    assert {n.id for n in graph.nodes} == {f"E_{A}_{last}", feature, f"L_{B}_{last}"}
    assert _edges(graph) == {(feature, f"E_{A}_{last}"), (f"L_{B}_{last}", feature)}
    full = attribute(backend, torch.tensor([PROMPT]), transcoders=[tc], target=B, prune=False)
    ids = [n.id for n in full.nodes]
    logit = ids.index(f"L_{B}_{last}")
    # the path carries the whole logit (bias terms aside: there are none in this model)
    assert (
        abs(
            float(full.adjacency[logit, ids.index(feature)]) - full.metadata["target_values"][logit]
        )
        < 1e-4
    )
    assert abs(float(full.adjacency[logit, ids.index(f"E_{A}_{last}")])) < 1e-5


def _carrying_lstm() -> Any:
    """A one-layer LSTM whose unit 0 opens its input gate only on token A, keeps its cell
    (forget gate ~1) and always shows it (output gate ~1); the head reads unit 0 into B's
    logit. A comes first, three other tokens follow: the cell carries A to the end."""
    from archscope_recurrent import RecurrentLM, RecurrentLMConfig

    torch.manual_seed(0)
    model = RecurrentLM(
        RecurrentLMConfig(
            vocab_size=100, d_model=8, hidden_size=4, num_layers=1, cell="lstm", norm=False
        )
    ).eval()
    rnn = model.rnn
    n = 4
    with torch.no_grad():
        emb = model.embed.weight
        e_a = emb[A] / emb[A].norm()
        for t in (31, 47, 58):
            emb[t] -= (emb[t] @ e_a) * e_a
        for p in rnn.parameters():
            p.zero_()
        w, bias = rnn.weight_ih_l0, rnn.bias_ih_l0
        bias[0:n] = -8.0  # input gates closed ...
        w[0] = 16 * e_a  # ... but unit 0's opens on A
        bias[n : 2 * n] = 8.0  # forget gates open
        w[2 * n] = e_a  # unit 0's candidate: A's identity
        bias[3 * n : 4 * n] = 8.0  # output gates open
        head = model.head
        head.weight.zero_()
        head.bias.zero_()
        head.weight[B, 0] = 5.0
    return model


def test_the_lstm_path_is_exactly_token_cell_logit() -> None:
    model = _carrying_lstm()
    backend = archscope.Backend.for_model(model)
    prompt = [A, 31, 47, 58]
    graph = attribute(backend, torch.tensor([prompt]), target=B)
    last = len(prompt) - 1
    assert {n.id for n in graph.nodes} == {f"E_{A}_0", f"L_{B}_{last}"}
    assert _edges(graph) == {(f"L_{B}_{last}", f"E_{A}_0")}
    full = attribute(backend, torch.tensor([prompt]), target=B, prune=False)
    logit = full.targets[0]
    row = full.adjacency[logit]
    assert float(row[0]) > 0.9 * float(row.abs().sum())
