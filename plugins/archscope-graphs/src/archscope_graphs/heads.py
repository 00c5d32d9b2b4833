"""Attention heads in attribution graphs: which head carries an edge, and what sets a head's
attention (QK attribution).

With attention patterns frozen, an attribution graph shows what flows *through* a head (its
values: an edge from a token to a logit passes through the heads that move it), but not what
made the head look where it looks: key and query composition is held in the pattern. The two
functions here make both visible.

- `edge_heads` splits one edge of a graph by the heads it passes through. In the frozen
  replacement model the edge's target is an affine function of every head's output, so the
  part of the edge that runs through head (l, h) is exact: the gradient of the target with
  respect to the head's output (its slice of the output projection's input), dotted with the
  change of that output when the source node is removed. Every path crosses each layer at
  most once, through one of its heads or past them all, so per layer the heads' parts plus
  the part that bypasses the layer's attention add up to the edge.
- `qk_attribution` decomposes one attention score (the scaled pre-softmax ``q·k``) of a head
  at (query position, key position). The residual stream that the layer's norm reads at each
  of the two positions is split into the components written into it: the token embedding,
  every earlier head's output (one term per head), the output projections' biases, every
  earlier MLP's output (or, given transcoders, each active feature's write, the decoder bias
  and skip, and the error), and whatever is left. With the norm's scale held at the prompt's
  value the query and key are affine in those components, so the score is a sum of
  ``query component × key component`` products plus bias terms: `QKAttribution.pairs`, whose
  column sums are the key-side terms (the full query against each key component) and row sums
  the query-side terms. The terms add up to the score to float rounding; the scores of the
  whole query row are checked against the model's own attention pattern (a layout this module
  does not reproduce, e.g. per-head query/key norms, raises an error naming the layer). On a
  bfloat16 or float16 model the decomposition is computed in float32 from the run's values
  (the norm recomputed on the block's input, the projections with float32 copies of their
  weights), so the terms still add up to the score; the check against the model's pattern
  then allows a few units of the model dtype's rounding.

Both run on the transformer backend (attention with separate query/key projections, with or
without rotary positions, or a fused [q|k|v] projection as in GPT-2).
"""

from __future__ import annotations

import contextlib
import operator
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from archscope.errors import ParameterError
from archscope.freeze import FreezeError, FrozenValues, frozen_norm
from archscope.sites import Site

from .interventions import _node_changes, _transcoder_of
from .replacement import ReplacementModel, _prompt_ids, require_frozen
from .types import AttributionGraph, Node, Transcoder

__all__ = ["EdgeHeads", "QKAttribution", "QKTerm", "edge_heads", "qk_attribution"]

_OUTPUT = ("o_proj", "c_proj", "dense", "out_proj")
_SEPARATE = (("q_proj", "k_proj"), ("query", "key"), ("q", "k"), ("wq", "wk"))
_FUSED = ("c_attn", "qkv_proj", "Wqkv", "qkv")
_PATTERN_EPS = 4  # units of the pattern dtype's rounding allowed between it and the recomputation


# -- the attention layers of a backend ---------------------------------------------------------
@dataclass
class _Layer:
    index: int
    block: Any
    attention: Any
    output: Any  # the output projection: its input holds the heads' outputs side by side
    n_heads: int
    n_kv: int
    head_dim: int


