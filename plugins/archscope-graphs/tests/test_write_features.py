"""Write-SAE features as graph nodes on state-space models (zoo Mamba, a Mamba-2, zoo:gdn's
gated delta nets).

`WriteFeatures` presents a layer's write SAEs (archscope.methods.write_sae) as a `Transcoder`
that reads and writes ``layer_i.state_write``; the frozen mixers scan the write site's value
(archscope_mamba.freeze), so a feature's write reaches later positions and layers through the
held recurrence. Checked here: the adaptor against the SAEs themselves; rows adding up to their
targets (independent bias terms); a write feature's edges against finite differences of the
frozen model with every other write held (plain runs and edits, not the graph machinery);
interventions in the real model against the graph's predictions, for both linearisations
(Pearson r reported per family; asserted >= 0.8 where it is met); export and viewer with these
nodes."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

import archscope
from archscope import Edit
from archscope.errors import ParameterError
from archscope.freeze import freeze
from archscope.methods.write_sae import collect_writes, fit_write_sae, write_layout, write_site
from archscope_graphs.attribution import _graph, attribute, bias_rows, bias_terms
from archscope_graphs.export import to_circuit_tracer, write_graph_files
from archscope_graphs.interventions import (
    check_graph,
    measure,
    node_edits,
    pearson,
    predict,
)
from archscope_graphs.replacement import ReplacementModel
from archscope_graphs.viewer import feature_labels, graph_payload, label_graph, render_html
from archscope_graphs.write_features import WriteFeatures, write_features

warnings.filterwarnings("ignore", message=".*falling back to its reference PyTorch.*")
#: zoo:mamba's prompts, in the zoo corpus's words
PROMPTS = [
    "dan likes the soup . paul likes the pie . so dan likes the",
    "iris says : mesa pove lale . then iris says : mesa pove",
    "hugo thinks the salad is gloomy . it was bad . so hugo thinks the",
]


def _saes(backend: Any, rows: list[list[int]], heads: range, n_features: int, epochs: int) -> Any:
    """Write SAEs of every layer (and of each of ``heads``), trained on ``rows``' writes."""
    out = []
    for layer in range(backend.n_layers):
        site = write_site(backend, layer)
        for head in heads:
            layout = write_layout(backend, site, head=head, sample_ids=rows[0])
            writes = collect_writes(backend, rows, layout)
            out.append(
                fit_write_sae(
                    writes, layout, n_features=n_features, k=4, epochs=epochs, batch_size=128
                )
            )
    return out


@pytest.fixture(scope="module")
def mamba() -> dict[str, Any]:
    """zoo:mamba (4 Mamba-1 layers, one 128 x 16 write per token each) and write SAEs of all
    its layers, trained on 40 held-out documents."""
    import archscope_zoo

    _, tokenizer, backend = archscope_zoo.load("mamba")
    rows = [tokenizer.encode(t)[:48] for t in archscope_zoo.datasets("heldout", n=40)]
    saes = _saes(backend, rows, range(1), 128, 3)
    prompts = [torch.tensor([tokenizer.encode(t)]) for t in PROMPTS]
    return {
        "backend": backend,
        "tokenizer": tokenizer,
        "saes": saes,
        "features": write_features(saes),
        "prompts": prompts,
    }


@pytest.fixture(scope="module")
def mamba2() -> dict[str, Any]:
    """A tiny random Mamba-2 (3 layers, 4 heads of 16 x 8) and write SAEs of every head of
    every layer, trained on random token ids."""
    from archscope_mamba.testing import make_model

    backend = archscope.Backend.for_model(make_model("mamba2"))
    rows = torch.randint(4, 100, (48, 24), generator=torch.Generator().manual_seed(0)).tolist()
    saes = _saes(backend, rows, range(4), 64, 5)
    prompts = [
        torch.randint(4, 100, (1, 10), generator=torch.Generator().manual_seed(100 + s))
        for s in range(3)
    ]
    return {"backend": backend, "saes": saes, "features": write_features(saes), "prompts": prompts}


