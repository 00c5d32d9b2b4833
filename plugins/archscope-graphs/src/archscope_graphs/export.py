"""An `AttributionGraph` as the JSON of circuit-tracer's graph files, which its local viewer
and Neuronpedia load.

The layout follows circuit-tracer's (0.5) ``circuit_tracer/frontend/graph_models.py`` (pydantic
models ``Model`` = ``metadata`` + ``qParams`` + ``nodes`` + ``links``) and what its
``utils/create_graph_files.py`` writes: a ``<slug>.json`` per graph and an index
``graph-metadata.json`` (``{"graphs": [metadata, ...]}``) in the same folder. Node ids:

- feature ``{layer}_{feature}_{pos}`` (``feature_type`` "cross layer transcoder"; its
  ``feature`` number is the Cantor pairing of layer and feature index, as in circuit-tracer
  0.5, schema version 1),
- error ``0_{layer}_{pos}`` ("mlp reconstruction error", ``feature`` -1),
- embedding ``E_{token}_{pos}`` (layer "E"),
- logit ``{n_layers + 1}_{token}_{pos}`` ("logit", with ``token_prob`` and ``clerp``).

Links are ``{"source", "target", "weight"}`` for every nonzero entry ``adjacency[target,
source]``. ``influence`` is each node's share of the influence on the target logits through
the graph (the absolute, row-normalised adjacency summed over all path lengths, weighted by
the logits' probabilities, as circuit-tracer's pruning defines it).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from archscope.errors import ParameterError

from .types import AttributionGraph, Node

_SLUG = re.compile(r"^[A-Za-z0-9._-]+$")


def _token(text: str) -> str:
    return text.replace("\n", "⏎").replace("\t", "→").replace("\r", "↵")


def node_influence(graph: AttributionGraph) -> torch.Tensor:
    """Each node's influence on the graph's target logits: with ``A`` the absolute adjacency
    with rows normalised to sum 1 and ``w`` the target logits' probabilities (normalised),
    ``influence = w (A + A² + ...)`` = ``w A (I - A)^-1``."""
    adj = graph.adjacency.detach().double().abs().cpu()
    n = adj.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.float64)
    norm = adj / adj.sum(1, keepdim=True).clamp_min(1e-30)
    weights = torch.zeros(n, dtype=torch.float64)
    for t in graph.targets:
        weights[t] = max(float(graph.nodes[t].value), 0.0)
    if float(weights.sum()) <= 0:
        weights[list(graph.targets)] = 1.0
    weights = weights / weights.sum().clamp_min(1e-30)
    eye = torch.eye(n, dtype=torch.float64)
    # the series converges: the graph is acyclic (every edge goes to a later layer/position)
    influence: torch.Tensor = torch.linalg.solve((eye - norm).t(), (weights @ norm))
    return influence


def _n_layers(graph: AttributionGraph) -> int:
    logits = [nd.layer for nd in graph.nodes if nd.kind == "logit"]
    if logits:
        return int(max(logits))
    return int(graph.metadata.get("n_layers", max((nd.layer for nd in graph.nodes), default=0) + 1))


def _cantor(x: int, y: int) -> int:
    """The Cantor pairing of two non-negative integers (one number per (layer, feature))."""
    return (x + y) * (x + y + 1) // 2 + y


def _ct_node(
    nd: Node, n_layers: int, token_strings: list[str], influence: float, is_target: bool
) -> dict[str, Any]:
    if nd.kind == "feature":
        if nd.index is None:
            raise ParameterError(f"feature node {nd.id!r} has no feature index")
        return {
            "node_id": f"{nd.layer}_{nd.index}_{nd.position}",
            "feature": _cantor(int(nd.layer), int(nd.index)),
            "layer": str(nd.layer),
            "ctx_idx": int(nd.position),
            "feature_type": "cross layer transcoder",
            "jsNodeId": f"{nd.layer}_{nd.index}-0",
            "clerp": nd.label,
            "influence": influence,
            "activation": float(nd.value),
        }
    if nd.kind == "error":
        return {
            "node_id": f"0_{nd.layer}_{nd.position}",
            "feature": -1,
            "layer": str(nd.layer),
            "ctx_idx": int(nd.position),
            "feature_type": "mlp reconstruction error",
            "jsNodeId": f"{nd.layer}_{nd.position}-0",
            "clerp": nd.label,
            "influence": influence,
        }
    if nd.kind == "embedding":
        vocab = int(nd.index) if nd.index is not None else 0
        return {
            "node_id": f"E_{vocab}_{nd.position}",
            "feature": int(nd.position),
            "layer": "E",
            "ctx_idx": int(nd.position),
            "feature_type": "embedding",
            "jsNodeId": f"E_{vocab}-{nd.position}",
            "clerp": nd.label,
            "influence": influence,
        }
    if nd.kind == "logit":
        vocab = int(nd.index) if nd.index is not None else 0
        layer = str(n_layers + 1)
        text = nd.label or str(vocab)
        return {
            "node_id": f"{layer}_{vocab}_{nd.position}",
            "feature": vocab,
            "layer": layer,
            "ctx_idx": int(nd.position),
            "feature_type": "logit",
            "token_prob": float(nd.value),
            "is_target_logit": is_target,
            "jsNodeId": f"L_{vocab}-{nd.position}",
            "clerp": f'Output "{_token(text)}" (p={float(nd.value):.3f})',
        }
    raise ParameterError(
        f"node {nd.id!r} has kind {nd.kind!r}; valid: feature, error, embedding, logit"
    )


def _separate_colliding_ids(graph: AttributionGraph, nodes: list[dict[str, Any]]) -> None:
    """Rename error nodes whose circuit-tracer id another node has (see `to_circuit_tracer`);
    any other collision is a malformed graph and is refused with the nodes named."""
    owner: dict[str, int] = {}
    for i, entry in enumerate(nodes):
        if entry["feature_type"] != "mlp reconstruction error":
            if entry["node_id"] in owner:
                first = graph.nodes[owner[entry["node_id"]]].id
                raise ParameterError(
                    f"nodes {first!r} and {graph.nodes[i].id!r} both map to circuit-tracer id "
                    f"{entry['node_id']!r}"
                )
            owner[entry["node_id"]] = i
    for i, entry in enumerate(nodes):
        if entry["feature_type"] == "mlp reconstruction error":
            if entry["node_id"] in owner:
                entry["node_id"] += "_error"
                entry["jsNodeId"] += "_error"
            if entry["node_id"] in owner:
                first = graph.nodes[owner[entry["node_id"]]].id
                raise ParameterError(
                    f"nodes {first!r} and {graph.nodes[i].id!r} both map to circuit-tracer id "
                    f"{entry['node_id']!r}"
                )
            owner[entry["node_id"]] = i


def to_circuit_tracer(
    graph: AttributionGraph,
    *,
    slug: str = "archscope-graph",
    scan: str | None = None,
    prompt: str | None = None,
    node_threshold: float | None = None,
) -> dict[str, Any]:
    """The graph as a dict in circuit-tracer's graph-file layout (see the module's doc).

    ``scan`` names the model and transcoders (default: the graph's ``metadata['model']``);
    ``prompt`` defaults to the joined token strings. circuit-tracer's scheme gives an error
    node ``0_{layer}_{pos}`` the id of the layer-0 feature with index ``layer`` at the same
    position; when both are in the graph, the error node's id (and jsNodeId) gets the suffix
    ``_error``, so that every link stays unambiguous."""
    if not _SLUG.match(slug):
        raise ParameterError(
            f"slug {slug!r} must be letters, digits, '.', '_' or '-' (it names the file "
            "<slug>.json)"
        )
    n = len(graph.nodes)
    adj = graph.adjacency.detach().cpu()
    if tuple(adj.shape) != (n, n):
        raise ParameterError(
            f"the graph has {n} nodes but an adjacency of shape {tuple(adj.shape)}; it must "
            f"be ({n}, {n}) (rows are targets, columns sources)"
        )
    influence = node_influence(graph)
    targets = set(graph.targets)
    first_target = min(targets) if targets else -1
    n_layers = _n_layers(graph)
    nodes = []
    for i, nd in enumerate(graph.nodes):
        entry = _ct_node(nd, n_layers, graph.token_strings, float(influence[i]), i == first_target)
        entry.setdefault("token_prob", 0.0)
        entry.setdefault("is_target_logit", False)
        entry.update(run_idx=0, reverse_ctx_idx=0)
        nodes.append(entry)
    _separate_colliding_ids(graph, nodes)
    dst, src = (adj != 0).nonzero(as_tuple=True)
    links = [
        {"source": nodes[s]["node_id"], "target": nodes[t]["node_id"], "weight": float(adj[t, s])}
        for t, s in zip(dst.tolist(), src.tolist(), strict=True)
    ]
    model = graph.metadata.get("model")
    metadata = {
        "slug": slug,
        "scan": scan or (str(model) if model else "archscope"),
        "transcoder_list": [str(t) for t in graph.metadata.get("transcoders", [])],
        "prompt_tokens": [_token(t) for t in graph.token_strings],
        "prompt": prompt if prompt is not None else "".join(graph.token_strings),
        "node_threshold": node_threshold
        if node_threshold is not None
        else graph.metadata.get("node_threshold"),
        "schema_version": 1,
        "archscope": {
            "scores": {k: float(v) for k, v in graph.scores.items()},
            "backend": graph.metadata.get("backend"),
            "linearisation": graph.metadata.get("linearisation", "frozen"),
        },
    }
    qparams = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    return {"metadata": metadata, "qParams": qparams, "nodes": nodes, "links": links}


def write_graph_files(
    graph: AttributionGraph, folder: str | Path, slug: str = "archscope-graph", **kw: Any
) -> Path:
    """Write ``<folder>/<slug>.json`` (see `to_circuit_tracer`) and add the graph's metadata to
    ``<folder>/graph-metadata.json`` (replacing an entry of the same slug), as circuit-tracer's
    ``create_graph_files`` does, so its local server and Neuronpedia's upload read the folder.
    Returns the graph file's path."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    data = to_circuit_tracer(graph, slug=slug, **kw)
    path = out / f"{slug}.json"
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    index = out / "graph-metadata.json"
    listing: dict[str, Any] = {"graphs": []}
    if index.is_file():
        try:
            listing = json.loads(index.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            raise ParameterError(
                f"{index} exists but is not JSON; move it away or write to another folder"
            ) from None
    listing["graphs"] = [g for g in listing.get("graphs", []) if g.get("slug") != slug]
    listing["graphs"].append(data["metadata"])
    index.write_text(json.dumps(listing, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


__all__ = ["node_influence", "to_circuit_tracer", "write_graph_files"]
