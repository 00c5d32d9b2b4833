"""Checking a graph: interventions in the real model against the graph's predictions.

An intervention changes one node's value in the real (unfrozen) model and measures the change
of a target logit at the last position:

- a feature at (read site, position): its write is changed by an `Edit` that adds
  ``(scale − 1) · activation · decoder row`` to every site the transcoder writes, at that
  position (``scale = 0`` ablates the feature, other values steer it);
- a token embedding at a position: ``(scale − 1) · embedding`` is added to the ``embed`` site.

The graph predicts the change linearly: the node's value changes by ``δ = (scale − 1) ·
value``; each feature downstream changes its pre-activation by ``Σ_s edge[t, s] · δ_s /
value_s`` (an active ReLU-like feature passes it on unchanged), and the logit by the same sum
over its sources. `check_graph` does this for the most influential nodes and reports the
Pearson correlation between predicted and measured changes.

`gradient_prediction` is a reference for that comparison: the real (unfrozen) model's own
first-order prediction of the same change, the gradient of the target logit at the node's
site dotted with the node's change. Where it matches the measurement (small interventions)
and the graph does not, the gap is what the graph holds fixed (gates, patterns, norm
scales), not the size of the intervention. A graph built with ``linearise="gradient"``
differentiates those instead of holding them; with no feature nodes its predictions are
`gradient_prediction`'s, node by node.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from archscope import Edit
from archscope.errors import ParameterError

from .attribution import _check_token, node_influence
from .replacement import _prompt_ids
from .types import AttributionGraph, Node, Transcoder


def _transcoder_of(node: Node, transcoders: Sequence[Transcoder]) -> Transcoder:
    for t in transcoders:
        if t.read_site == node.site:
            return t
    raise ParameterError(
        f"no transcoder reads {node.site!r} (node {node.id}); pass the transcoders the graph "
        "was computed with"
    )


def node_edits(
    node: Node, scale: float, transcoders: Sequence[Transcoder], embed: torch.Tensor | None
) -> list[Edit]:
    """The edits that set ``node``'s value to ``scale`` times its value in the real model."""
    if node.kind == "embedding" and embed is None:
        raise ParameterError("an embedding intervention needs the prompt's embeddings")
    return [
        _add_at(site, change, node.position)
        for site, change in _node_changes(node, scale, transcoders, embed)
    ]


