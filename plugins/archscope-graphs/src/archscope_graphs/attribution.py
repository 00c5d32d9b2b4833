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

That is the default linearisation, "frozen". With ``linearise="gradient"`` nothing is frozen:
the same rows are computed through the live model (its patterns, norms, gates differentiated),
so each is the first-order part of its target at the prompt, not the target; ``target − row
sum`` is recorded per node as ``metadata["linearisation_offset"]`` and `bias_terms` refuses
such a graph. ``metadata["linearisation"]`` names the construction.

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

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from archscope.errors import ParameterError
from archscope.sites import Site
from archscope.tokens import single_token_id

from .replacement import ReplacementModel, check_linearise, require_frozen
from .types import AttributionGraph, Node, Transcoder


@dataclass
class _Row:
    """A target row: the seed of its backward pass, row ``index`` of ``vectors``."""

    site: str  # "logits" or a read site
    position: int
    vectors: torch.Tensor  # seed directions at (position) of site (a transcoder's encoder)
    index: int = 0

    @property
    def vector(self) -> torch.Tensor:
        return self.vectors[self.index]


def _row_vectors(rows: Sequence[_Row | None]) -> torch.Tensor:
    """The seed directions of ``rows`` (all of one site), stacked: one gather where they are
    rows of one matrix (a transcoder's features)."""
    picked = [r for r in rows if r is not None]
    first = picked[0].vectors
    if all(r.vectors is first for r in picked):
        return first[torch.tensor([r.index for r in picked])]
    return torch.stack([r.vector for r in picked])


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
    batch_size: int = 128,
    prune: bool = True,
    feature_threshold: float = 0.0,
    tokenizer: Any = None,
    linearise: str = "frozen",
) -> AttributionGraph:
    """The attribution graph of ``prompt`` (a string, a list of token ids or a (1, seq) tensor)
    on ``backend`` with ``transcoders`` replacing the sites they write.

    ``target``: a token id (or a one-token string) whose logit at the last position the graph
    explains, or a pair ``(good, bad)`` of token ids: the logit difference good − bad (the
    contrast removes what raises both, e.g. "a word of this class comes next"); None = the top
    logits (``max_logits``, ``desired_logit_prob``). ``prune=False``
    returns the whole graph (scores are computed on both). ``feature_threshold``: features with
    activation at or below it are not nodes. ``tokenizer`` reads a text prompt or target and
    names the tokens (default: the backend's, if it has one).

    ``linearise``: "frozen" (nonlinearities held at the prompt's values through
    `archscope.freeze`: rows add up to their targets minus the bias terms, `bias_terms`) or
    "gradient" (nothing held: edges are gradients of the live model dotted with the sources'
    values, a first-order expansion at the prompt; each row's target − row sum is recorded as
    ``metadata["linearisation_offset"]``, per node, 0 where a node has no row)."""
    _check(max_logits, desired_logit_prob, node_threshold, edge_threshold, batch_size)
    check_linearise(linearise, "attribute")
    with ReplacementModel.build(backend, prompt, transcoders, tokenizer, linearise) as rm:
        full, rows = _graph_rows(
            rm, target, max_logits, desired_logit_prob, batch_size, feature_threshold, not prune
        )
    full.metadata.update(
        {
            "linearisation": linearise,
            "backend": getattr(backend, "name", type(backend).__name__),
            "model": type(backend.model).__name__,
            # what the graph held: nothing in a gradient graph
            "frozen": sorted(getattr(backend, "freezes", ())) if linearise == "frozen" else [],
            "not_frozen": dict(getattr(backend, "cannot_freeze", {})),
            "node_threshold": node_threshold,
            "edge_threshold": edge_threshold,
            "batch_size": batch_size,
        }
    )
    if linearise == "gradient":  # no exact sum: what each first-order row misses
        full.metadata["linearisation_offset"] = _offsets(full, rows)
    sums = _row_sums(rows.values)
    influence = _influence(rows.index, rows.values, sums, _logit_weights(full))
    full.scores.update(_scores(full, rows, influence, sums))
    if not prune:
        return full
    pruned = _prune(full, rows, node_threshold, edge_threshold, influence)
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


