"""A small attribution graph built by hand, shared by the export, viewer and CLI tests."""

from __future__ import annotations

import torch

from archscope_graphs.types import AttributionGraph, Node


def small_graph() -> AttributionGraph:
    """Two tokens, two layers: embeddings -> two features and an error node -> two logits.

    Known edges (target <- source: weight):
      f0 (layer 0, feature 3, pos 1) <- emb "cat" (pos 1): 2.0
      f1 (layer 1, feature 7, pos 1) <- f0: 1.5, <- emb "the" (pos 0): -0.5
      err (layer 1, pos 1)            <- emb "cat": 0.25
      logit " sat" <- f1: 3.0, <- err: 0.4
      logit " ran" <- f1: -1.0
    """
    nodes = [
        Node("emb_0", "embedding", -1, 0, 11, site="embed", label="the"),
        Node("emb_1", "embedding", -1, 1, 42, site="embed", label="cat"),
        Node("f0", "feature", 0, 1, 3, value=1.25, site="layer_0.mlp", label="cat-ness"),
        Node("f1", "feature", 1, 1, 7, value=0.5, site="layer_1.mlp", label="animal subject"),
        Node("err", "error", 1, 1, None, site="layer_1.mlp"),
        Node("logit_sat", "logit", 2, 1, 99, value=0.6, label=" sat"),
        Node("logit_ran", "logit", 2, 1, 98, value=0.2, label=" ran"),
    ]
    idx = {n.id: i for i, n in enumerate(nodes)}
    adj = torch.zeros(len(nodes), len(nodes))
    for target, source, weight in EDGES:
        adj[idx[target], idx[source]] = weight
    return AttributionGraph(
        tokens=[11, 42],
        token_strings=["the", " cat"],
        nodes=nodes,
        adjacency=adj,
        targets=[idx["logit_sat"], idx["logit_ran"]],
        scores={"replacement": 0.75, "completeness": 0.9},
        metadata={"model": "hand-built", "backend": "none", "n_layers": 2},
    )


EDGES = [
    ("f0", "emb_1", 2.0),
    ("f1", "f0", 1.5),
    ("f1", "emb_0", -0.5),
    ("err", "emb_1", 0.25),
    ("logit_sat", "f1", 3.0),
    ("logit_sat", "err", 0.4),
    ("logit_ran", "f1", -1.0),
]