@pytest.fixture(scope="module")
def gdn() -> dict[str, Any]:
    """zoo:gdn (2 gated-delta-net layers of 4 heads, 16 x 16 writes, and MLPs, which stay in
    the frozen model as the linear maps their held gates make them) and write SAEs of every
    head of both layers, trained on 48 recall texts; prompts: 3 other texts up to their
    first question."""
    import archscope_zoo

    _, tokenizer, backend = archscope_zoo.load("gdn")
    data = archscope_zoo.datasets("recall", 51)
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in data.texts]
    saes = _saes(backend, rows[:48], range(4), 64, 5)
    prompts = [torch.tensor([rows[r][: 2 * len(data.bindings[r]) + 2]]) for r in range(48, 51)]
    return {"backend": backend, "saes": saes, "features": write_features(saes), "prompts": prompts}


@pytest.fixture(params=["mamba", "mamba2", "gdn"])
def family(request: Any) -> dict[str, Any]:
    return {"name": request.param, **request.getfixturevalue(request.param)}


# -- the adaptor ------------------------------------------------------------------------------
def test_the_adaptor_is_the_saes_on_the_flat_site(mamba2: dict[str, Any]) -> None:
    backend, saes = mamba2["backend"], mamba2["saes"]
    site = "layer_1.state_write"
    group = [s for s in saes if s.layout.site == site]
    features = WriteFeatures(group)
    assert features.read_site == site and features.write_sites == (site,)
    assert features.layer == 1 and features.n_features == sum(s.n_features for s in group)
    value = backend.run(mamba2["prompts"][0], capture=[site])[site][0]  # (seq, 4, 16, 8)
    flat = value.reshape(value.shape[0], -1)
    acts = features.encode(value)
    torch.testing.assert_close(features.encode(flat), acts)
    offset, whole = 0, torch.zeros_like(value)
    for sae in group:  # each SAE on its own head's write, its features in its own slice
        head = sae.layout.take(value[None])[0].reshape(value.shape[0], -1)
        own = acts[:, offset : offset + sae.n_features]
        torch.testing.assert_close(own, sae.encode(head).detach())
        whole[:, sae.layout.head] = sae.decode(own).detach().reshape(whole[:, 0].shape)
        offset += sae.n_features
    # decode: each SAE's reconstruction in its head's slot
    decoded = features.decode(acts, site).reshape(value.shape)
    torch.testing.assert_close(decoded, whole, atol=1e-6, rtol=1e-5)
    # an adaptor of some heads writes nothing into the others
    some = WriteFeatures([group[1], group[3]])
    assert some.n_features == group[1].n_features + group[3].n_features
    partial = some.decode(some.encode(value), site).reshape(value.shape)
    assert float(partial[:, [0, 2]].abs().max()) == 0.0
    torch.testing.assert_close(partial[:, [1, 3]], whole[:, [1, 3]], atol=1e-6, rtol=1e-5)
    # encoder rows: the linear part of the pre-activations; decoder rows: of the decode
    pre = torch.cat(
        [
            s.pre_activations(s.layout.take(value[None])[0].reshape(len(flat), -1) * s.input_scale)
            for s in group
        ],
        -1,
    )
    zero = torch.cat([s.pre_activations(torch.zeros(1, s.input_dim)) for s in group], -1)
    pre, zero = pre.detach(), zero.detach()
    torch.testing.assert_close(flat @ features.encoder().T + zero, pre, atol=1e-5, rtol=1e-4)
    biases = features.decode(torch.zeros_like(acts), site)
    torch.testing.assert_close(
        acts @ features.decoder(site) + biases, features.decode(acts, site), atol=1e-6, rtol=1e-5
    )