def _check_token(token: Any, vocab: int, what: str) -> int:
    """``token`` as a token id of a vocabulary of ``vocab``, else a ParameterError naming
    ``what``."""
    try:
        index = None if isinstance(token, bool) else operator.index(token)
    except TypeError:
        index = None
    if index is None or not 0 <= index < vocab:
        raise ParameterError(f"{what} must be a token id in [0, {vocab}), got {token!r}")
    return index


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
        target = _check_token(target, rm.logits.shape[-1], "attribute: target")
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
    """The unpruned graph, its adjacency dense."""
    graph, _ = _graph_rows(
        rm, target, max_logits, desired, batch_size, feature_threshold, dense=True
    )
    return graph


def _graph_rows(
    rm: ReplacementModel,
    target: int | str | tuple[int, int] | None,
    max_logits: int,
    desired: float,
    batch_size: int,
    feature_threshold: float,
    dense: bool = False,
) -> tuple[AttributionGraph, _Rows]:
    """The unpruned graph with its computed rows. ``dense``: the rows are written into the
    graph's (n, n) adjacency (and the `_Rows` are all of its rows); otherwise the graph's
    ``adjacency`` is left empty (0, 0) and only the targets' rows exist."""
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
        site = t.read_site
        activations = acts[idx[:, 0], idx[:, 1]].tolist()
        for (p, f), value in zip(idx.tolist(), activations, strict=True):
            nodes.append(Node(f"{layer}_{f}_{p}", "feature", layer, p, f, value, site=site))
            rows.append(_Row(site, p, enc, f))
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
        rows.append(_Row("logits", seq - 1, _logit_vector(vocab, tok, contrast)[None]))
    targets = [i for i, r in enumerate(rows) if r is not None]
    # dense: the (n, n) adjacency itself, its rows written in place; otherwise the targets'
    # rows only (a graph with few targets, e.g. a recurrent model's long prompt, stays small)
    index = torch.tensor(targets, dtype=torch.long)
    if dense:
        computed = torch.zeros(len(nodes), len(nodes))
        dest, kept = index, _Rows(torch.arange(len(nodes)), computed)
    else:
        computed = torch.zeros(len(targets), len(nodes))
        dest, kept = torch.arange(len(targets)), _Rows(index, computed)
    _fill_rows(rm, rows, targets, active, n_features, n_errors, computed, dest, batch_size)
    values = _target_values(rm, rows)
    strings = _token_strings(rm.tokenizer, tokens)
    for node in nodes[n_features + n_errors :]:
        if node.kind == "embedding":
            node.label = strings[node.position]
        elif node.kind == "logit":
            node.label = _token_strings(rm.tokenizer, [node.index or 0])[0]
    graph = AttributionGraph(
        tokens=tokens,
        token_strings=strings,
        nodes=nodes,
        adjacency=torch.zeros(0, 0),
        targets=list(range(first_logit, len(nodes))),
        metadata={
            "target_values": values.tolist(),
            "n_features": n_features,
            "n_errors": n_errors,
            "seq": seq,
            "contrast_token": contrast,
        },
    )
    if dense:
        graph.adjacency = computed
    return graph, kept


def _offsets(graph: AttributionGraph, rows: _Rows) -> list[float]:
    """Per node: its target value minus its row's sum (what a first-order row does not
    reach); 0 for nodes without a row (errors, embeddings)."""
    values = torch.tensor(graph.metadata["target_values"], dtype=torch.float64)
    offset = torch.zeros(len(graph.nodes), dtype=torch.float64)
    offset[rows.index] = values[rows.index] - rows.values.double().sum(1)
    offset[[i for i, n in enumerate(graph.nodes) if n.kind in ("error", "embedding")]] = 0.0
    return [float(x) for x in offset]


