"""The ``graph`` method: an attribution graph of one prompt (a batch's first row, its real
tokens), as `archscope run graph` and `archscope.run_method("graph", ...)` compute it.

Through the method interface no transcoders are passed (parameters are plain values), so the
graph's nodes are the token embeddings, the error nodes of nothing replaced (none) and the
logits: the direct effect of each token on the top logits through the frozen model
(``linearise="gradient"``: its first-order effect through the live model). Call
`archscope_graphs.attribution.attribute` with ``transcoders=`` for feature nodes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from archscope import Result
from archscope.errors import InputError
from archscope.params import Param
from archscope.registry import method


@dataclass
class GraphResult(Result):
    """A pruned attribution graph: nodes, edges ``(target id, source id, weight)`` and the
    replacement / completeness scores."""

    tokens: list[int]
    token_strings: list[str]
    nodes: list[dict[str, Any]]
    edges: list[tuple[str, str, float]]
    scores: dict[str, float]
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_markdown(self) -> str:
        lines = [
            "## Attribution graph",
            "",
            f"prompt: {' '.join(repr(s) for s in self.token_strings)}",
            "",
            ", ".join(f"{k} {v:.3f}" for k, v in self.scores.items()),
            "",
            "| target | source | weight |",
            "|---|---|---|",
        ]
        for target, source, weight in sorted(self.edges, key=lambda e: -abs(e[2]))[:30]:
            lines.append(f"| {target} | {source} | {weight:+.4f} |")
        return "\n".join(lines)


@method(
    "graph",
    "Attribution graph of one prompt: direct effects through the model with its "
    "nonlinearities frozen (token embeddings → logits; features with transcoders, in Python)",
    requires={"freeze", "logits"},
    quick={"max_logits": 2},
)
def graph_method(
    backend: Any,
    data: Any,
    *,
    target: Annotated[int | None, Param(help="token id to explain (default: top logits)")] = None,
    max_logits: Annotated[int, Param(min=1, help="most logits explained")] = 10,
    desired_logit_prob: Annotated[
        float, Param(min=0.0, max=1.0, help="explain top logits up to this probability")
    ] = 0.95,
    node_threshold: Annotated[
        float, Param(min=0.0, max=1.0, help="cumulative influence share of kept nodes")
    ] = 0.8,
    edge_threshold: Annotated[
        float, Param(min=0.0, max=1.0, help="cumulative influence share of kept edges")
    ] = 0.98,
    batch_size: Annotated[int, Param(min=1, help="target rows per backward pass")] = 128,
    linearise: Annotated[
        Literal["frozen", "gradient"],
        Param(
            help="frozen: nonlinearities held, rows add up exactly; gradient: first-order "
            "expansion of the live model"
        ),
    ] = "frozen",
) -> GraphResult:
    import torch

    from .attribution import attribute

    ids = torch.as_tensor(data["input_ids"] if isinstance(data, dict) else data)
    mask = data.get("attention_mask") if isinstance(data, dict) else None
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise InputError(
            f"the graph method takes token ids (batch, seq); got shape {tuple(ids.shape)}"
        )
    rows = int(ids.shape[0])
    ids = ids[:1]  # one prompt: the batch's first row, its real tokens only
    if mask is not None:
        ids = ids[:, torch.as_tensor(mask)[0].bool()]
    graph = attribute(
        backend,
        ids,
        target=target,
        max_logits=max_logits,
        desired_logit_prob=desired_logit_prob,
        node_threshold=node_threshold,
        edge_threshold=edge_threshold,
        batch_size=batch_size,
        linearise=linearise,
    )
    edges = [
        (graph.nodes[t].id, graph.nodes[s].id, float(graph.adjacency[t, s]))
        for t, s in graph.adjacency.nonzero().tolist()
    ]
    return GraphResult(
        tokens=graph.tokens,
        token_strings=graph.token_strings,
        nodes=[
            {
                "id": n.id,
                "kind": n.kind,
                "layer": n.layer,
                "position": n.position,
                "index": n.index,
                "value": n.value,
                "label": n.label,
            }
            for n in graph.nodes
        ],
        edges=edges,
        scores=graph.scores,
        metadata={
            **{k: v for k, v in graph.metadata.items() if k not in ("kept_nodes",)},
            "explained_row": "the first of the batch's rows" if rows > 1 else "the only row",
        },
    )