def test_the_adaptor_refuses_what_it_cannot_place(mamba2: dict[str, Any]) -> None:
    saes = mamba2["saes"]
    with pytest.raises(ParameterError, match="one site"):
        WriteFeatures([saes[0], saes[4]])  # layers 0 and 1
    with pytest.raises(ParameterError, match="same head"):
        WriteFeatures([saes[0], saes[0]])
    with pytest.raises(ParameterError, match="write SAEs"):
        WriteFeatures([object()])
    with pytest.raises(ParameterError, match="expected values"):
        WriteFeatures(saes[:4]).encode(torch.zeros(3, 7))
    assert [f.layer for f in mamba2["features"]] == [0, 1, 2]
    # two dictionaries on one layer would give their features the same node ids
    split = [WriteFeatures(saes[:2]), WriteFeatures(saes[2:4])]
    with pytest.raises(ParameterError, match="two transcoders read layer 0"):
        attribute(mamba2["backend"], mamba2["prompts"][0], transcoders=split)


# -- graphs -----------------------------------------------------------------------------------
def test_rows_add_up_to_their_targets(family: dict[str, Any]) -> None:
    backend, features = family["backend"], family["features"]
    ids = family["prompts"][0]
    with ReplacementModel.build(backend, ids, features) as rm:
        graph = _graph(rm, None, 5, 0.95, 32, 0.0)
        bias = bias_terms(rm, graph)
        # the replacement model is the model at the prompt
        torch.testing.assert_close(rm.run(1).logits[0].detach(), rm.logits, atol=1e-4, rtol=0)
    layers = {n.layer for n in graph.nodes if n.kind == "feature"}
    assert layers == set(range(backend.n_layers))  # every layer's write features are nodes
    assert {n.site for n in graph.nodes if n.kind == "feature"} == {f.read_site for f in features}
    assert graph.metadata["n_errors"] == backend.n_layers * ids.shape[1]
    rows = bias_rows(graph)
    values = torch.tensor(graph.metadata["target_values"], dtype=torch.float64)[rows]
    sums = graph.adjacency[rows].double().sum(1) + bias
    torch.testing.assert_close(sums, values, atol=1e-4, rtol=0)


def _frozen_effect(
    backend: Any,
    ids: torch.Tensor,
    features: list[WriteFeatures],
    source: Any,
    eps: float,
    read: tuple[str, int] | None,
) -> torch.Tensor:
    """In the frozen model, with every write site held at the prompt's value: the change of
    the last position's logits (``read`` None) or of the live write of site ``read[0]`` at
    position ``read[1]`` when ``source`` (a feature node) has ``eps`` times its activation
    added to its write. Plain runs with edits, none of the graph's machinery."""
    sites = [f.read_site for f in features]
    clean = backend.run(ids, capture=sites)
    feature = next(f for f in features if f.read_site == source.site)
    row = feature.decoder(source.site)[source.index]
    seen: dict[str, torch.Tensor] = {}

    def held(site: str, change: torch.Tensor | None) -> Edit:
        def hold(x: torch.Tensor) -> torch.Tensor:
            seen[site] = x.detach().clone()  # the live write, before it is held
            value = clean[site].clone()
            if change is not None:
                value[:, source.position] += change.reshape(value.shape[2:])
            return value.to(x.dtype)

        return Edit.apply(site, hold)

    def run(step: float) -> torch.Tensor:
        change = step * source.value * row
        edits = [held(s, change if s == source.site else None) for s in sites]
        out = backend.run(ids, capture=["logits"], edits=edits)
        if read is None:
            return out.logits[0, -1].double()
        return seen[read[0]][0, read[1]].reshape(-1).double()

    with freeze(backend, ids):
        return (run(eps) - run(0.0)) / eps