def _target_values(rm: ReplacementModel, rows: list[_Row | None]) -> torch.Tensor:
    """Each target's value in the prompt's run (a feature's pre-activation, a logit), one
    product per site; 0 for the other nodes."""
    values = torch.zeros(len(rows))
    by_site: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        if row is not None:
            by_site.setdefault(row.site, []).append(i)
    for site, index in by_site.items():
        ref = rm.logits if site == "logits" else rm.reads[site]
        picked = [rows[i] for i in index]
        positions = torch.tensor([r.position for r in picked if r is not None])
        vectors = _row_vectors(picked)
        values[torch.tensor(index)] = (ref[positions].float() * vectors.float()).sum(-1)
    return values


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
    out: torch.Tensor,
    dest: torch.Tensor,
    batch_size: int,
) -> None:
    """``out[dest[j]]`` = the row of node ``targets[j]``: one forward of ``batch`` copies of
    the prompt, then one backward per chunk of rows (row b of a chunk seeds copy b).

    Targets come in node order, which is (site, position) order: a chunk seeds one site,
    mostly (the backward stops at its layer: a leaf it cannot reach gets no gradient and its
    columns are skipped), and a narrow range of positions (by causality a target at position
    t has no gradient at later positions: only positions up to the chunk's last are read). A
    feature's column is its decoder row, scaled by its activation, dotted with the gradient at
    its position: one batched matrix product per transcoder and written site over the
    positions, each position against its own active features only (padded to the most active
    position's count); an error's or embedding's column is its vector dotted with the
    gradient at its position."""
    if not targets:
        return
    seq = rm.prompt.shape[1]
    batch = min(batch_size, len(targets))
    live = rm.run(batch)
    packed = [_pack_features(rm, k, idx, seq) for k, idx in enumerate(active)]
    vectors = {"embed": rm.embed.float(), **{s: e.float() for s, e in rm.errors.items()}}
    starts = {"embed": n_features + n_errors}
    for k, site in enumerate(rm.errors):
        starts[site] = n_features + k * seq
    leaf_sites = list(live.leaves)
    for start in range(0, len(targets), batch):
        chunk = [rows[i] for i in targets[start : start + batch]]
        n = len(chunk)
        outputs, seeds, span = _seeds(live, chunk)
        grads = torch.autograd.grad(
            outputs,
            [live.leaves[s] for s in leaf_sites],
            grad_outputs=seeds,
            retain_graph=True,
            allow_unused=True,
        )
        # positions after the chunk's last target have no gradient; unreached leaves none
        g = {
            s: v.detach()[:n, :span].float()
            for s, v in zip(leaf_sites, grads, strict=True)
            if v is not None
        }
        rows_at = dest[start : start + n]
        first = int(rows_at[0])
        contiguous = int(rows_at[-1]) - first == n - 1
        # consecutive rows are written in place; a chunk spanning a gap goes through a block
        block = out[first : first + n] if contiguous else torch.zeros(n, out.shape[1])
        col = 0
        for idx, (counts, at, weights) in zip(active, packed, strict=True):
            reached = int(counts[:span].sum())  # the active features at positions < span
            terms = [
                # (span, n, d) @ (span, d, m) -> (span, n, m)
                torch.bmm(g[site].transpose(0, 1), w[:span].transpose(1, 2))
                for site, w in weights.items()
                if site in g and reached
            ]
            if terms:
                effect = torch.stack(terms).sum(0) if len(terms) > 1 else terms[0]
                block[:, col : col + reached] = effect.permute(1, 0, 2).reshape(n, -1)[
                    :, at[:reached]
                ]
            col += len(idx)
        for site, vector in vectors.items():
            if site in g:
                c = starts[site]
                block[:, c : c + span] = torch.einsum("bpd,pd->bp", g[site], vector[:span])
        if not contiguous:
            out[rows_at] = block


def _seeds(
    live: Any, chunk: list[_Row | None]
) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
    """The outputs and gradient seeds of one backward (row b of ``chunk`` seeds copy b: one
    seed tensor per site, not per row), and the number of positions up to its last target."""
    by_site: dict[str, list[int]] = {}
    for b, row in enumerate(chunk):
        assert row is not None
        by_site.setdefault(row.site, []).append(b)
    outputs, seeds, span = [], [], 0
    for site, slots in by_site.items():
        ref = live.logits if site == "logits" else live.reads[site]
        picked = [chunk[b] for b in slots]
        positions = torch.tensor([r.position for r in picked if r is not None])
        seed = torch.zeros_like(ref)
        seed[torch.tensor(slots), positions] = _row_vectors(picked).to(seed.dtype)
        outputs.append(ref)
        seeds.append(seed)
        span = max(span, int(positions.max()) + 1)
    return outputs, seeds, span