def _layers(backend: Any) -> list[_Layer]:
    structure: Any = getattr(backend, "structure", None)
    parts = getattr(structure, "parts", None)
    if not parts:
        raise ParameterError(
            f"attention heads are read on the transformer backend (blocks with an attention "
            f"module); backend {getattr(backend, 'name', type(backend).__name__)!r} has none"
        )
    config = backend.model.config
    heads = int(getattr(config, "num_attention_heads", None) or structure.n_heads or 0)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    d = int(structure.d_model)
    head_dim = int(getattr(config, "head_dim", None) or (d // heads if heads else 0))
    out = []
    for i, part in enumerate(parts):
        attention = part.attention
        proj = next((getattr(attention, n) for n in _OUTPUT if hasattr(attention, n)), None)
        if proj is None or not heads:
            raise ParameterError(
                f"layer {i} ({type(attention).__name__}): no output projection "
                f"({', '.join(_OUTPUT)}) or no head count in the config; per-head reading "
                "needs both"
            )
        out.append(_Layer(i, part.block, attention, proj, heads, kv, head_dim))
    return out


def _check_head(layers: list[_Layer], layer: int, head: int) -> _Layer:
    if not 0 <= layer < len(layers):
        raise ParameterError(f"layer must be in [0, {len(layers)}), got {layer}")
    if not 0 <= head < layers[layer].n_heads:
        raise ParameterError(
            f"layer {layer} has {layers[layer].n_heads} heads (0..{layers[layer].n_heads - 1}), "
            f"got head {head}"
        )
    return layers[layer]


@contextlib.contextmanager
def _record_head_inputs(layers: list[_Layer], store: dict[int, torch.Tensor]) -> Iterator[None]:
    """While open, every run stores each layer's output-projection input in ``store``."""
    handles = []
    try:
        for layer in layers:

            def pre(module: Any, args: Any, index: int = layer.index) -> None:
                store[index] = args[0]

            handles.append(layer.output.register_forward_pre_hook(pre))
        yield
    finally:
        for handle in handles:
            handle.remove()


# -- per-head decomposition of an edge ---------------------------------------------------------
@dataclass
class EdgeHeads:
    """One edge of a graph split by the attention heads it passes through.

    ``edge``: the source's direct effect on the target in the frozen replacement model (the
    graph's ``adjacency[target, source]``); ``through[(layer, head)]``: the part of it that
    runs through that head's output (paths through several heads count in each);
    ``bypass[layer]``: the part that passes no head of that layer, so that for every layer
    ``sum(through[(layer, h)] for h) + bypass[layer] == edge``."""

    source: str
    target: str
    edge: float
    through: dict[tuple[int, int], float]
    bypass: dict[int, float]

    def top(self, n: int = 3) -> list[tuple[tuple[int, int], float]]:
        """The ``n`` heads carrying most of the edge (by size of their part, sign kept)."""
        return sorted(self.through.items(), key=lambda kv: -abs(kv[1]))[:n]

    def share(self, layer: int, head: int) -> float:
        """The head's part as a share of the edge."""
        return self.through[(layer, head)] / self.edge if self.edge else float("nan")


def edge_heads(
    backend: Any,
    prompt: Any,
    graph: AttributionGraph,
    target: int | str,
    source: int | str,
    *,
    transcoders: Sequence[Transcoder] | None = None,
    tokenizer: Any = None,
) -> EdgeHeads:
    """Split the edge ``source → target`` of ``graph`` (node indices or ids; the graph of
    ``prompt`` with ``transcoders``) by the attention heads it passes through (see
    `EdgeHeads`). ``target`` is a logit or feature node; ``source`` a feature, error or
    embedding node."""
    # the split is exact in the frozen model, whose edges a gradient graph does not hold
    require_frozen(graph.metadata.get("linearisation", "frozen"), "edge_heads")
    layers = _layers(backend)
    t_node, s_node = _node(graph, target), _node(graph, source)
    if t_node.kind not in ("logit", "feature"):
        raise ParameterError(
            f"the target of an edge is a logit or feature node; {t_node.id} is a {t_node.kind} node"
        )
    if t_node.kind == "feature":
        _transcoder_of(t_node, transcoders or ())  # a clear error before any run
    contrast = graph.metadata.get("contrast_token")
    with ReplacementModel.build(backend, prompt, transcoders, tokenizer) as rm:
        if rm.prompt[0].tolist() != list(graph.tokens):
            raise ParameterError(
                "edge_heads: the graph was computed on another prompt "
                f"({len(graph.tokens)} tokens) than the one given ({rm.prompt.shape[1]})"
            )
        removed = _without(rm, s_node)
        store: dict[int, torch.Tensor] = {}
        with _record_head_inputs(layers, store):
            with torch.no_grad():
                live = rm.run(1, removed)
                after = {i: z.detach().clone() for i, z in store.items()}
                value_after = float(_target_value(live, t_node, rm, contrast).detach())
            live = rm.run(1)
            before = dict(store)
            value = _target_value(live, t_node, rm, contrast)
        order = sorted(before)
        grads = torch.autograd.grad(value, [before[i] for i in order], allow_unused=True)
    edge = float(value.detach()) - value_after
    through: dict[tuple[int, int], float] = {}
    bypass: dict[int, float] = {}
    for i, g in zip(order, grads, strict=True):
        layer = layers[i]
        change = (before[i].detach() - after[i]).double()
        grad = torch.zeros_like(change) if g is None else g.double()
        per = (grad * change)[0].reshape(change.shape[1], layer.n_heads, -1).sum((0, 2))
        for h in range(layer.n_heads):
            through[(i, h)] = float(per[h])
        bypass[i] = edge - float(per.sum())
    return EdgeHeads(s_node.id, t_node.id, edge, through, bypass)


def _integer(value: Any, what: str) -> int:
    """``value`` as an int (Python, numpy or 0-d tensor integers), else a ParameterError."""
    try:
        if isinstance(value, bool):
            raise TypeError
        return operator.index(value)
    except TypeError:
        raise ParameterError(
            f"{what} must be an integer, got {value!r} ({type(value).__name__})"
        ) from None


def _node(graph: AttributionGraph, ref: int | str) -> Node:
    if isinstance(ref, str):
        for node in graph.nodes:
            if node.id == ref:
                return node
        raise ParameterError(f"the graph has no node {ref!r} (ids like {graph.nodes[0].id!r})")
    index = _integer(ref, "a node (its index in the graph, or its id)")
    if not 0 <= index < len(graph.nodes):
        raise ParameterError(f"node index {index} outside the graph's {len(graph.nodes)} nodes")
    return graph.nodes[index]


def _without(rm: ReplacementModel, node: Node) -> dict[str, torch.Tensor]:
    """The leaf values of ``rm`` with ``node``'s vector taken out of its site."""
    if node.kind == "error":
        site = node.site or ""
        value = rm.direct[site].clone()
        value[node.position] -= rm.errors[site][node.position]
        return {site: value}
    if node.kind not in ("feature", "embedding"):
        raise ParameterError(
            f"the source of an edge is a feature, error or embedding node; {node.id} is a "
            f"{node.kind} node"
        )
    out = {}
    leaves = {"embed": rm.embed, **rm.direct}
    for site, change in _node_changes(node, 0.0, rm.transcoders, rm.embed):
        value = leaves[site].clone()
        value[node.position] += change.to(value.dtype)
        out[site] = value
    return out


def _target_value(live: Any, node: Node, rm: ReplacementModel, contrast: int | None) -> Any:
    if node.kind == "logit":
        logits = live.logits[0, node.position]
        value = logits[node.index or 0]
        return value - logits[contrast] if contrast is not None else value
    t = _transcoder_of(node, rm.transcoders)
    return live.reads[t.read_site][0, node.position].float() @ t.encoder()[node.index or 0].float()


# -- QK attribution ----------------------------------------------------------------------------
@dataclass
class QKTerm:
    """One component of the residual stream at the query or key position and its part of the
    score. ``kind``: ``embedding``, ``head`` (an earlier head's output), ``attn_bias`` (an
    output projection's bias), ``mlp`` (an MLP's output), ``feature`` / ``transcoder_bias`` /
    ``error`` (the MLP output split by transcoders), ``other`` (what the named components
    leave of the stream: 0 on a plain sequential residual), ``bias`` (the norm's and the
    projection's biases, independent of the stream)."""

    name: str
    kind: str
    layer: int | None
    head: int | None
    position: int
    value: float
    index: int | None = None


@dataclass
class QKAttribution:
    """The attention score of head ``head`` of layer ``layer`` from ``query`` to ``key``,
    decomposed (see the module's docstring).

    ``score``: the scaled pre-softmax ``q·k``; ``row``: the head's scores from ``query`` to every
    key up to it (their softmax is the model's attention pattern, checked);
    ``query_terms`` / ``key_terms``: the components at each side with their parts (each list
    adds up to ``score``); ``pairs[i, j]``: query term i's query against key term j's key
    (adds up to ``score``; row sums are the query parts, column sums the key parts)."""

    layer: int
    head: int
    query: int
    key: int
    score: float
    row: torch.Tensor
    query_terms: list[QKTerm]
    key_terms: list[QKTerm]
    pairs: torch.Tensor
    metadata: dict[str, Any] = field(default_factory=dict)

    def top(self, side: str = "key", n: int = 5, *, by_abs: bool = False) -> list[QKTerm]:
        """The ``n`` terms of one side (``"key"`` or ``"query"``) with the largest parts: the
        ones raising the score most (signed), or with ``by_abs=True`` the largest by size
        either way (as `EdgeHeads.top` ranks heads)."""
        terms = self._side(side)
        return sorted(terms, key=lambda t: -abs(t.value) if by_abs else -t.value)[:n]

    def term(self, side: str, name: str) -> QKTerm:
        """The term called ``name`` (e.g. ``"L0H2"``) on one side (``"key"`` or ``"query"``)."""
        terms = self._side(side)
        for t in terms:
            if t.name == name:
                return t
        raise ParameterError(
            f"no {side} term {name!r}; terms: {', '.join(t.name for t in terms[:12])}..."
        )

    def _side(self, side: str) -> list[QKTerm]:
        if side not in ("key", "query"):
            raise ParameterError(f"side is 'key' or 'query', got {side!r}")
        return self.key_terms if side == "key" else self.query_terms


@dataclass
class _Capture:
    resid: torch.Tensor | None = None  # (seq, d) the block's input
    attn_in: torch.Tensor | None = None  # (seq, d) the attention's input (normed)
    position_embeddings: Any = None
    norm_io: list[tuple[Any, torch.Tensor, torch.Tensor]] = field(default_factory=list)


def qk_attribution(
    backend: Any,
    prompt: Any,
    layer: int,
    head: int,
    query: int,
    key: int,
    *,
    transcoders: Sequence[Transcoder] | None = None,
    tokenizer: Any = None,
) -> QKAttribution:
    """Decompose the attention score of head ``head`` of ``layer`` from position ``query`` to
    position ``key`` (``key <= query``; negative positions count from the end) on ``prompt``
    into the contributions of the components of the residual stream at both positions (see
    the module's docstring). ``transcoders`` split earlier MLP outputs into features,
    decoder bias and skip, and error."""
    layer, head = _integer(layer, "qk_attribution: layer"), _integer(head, "qk_attribution: head")
    query, key = _integer(query, "qk_attribution: query"), _integer(key, "qk_attribution: key")
    layers = _layers(backend)
    spec = _check_head(layers, layer, head)
    tokenizer = tokenizer if tokenizer is not None else getattr(backend, "tokenizer", None)
    ids = _prompt_ids(backend, prompt, tokenizer)
    seq = ids.shape[1]
    query = query + seq if query < 0 else query
    key = key + seq if key < 0 else key
    if not (0 <= key <= query < seq):
        raise ParameterError(
            f"qk_attribution: need 0 <= key <= query < {seq} (the prompt's length; causal "
            f"attention), got query {query}, key {key}"
        )
    tcs = list(transcoders or [])
    written = {
        s for t in tcs for s in t.write_sites if (Site.parse(s).layer or 0) < layer
    }  # MLP outputs before the layer that transcoders split
    reads = sorted({t.read_site for t in tcs if set(t.write_sites) & written})
    capture = ["embed", f"layer_{layer}.attn_pattern"]
    capture += [f"layer_{i}.mlp" for i in range(layer)] + reads
    heads_in: dict[int, torch.Tensor] = {}
    cap = _Capture()
    with _record_head_inputs(layers[:layer], heads_in), _capture_layer(spec, cap):
        with torch.no_grad():
            result = backend.run(ids, capture=list(dict.fromkeys(capture)))
    norm, attn_in = _pre_attention_norm(spec, cap)
    assert cap.resid is not None
    resid = cap.resid.float()
    acts = {k: v[0].detach().float().to(resid.device) for k, v in result.activations.items()}
    pattern = acts.pop(f"layer_{layer}.attn_pattern")
    project = _projector(spec, cap.position_embeddings)
    positions = (query, key)
    comps = {
        p: _components(p, layer, layers, heads_in, acts, tcs, written, resid) for p in (query, key)
    }
    vectors = {}
    for side, p in zip(("query", "key"), positions, strict=True):
        normed = _affine_norm(norm, resid[p], attn_in[p])
        stack = torch.stack([c[1] for c in comps[p]])  # the embedding at least, and "other"
        n_all = normed(torch.cat([stack, resid.new_zeros(1, resid.shape[1])]))
        q, k = project(n_all, p)  # (n, heads, hd), (n, kv, hd)
        vec = q[:, head] if side == "query" else k[:, head // (spec.n_heads // spec.n_kv)]
        bias = vec[-1:]
        vectors[side] = torch.cat([vec[:-1] - bias, bias]).double()
    scaling = _scaling(spec)
    pairs = scaling * vectors["query"] @ vectors["key"].T
    row = _row(spec, attn_in, project, head, query, scaling)
    dtype = result.activations[f"layer_{layer}.attn_pattern"].dtype
    _check_pattern(row, pattern[head, query, : query + 1], layer, head, dtype)
    terms = {}
    for side, p, sums in (("query", query, pairs.sum(1)), ("key", key, pairs.sum(0))):
        named = [
            QKTerm(name, kind, lay, h, p, float(v), idx)
            for (name, _, kind, lay, h, idx), v in zip(comps[p], sums[:-1].tolist(), strict=True)
        ]
        named.append(QKTerm("bias", "bias", None, None, p, float(sums[-1])))
        terms[side] = named
    return QKAttribution(
        layer,
        head,
        query,
        key,
        float(row[key]),
        row,
        terms["query"],
        terms["key"],
        pairs,
        metadata={"scaling": scaling, "tokens": ids[0].tolist()},
    )


@contextlib.contextmanager
def _capture_layer(spec: _Layer, cap: _Capture) -> Iterator[None]:
    """Record the block's input, the attention's input and its position embeddings, and
    every norm of the block (input and output), on the next run."""
    handles = []

    def block_pre(module: Any, args: Any, kwargs: Any) -> None:
        x = args[0] if args else kwargs.get("hidden_states")
        cap.resid = x[0].detach()

    def attn_pre(module: Any, args: Any, kwargs: Any) -> None:
        x = args[0] if args else kwargs.get("hidden_states")
        cap.attn_in = x[0].detach()
        cap.position_embeddings = kwargs.get("position_embeddings")

    try:
        handles.append(spec.block.register_forward_pre_hook(block_pre, with_kwargs=True))
        handles.append(spec.attention.register_forward_pre_hook(attn_pre, with_kwargs=True))
        for module in spec.block.children():
            if (
                "norm" in type(module).__name__.lower()
                and getattr(module, "weight", None) is not None
            ):

                def norm_hook(module: Any, args: Any, output: Any) -> None:
                    cap.norm_io.append((module, args[0][0].detach(), output[0].detach()))

                handles.append(module.register_forward_hook(norm_hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _pre_attention_norm(spec: _Layer, cap: _Capture) -> tuple[Any, torch.Tensor]:
    if cap.resid is None or cap.attn_in is None:
        raise ParameterError(f"layer {spec.index}: the run did not reach its attention")
    for module, x, out in cap.norm_io:
        if (
            out.shape == cap.attn_in.shape
            and x.shape == cap.resid.shape
            and torch.allclose(out, cap.attn_in)
            and torch.allclose(x, cap.resid)
        ):
            if module.weight.dtype == torch.float32:
                return module, cap.attn_in.float()
            # a half-precision model: the norm recomputed in float32 on the block's input, so
            # that the score and its terms come from the same float32 arithmetic (the model's
            # own pattern is checked within its dtype's precision)
            with torch.no_grad():
                return module, _in_float32(module)(cap.resid.float()).float()
    raise ParameterError(
        f"layer {spec.index} ({type(spec.block).__name__}): no norm of the block maps the "
        "block's input to the attention's input (a pre-norm block is needed for QK attribution)"
    )


def _in_float32(module: Any) -> Any:
    """``module`` if its parameters are float32, else a function running it with float32
    copies of its parameters and buffers (the module itself is left as it is)."""
    tensors = dict(module.named_parameters()) | dict(module.named_buffers())
    if all(not v.is_floating_point() or v.dtype == torch.float32 for v in tensors.values()):
        return module
    cast = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}

    def run(x: torch.Tensor) -> Any:
        return torch.func.functional_call(module, cast, (x.float(),))

    return run


def _affine_norm(module: Any, x: torch.Tensor, out: torch.Tensor) -> Any:
    """The norm at one position with its scale held: an affine map of rows (n, d)."""
    values = FrozenValues()
    frozen_norm(module, x[None], out[None], values, "norm")
    values.recording = False

    def apply(rows: torch.Tensor) -> torch.Tensor:
        values.start_run()
        return frozen_norm(module, rows, rows, values, "norm").float()

    return apply


def _projector(spec: _Layer, position_embeddings: Any) -> Any:
    """``(normed rows (n, d), position) → (queries (n, heads, hd), keys (n, kv, hd))`` as the
    attention computes them (rotary positions applied at ``position``)."""
    attention = spec.attention
    if any(hasattr(attention, n) for n in ("q_norm", "k_norm", "q_layernorm", "k_layernorm")):
        raise FreezeError(
            f"layer {spec.index} ({type(attention).__name__}) normalises its queries and keys "
            "per head; QK attribution does not decompose those scores"
        )
    hd, heads, kv = spec.head_dim, spec.n_heads, spec.n_kv
    separate = next(
        (
            (getattr(attention, q), getattr(attention, k))
            for q, k in _SEPARATE
            if getattr(attention, q, None) is not None and getattr(attention, k, None) is not None
        ),
        None,
    )
    fused = next(
        (getattr(attention, n) for n in _FUSED if getattr(attention, n, None) is not None), None
    )
    if separate is not None:
        separate = (_in_float32(separate[0]), _in_float32(separate[1]))
    if fused is not None:
        fused = _in_float32(fused)
    if separate is None and fused is None:
        raise FreezeError(
            f"layer {spec.index} ({type(attention).__name__}): no separate query/key "
            "projections and no fused [q|k|v] one; QK attribution cannot read its scores"
        )
    rotate = None
    if position_embeddings is not None:
        rotate = getattr(sys.modules.get(type(attention).__module__), "apply_rotary_pos_emb", None)
        if rotate is None:
            raise FreezeError(
                f"layer {spec.index} ({type(attention).__name__}) takes position embeddings but "
                "its module has no apply_rotary_pos_emb"
            )

    def project(rows: torch.Tensor, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            x = rows.float()
            if separate is not None:
                q, k = separate[0](x), separate[1](x)
            else:
                assert fused is not None
                qkv = fused(x)
                q, k = qkv[..., : heads * hd], qkv[..., heads * hd : (heads + kv) * hd]
            q = q.float().reshape(len(rows), heads, 1, hd)
            k = k.float().reshape(len(rows), kv, 1, hd)
            if rotate is not None:
                cos, sin = position_embeddings
                cos = cos[:, position : position + 1].float().expand(len(rows), 1, -1)
                sin = sin[:, position : position + 1].float().expand(len(rows), 1, -1)
                q, k = rotate(q, k, cos, sin)
            return q[:, :, 0], k[:, :, 0]

    return project


def _scaling(spec: _Layer) -> float:
    scaling = getattr(spec.attention, "scaling", None)
    return float(scaling) if scaling is not None else spec.head_dim**-0.5


def _row(
    spec: _Layer,
    attn_in: torch.Tensor,
    project: Any,
    head: int,
    query: int,
    scaling: float,
) -> torch.Tensor:
    """The head's scores from ``query`` to every key up to it, from the captured inputs."""
    q = project(attn_in[query : query + 1], query)[0][0, head].double()
    group = spec.n_heads // spec.n_kv
    keys = torch.stack(
        [project(attn_in[p : p + 1], p)[1][0, head // group] for p in range(query + 1)]
    ).double()
    scores: torch.Tensor = scaling * keys @ q
    return scores


def _check_pattern(
    row: torch.Tensor, pattern: torch.Tensor, layer: int, head: int, dtype: torch.dtype
) -> None:
    """The softmax of ``row`` is the model's ``pattern`` (computed in ``dtype``): within 1e-4,
    or a few units of rounding of a coarser dtype."""
    mine = torch.softmax(row, -1)
    gap = float((mine - pattern.to(mine.device).double()).abs().max())
    if gap > max(1e-4, _PATTERN_EPS * torch.finfo(dtype).eps):
        raise FreezeError(
            f"layer {layer} head {head}: the scores recomputed from the attention's inputs do "
            f"not give the model's attention pattern (largest difference {gap:.2e}); this "
            "attention's layout (masking, positions or scaling) is not one QK attribution knows"
        )


def _components(
    p: int,
    layer: int,
    layers: list[_Layer],
    heads_in: dict[int, torch.Tensor],
    acts: dict[str, torch.Tensor],
    tcs: list[Transcoder],
    written: set[str],
    resid: torch.Tensor,
) -> list[tuple[str, torch.Tensor, str, int | None, int | None, int | None]]:
    """What was written into the residual stream at position ``p`` before ``layer``: (name,
    vector, kind, layer, head, feature index); the last is what they leave ("other")."""
    out: list[tuple[str, torch.Tensor, str, int | None, int | None, int | None]] = [
        ("embed", acts["embed"][p], "embedding", None, None, None)
    ]
    for spec in layers[:layer]:
        z = heads_in[spec.index][0, p].detach()
        proj = _in_float32(spec.output)
        with torch.no_grad():
            zero = proj(z.new_zeros(1, z.shape[-1], dtype=torch.float32)).float()[0]
            masked = z.new_zeros(spec.n_heads, z.shape[-1], dtype=torch.float32)
            for h in range(spec.n_heads):
                sl = slice(h * spec.head_dim, (h + 1) * spec.head_dim)
                masked[h, sl] = z[sl].float()
            per_head = proj(masked).float() - zero
        for h in range(spec.n_heads):
            out.append((f"L{spec.index}H{h}", per_head[h], "head", spec.index, h, None))
        if bool(zero.abs().max() > 0):
            out.append((f"attn_bias_{spec.index}", zero, "attn_bias", spec.index, None, None))
        site = f"layer_{spec.index}.mlp"
        if site in written:
            out += _split_mlp(site, spec.index, p, acts, tcs)
        else:
            out.append((f"mlp_{spec.index}", acts[site][p], "mlp", spec.index, None, None))
    other = resid[p] - torch.stack([c[1] for c in out]).sum(0)
    out.append(("other", other, "other", None, None, None))
    return out


def _split_mlp(
    site: str, layer: int, p: int, acts: dict[str, torch.Tensor], tcs: list[Transcoder]
) -> list[tuple[str, torch.Tensor, str, int | None, int | None, int | None]]:
    out: list[tuple[str, torch.Tensor, str, int | None, int | None, int | None]] = []
    total = acts[site][p]
    rest = torch.zeros_like(total)
    recon = torch.zeros_like(total)
    for t in tcs:
        if site not in t.write_sites:
            continue
        x = acts[t.read_site][p]
        with torch.no_grad():
            a = t.encode(x[None])[0].float()
            dec = t.decoder(site).detach().float()
            read_layer = Site.parse(t.read_site).layer
            for f in (a > 0).nonzero().flatten().tolist():
                vec = a[f] * dec[f]
                recon = recon + vec
                out.append((f"{read_layer}_{f}", vec, "feature", read_layer, None, int(f)))
            rest = rest + t.decode(torch.zeros_like(a)[None], site)[0].float()
            skip = t.skip(x[None], site)
            if skip is not None:
                rest = rest + skip[0].float()
    out.append((f"tc_bias_{layer}", rest, "transcoder_bias", layer, None, None))
    out.append((f"err_{layer}", total - recon - rest, "error", layer, None, None))
    return out
