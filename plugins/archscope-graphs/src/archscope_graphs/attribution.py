"""Attribution graphs: the direct effects between the nodes of a replacement model.

Nodes, in this order: active transcoder features per (read site, position), error nodes per
(written site, position), token embeddings per position, and output logits (the most probable
tokens at the last position until their probabilities add up to ``desired_logit_prob``, at most
``max_logits``; or the chosen ``target``). ``adjacency[target, source]`` is the direct effect of
``source`` on ``target`` through the frozen replacement model (`replacement`): for a logit, on
its logit; for a feature, on its pre-activation (encoder row · read site). Rows are computed
``batch_size`` at a time: one forward pass of ``batch_size`` copies of the prompt, one backward
pass per chunk of target rows, each copy carrying one row's gradient; rows are written into the
graph as they come (memory: the graph plus one batch of gradients, never seq² × features).

A row's entries add up to its target's value minus the frozen bias terms (the biases of
attention, norms and heads carried through the frozen model, and the transcoders' decoder
biases), which `bias_terms` computes independently (a run of the frozen model with every input
set to zero).

Pruning follows influence on the chosen logits: with ``A`` = |adjacency| normalised per row
and ``w`` the logits' probabilities, a node's influence is ``w·(A + A² + ...)``; nodes are kept,
most influential first, until their cumulative share of the total reaches ``node_threshold``,
then edges (scored by normalised weight × the influence of their target) until
``edge_threshold``. Logits are always kept. Scores: ``replacement`` = the share of the
influence reaching the logits from embeddings rather than error nodes (end to end);
``completeness`` = the influence-weighted share of the nodes' direct inputs that does not
come from error nodes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from archscope.errors import ParameterError
from archscope.sites import Site
from archscope.tokens import single_token_id

from .replacement import ReplacementModel
from .types import AttributionGraph, Node, Transcoder


@dataclass
class _Row:
    """A target row: the seed of its backward pass."""

    site: str  # "logits" or a read site
    position: int
    vector: torch.Tensor  # seed direction at (position) of site


def attribute(
    backend: Any,
    prompt: Any,
    *,
    transcoders: Sequence[Transcoder] | None = None,
    target: int | str | tuple[int, int] | None = None,
    max_logits: int = 10,
    desired_logit_prob: float = 0.95,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    batch_size: int = 32,
    prune: bool = True,
    feature_threshold: float = 0.0,
    tokenizer: Any = None,
) -> AttributionGraph:
    """The attribution graph of ``prompt`` (a string, a list of token ids or a (1, seq) tensor)
    on ``backend`` with ``transcoders`` replacing the sites they write.

    ``target``: a token id (or a one-token string) whose logit at the last position the graph
    explains, or a pair ``(good, bad)`` of token ids: the logit difference good − bad (the
    contrast removes what raises both, e.g. "a word of this class comes next"); None = the top
    logits (``max_logits``, ``desired_logit_prob``). ``prune=False``
    returns the whole graph (scores are computed on both). ``feature_threshold``: features with
    activation at or below it are not nodes. ``tokenizer`` reads a text prompt or target and
    names the tokens (default: the backend's, if it has one)."""
    _check(max_logits, desired_logit_prob, node_threshold, edge_threshold, batch_size)
    with ReplacementModel.build(backend, prompt, transcoders, tokenizer) as rm:
        full = _graph(rm, target, max_logits, desired_logit_prob, batch_size, feature_threshold)
    full.metadata.update(
        {
            "backend": getattr(backend, "name", type(backend).__name__),
            "model": type(backend.model).__name__,
            "frozen": sorted(getattr(backend, "freezes", ())),
            "not_frozen": dict(getattr(backend, "cannot_freeze", {})),
            "node_threshold": node_threshold,
            "edge_threshold": edge_threshold,
            "batch_size": batch_size,
        }
    )
    full.scores.update(graph_scores(full))
    if not prune:
        return full
    pruned = prune_graph(full, node_threshold, edge_threshold)
    pruned.scores.update({f"pruned_{k}": v for k, v in graph_scores(pruned).items()})
    return pruned


def _check(max_logits: int, prob: float, node_t: float, edge_t: float, batch_size: int) -> None:
    problems = []
    if not isinstance(max_logits, int) or max_logits < 1:
        problems.append(f"max_logits={max_logits!r} (an int >= 1)")
    for name, value in (
        ("desired_logit_prob", prob),
        ("node_threshold", node_t),
        ("edge_threshold", edge_t),
    ):
        if not isinstance(value, (int, float)) or not 0.0 < float(value) <= 1.0:
            problems.append(f"{name}={value!r} (a fraction in (0, 1])")
    if not isinstance(batch_size, int) or batch_size < 1:
        problems.append(f"batch_size={batch_size!r} (an int >= 1)")
    if problems:
        raise ParameterError(
            "attribute: invalid " + "; ".join(problems) + ". Fix these parameters and call again"
        )


def _target_tokens(
    rm: ReplacementModel, target: int | str | None, max_logits: int, desired: float
) -> tuple[list[int], list[float]]:
    probs = torch.softmax(rm.logits[-1].double(), -1)
    if target is not None:
        if isinstance(target, bool):
            raise ParameterError(f"attribute: target must be a token id, got {target!r}")
        if isinstance(target, str):
            if rm.tokenizer is None:
                raise ParameterError(
                    f"attribute: target {target!r} is text but there is no tokenizer "
                    "(tokenizer=...); pass a token id instead"
                )
            target = single_token_id(rm.tokenizer, target, "attribute: target")
        vocab = rm.logits.shape[-1]
        if not isinstance(target, int) or not 0 <= target < vocab:
            raise ParameterError(
                f"attribute: target must be a token id in [0, {vocab}), got {target!r}"
            )
        return [target], [float(probs[target])]
    order = torch.argsort(probs, descending=True)[:max_logits]
    tokens, ps, total = [], [], 0.0
    for t in order.tolist():
        tokens.append(int(t))
        ps.append(float(probs[t]))
        total += float(probs[t])
        if total >= desired:
            break
    return tokens, ps


def _split_target(
    rm: ReplacementModel, target: int | str | tuple[int, int] | None
) -> tuple[int | str | None, int | None]:
    """(the target, the contrast token or None)."""
    if not isinstance(target, tuple):
        return target, None
    if len(target) != 2 or target[0] == target[1]:
        raise ParameterError(
            f"attribute: a contrast target is a pair (good, bad) of two different token ids, "
            f"got {target!r}"
        )
    _target_tokens(rm, target[1], 1, 1.0)  # checks the id
    return target[0], int(target[1])


def _layer_of(site: str, default: int) -> int:
    parsed = Site.parse(site)
    return parsed.layer if parsed.layer is not None else default


def _graph(
    rm: ReplacementModel,
    target: int | str | tuple[int, int] | None,
    max_logits: int,
    desired: float,
    batch_size: int,
    feature_threshold: float,
) -> AttributionGraph:
    seq = rm.prompt.shape[1]
    n_layers = int(getattr(rm.backend, "n_layers", 0))
    tokens = rm.prompt[0].tolist()
    nodes: list[Node] = []
    rows: list[_Row | None] = []
    # features
    active: list[torch.Tensor] = []  # per transcoder: (n_active, 2) positions, features
    for t, acts in zip(rm.transcoders, rm.acts, strict=True):
        idx = (acts > feature_threshold).nonzero()
        active.append(idx)
        layer = _layer_of(t.read_site, 0)
        enc = t.encoder().detach().float()
        for p, f in idx.tolist():
            nodes.append(
                Node(
                    f"{layer}_{f}_{p}",
                    "feature",
                    layer,
                    p,
                    f,
                    float(acts[p, f]),
                    site=t.read_site,
                )
            )
            rows.append(_Row(t.read_site, p, enc[f]))
    n_features = len(nodes)
    for site in rm.errors:
        layer = _layer_of(site, 0)
        for p in range(seq):
            nodes.append(Node(f"err_{layer}_{p}", "error", layer, p, None, site=site))
            rows.append(None)
    n_errors = len(nodes) - n_features
    for p in range(seq):
        nodes.append(Node(f"E_{tokens[p]}_{p}", "embedding", -1, p, tokens[p], site="embed"))
        rows.append(None)
    target, contrast = _split_target(rm, target)
    targets_tok, probs = _target_tokens(rm, target, max_logits, desired)
    vocab = rm.logits.shape[-1]
    first_logit = len(nodes)
    for tok, prob in zip(targets_tok, probs, strict=True):
        nodes.append(
            Node(f"L_{tok}_{seq - 1}", "logit", n_layers, seq - 1, tok, prob, site="logits")
        )
        rows.append(_Row("logits", seq - 1, _logit_vector(vocab, tok, contrast)))
    adjacency = torch.zeros(len(nodes), len(nodes))
    targets = [i for i, r in enumerate(rows) if r is not None]
    _fill_rows(rm, rows, targets, active, n_features, n_errors, adjacency, batch_size)
    values = torch.zeros(len(nodes))
    for i in targets:
        row = rows[i]
        assert row is not None
        if row.site == "logits":
            values[i] = rm.logits[row.position] @ row.vector
        else:
            values[i] = rm.reads[row.site][row.position] @ row.vector
    strings = _token_strings(rm.tokenizer, tokens)
    for node in nodes:
        if node.kind == "embedding":
            node.label = strings[node.position]
        elif node.kind == "logit":
            node.label = _token_strings(rm.tokenizer, [node.index or 0])[0]
    return AttributionGraph(
        tokens=tokens,
        token_strings=strings,
        nodes=nodes,
        adjacency=adjacency,
        targets=list(range(first_logit, len(nodes))),
        metadata={
            "target_values": values.tolist(),
            "n_features": n_features,
            "n_errors": n_errors,
            "seq": seq,
            "contrast_token": contrast,
        },
    )


def _logit_vector(vocab: int, token: int, contrast: int | None) -> torch.Tensor:
    """The direction in logit space a logit row explains: ``token``'s logit, minus
    ``contrast``'s when given."""
    vector = torch.zeros(vocab)
    vector[token] = 1.0
    if contrast is not None:
        vector[contrast] = -1.0
    return vector


def _fill_rows(
    rm: ReplacementModel,
    rows: list[_Row | None],
    targets: list[int],
    active: list[torch.Tensor],
    n_features: int,
    n_errors: int,
    adjacency: torch.Tensor,
    batch_size: int,
) -> None:
    """Each target's row of ``adjacency``: one forward of ``batch`` copies, then one backward
    per chunk of rows (row b of a chunk seeds copy b)."""
    if not targets:
        return
    batch = min(batch_size, len(targets))
    live = rm.run(batch)
    seq = rm.prompt.shape[1]
    # the (batch, seq, n_features) feature effects in float32 (as the gradients are): in
    # float64 they cost more than the backward passes on graphs of thousands of nodes; the
    # error and embedding dot products, and the products with the activations, in float64
    decoders = [{s: t.decoder(s).detach().float() for s in t.write_sites} for t in rm.transcoders]
    errors = {s: e.double() for s, e in rm.errors.items()}
    embed = rm.embed.double()
    error_sites = list(rm.errors)
    embed_col = n_features + n_errors
    leaf_sites = list(live.leaves)
    for start in range(0, len(targets), batch):
        chunk = targets[start : start + batch]
        seeds: dict[str, torch.Tensor] = {}
        for b, i in enumerate(chunk):
            row = rows[i]
            assert row is not None
            ref = live.logits if row.site == "logits" else live.reads[row.site]
            if row.site not in seeds:  # one seed tensor per site and chunk, not per row
                seeds[row.site] = torch.zeros_like(ref)
            seed = seeds[row.site]
            seed[b, row.position] = row.vector.to(seed.dtype)
        outputs = [live.logits if s == "logits" else live.reads[s] for s in seeds]
        grads = torch.autograd.grad(
            outputs,
            [live.leaves[s] for s in leaf_sites],
            grad_outputs=list(seeds.values()),
            retain_graph=True,
            allow_unused=True,
            materialize_grads=True,
        )
        g = {s: v.detach() for s, v in zip(leaf_sites, grads, strict=True)}
        n = len(chunk)
        rows_out = torch.zeros(n, adjacency.shape[1], dtype=torch.float64)
        col = 0
        for k, (acts, idx) in enumerate(zip(rm.acts, active, strict=True)):
            if len(idx):
                effect: torch.Tensor | None = None
                for site, dec in decoders[k].items():
                    term = g[site][:n].float() @ dec.T
                    effect = term if effect is None else effect + term
                assert effect is not None
                p, f = idx[:, 0], idx[:, 1]
                rows_out[:, col : col + len(idx)] = effect[:, p, f].double() * acts[p, f].double()
            col += len(idx)
        for site in error_sites:
            rows_out[:, col : col + seq] = (g[site][:n].double() * errors[site]).sum(-1)
            col += seq
        rows_out[:, embed_col : embed_col + seq] = (g["embed"][:n].double() * embed).sum(-1)
        adjacency[chunk] = rows_out.to(adjacency.dtype)


def bias_terms(rm: ReplacementModel, graph: AttributionGraph) -> torch.Tensor:
    """Per target row of ``graph`` (`AttributionGraph.targets` first, then every feature
    row, in node order): what no node explains, computed without the graph's rows: one run of
    the frozen model in which the embeddings are zero and each written site holds only the
    transcoders' decoder biases (its skip terms stay live). By linearity this is the target's
    value minus the sum of its row."""
    bias_only: dict[str, torch.Tensor] = {"embed": torch.zeros_like(rm.embed)}
    for site, value in rm.writes.items():
        total = torch.zeros_like(value)
        for t, acts in zip(rm.transcoders, rm.acts, strict=True):
            if site in t.write_sites:
                total = total + t.decode(torch.zeros_like(acts), site).float()
        bias_only[site] = total
    with torch.no_grad():
        live = rm.run(1, bias_only)
    logits = live.logits.detach()
    reads = {k: v.detach() for k, v in live.reads.items()}
    out = []
    for i in bias_rows(graph):
        node = graph.nodes[i]
        if node.kind == "logit":
            vector = _logit_vector(
                logits.shape[-1], node.index or 0, graph.metadata.get("contrast_token")
            )
            out.append(float(logits[0, node.position].float() @ vector))
        else:
            t = next(t for t in rm.transcoders if t.read_site == node.site)
            enc = t.encoder()[node.index or 0].float()
            out.append(float(reads[t.read_site][0, node.position].float() @ enc))
    return torch.tensor(out, dtype=torch.float64)


def bias_rows(graph: AttributionGraph) -> list[int]:
    """The rows `bias_terms` covers: the logits, then the features (node order)."""
    return [*graph.targets, *(i for i, n in enumerate(graph.nodes) if n.kind == "feature")]


def _token_strings(tokenizer: Any, tokens: list[int]) -> list[str]:
    if tokenizer is None:
        return [str(t) for t in tokens]
    try:
        return [tokenizer.decode([t]) for t in tokens]
    except Exception:
        return [str(t) for t in tokens]


# -- influence, pruning, scores ---------------------------------------------------------------
def _normalised(adjacency: torch.Tensor) -> torch.Tensor:
    a = adjacency.abs().double()
    total = a.sum(1, keepdim=True)
    return torch.where(total > 0, a / total.clamp_min(1e-300), torch.zeros_like(a))


def _influence(a: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``weights·(A + A² + ...)`` (the graph is acyclic, so the series ends)."""
    current = weights @ a
    total = current.clone()
    for _ in range(a.shape[0]):
        if not bool(current.abs().sum() > 1e-12):
            break
        current = current @ a
        total += current
    return total


def _logit_weights(graph: AttributionGraph) -> torch.Tensor:
    w = torch.zeros(len(graph.nodes), dtype=torch.float64)
    for i in graph.targets:
        w[i] = graph.nodes[i].value
    if float(w.sum()) <= 0:
        w[graph.targets] = 1.0
    return w / w.sum()


def _keep_cumulative(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Mask of the highest scores whose cumulative share (before each) is below
    ``threshold``; zero scores are never kept."""
    total = float(scores.sum())
    keep = torch.zeros_like(scores, dtype=torch.bool)
    if total <= 0:
        return keep
    order = torch.argsort(scores, descending=True)
    before = torch.cumsum(scores[order], 0) - scores[order]
    chosen = order[(before / total < threshold) & (scores[order] > 0)]
    keep[chosen] = True
    return keep


def node_influence(graph: AttributionGraph) -> torch.Tensor:
    """Each node's influence on the graph's logits (weighted by their probabilities)."""
    return _influence(_normalised(graph.adjacency), _logit_weights(graph))


def prune_graph(
    graph: AttributionGraph, node_threshold: float = 0.8, edge_threshold: float = 0.98
) -> AttributionGraph:
    """The graph keeping the nodes and edges that carry ``node_threshold`` / ``edge_threshold``
    of the influence on the logits (cumulative shares, most influential first)."""
    n = len(graph.nodes)
    logits = torch.zeros(n, dtype=torch.bool)
    logits[graph.targets] = True
    influence = node_influence(graph)
    keep = _keep_cumulative(torch.where(logits, 0.0, influence), node_threshold) | logits
    adj = graph.adjacency * keep[:, None] * keep[None, :]
    a = _normalised(adj)
    weights = _logit_weights(graph)
    node_score = _influence(a, weights) + weights
    edge_scores = a * node_score[:, None]
    edge_keep = _keep_cumulative(edge_scores.flatten(), edge_threshold).view(n, n)
    adj = adj * edge_keep
    # nodes left without a path: drop those with no kept edge (logits stay)
    connected = (adj != 0).any(0) | (adj != 0).any(1) | logits
    keep &= connected
    index = keep.nonzero().flatten()
    remap = {int(old): new for new, old in enumerate(index.tolist())}
    metadata = dict(graph.metadata)
    values = metadata.get("target_values")
    if values is not None:
        metadata["target_values"] = [values[int(i)] for i in index]
    metadata.update(
        {
            "pruned_from": n,
            "kept_nodes": [int(i) for i in index],
            "node_influence": [float(influence[int(i)]) for i in index],
        }
    )
    return AttributionGraph(
        tokens=graph.tokens,
        token_strings=graph.token_strings,
        nodes=[graph.nodes[int(i)] for i in index],
        adjacency=adj[index][:, index].float(),
        targets=[remap[t] for t in graph.targets if t in remap],
        scores=dict(graph.scores),
        metadata=metadata,
    )


def graph_scores(graph: AttributionGraph) -> dict[str, float]:
    """``replacement`` and ``completeness`` of ``graph`` (see the module's docstring)."""
    kinds = [node.kind for node in graph.nodes]
    errors = torch.tensor([k == "error" for k in kinds])
    embeds = torch.tensor([k == "embedding" for k in kinds])
    if not len(kinds):
        return {"replacement": 1.0, "completeness": 1.0}
    a = _normalised(graph.adjacency)
    weights = _logit_weights(graph)
    influence = _influence(a, weights)
    from_errors = float(influence[errors].sum())
    from_embeds = float(influence[embeds].sum())
    replacement = from_embeds / (from_embeds + from_errors) if from_embeds + from_errors else 1.0
    raw = graph.adjacency.abs().double()
    total = raw.sum(1)
    error_share = torch.where(total > 0, raw[:, errors].sum(1) / total.clamp_min(1e-300), 0.0)
    w = influence + weights
    targets = total > 0
    completeness = (
        float((w[targets] * (1 - error_share[targets])).sum() / w[targets].sum())
        if bool(targets.any()) and float(w[targets].sum()) > 0
        else 1.0
    )
    return {"replacement": replacement, "completeness": completeness}
