"""The "gradient" linearisation of attribution graphs against finite differences of the live
(unfrozen) model, written here with plain runs and edits, none of the graph's machinery.

- A row of a gradient graph is the first-order part of its target at the prompt: the
  directional derivative of the target along every node's value at once. Reference: a central
  finite difference of the live model in which every leaf's node part is scaled by 1 ± ε (the
  embeddings; at each written site its features and its error, the decoder biases staying
  where they are, since they are no node), on a transformer with features, zoo Mamba, a hybrid
  (gated delta nets + attention, with features on its MLPs) and zoo LSTM; Mamba-2 write
  features in test_write_features.py.
- An edge is the same derivative for one source, every other node held.
- "frozen" (the default) is unchanged: the same graph, bit for bit, named or not.

The models run in float64 copies (the fixtures' models are left as they are), but some of
their parts compute in float32 still (Llama's RMSNorm upcasts to float32 and back): the finite
difference's rounding error is ~1e-7 / ε of the target, its truncation error ~ε² times the
third derivative. ε = 1e-2 balances the two (measured on the tiny Llama's feature rows: 6e-6
relative at ε = 1e-2, 1e-3 at ε = 1e-4 from rounding); the graph's own arithmetic is float32
(~6e-8 per entry). A row's sum is asserted to 2e-4 of the row's absolute mass plus the
target's size (float32 rounding is relative to both). A single
feature's write is large beside the residual it joins (the final norm curves strongly along
it: 5% off at ε = 1e-2, 0.3% at 1e-3), so an edge's difference takes ε = 1e-3 with Richardson
extrapolation (differences at ε and ε/2 combined so that the ε² term cancels) and is asserted
to 1e-3 relative, 1e-5 absolute (an embedding's, small, takes the rows' ε). All far below what distinguishes the two linearisations (their logit rows differ by
more than 1e-3, asserted too).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import pytest
import torch

import archscope
from archscope import Edit
from archscope.errors import ParameterError
from archscope_graphs.attribution import attribute, bias_terms, prune_graph
from archscope_graphs.export import to_circuit_tracer
from archscope_graphs.heads import edge_heads
from archscope_graphs.replacement import ReplacementModel
from archscope_graphs.viewer import graph_payload

EPS = 1e-2
EDGE_EPS = 1e-3
PROMPT = "the cat sat on the mat and the dog"


def _f64(backend: Any) -> Any:
    """The backend of a float64 copy of ``backend``'s model."""
    return archscope.Backend.for_model(copy.deepcopy(backend.model).double())


def _ids(seq: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, 90, (1, seq), generator=torch.Generator().manual_seed(seed))


def _case(name: str, request: Any) -> tuple[Any, torch.Tensor, list[Any]]:
    """(float64 backend, prompt, transcoders) of a family."""
    if name == "llama":
        backend = _f64(request.getfixturevalue("tiny_llama"))
        make = request.getfixturevalue("make_transcoders")
        return backend, _ids(), make(backend.site_info("layer_0.mlp").dim, 2)
    if name == "qwen3.5-hybrid":  # gated delta nets and attention, MLP transcoders on each
        backend = _f64(request.getfixturevalue("tiny_hybrid"))
        make = request.getfixturevalue("make_transcoders")
        return backend, _ids(9), make(backend.site_info("layer_0.mlp").dim, backend.n_layers)
    _, tokenizer, backend = request.getfixturevalue("zoo")[name]
    return _f64(backend), torch.tensor([tokenizer.encode(PROMPT)]), []