def _pack_features(
    rm: ReplacementModel, k: int, idx: torch.Tensor, seq: int
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """For transcoder ``k`` with active (position, feature) pairs ``idx`` (position-major):
    the count of active features per position, each pair's flat index in a (seq, m) padded
    layout, and per written site the (seq, m, d) decoder rows times their activations."""
    t, acts = rm.transcoders[k], rm.acts[k]
    counts = (
        torch.bincount(idx[:, 0], minlength=seq) if len(idx) else torch.zeros(seq, dtype=torch.long)
    )
    m = max(int(counts.max()) if len(idx) else 0, 1)
    starts = torch.cumsum(counts, 0) - counts
    p, f = (idx[:, 0], idx[:, 1]) if len(idx) else (torch.zeros(0, dtype=torch.long),) * 2
    slot = torch.arange(len(idx)) - starts[p]
    flat = p * m + slot
    scale = acts[p, f].float()[:, None]
    weights = {}
    for site in t.write_sites:
        dec = t.decoder(site).detach().float()
        w = torch.zeros(seq, m, dec.shape[1])
        w[p, slot] = dec[f] * scale
        weights[site] = w
    return counts, flat, weights


def bias_terms(rm: ReplacementModel, graph: AttributionGraph) -> torch.Tensor:
    """Per target row of ``graph`` (`AttributionGraph.targets` first, then every feature
    row, in node order): what no node explains, computed without the graph's rows: one run of
    the frozen model in which the embeddings are zero and each written site holds only the
    transcoders' decoder biases (its skip terms stay live). By linearity this is the target's
    value minus the sum of its row. Only a "frozen" graph is affine in its nodes: a
    "gradient" graph (or replacement model) is refused with a ParameterError (its rows miss
    their targets by ``metadata["linearisation_offset"]``)."""
    require_frozen(graph.metadata.get("linearisation", "frozen"), "bias_terms")
    require_frozen(rm.linearise, "bias_terms")
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
# They work on the computed rows only (`_Rows`): the rows of the targets (features and logits)
# are the only non-zero rows of an adjacency, so a graph whose targets are few (a recurrent
# model's long prompt: its logits) never needs the (n, n) matrix; the dense public functions
# take the non-zero rows of the graph's adjacency and give the same results.
@dataclass
class _Rows:
    """The non-zero rows of an (n, n) adjacency: ``values[j]`` is row ``index[j]``."""

    index: torch.Tensor  # (k,) int64, increasing
    values: torch.Tensor  # (k, n)

    @classmethod
    def of(cls, adjacency: torch.Tensor) -> _Rows:
        index = (adjacency != 0).any(1).nonzero().flatten()
        return cls(index, adjacency[index])

    def dense(self) -> torch.Tensor:
        n = self.values.shape[1]
        out = torch.zeros(n, n, dtype=self.values.dtype)
        out[self.index] = self.values
        return out


def _normalised(values: torch.Tensor, sums: torch.Tensor | None = None) -> torch.Tensor:
    """|rows| over their sums (`_row_sums`, given or computed; all-zero rows stay zero), in
    float64."""
    a = values.abs().double()
    total = a.sum(1, keepdim=True) if sums is None else sums[:, None]
    return a.div_(total.clamp_min(1e-300))  # an all-zero row stays zero


#: Rows converted to float64 at a time by `_row_sums` and `_influence` (a block of a few MB:
#: the (k, n) matrix itself is never copied whole).
_BLOCK = 64


def _row_sums(values: torch.Tensor) -> torch.Tensor:
    """Each row's sum of absolute values, in float64: what `_normalised` divides by."""
    sums = torch.zeros(values.shape[0], dtype=torch.float64)
    for i in range(0, values.shape[0], _BLOCK):
        sums[i : i + _BLOCK] = values[i : i + _BLOCK].double().abs_().sum(1)
    return sums


def _influence(
    index: torch.Tensor, values: torch.Tensor, sums: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """``weights·(A + A² + ...)`` for the matrix ``A`` whose non-zero rows are |``values``|
    over their ``sums`` (`_normalised`) at ``index`` (the graph is acyclic, so the series
    ends): each term is the last one's entries at those rows times ``A``.

    ``A`` is never made: a term is the sum over the rows where the last term is non-zero of
    its entry over the row's sum times the row, a block of rows at a time in float64 (a
    graph's terms live on few rows: the first on the logits', the last on the first layer's)."""
    scale = 1.0 / sums.clamp_min(1e-300)  # an all-zero row adds nothing

    def times_a(entries: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(values.shape[1], dtype=torch.float64)
        live = (entries != 0).nonzero().flatten()
        if not len(live):
            return out
        for i in range(int(live[0]), int(live[-1]) + 1, _BLOCK):
            c = entries[i : i + _BLOCK] * scale[i : i + _BLOCK]
            if bool(c.any()):
                out += c @ values[i : i + _BLOCK].double().abs_()
        return out

    current = times_a(weights[index])
    total = current.clone()
    for _ in range(values.shape[1]):
        if not bool(current.abs().sum() > 1e-12):
            break
        current = times_a(current[index])
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
    rows = _Rows.of(graph.adjacency)
    return _influence(rows.index, rows.values, _row_sums(rows.values), _logit_weights(graph))


def prune_graph(
    graph: AttributionGraph, node_threshold: float = 0.8, edge_threshold: float = 0.98
) -> AttributionGraph:
    """The graph keeping the nodes and edges that carry ``node_threshold`` / ``edge_threshold``
    of the influence on the logits (cumulative shares, most influential first)."""
    return _prune(graph, _Rows.of(graph.adjacency), node_threshold, edge_threshold)


def _prune(
    graph: AttributionGraph,
    rows: _Rows,
    node_threshold: float,
    edge_threshold: float,
    influence: torch.Tensor | None = None,
) -> AttributionGraph:
    """`prune_graph` on the graph whose adjacency has the non-zero ``rows``: memory of the
    rows plus the node-pruned graph, never (n, n). ``influence``: the nodes' influence on the
    logits (`node_influence`), if already computed."""
    n = len(graph.nodes)
    logits = torch.zeros(n, dtype=torch.bool)
    logits[graph.targets] = True
    weights = _logit_weights(graph)
    if influence is None:
        influence = _influence(rows.index, rows.values, _row_sums(rows.values), weights)
    keep = _keep_cumulative(torch.where(logits, 0.0, influence), node_threshold) | logits
    # the node-pruned graph, over the kept nodes only (K of them)
    kept = keep.nonzero().flatten()
    place = torch.full((n,), -1, dtype=torch.long)
    place[kept] = torch.arange(len(kept))
    live_rows = keep[rows.index]
    sub_index = place[rows.index[live_rows]]
    sub = rows.values[live_rows][:, kept]
    sums = _row_sums(sub)
    a = _normalised(sub, sums)
    w = weights[kept]
    node_score = _influence(sub_index, sub, sums, w) + w
    edge_scores = a * node_score[sub_index][:, None]
    edge_keep = _keep_cumulative(edge_scores.flatten(), edge_threshold).view(edge_scores.shape)
    sub = sub * edge_keep
    # nodes left without a path: drop those with no kept edge (logits stay)
    nonzero = sub != 0
    connected = nonzero.any(0) | logits[kept]
    connected[sub_index] |= nonzero.any(1)
    adj = torch.zeros(len(kept), len(kept), dtype=sub.dtype)
    adj[sub_index] = sub
    index = kept[connected]
    remap = {int(old): new for new, old in enumerate(index.tolist())}
    metadata = dict(graph.metadata)
    for key in ("target_values", "linearisation_offset"):  # per node: the kept nodes'
        values = metadata.get(key)
        if values is not None:
            metadata[key] = [values[int(i)] for i in index]
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
        adjacency=adj[connected][:, connected].float(),
        targets=[remap[t] for t in graph.targets if t in remap],
        scores=dict(graph.scores),
        metadata=metadata,
    )


def graph_scores(graph: AttributionGraph) -> dict[str, float]:
    """``replacement`` and ``completeness`` of ``graph`` (see the module's docstring)."""
    return _scores(graph, _Rows.of(graph.adjacency))


def _scores(
    graph: AttributionGraph,
    rows: _Rows,
    influence: torch.Tensor | None = None,
    sums: torch.Tensor | None = None,
) -> dict[str, float]:
    """`graph_scores` from the non-zero ``rows`` (and the nodes' ``influence`` and the rows'
    `_row_sums`, if already computed)."""
    kinds = [node.kind for node in graph.nodes]
    errors = torch.tensor([k == "error" for k in kinds])
    embeds = torch.tensor([k == "embedding" for k in kinds])
    if not len(kinds):
        return {"replacement": 1.0, "completeness": 1.0}
    if sums is None:
        sums = _row_sums(rows.values)  # > 0 on rows with any edge, 0 on all-zero rows
    # the normalised rows' share from error nodes
    error_share = rows.values[:, errors].double().abs_().sum(1) / sums.clamp_min(1e-300)
    weights = _logit_weights(graph)
    if influence is None:
        influence = _influence(rows.index, rows.values, sums, weights)
    from_errors = float(influence[errors].sum())
    from_embeds = float(influence[embeds].sum())
    replacement = from_embeds / (from_embeds + from_errors) if from_embeds + from_errors else 1.0
    w = (influence + weights)[rows.index]
    targets = sums > 0
    completeness = (
        float((w[targets] * (1 - error_share[targets])).sum() / w[targets].sum())
        if bool(targets.any()) and float(w[targets].sum()) > 0
        else 1.0
    )
    return {"replacement": replacement, "completeness": completeness}