def _add_at(site: str, change: torch.Tensor, position: int) -> Edit:
    """An edit adding ``change`` at ``position``: a vector over the site's values at one
    position, flattened where the site has several axes per token (a state write: heads x
    rows x columns), reshaped to them here."""

    def add(x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        out[:, position] = out[:, position] + change.to(x.dtype).reshape(x.shape[2:])
        return out

    return Edit.apply(site, add)


def measure(
    backend: Any,
    prompt: Any,
    node: Node,
    token: int,
    *,
    scale: float = 0.0,
    transcoders: Sequence[Transcoder] = (),
    contrast: int | None = None,
) -> float:
    """The change of ``token``'s logit (minus ``contrast``'s, when given) at the last position
    when ``node`` is scaled by ``scale`` in the real model (0 = ablated)."""
    ids = _prompt_ids(backend, prompt)
    clean = backend.run(ids, capture=["embed", "logits"])
    assert clean.logits is not None
    token, contrast = _check_tokens(token, contrast, clean.logits.shape[-1], "measure")
    edits = node_edits(node, scale, transcoders, clean.activations["embed"][0])
    edited = backend.run(ids, capture=["logits"], edits=edits)
    assert edited.logits is not None
    change = edited.logits[0, -1] - clean.logits[0, -1]
    return float(change[token] - (change[contrast] if contrast is not None else 0.0))


def _check_tokens(token: Any, contrast: Any, vocab: int, caller: str) -> tuple[int, int | None]:
    """``token`` and ``contrast`` (or None) as token ids of a vocabulary of ``vocab``."""
    token = _check_token(token, vocab, f"{caller}: token")
    if contrast is not None:
        contrast = _check_token(contrast, vocab, f"{caller}: contrast")
    return token, contrast


def _node_changes(
    node: Node, scale: float, transcoders: Sequence[Transcoder], embed: torch.Tensor | None
) -> list[tuple[str, torch.Tensor]]:
    """(site, change at the node's position) of setting ``node`` to ``scale`` times its value."""
    if node.kind == "feature":
        t = _transcoder_of(node, transcoders)
        row = node.index or 0
        return [
            (site, (scale - 1.0) * node.value * t.decoder(site)[row].detach().float())
            for site in t.write_sites
        ]
    if node.kind == "embedding" and embed is not None:
        return [("embed", (scale - 1.0) * embed[node.position].detach().float())]
    raise ParameterError(
        f"interventions act on feature and embedding nodes; node {node.id} is a {node.kind} "
        "node (error nodes are constants of the replacement model, logits are outputs)"
    )


def gradient_prediction(
    backend: Any,
    prompt: Any,
    node: Node,
    token: int,
    *,
    scale: float = 0.0,
    transcoders: Sequence[Transcoder] = (),
    contrast: int | None = None,
) -> float:
    """The real model's first-order prediction of the change `measure` measures: the gradient
    of ``token``'s logit (minus ``contrast``'s) at the last position with respect to the
    node's site at its position, in the unfrozen model, dotted with the node's change."""
    ids = _prompt_ids(backend, prompt)
    clean = backend.run(ids, capture=["embed", "logits"])
    assert clean.logits is not None
    token, contrast = _check_tokens(token, contrast, clean.logits.shape[-1], "gradient_prediction")
    embed = clean.activations["embed"][0]
    changes = _node_changes(node, scale, transcoders, embed)
    leaves = [torch.zeros_like(change, requires_grad=True) for _, change in changes]
    edits = [
        _add_at(site, leaf, node.position) for (site, _), leaf in zip(changes, leaves, strict=True)
    ]
    result = backend.run(ids, capture=["logits"], edits=edits, grad=True)
    logits = result.logits[0, -1].float()
    value = logits[token] - (logits[contrast] if contrast is not None else 0.0)
    grads = torch.autograd.grad(value, leaves, allow_unused=True)
    return float(
        sum(
            float(g.double() @ change.double())
            for g, (_, change) in zip(grads, changes, strict=True)
            if g is not None
        )
    )


def predict(graph: AttributionGraph, source: int, target: int, scale: float = 0.0) -> float:
    """The graph's linear prediction of the change of node ``target`` (a logit) when node
    ``source`` is scaled by ``scale``: direct and indirect effects through the graph's
    feature nodes (see the module's docstring)."""
    nodes = graph.nodes
    adj = graph.adjacency.double()
    # edges are effects of each source's whole value: per unit of value, edge / value
    unit = torch.tensor([n.value if n.kind == "feature" else 1.0 for n in nodes]).double()
    unit = torch.where(unit == 0, torch.ones_like(unit), unit)
    delta = torch.zeros(len(nodes), dtype=torch.float64)
    delta[source] = (scale - 1.0) * unit[source]
    order = sorted(
        (i for i, n in enumerate(nodes) if n.kind == "feature" and i != source),
        key=lambda i: (nodes[i].layer, nodes[i].position),
    )
    for t in order:  # sources come before their targets in this order
        delta[t] += float((adj[t] / unit * delta).sum())
    return float((adj[target] / unit * delta).sum())


def check_graph(
    backend: Any,
    prompt: Any,
    graph: AttributionGraph,
    *,
    transcoders: Sequence[Transcoder] = (),
    n: int = 10,
    scale: float = 0.0,
    kinds: tuple[str, ...] = ("feature",),
    gradient: bool = False,
) -> dict[str, Any]:
    """Intervene on the ``n`` most influential nodes of ``kinds`` (features; on graphs without
    features pass ``kinds=("embedding",)``) and compare the measured change of the first
    target logit with the graph's prediction: ``{"r": Pearson r, "predicted": [...],
    "measured": [...], "nodes": [...]}``. ``gradient=True`` adds the real model's
    first-order predictions (`gradient_prediction`) as ``"gradient"`` and their correlation
    with the measurements as ``"r_gradient"``."""
    if not graph.targets:
        raise ParameterError("the graph has no logit target to check")
    if isinstance(prompt, str):  # the graph holds the prompt's token ids
        prompt = list(graph.tokens)
    target = graph.targets[0]
    token = graph.nodes[target].index or 0
    influence = node_influence(graph)
    candidates = [i for i, node in enumerate(graph.nodes) if node.kind in kinds]
    if len(candidates) < 2:
        raise ParameterError(
            f"check_graph needs at least 2 nodes of kinds {kinds}; the graph has "
            f"{len(candidates)} (kinds in it: {sorted({x.kind for x in graph.nodes})})"
        )
    chosen = sorted(candidates, key=lambda i: -float(influence[i]))[:n]
    predicted = [predict(graph, i, target, scale) for i in chosen]
    measured = [
        measure(
            backend,
            prompt,
            graph.nodes[i],
            token,
            scale=scale,
            transcoders=transcoders,
            contrast=graph.metadata.get("contrast_token"),
        )
        for i in chosen
    ]
    out = {
        "r": pearson(predicted, measured),
        "predicted": predicted,
        "measured": measured,
        "nodes": [graph.nodes[i].id for i in chosen],
        "target": graph.nodes[target].id,
    }
    if gradient:
        first_order = [
            gradient_prediction(
                backend,
                prompt,
                graph.nodes[i],
                token,
                scale=scale,
                transcoders=transcoders,
                contrast=graph.metadata.get("contrast_token"),
            )
            for i in chosen
        ]
        out.update({"gradient": first_order, "r_gradient": pearson(first_order, measured)})
    return out


def pearson(a: Sequence[float], b: Sequence[float]) -> float:
    x = torch.tensor(a, dtype=torch.float64)
    y = torch.tensor(b, dtype=torch.float64)
    x, y = x - x.mean(), y - y.mean()
    denom = float(x.norm() * y.norm())
    return float((x * y).sum()) / denom if denom > 0 else float("nan")
