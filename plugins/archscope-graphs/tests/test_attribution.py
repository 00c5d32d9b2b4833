"""Attribution graphs: rows add up to their targets (with independently computed bias terms)
on every family, edges equal effects measured in the frozen model, batching changes nothing,
pruning and scores behave, bad input is refused clearly."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from archscope.errors import ParameterError, SiteError
from archscope_graphs.attribution import (
    _graph,
    attribute,
    bias_rows,
    bias_terms,
    graph_scores,
    node_influence,
    prune_graph,
)
from archscope_graphs.replacement import ReplacementModel


def _ids(seq: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, 90, (1, seq), generator=torch.Generator().manual_seed(seed))


def _full_graph(backend: Any, ids: torch.Tensor, tcs: Any, batch: int = 16) -> Any:
    with ReplacementModel.build(backend, ids, tcs) as rm:
        graph = _graph(rm, None, 5, 0.95, batch, 0.0)
        bias = bias_terms(rm, graph)
    return graph, bias


def _check_rows_add_up(graph: Any, bias: torch.Tensor) -> None:
    rows = bias_rows(graph)
    values = torch.tensor(graph.metadata["target_values"], dtype=torch.float64)[rows]
    sums = graph.adjacency[rows].double().sum(1) + bias
    torch.testing.assert_close(sums, values, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_transformer_rows_add_up_to_logits_and_features(
    family: str, tiny_llama: Any, tiny_gpt2: Any, make_transcoders: Any
) -> None:
    backend = tiny_llama if family == "llama" else tiny_gpt2
    d = backend.site_info("layer_0.mlp").dim
    tcs = make_transcoders(d, 2, skip=family == "llama")
    graph, bias = _full_graph(backend, _ids(), tcs)
    kinds = {n.kind for n in graph.nodes}
    assert kinds == {"feature", "error", "embedding", "logit"}
    assert graph.metadata["n_features"] > 10  # the feature rows are really checked
    _check_rows_add_up(graph, bias)


@pytest.mark.parametrize("name", ["mamba", "lstm", "qwen3.5-hybrid"])
def test_recurrent_rows_add_up_to_logits(name: str, request: Any) -> None:
    if name == "qwen3.5-hybrid":
        backend = request.getfixturevalue("tiny_hybrid")
        ids = _ids(9)
    else:
        _, tokenizer, backend = request.getfixturevalue("zoo")[name]
        ids = torch.tensor([tokenizer.encode("the cat sat on the mat and the dog")])
    graph, bias = _full_graph(backend, ids, None)
    assert {n.kind for n in graph.nodes} == {"embedding", "logit"}
    _check_rows_add_up(graph, bias)
    # edges reach the last position from every earlier one, through the frozen recurrence
    logit = graph.targets[0]
    first = next(i for i, n in enumerate(graph.nodes) if n.kind == "embedding")
    assert float(graph.adjacency[logit, first].abs()) > 1e-4


def test_zoo_transformer_with_trained_transcoders(
    zoo: Any, zoo_transcoders: Any, make_transcoders: Any
) -> None:
    _, tokenizer, backend = zoo["transformer"]
    ids = torch.tensor([tokenizer.encode("the cat sat on the mat and the dog")])
    graph, bias = _full_graph(backend, ids, zoo_transcoders)
    _check_rows_add_up(graph, bias)
    scores = graph_scores(graph)
    assert 0.5 < scores["replacement"] <= 1.0 and 0.5 < scores["completeness"] <= 1.0


def test_an_edge_is_the_effect_measured_in_the_frozen_model(
    tiny_llama: Any, make_transcoders: Any
) -> None:
    """Independent reference: with every nonlinearity held, removing a node's vector from
    its site changes a logit by exactly that node's edge (embeddings: their only path runs
    through attention and residual, the MLP sites being held leaves)."""
    tcs = make_transcoders(tiny_llama.site_info("layer_0.mlp").dim, 2)
    ids = _ids()
    with ReplacementModel.build(tiny_llama, ids, tcs) as rm:
        graph = _graph(rm, None, 3, 0.95, 8, 0.0)
        logit = graph.targets[0]
        tok = graph.nodes[logit].index
        base = rm.run(1).logits[0, -1, tok].detach()
        for i, node in enumerate(graph.nodes):
            if node.kind == "embedding" and node.position in (0, 3, 6):
                embed = rm.embed.clone()
                embed[node.position] = 0
                moved = rm.run(1, {"embed": embed}).logits[0, -1, tok].detach()
                assert abs(float(base - moved) - float(graph.adjacency[logit, i])) < 1e-4
            if node.kind == "feature" and node.layer == 1:
                site = "layer_1.mlp"
                value = rm.direct[site].clone()
                dec = tcs[1].decoder(site)[node.index]
                value[node.position] -= node.value * dec
                moved = rm.run(1, {site: value}).logits[0, -1, tok].detach()
                assert abs(float(base - moved) - float(graph.adjacency[logit, i])) < 1e-4


def test_batch_size_changes_nothing(tiny_gpt2: Any, make_transcoders: Any) -> None:
    tcs = make_transcoders(tiny_gpt2.site_info("layer_0.mlp").dim, 2)
    one, _ = _full_graph(tiny_gpt2, _ids(5), tcs, batch=1)
    many, _ = _full_graph(tiny_gpt2, _ids(5), tcs, batch=64)
    torch.testing.assert_close(one.adjacency, many.adjacency, atol=1e-5, rtol=1e-5)


def test_pruning_keeps_the_logits_and_a_subset(tiny_llama: Any, make_transcoders: Any) -> None:
    tcs = make_transcoders(tiny_llama.site_info("layer_0.mlp").dim, 2)
    full = attribute(tiny_llama, _ids(), transcoders=tcs, prune=False)
    pruned = prune_graph(full, 0.5, 0.9)
    assert len(pruned.nodes) < len(full.nodes)
    assert [pruned.nodes[t].id for t in pruned.targets] == [full.nodes[t].id for t in full.targets]
    ids = {n.id for n in full.nodes}
    assert {n.id for n in pruned.nodes} <= ids
    looser = prune_graph(full, 0.9, 0.99)
    assert len(looser.nodes) >= len(pruned.nodes)
    graph = attribute(tiny_llama, _ids(), transcoders=tcs, target=7)
    assert [graph.nodes[t].index for t in graph.targets] == [7]
    assert {"replacement", "completeness", "pruned_replacement"} <= set(graph.scores)


def test_bad_input_is_refused_clearly(tiny_llama: Any, make_transcoders: Any) -> None:
    with pytest.raises(ParameterError, match="node_threshold=1.5"):
        attribute(tiny_llama, _ids(), node_threshold=1.5)
    with pytest.raises(ParameterError, match="one sequence of token ids"):
        attribute(tiny_llama, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ParameterError, match="token id in"):
        attribute(tiny_llama, _ids(), target=10_000)
    tc = make_transcoders(tiny_llama.site_info("layer_0.mlp").dim, 1)[0]
    tc.read_site = "layer_9.mlp_in"
    with pytest.raises(SiteError, match="layer_9.mlp_in"):
        attribute(tiny_llama, _ids(), transcoders=[tc])


def test_a_contrast_target_explains_a_logit_difference(
    tiny_llama: Any, make_transcoders: Any
) -> None:
    tcs = make_transcoders(tiny_llama.site_info("layer_0.mlp").dim, 2)
    with ReplacementModel.build(tiny_llama, _ids(), tcs) as rm:
        graph = _graph(rm, (7, 9), 1, 0.95, 8, 0.0)
        bias = bias_terms(rm, graph)
        plain7 = _graph(rm, 7, 1, 0.95, 8, 0.0)
        plain9 = _graph(rm, 9, 1, 0.95, 8, 0.0)
    _check_rows_add_up(graph, bias)
    row = graph.adjacency[graph.targets[0]]
    expected = plain7.adjacency[plain7.targets[0]] - plain9.adjacency[plain9.targets[0]]
    torch.testing.assert_close(row, expected, atol=1e-5, rtol=0)
    with pytest.raises(ParameterError, match="pair"):
        attribute(tiny_llama, _ids(), target=(7, 7))


def test_seed_tensors_are_allocated_per_chunk_not_per_row(
    tiny_llama: Any, make_transcoders: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A backward pass's seeds are one tensor per site and chunk: allocating one per target
    row (the size of the whole batch's logits) made graphs of a few thousand nodes spend most
    of their time in zeros_like."""
    d = tiny_llama.site_info("layer_0.mlp").dim
    tcs = make_transcoders(d, 2)
    calls = {"n": 0}
    real = torch.zeros_like

    def counting(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls["n"] += 1
        return real(*args, **kwargs)

    with ReplacementModel.build(tiny_llama, _ids(), tcs) as rm:
        monkeypatch.setattr(torch, "zeros_like", counting)
        graph = _graph(rm, None, 5, 0.95, 1024, 0.0)
        monkeypatch.undo()
    rows = len(bias_rows(graph))
    assert rows > 50
    # one chunk: a seed per site (logits + each read site), plus the replacement run's own
    assert calls["n"] <= 10, (calls["n"], rows)


# -- the row-wise influence and pruning against a dense reference ----------------------------
def _dense_normalised(adj: torch.Tensor) -> torch.Tensor:
    a = adj.abs().double()
    total = a.sum(1, keepdim=True)
    return torch.where(total > 0, a / total.clamp_min(1e-300), torch.zeros_like(a))


def _dense_influence(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """w·(A + A² + ...) by the closed form w·((I − A)⁻¹ − I) (A is nilpotent: acyclic)."""
    eye = torch.eye(a.shape[0], dtype=torch.float64)
    out: torch.Tensor = w @ (torch.linalg.inv(eye - a) - eye)
    return out


def _dense_prune(graph: Any, node_t: float, edge_t: float) -> tuple[list[str], torch.Tensor]:
    """Pruning written out on the whole (n, n) matrix: the reference for the row-wise path."""
    n = len(graph.nodes)
    logits = torch.zeros(n, dtype=torch.bool)
    logits[graph.targets] = True
    w = torch.zeros(n, dtype=torch.float64)
    w[graph.targets] = torch.tensor([graph.nodes[t].value for t in graph.targets]).double()
    w = w / w.sum()
    influence = _dense_influence(_dense_normalised(graph.adjacency), w)

    def cumulative(scores: torch.Tensor, threshold: float) -> torch.Tensor:
        order = torch.argsort(scores, descending=True)
        before = torch.cumsum(scores[order], 0) - scores[order]
        keep = torch.zeros_like(scores, dtype=torch.bool)
        keep[order[(before / scores.sum() < threshold) & (scores[order] > 0)]] = True
        return keep

    keep = cumulative(torch.where(logits, 0.0, influence), node_t) | logits
    adj = graph.adjacency * keep[:, None] * keep[None, :]
    a = _dense_normalised(adj)
    score = _dense_influence(a, w) + w
    adj = adj * cumulative((a * score[:, None]).flatten(), edge_t).view(n, n)
    keep &= (adj != 0).any(0) | (adj != 0).any(1) | logits
    index = keep.nonzero().flatten()
    return [graph.nodes[int(i)].id for i in index], adj[index][:, index]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_row_wise_pruning_equals_the_dense_computation(
    family: str, tiny_llama: Any, tiny_gpt2: Any, tiny_fitted: Any
) -> None:
    """The pruning and influence work on the computed rows only; on full graphs of the
    fixtures they keep exactly the nodes and edges that the dense (n, n) computation keeps,
    and `attribute(prune=True)` (which never builds the dense matrix) gives the same graph."""
    backend = tiny_llama if family == "llama" else tiny_gpt2
    ids = _ids(9, seed=3)
    full = attribute(backend, ids, transcoders=tiny_fitted[family], prune=False)
    assert full.metadata["n_features"] > 10
    for node_t, edge_t in ((0.8, 0.98), (0.5, 0.9), (0.95, 0.999)):
        ref_ids, ref_adj = _dense_prune(full, node_t, edge_t)
        pruned = prune_graph(full, node_t, edge_t)
        assert [n.id for n in pruned.nodes] == ref_ids
        torch.testing.assert_close(pruned.adjacency, ref_adj, atol=0, rtol=0)
        assert len(ref_ids) < len(full.nodes)
    direct = attribute(backend, ids, transcoders=tiny_fitted[family])
    ref_ids, ref_adj = _dense_prune(full, 0.8, 0.98)
    assert [n.id for n in direct.nodes] == ref_ids
    torch.testing.assert_close(direct.adjacency, ref_adj, atol=1e-6, rtol=0)
    torch.testing.assert_close(
        node_influence(full),
        _dense_influence(
            _dense_normalised(full.adjacency),
            torch.tensor([n.value if n.kind == "logit" else 0.0 for n in full.nodes]).double()
            / sum(n.value for n in full.nodes if n.kind == "logit"),
        ),
        atol=1e-8,
        rtol=1e-6,
    )


def test_a_long_recurrent_prompt_never_builds_the_dense_matrix(zoo: Any) -> None:
    """On the LSTM a graph's only computed rows are its logits: no tensor with two
    dimensions as large as the node count is made while the graph is computed and pruned,
    and the result equals pruning the dense graph."""
    from torch.utils._python_dispatch import TorchDispatchMode

    _, _, backend = zoo["lstm"]
    seq = 300
    ids = torch.randint(4, 200, (1, seq), generator=torch.Generator().manual_seed(1))
    n = seq + 1  # the embeddings and the one logit
    shapes: list[tuple[int, ...]] = []

    class Shapes(TorchDispatchMode):
        def __torch_dispatch__(
            self, func: Any, types: Any, args: Any = (), kwargs: Any = None
        ) -> Any:
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    shapes.append(tuple(t.shape))
            return out

    with Shapes():
        graph = attribute(backend, ids, max_logits=1)
    assert graph.metadata["pruned_from"] == n
    assert shapes and not [s for s in shapes if sum(d >= n for d in s) >= 2]
    full = attribute(backend, ids, max_logits=1, prune=False)
    ref_ids, ref_adj = _dense_prune(full, 0.8, 0.98)
    assert [x.id for x in graph.nodes] == ref_ids
    torch.testing.assert_close(graph.adjacency, ref_adj, atol=1e-6, rtol=0)


def _layered_graph(seed: int) -> Any:
    """A graph of 520 nodes shaped like a real one (features of three layers, errors,
    embeddings, logits last) whose rows span many blocks of the row-wise influence, with
    all-zero feature rows among them (dead features) and random signed edges from earlier
    layers only."""
    from archscope_graphs.types import AttributionGraph, Node

    gen = torch.Generator().manual_seed(seed)
    per_layer, n_err, n_emb, n_logit = 150, 40, 20, 10
    nodes, layer_of = [], []
    for layer in range(3):
        for i in range(per_layer):
            nodes.append(Node(f"{layer}_{i}_0", "feature", layer, 0, i, 1.0))
            layer_of.append(layer)
    nodes += [Node(f"err_{i}", "error", i % 3, 0, None) for i in range(n_err)]
    layer_of += [i % 3 for i in range(n_err)]
    nodes += [Node(f"E_{i}", "embedding", -1, i, i) for i in range(n_emb)]
    layer_of += [-1] * n_emb
    probs = torch.rand(n_logit, generator=gen) + 0.1
    nodes += [Node(f"L_{i}", "logit", 3, 0, i, float(p)) for i, p in enumerate(probs)]
    layer_of += [3] * n_logit
    n = len(nodes)
    layers = torch.tensor(layer_of)
    rows = torch.tensor([node.kind in ("feature", "logit") for node in nodes])
    # a target reads the features of earlier layers and the errors and embeddings before it
    below = layers[None, :] < layers[:, None]
    sources = below & torch.tensor([node.kind != "logit" for node in nodes])[None, :]
    sources &= ~(
        torch.tensor([node.kind == "error" for node in nodes])[None, :]
        & (layers[None, :] >= layers[:, None])
    )
    weights = torch.randn(n, n, generator=gen) * (torch.rand(n, n, generator=gen) < 0.3)
    adjacency = torch.where(sources & rows[:, None], weights, torch.zeros(()))
    dead = torch.randperm(3 * per_layer, generator=gen)[:60]  # all-zero feature rows
    adjacency[dead] = 0.0
    targets = list(range(n - n_logit, n))
    return AttributionGraph(list(range(n_emb)), [""] * n_emb, nodes, adjacency, targets)


@pytest.mark.parametrize("seed", [0, 1])
def test_influence_scores_and_pruning_over_many_row_blocks_equal_the_dense_computation(
    seed: int,
) -> None:
    """The influence is computed a block of rows at a time, only over the rows where the last
    term is non-zero: on a graph of many blocks with dead rows among them it equals the
    closed form, the scores equal their definition written out densely, and pruning keeps
    what the dense computation keeps."""
    graph = _layered_graph(seed)
    n = len(graph.nodes)
    assert n > 8 * 64  # several blocks of rows
    w = torch.zeros(n, dtype=torch.float64)
    w[graph.targets] = torch.tensor([graph.nodes[t].value for t in graph.targets]).double()
    w = w / w.sum()
    a = _dense_normalised(graph.adjacency)
    influence = _dense_influence(a, w)
    torch.testing.assert_close(node_influence(graph), influence, atol=1e-12, rtol=1e-9)
    kinds = [node.kind for node in graph.nodes]
    errors = torch.tensor([k == "error" for k in kinds])
    embeds = torch.tensor([k == "embedding" for k in kinds])
    from_errors, from_embeds = influence[errors].sum(), influence[embeds].sum()
    has_edges = (graph.adjacency != 0).any(1)
    share = (influence + w)[has_edges]
    complete = share * (1 - a[has_edges][:, errors].sum(1))
    expected = {
        "replacement": float(from_embeds / (from_embeds + from_errors)),
        "completeness": float(complete.sum() / share.sum()),
    }
    scores = graph_scores(graph)
    assert scores.keys() == expected.keys()
    for key, value in expected.items():
        assert scores[key] == pytest.approx(value, rel=1e-12), key
    for node_t, edge_t in ((0.8, 0.98), (0.5, 0.9)):
        ref_ids, ref_adj = _dense_prune(graph, node_t, edge_t)
        pruned = prune_graph(graph, node_t, edge_t)
        assert [x.id for x in pruned.nodes] == ref_ids
        torch.testing.assert_close(pruned.adjacency, ref_adj, atol=0, rtol=0)
        assert 10 < len(ref_ids) < n