def test_write_feature_edges_are_frozen_finite_differences(family: dict[str, Any]) -> None:
    backend, features = family["backend"], family["features"]
    ids = family["prompts"][1]
    graph = attribute(backend, ids, transcoders=features, prune=False)
    adj, nodes = graph.adjacency, graph.nodes
    target = graph.targets[0]
    feats = [i for i, n in enumerate(nodes) if n.kind == "feature"]
    # the strongest feature -> logit edge
    source = max(feats, key=lambda i: abs(float(adj[target, i])))
    change = _frozen_effect(backend, ids, features, nodes[source], 0.5, None)
    edge = float(adj[target, source])
    assert abs(edge) > 1e-3
    assert float(change[nodes[target].index]) == pytest.approx(edge, rel=1e-3, abs=1e-5)
    # the strongest feature -> feature edge (a later layer's write feature reading it)
    sub = adj[feats][:, feats].abs()
    flat = int(sub.argmax())
    t, s = feats[flat // len(feats)], feats[flat % len(feats)]
    assert nodes[t].layer > nodes[s].layer
    read = _frozen_effect(backend, ids, features, nodes[s], 0.5, (nodes[t].site, nodes[t].position))
    reader = next(f for f in features if f.read_site == nodes[t].site)
    pre = float(reader.encoder()[nodes[t].index].double() @ read)
    assert abs(float(adj[t, s])) > 1e-4
    assert pre == pytest.approx(float(adj[t, s]), rel=1e-3, abs=1e-6)


def test_gradient_write_feature_rows_are_live_finite_differences(mamba2: dict[str, Any]) -> None:
    """A "gradient" graph's row (a logit, a write feature's pre-activation) adds up to the
    central finite difference of the live model (no freeze: Δ, B, C, gates and norms move)
    in which the embeddings and every write's node part (features + error, the decoder biases
    staying) are scaled by 1 ± ε, every write held at that value: plain runs and edits, on a
    float64 copy of the tiny Mamba-2 (ε = 1e-2 and the tolerance as in test_linearise.py)."""
    import copy

    backend = archscope.Backend.for_model(copy.deepcopy(mamba2["backend"].model).double())
    features, ids, eps = mamba2["features"], mamba2["prompts"][0], 1e-2
    graph = attribute(backend, ids, transcoders=features, prune=False, linearise="gradient")
    sites = [f.read_site for f in features]
    clean = backend.run(ids, capture=["embed", *sites])
    seen: dict[str, torch.Tensor] = {}

    def held(site: str, step: float) -> Edit:
        feature = next((f for f in features if f.read_site == site), None)
        value = clean[site].double()
        if feature is not None:  # the node part: the write less the decoder biases
            acts = torch.zeros(1, feature.n_features)
            bias = feature.decode(acts, site).double().reshape(value.shape[2:])
            value = value + step * (value - bias)
        else:
            value = value * (1 + step)

        def hold(x: torch.Tensor) -> torch.Tensor:
            seen[site] = x.detach().clone()
            return value.to(x.dtype)

        return Edit.apply(site, hold)

    def run(step: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        edits = [held(s, step) for s in ["embed", *sites]]
        logits = backend.run(ids, capture=["logits"], edits=edits).logits[0, -1].double()
        return logits, {s: seen[s][0].flatten(1).double() for s in sites}

    (up, up_writes), (down, down_writes) = run(eps), run(-eps)
    feature_rows = [i for i, n in enumerate(graph.nodes) if n.kind == "feature"]
    rows = [*graph.targets, *feature_rows[:: max(1, len(feature_rows) // 12)]]
    assert len(rows) > len(graph.targets) + 5
    for i in rows:
        node = graph.nodes[i]
        if node.kind == "logit":
            reference = float(up[node.index] - down[node.index]) / (2 * eps)
        else:
            enc = next(f for f in features if f.read_site == node.site).encoder()[node.index]
            write = up_writes[node.site] - down_writes[node.site]
            reference = float(write[node.position] @ enc.double()) / (2 * eps)
        row = graph.adjacency[i].double()
        # float32 rounding is relative to the target's own size as well as the row's mass
        value = abs(graph.metadata["target_values"][i])
        tolerance = 2e-4 * (float(row.abs().sum()) + value) + 1e-6
        assert float(row.sum()) == pytest.approx(reference, abs=tolerance), node.id


def test_a_write_feature_intervention_is_a_real_model_write_edit(family: dict[str, Any]) -> None:
    """`measure` on a write feature: the same change as an edit written from the SAE's atom
    and layout (the head's slot of the write), in the real model."""
    backend, features, saes = family["backend"], family["features"], family["saes"]
    ids = family["prompts"][0]
    graph = attribute(backend, ids, transcoders=features, prune=False)
    node = max(
        (n for n in graph.nodes if n.kind == "feature" and n.layer == 1), key=lambda n: n.value
    )
    token = graph.nodes[graph.targets[0]].index or 0
    index = node.index or 0
    for sae in (s for s in saes if s.layout.site == node.site):  # numbered SAE after SAE
        if index < sae.n_features:
            break
        index -= sae.n_features
    atom = sae.atoms()[index] / sae.input_scale  # (d_value, d_key)

    def ablate(x: torch.Tensor) -> torch.Tensor:
        head = sae.layout.take(x).clone()
        head[:, node.position] -= node.value * atom.to(x.dtype)
        return sae.layout.put(x, head)

    clean = backend.run(ids, capture=["logits"]).logits[0, -1]
    edited = backend.run(ids, capture=["logits"], edits=[Edit.apply(node.site, ablate)])
    expected = float(edited.logits[0, -1, token] - clean[token])
    got = measure(backend, ids, node, token, scale=0.0, transcoders=features)
    assert abs(expected) > 1e-6
    assert got == pytest.approx(expected, rel=1e-4, abs=1e-7)


# -- interventions: the graph against the real model ------------------------------------------
#: where the 10 most influential write features follow the graph with r >= 0.8 (ablation and
#: x1.1) with these fixtures; the other prompts' numbers are reported (docs/graphs.md)
MEETS = {("mamba2", 0), ("gdn", 1), ("gdn", 2)}
#: where ablating the gradient graph's 10 most influential write features is not first-order
#: in the real model itself (its own gradient predicts the measured changes with r 0.76; the
#: gradient graph 0.73, and 0.99 at x1.1)
ABLATION_NONLINEAR = {("mamba", 2)}


@pytest.mark.parametrize("prompt", range(len(PROMPTS)))
def test_write_feature_interventions_against_the_graph(family: dict[str, Any], prompt: int) -> None:
    """Ablating and steering (x1.1) the 10 most influential write features in the real model:
    Pearson r between the graph's predictions and the measured changes, printed per family
    and prompt. What holds everywhere: the real model is linear at x1.1 (its own gradient
    predicts the change, r >= 0.95), and the graph's predictions follow the frozen model's
    (the same ablations run with the model frozen: r >= 0.9, measured 0.92-1.0); the gap
    between the two is what the frozen model holds (norm scales, gates, Δ/B/C of later
    layers). The "gradient" graph of the same prompt (edges through the live model) is
    checked the same way: r >= 0.8 at x1.1 everywhere, and for ablations except where the
    real model's own gradient misses them too."""
    backend, features = family["backend"], family["features"]
    ids = family["prompts"][prompt]
    graph = attribute(backend, ids, transcoders=features, prune=False)
    ablated = check_graph(backend, ids, graph, transcoders=features, n=10)
    steered = check_graph(backend, ids, graph, transcoders=features, n=10, scale=1.1, gradient=True)
    token = graph.nodes[graph.targets[0]].index or 0
    by_id = {n.id: n for n in graph.nodes}
    with freeze(backend, ids):
        base = backend.run(ids, capture=["logits"]).logits[0, -1, token]
        frozen = []
        for node_id in ablated["nodes"]:
            frozen.append(measure_frozen(backend, ids, by_id[node_id], token, features) - base)
    in_frozen = pearson(ablated["predicted"], [float(f) for f in frozen])
    live_norm = pearson(
        _final_norm_live(backend, ids, ablated["nodes"], by_id, token, features),
        ablated["measured"],
    )
    linear = attribute(backend, ids, transcoders=features, prune=False, linearise="gradient")
    g_ablated = check_graph(backend, ids, linear, transcoders=features, n=10, gradient=True)
    g_steered = check_graph(backend, ids, linear, transcoders=features, n=10, scale=1.1)
    print(
        f"{family['name']} prompt {prompt}: gradient graph r = {g_ablated['r']:.3f} (ablation), "
        f"{g_steered['r']:.3f} (x1.1); the real model's own first-order prediction of these "
        f"ablations r = {g_ablated['r_gradient']:.3f}; layers "
        f"{sorted({by_id[i].layer for i in g_ablated['nodes']})}"
    )
    print(
        f"{family['name']} prompt {prompt}: r = {ablated['r']:.3f} (ablation), "
        f"{steered['r']:.3f} (x1.1); gradient r = {steered['r_gradient']:.4f}; graph against "
        f"the frozen model's ablations r = {in_frozen:.4f}; frozen with the final norm's scale "
        f"live against the measurement r = {live_norm:.3f}; "
        f"layers {sorted({by_id[i].layer for i in ablated['nodes']})}"
    )
    assert len(ablated["nodes"]) == 10
    assert steered["r_gradient"] >= 0.95
    assert in_frozen >= 0.9  # not 1: the graph holds later layers' error nodes fixed
    if (family["name"], prompt) in MEETS:
        assert ablated["r"] >= 0.8 and steered["r"] >= 0.8
    # the gradient linearisation: the graph follows the real model wherever the real model
    # is first-order, i.e. at x1.1 everywhere; an ablation (a large change) too except where
    # the model's own gradient misses it as well
    assert g_steered["r"] >= 0.8
    if (family["name"], prompt) in ABLATION_NONLINEAR:
        assert g_ablated["r_gradient"] < 0.8
    else:
        assert g_ablated["r"] >= 0.8


def test_last_layer_write_features_differ_from_the_model_by_the_final_norm_only(
    mamba: dict[str, Any],
) -> None:
    """A Mamba-1 last-layer write reaches the logits through its own held recurrence (exact:
    its layer's Δ, B, C and gate do not depend on it) and the final norm: the graph predicts
    the frozen model's ablation exactly (no later layer, so no error node in between), and the
    frozen model with the final norm's scale left live is the real model."""
    backend, features = mamba["backend"], mamba["features"]
    ids = mamba["prompts"][0]
    graph = attribute(backend, ids, transcoders=features, prune=False)
    target = graph.targets[0]
    token = graph.nodes[target].index or 0
    last = backend.n_layers - 1
    chosen = sorted(
        (i for i, n in enumerate(graph.nodes) if n.kind == "feature" and n.layer == last),
        key=lambda i: -abs(float(graph.adjacency[target, i])),
    )[:5]
    nodes = [graph.nodes[i] for i in chosen]
    by_id = {n.id: n for n in nodes}
    real = [measure(backend, ids, n, token, scale=0.0, transcoders=features) for n in nodes]
    live = _final_norm_live(backend, ids, list(by_id), by_id, token, features)
    with freeze(backend, ids):
        base = backend.run(ids, capture=["logits"]).logits[0, -1, token]
        held = [float(measure_frozen(backend, ids, n, token, features) - base) for n in nodes]
    predicted = [predict(graph, i, target, 0.0) for i in chosen]
    assert max(abs(x) for x in real) > 1e-3
    torch.testing.assert_close(torch.tensor(predicted), torch.tensor(held), atol=1e-5, rtol=1e-3)
    torch.testing.assert_close(torch.tensor(live), torch.tensor(real), atol=1e-5, rtol=1e-3)
    print(f"zoo:mamba last-layer write features: graph r = {pearson(predicted, real):.3f}")


def _final_norm_live(
    backend: Any,
    ids: torch.Tensor,
    chosen: list[str],
    by_id: dict[str, Any],
    token: int,
    features: list[WriteFeatures],
) -> list[float]:
    """The same ablations in the frozen model whose final norm is left live (a diagnostic:
    how much of the gap between graph and model the held final norm scale makes)."""
    import importlib

    frozen = importlib.import_module(f"archscope_{backend.name}.freeze")  # mamba, hybrid
    held = frozen.frozen_norm

    def final_live(module: Any, x: Any, output: Any, values: Any, key: Any) -> Any:
        out = held(module, x, output, values, key)
        return output if module is backend.final_norm else out

    frozen.frozen_norm = final_live
    try:
        with freeze(backend, ids):
            base = backend.run(ids, capture=["logits"]).logits[0, -1, token]
            return [
                float(measure_frozen(backend, ids, by_id[i], token, features) - base)
                for i in chosen
            ]
    finally:
        frozen.frozen_norm = held


def measure_frozen(
    backend: Any, ids: torch.Tensor, node: Any, token: int, features: list[WriteFeatures]
) -> torch.Tensor:
    """The target logit with ``node`` ablated, in the current (frozen) run of the backend."""
    edits = node_edits(node, 0.0, features, None)
    return backend.run(ids, capture=["logits"], edits=edits).logits[0, -1, token]


# -- export and viewer ------------------------------------------------------------------------
def test_write_feature_graphs_export_and_show(mamba: dict[str, Any], tmp_path: Path) -> None:
    backend, features = mamba["backend"], mamba["features"]
    graph = attribute(backend, mamba["prompts"][2], transcoders=features, node_threshold=0.95)
    feature_nodes = [n for n in graph.nodes if n.kind == "feature"]
    assert feature_nodes and all(n.site.endswith(".state_write") for n in feature_nodes)
    data = to_circuit_tracer(graph)
    ids = [n["node_id"] for n in data["nodes"]]
    assert len(ids) == len(set(ids)) == len(graph.nodes)
    exported = {n["node_id"]: n for n in data["nodes"]}
    for n in feature_nodes:
        assert exported[f"{n.layer}_{n.index}_{n.position}"]["layer"] == str(n.layer)
    write_graph_files(graph, tmp_path, slug="writes")
    assert json.loads((tmp_path / "writes.json").read_text())["nodes"]
    payload = graph_payload(graph)
    assert {n["site"] for n in payload["nodes"] if n["kind"] == "feature"} <= {
        f.read_site for f in features
    }
    page = render_html(graph)
    assert all(json.dumps(n.id) in page for n in feature_nodes)
    # labels: the features' top-activating tokens, read from the whole write site (plain runs:
    # collect reads no site of several axes per token), against encoding each text's writes
    import archscope_zoo

    texts = archscope_zoo.datasets("heldout", n=4)
    wanted = sorted({(n.layer, n.index or 0) for n in feature_nodes})[:3]
    tokenizer = mamba["tokenizer"]
    labels = feature_labels(
        features, backend, texts, wanted, top=3, batch_size=2, tokenizer=tokenizer
    )
    assert any(labels[w] for w in wanted)
    for layer, index in wanted:
        site = f"layer_{layer}.state_write"
        reader = next(f for f in features if f.read_site == site)
        best = []
        for text in texts:
            ids = tokenizer.encode(text)
            write = backend.run(torch.tensor([ids]), capture=[site])[site][0]
            acts = reader.encode(write)[:, index]
            best += [(float(a), tokenizer.decode([t])) for a, t in zip(acts, ids, strict=True)]
        top = [(t, a) for a, t in sorted(best, reverse=True)[:3] if a > 0]
        got = labels[(layer, index)]
        assert [t for t, _ in got] == [t for t, _ in top]
        assert [a for _, a in got] == pytest.approx([a for _, a in top], rel=1e-4)
    label_graph(graph, labels)
    labelled = [n for n in graph.nodes if n.kind == "feature" and (n.layer, n.index) in wanted]
    assert labelled and all(n.label for n in labelled if labels[(n.layer, n.index or 0)])