def live_change(
    backend: Any,
    ids: torch.Tensor,
    transcoders: Sequence[Any],
    direction: dict[str, torch.Tensor],
    reads: Sequence[tuple[str, int]],
    eps: float = EPS,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Central finite difference, in the live model, of the last position's logits and of the
    values of ``reads`` ((site, position) pairs) when every leaf site (``embed`` and each
    written site, each held at its clean value) moves by ε times ``direction[site]`` (seq, d)
    (zero where not given): (f(x + εv) − f(x − εv)) / 2ε."""
    written = sorted({s for t in transcoders for s in t.write_sites})
    read_sites = sorted({s for s, _ in reads})
    clean = backend.run(ids, capture=["embed", *written])
    seen: dict[str, torch.Tensor] = {}

    def hold(site: str, step: float) -> Edit:
        def edit(x: torch.Tensor) -> torch.Tensor:
            seen[site] = x.detach().clone()  # the live value, before it is held
            value = clean[site].clone()
            if site in direction:
                value[0] += step * direction[site].reshape(value[0].shape).to(value.dtype)
            return value.to(x.dtype)

        return Edit.apply(site, edit)

    def keep(site: str) -> Edit:
        def edit(x: torch.Tensor) -> torch.Tensor:
            seen[site] = x.detach().clone()
            return x

        return Edit.apply(site, edit)

    def run(step: float) -> tuple[torch.Tensor, list[torch.Tensor]]:
        edits = [hold(s, step) for s in ["embed", *written]]
        edits += [keep(s) for s in read_sites if s not in written]
        out = backend.run(ids, capture=["logits"], edits=edits)
        return out.logits[0, -1].double(), [seen[s][0, p].reshape(-1).double() for s, p in reads]

    up, up_reads = run(eps)
    down, down_reads = run(-eps)
    return (up - down) / (2 * eps), [
        (u - d) / (2 * eps) for u, d in zip(up_reads, down_reads, strict=True)
    ]


def live_change_extrapolated(
    backend: Any,
    ids: torch.Tensor,
    transcoders: Sequence[Any],
    direction: dict[str, torch.Tensor],
    reads: Sequence[tuple[str, int]],
    eps: float,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """`live_change` at ε and ε/2 combined as (4 D(ε/2) − D(ε)) / 3 (Richardson): the ε²
    term of the central difference cancels, for directions along which the model curves
    strongly."""
    whole, whole_reads = live_change(backend, ids, transcoders, direction, reads, eps)
    half, half_reads = live_change(backend, ids, transcoders, direction, reads, eps / 2)
    return (4 * half - whole) / 3, [
        (4 * h - w) / 3 for h, w in zip(half_reads, whole_reads, strict=True)
    ]


def _node_parts(backend: Any, ids: torch.Tensor, transcoders: Sequence[Any]) -> dict[str, Any]:
    """Each leaf's node part: the embeddings; at a written site its value less the
    transcoders' decoder biases (= features × decoder rows + the error)."""
    written = sorted({s for t in transcoders for s in t.write_sites})
    clean = backend.run(ids, capture=["embed", *written])
    parts = {"embed": clean["embed"][0].double()}
    for site in written:
        value = clean[site][0].double().flatten(1)
        for t in transcoders:
            if site in t.write_sites:
                acts = torch.zeros(1, t.n_features)
                value = value - t.decode(acts, site).double()
        parts[site] = value
    return parts


@pytest.mark.parametrize("name", ["llama", "mamba", "qwen3.5-hybrid", "lstm"])
def test_gradient_rows_are_finite_differences_of_the_live_model(name: str, request: Any) -> None:
    backend, ids, tcs = _case(name, request)
    graph = attribute(backend, ids, transcoders=tcs, prune=False, linearise="gradient")
    assert graph.metadata["linearisation"] == "gradient" and graph.metadata["frozen"] == []
    nodes, adj = graph.nodes, graph.adjacency.double()
    feature_rows = [i for i, n in enumerate(nodes) if n.kind == "feature"]
    rows = [*graph.targets, *feature_rows[:: max(1, len(feature_rows) // 12)]]
    if tcs:
        assert len(rows) > len(graph.targets) + 5  # feature rows are really checked
    reads = [(nodes[i].site, nodes[i].position) for i in rows if nodes[i].kind == "feature"]
    direction = _node_parts(backend, ids, tcs)
    logits, read_changes = live_change(backend, ids, tcs, direction, reads)
    changes = iter(read_changes)
    values = graph.metadata["target_values"]
    offsets = graph.metadata["linearisation_offset"]
    for i in rows:
        node = nodes[i]
        if node.kind == "logit":
            reference = float(logits[node.index])
        else:
            t = next(t for t in tcs if t.read_site == node.site)
            reference = float(next(changes) @ t.encoder()[node.index].double())
        total = float(adj[i].sum())
        tolerance = 2e-4 * (float(adj[i].abs().sum()) + abs(values[i])) + 1e-6
        assert total == pytest.approx(reference, abs=tolerance), (name, node.id)
        # the recorded offset is what the first-order part leaves of the target
        assert values[i] - offsets[i] == pytest.approx(reference, abs=tolerance + 1e-5)
    assert all(offsets[i] == 0.0 for i, n in enumerate(nodes) if n.kind in ("error", "embedding"))
    # the live model is not the frozen one: the logit rows differ
    frozen = attribute(backend, ids, transcoders=tcs, prune=False)
    gap = (frozen.adjacency[graph.targets] - graph.adjacency[graph.targets]).abs().max()
    assert float(gap) > 1e-3


def test_an_edge_is_a_finite_difference_of_the_live_model_for_one_source(request: Any) -> None:
    """Moving one source (a feature's write, an embedding) with every other node held changes
    a logit, and a later feature's pre-activation, by its edge (per unit of the source's
    value)."""
    backend, ids, tcs = _case("llama", request)
    graph = attribute(backend, ids, transcoders=tcs, prune=False, linearise="gradient")
    nodes, adj = graph.nodes, graph.adjacency
    target = graph.targets[0]
    feats = [i for i, n in enumerate(nodes) if n.kind == "feature"]
    embeds = [i for i, n in enumerate(nodes) if n.kind == "embedding"]
    late = [i for i in feats if nodes[i].layer == 1]
    checked = [
        (target, max(feats, key=lambda i: abs(float(adj[target, i])))),
        (target, max(embeds, key=lambda i: abs(float(adj[target, i])))),
        # an earlier position's embedding: through attention only
        (target, max(embeds[:-1], key=lambda i: abs(float(adj[target, i])))),
    ]
    sub = adj[late][:, feats].abs()
    flat = int(sub.argmax())
    checked.append((late[flat // len(feats)], feats[flat % len(feats)]))
    clean = backend.run(ids, capture=["embed"])["embed"][0].double()
    for t, s in checked:
        source, reader = nodes[s], nodes[t]
        if source.kind == "feature":
            tc = next(x for x in tcs if x.read_site == source.site)
            site = tc.write_sites[0]
            vector = source.value * tc.decoder(site)[source.index].double()
        else:
            site, vector = "embed", clean[source.position]
        direction = {site: torch.zeros_like(vector).expand(ids.shape[1], -1).clone()}
        direction[site][source.position] = vector
        reads = [(reader.site, reader.position)] if reader.kind == "feature" else []
        if source.kind == "feature":
            logits, read_changes = live_change_extrapolated(
                backend, ids, tcs, direction, reads, EDGE_EPS
            )
        else:  # an embedding is small beside a feature's write: the rows' ε
            logits, read_changes = live_change(backend, ids, tcs, direction, reads)
        if reader.kind == "logit":
            reference = float(logits[reader.index])
        else:
            enc = next(x for x in tcs if x.read_site == reader.site).encoder()[reader.index]
            reference = float(read_changes[0] @ enc.double())
        edge = float(adj[t, s])
        assert abs(edge) > 1e-4, (reader.id, source.id)
        assert edge == pytest.approx(reference, rel=1e-3, abs=1e-5), (reader.id, source.id)


def test_gradient_rows_do_not_depend_on_the_batch(tiny_gpt2: Any, make_transcoders: Any) -> None:
    tcs = make_transcoders(tiny_gpt2.site_info("layer_0.mlp").dim, 2)
    graphs = [
        attribute(
            tiny_gpt2, _ids(), transcoders=tcs, prune=False, linearise="gradient", batch_size=b
        )
        for b in (1, 64)
    ]
    torch.testing.assert_close(graphs[0].adjacency, graphs[1].adjacency, atol=1e-5, rtol=1e-5)
    assert graphs[0].metadata["linearisation_offset"] == pytest.approx(
        graphs[1].metadata["linearisation_offset"], abs=1e-4
    )


def test_frozen_is_the_default_and_unchanged(tiny_llama: Any, make_transcoders: Any) -> None:
    tcs = make_transcoders(tiny_llama.site_info("layer_0.mlp").dim, 2, skip=True)
    for prune in (False, True):
        default = attribute(tiny_llama, _ids(), transcoders=tcs, prune=prune)
        named = attribute(tiny_llama, _ids(), transcoders=tcs, prune=prune, linearise="frozen")
        assert torch.equal(default.adjacency, named.adjacency)
        assert [n.id for n in default.nodes] == [n.id for n in named.nodes]
        assert default.scores == named.scores
        assert default.metadata["linearisation"] == "frozen"
        assert "linearisation_offset" not in default.metadata
    # and the frozen rows still add up with the bias terms (the exact decomposition)
    with ReplacementModel.build(tiny_llama, _ids(), tcs) as rm:
        assert rm.values is not None
        full = attribute(tiny_llama, _ids(), transcoders=tcs, prune=False)
        bias = bias_terms(rm, full)
    values = torch.tensor(full.metadata["target_values"], dtype=torch.float64)
    torch.testing.assert_close(
        full.adjacency[full.targets].double().sum(1) + bias[: len(full.targets)],
        values[full.targets],
        atol=1e-4,
        rtol=0,
    )


def test_gradient_graphs_are_marked_and_refused_where_sums_are_exact(
    tiny_llama: Any, make_transcoders: Any
) -> None:
    tcs = make_transcoders(tiny_llama.site_info("layer_0.mlp").dim, 2)
    full = attribute(tiny_llama, _ids(), transcoders=tcs, prune=False, linearise="gradient")
    # bias terms belong to the exact decomposition only
    with ReplacementModel.build(tiny_llama, _ids(), tcs) as rm:
        with pytest.raises(ParameterError, match="linearise='frozen'.*'gradient'"):
            bias_terms(rm, full)
    with ReplacementModel.build(tiny_llama, _ids(), tcs, linearise="gradient") as rm:
        assert rm.values is None  # nothing frozen, no hook left
        with pytest.raises(ParameterError, match="linearisation_offset"):
            rm.leaf_zero_logits()
    # nor is a split of an edge by heads (exact in the frozen model only)
    with pytest.raises(ParameterError, match="to use edge_heads"):
        edge_heads(tiny_llama, _ids(), full, full.targets[0], 0, transcoders=tcs)
    with pytest.raises(ParameterError, match=r"linearise='linear'.*'frozen', 'gradient'"):
        attribute(tiny_llama, _ids(), linearise="linear")
    with pytest.raises(ParameterError, match="linearise=None"):
        ReplacementModel.build(tiny_llama, _ids(), tcs, linearise=None).__enter__()
    # the offset follows the nodes through pruning; the export and the viewer name the
    # linearisation
    pruned = prune_graph(full)
    kept = pruned.metadata["kept_nodes"]
    offsets = full.metadata["linearisation_offset"]
    assert pruned.metadata["linearisation_offset"] == [offsets[i] for i in kept]
    assert to_circuit_tracer(pruned)["metadata"]["archscope"]["linearisation"] == "gradient"
    assert graph_payload(pruned)["metadata"]["linearisation"] == "gradient"
    # the model is left as it was: no hook, same logits
    ids = _ids()
    before = tiny_llama.run(ids, capture=["logits"]).logits
    attribute(tiny_llama, ids, transcoders=tcs, linearise="gradient")
    torch.testing.assert_close(tiny_llama.run(ids, capture=["logits"]).logits, before)


def test_the_registered_method_takes_the_linearisation(tiny_llama: Any) -> None:
    """`archscope.run_method("graph", ..., linearise=...)` (and so `archscope run graph`) gives
    the graph `attribute` gives with the same linearisation; an unknown one is refused."""
    ids = torch.randint(4, 90, (1, 6), generator=torch.Generator().manual_seed(2))
    for linearise in ("frozen", "gradient"):
        result = archscope.run_method("graph", tiny_llama, ids, max_logits=2, linearise=linearise)
        graph = attribute(tiny_llama, ids, max_logits=2, linearise=linearise)
        assert result.metadata["linearisation"] == linearise
        want = {
            (graph.nodes[t].id, graph.nodes[s].id): float(graph.adjacency[t, s])
            for t, s in graph.adjacency.nonzero().tolist()
        }
        assert {(t, s): w for t, s, w in result.edges} == pytest.approx(want)
    with pytest.raises(archscope.ArchscopeError, match="linearise"):
        archscope.run_method("graph", tiny_llama, ids, linearise="tangent")
