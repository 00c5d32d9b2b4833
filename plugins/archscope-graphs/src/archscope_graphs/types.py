"""The two shapes every part of the plugin agrees on: a `Transcoder` (what the replacement model
needs from a trained dictionary) and an `AttributionGraph` (what the graph computation produces
and the exporters and the viewer read)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

NodeKind = Literal["feature", "error", "embedding", "logit"]


@runtime_checkable
class Transcoder(Protocol):
    """A dictionary that reads one site and writes one or more later sites.

    A single-layer transcoder reads ``layer_l.mlp_in`` and writes ``layer_l.mlp``; one read
    layer of a cross-layer transcoder writes every later layer's MLP output too (a cross-layer
    transcoder is a list of these, one per read layer). ``encode`` gives the feature
    activations, ``decode`` the reconstruction at one written site (decoder bias included, the
    skip term not), ``encoder()``/``decoder(site)`` the read and write directions."""

    read_site: str
    write_sites: tuple[str, ...]
    n_features: int

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d_in) → (..., n_features) feature activations."""
        ...

    def decode(self, acts: torch.Tensor, site: str) -> torch.Tensor:
        """(..., n_features) → (..., d_out): the reconstruction of ``site``."""
        ...

    def encoder(self) -> torch.Tensor:
        """(n_features, d_in): each feature's read direction."""
        ...

    def decoder(self, site: str) -> torch.Tensor:
        """(n_features, d_out): each feature's write direction into ``site``."""
        ...

    def skip(self, x: torch.Tensor, site: str) -> torch.Tensor | None:
        """The linear skip term's contribution to ``site`` (None without a skip)."""
        ...


@dataclass
class Node:
    """One node of an attribution graph.

    ``layer``: the block index (embeddings -1, logits the number of layers); ``position``: the
    token position; ``index``: the feature index (features), the token id (embeddings, logits),
    None for error nodes; ``value``: the feature's activation, the logit's probability, 0.0
    otherwise; ``site``: the site the node sits on (e.g. ``layer_1.mlp``)."""

    id: str
    kind: NodeKind
    layer: int
    position: int
    index: int | None
    value: float = 0.0
    site: str | None = None
    label: str = ""


@dataclass
class AttributionGraph:
    """Nodes and the direct effects between them.

    ``adjacency[target, source]`` is the direct effect of node ``source`` on node ``target``
    through the frozen replacement model (rows are targets, as in circuit-tracer's files).
    ``targets`` are the indices of the logit nodes the graph explains. ``scores`` holds
    ``replacement`` and ``completeness`` (and any others computed); ``metadata`` says how the
    graph was made (model, backend, what was frozen, thresholds)."""

    tokens: list[int]
    token_strings: list[str]
    nodes: list[Node]
    adjacency: torch.Tensor
    targets: list[int]
    scores: dict[str, float] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
