"""A self-contained HTML page showing an attribution graph: one file, its script and style
inline, no network access (no CDN, no fonts, no images fetched).

Nodes sit on a grid of layer (rows: token embeddings at the bottom, logits at the top) by
token position (columns); edges are drawn with their weight's sign as colour (blue positive,
red negative) and its size as width and opacity. Hovering a node shows its details and
highlights its edges; clicking pins it in the side panel, which lists its strongest inputs
and outputs. Node labels are the top-activating tokens of each feature (`feature_labels`
computes them with `archscope.collect` on the zoo corpus or any dataset, with plain runs for
sites of several axes per token such as state writes; `label_graph` writes them into a
graph).
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from archscope.errors import ParameterError

from .types import AttributionGraph

_KIND_ORDER = {"embedding": 0, "feature": 1, "error": 2, "logit": 3}


def graph_payload(graph: AttributionGraph, *, min_weight: float = 0.0) -> dict[str, Any]:
    """What the page draws: nodes (id, kind, layer, position, index, value, label, site) and
    edges (source, target, weight) with ``|weight| > min_weight``, plus the prompt's tokens,
    the scores and the metadata's plain values."""
    n = len(graph.nodes)
    adj = graph.adjacency.detach().cpu().float()
    if tuple(adj.shape) != (n, n):
        raise ParameterError(
            f"the graph has {n} nodes but an adjacency of shape {tuple(adj.shape)}; it must "
            f"be ({n}, {n})"
        )
    nodes = [
        {
            "id": nd.id,
            "kind": nd.kind,
            "layer": int(nd.layer),
            "position": int(nd.position),
            "index": None if nd.index is None else int(nd.index),
            "value": float(nd.value),
            "label": nd.label,
            "site": nd.site,
            "target": i in graph.targets,
        }
        for i, nd in enumerate(graph.nodes)
    ]
    dst, src = (adj.abs() > min_weight).nonzero(as_tuple=True)
    edges = [
        {"source": graph.nodes[s].id, "target": graph.nodes[t].id, "weight": float(adj[t, s])}
        for t, s in zip(dst.tolist(), src.tolist(), strict=True)
    ]
    meta = {
        k: v
        for k, v in graph.metadata.items()
        if isinstance(v, (str, int, float, bool)) or v is None
    }
    return {
        "tokens": list(graph.token_strings),
        "nodes": nodes,
        "edges": edges,
        "scores": {k: float(v) for k, v in graph.scores.items()},
        "metadata": meta,
    }


def render_html(
    graph: AttributionGraph, *, title: str = "Attribution graph", min_weight: float = 0.0
) -> str:
    """The page as a string (see the module's doc)."""
    payload = json.dumps(graph_payload(graph, min_weight=min_weight), ensure_ascii=True)
    # inside <script>, "</" would end the element: JSON allows the escaped form
    payload = payload.replace("</", "<\\/")
    return _TEMPLATE.replace("__TITLE__", html.escape(title)).replace("__DATA__", payload)


def write_html(graph: AttributionGraph, path: str | Path, **kw: Any) -> Path:
    """Write `render_html` to ``path`` (UTF-8) and return it."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_html(graph, **kw), encoding="utf-8")
    return out


# -- labels --------------------------------------------------------------------------------------
@torch.no_grad()
def feature_labels(
    transcoders: Sequence[Any],
    backend: Any,
    data: Any,
    features: Sequence[tuple[int, int]],
    *,
    top: int = 5,
    tokenizer: Any = None,
    batch_size: int = 16,
) -> dict[tuple[int, int], list[tuple[str, float]]]:
    """The ``top`` highest activations of each feature ``(layer, index)`` over ``data`` (texts,
    token ids or a Dataset; the zoo corpus: ``archscope_zoo.datasets("heldout")``), as
    ``(token string, activation)`` pairs, strongest first; features that never fire get an
    empty list. Activations come from `archscope.iter_collect` at each transcoder's read
    site; the token strings from ``tokenizer`` (default: the backend's)."""
    from archscope import iter_collect

    if not isinstance(top, int) or top < 1:
        raise ParameterError(f"top must be an integer >= 1, got {top!r}")
    by_layer = {int(t.layer): t for t in transcoders}
    wanted: dict[int, list[int]] = {}
    for layer, index in features:
        if layer not in by_layer:
            raise ParameterError(
                f"feature ({layer}, {index}): no transcoder reads layer {layer}; the "
                f"transcoders read layers {sorted(by_layer)}"
            )
        if not 0 <= index < by_layer[layer].n_features:
            raise ParameterError(
                f"feature ({layer}, {index}): layer {layer}'s transcoder has "
                f"{by_layer[layer].n_features} features"
            )
        wanted.setdefault(layer, []).append(int(index))
    if not wanted:
        return {}
    sites = [by_layer[layer].read_site for layer in wanted]
    best_vals = {layer: torch.full((top, len(ix)), -float("inf")) for layer, ix in wanted.items()}
    best_tok = {
        layer: torch.zeros((top, len(ix)), dtype=torch.long) for layer, ix in wanted.items()
    }
    flat = all(len(backend.site_info(s).shape) == 3 for s in sites)
    parts = (
        (
            (part.activations, part.token_ids)
            for part in iter_collect(
                backend, data, sites, pool=None, batch_size=batch_size, tokenizer=tokenizer
            )
        )
        if flat
        else _token_rows(backend, data, sites, batch_size, tokenizer)
    )
    for values, token_ids in parts:
        assert token_ids is not None
        for layer, ix in wanted.items():
            tc = by_layer[layer]
            acts = tc.encode(values[tc.read_site].float())[:, ix]  # (tokens, wanted)
            vals = torch.cat([best_vals[layer], acts])
            toks = torch.cat([best_tok[layer], token_ids.view(-1, 1).expand_as(acts)])
            k = min(top, len(vals))
            order = vals.topk(k, dim=0).indices
            best_vals[layer] = vals.gather(0, order)
            best_tok[layer] = toks.gather(0, order)
    tok = tokenizer if tokenizer is not None else getattr(backend, "tokenizer", None)
    out: dict[tuple[int, int], list[tuple[str, float]]] = {}
    for layer, ix in wanted.items():
        for j, index in enumerate(ix):
            pairs = []
            for r in range(best_vals[layer].shape[0]):
                v = float(best_vals[layer][r, j])
                if v > 0:
                    t = int(best_tok[layer][r, j])
                    pairs.append((tok.decode([t]) if tok is not None else str(t), v))
            out[(layer, index)] = pairs
    return out


def _token_rows(backend: Any, data: Any, sites: list[str], batch_size: int, tokenizer: Any) -> Any:
    """``(site -> (tokens, *axes) values, token ids)`` per batch of ``data``, every real token:
    what `archscope.iter_collect` gives, for sites with several axes per token (a state
    write), which it does not read."""
    from archscope.data import as_dataset, padding_for

    dataset = as_dataset(data, tokenizer)
    for _, batch in dataset.batches(batch_size, padding_for(backend)):
        result = backend.run(batch, capture=list(sites))
        real = batch["attention_mask"].bool()
        values = {
            s: result.activations[s].detach()[real.to(result.activations[s].device)].cpu()
            for s in sites
        }
        yield values, batch["input_ids"][real]


def label_graph(
    graph: AttributionGraph, labels: dict[tuple[int, int], list[tuple[str, float]]], *, n: int = 3
) -> AttributionGraph:
    """Set each feature node's label to its ``n`` top-activating tokens (from
    `feature_labels`), e.g. ``"cat" "dog" "fox"``; other nodes keep theirs. In place; returns
    the graph."""
    for nd in graph.nodes:
        if nd.kind == "feature" and nd.index is not None:
            pairs = labels.get((int(nd.layer), int(nd.index)))
            if pairs:
                nd.label = " ".join(json.dumps(t, ensure_ascii=False) for t, _ in pairs[:n])
    return graph


_TEMPLATE = r"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:">
<title>__TITLE__</title>
<style>
  body { margin: 0; font: 13px/1.35 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d2330; background: #fafbfc; display: flex; height: 100vh; }
  #main { flex: 1; overflow: auto; position: relative; }
  #side { width: 320px; border-left: 1px solid #d9dde3; padding: 10px 12px; overflow: auto; background: #fff; }
  h1 { font-size: 15px; margin: 8px 12px; }
  #scores { margin: 0 12px 6px; color: #555; }
  svg text { font-size: 10px; fill: #333; pointer-events: none; }
  .edge { fill: none; }
  .edge.dim { opacity: 0.05 !important; }
  .edge.hot { opacity: 1 !important; }
  .node circle, .node rect { stroke: #222; stroke-width: 0.8; cursor: pointer; }
  .node.feature circle { fill: #f3c969; }
  .node.error rect { fill: #b9bec7; }
  .node.embedding rect { fill: #9fd3a8; }
  .node.logit rect { fill: #d7a3e0; }
  .node.target rect { stroke: #7b1fa2; stroke-width: 2.5; }
  .node.sel circle, .node.sel rect { stroke: #d32f2f; stroke-width: 2.5; }
  #tip { position: fixed; pointer-events: none; background: #fff; border: 1px solid #999; padding: 4px 6px; border-radius: 3px; display: none; max-width: 300px; box-shadow: 0 1px 4px rgba(0,0,0,.2); }
  table { border-collapse: collapse; width: 100%; }
  td { padding: 1px 4px; border-bottom: 1px solid #eee; vertical-align: top; }
  td.w { text-align: right; font-variant-numeric: tabular-nums; }
  .pos { color: #1565c0; } .neg { color: #c62828; }
  .legend span { display: inline-block; margin-right: 10px; }
</style>
</head>
<body>
<div id="main">
  <h1>__TITLE__</h1>
  <div id="scores"></div>
  <svg id="graph" xmlns="http://www.w3.org/2000/svg"></svg>
</div>
<div id="side">
  <div class="legend"><span class="pos">&#9632; positive</span><span class="neg">&#9632; negative</span></div>
  <p>Hover a node for details; click to pin it.</p>
  <div id="details"></div>
</div>
<div id="tip"></div>
<script id="graph-data" type="application/json">__DATA__</script>
<script>
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("graph-data").textContent);
  var NS = "http://www.w3.org/2000/svg";
  var svg = document.getElementById("graph");
  var nodes = data.nodes, edges = data.edges, tokens = data.tokens;
  var byId = {};
  nodes.forEach(function (n) { byId[n.id] = n; n.inE = []; n.outE = []; });
  edges.forEach(function (e) {
    if (byId[e.source]) byId[e.source].outE.push(e);
    if (byId[e.target]) byId[e.target].inE.push(e);
  });
  // rows: embeddings, one per layer (features and errors), logits
  var rowKey = function (n) {
    if (n.kind === "embedding") return -1;
    if (n.kind === "logit") return 1e9;
    return n.layer;
  };
  var rows = Array.from(new Set(nodes.map(rowKey))).sort(function (a, b) { return a - b; });
  var nPos = Math.max(tokens.length, 1 + Math.max.apply(null, nodes.map(function (n) { return n.position; }).concat([0])));
  var cell = {};
  nodes.forEach(function (n) {
    var key = rowKey(n) + ":" + n.position;
    (cell[key] = cell[key] || []).push(n);
  });
  var maxIn = 1;
  Object.keys(cell).forEach(function (k) { maxIn = Math.max(maxIn, cell[k].length); });
  var colW = Math.max(150, Math.min(320, 60 * maxIn)), rowH = 90, left = 110, top = 30;
  var width = left + colW * nPos + 20, height = top + rowH * rows.length + 40;
  svg.setAttribute("width", width); svg.setAttribute("height", height);
  var yOf = function (n) { return top + rowH * (rows.length - 1 - rows.indexOf(rowKey(n))) + rowH / 2; };
  Object.keys(cell).forEach(function (k) {
    var list = cell[k];
    list.sort(function (a, b) { return (a.kind > b.kind) - (a.kind < b.kind) || (a.index || 0) - (b.index || 0); });
    list.forEach(function (n, i) {
      n.x = left + colW * n.position + colW * (i + 1) / (list.length + 1);
      n.y = yOf(n);
      n.below = i % 2 === 1;  // neighbours' labels alternate above and below
    });
  });
  function el(tag, attrs, parent) {
    var e = document.createElementNS(NS, tag);
    for (var a in attrs) e.setAttribute(a, attrs[a]);
    (parent || svg).appendChild(e);
    return e;
  }
  // row labels and token columns
  rows.forEach(function (r, i) {
    var t = el("text", { x: 6, y: top + rowH * (rows.length - 1 - i) + rowH / 2 + 3 });
    t.textContent = r === -1 ? "embeddings" : r === 1e9 ? "logits" : "layer " + r;
  });
  tokens.forEach(function (tok, p) {
    var t = el("text", { x: left + colW * p + colW / 2, y: height - 12, "text-anchor": "middle", "class": "token" });
    t.textContent = tok;
  });
  var maxW = 1e-12;
  edges.forEach(function (e) { maxW = Math.max(maxW, Math.abs(e.weight)); });
  var gE = el("g", { id: "edges" }), gN = el("g", { id: "nodes" });
  edges.forEach(function (e) {
    var s = byId[e.source], t = byId[e.target];
    if (!s || !t) return;
    var r = Math.abs(e.weight) / maxW;
    var midY = (s.y + t.y) / 2;
    e.path = el("path", {
      "class": "edge", "data-source": e.source, "data-target": e.target, "data-weight": e.weight,
      d: "M" + s.x + "," + s.y + " C" + s.x + "," + midY + " " + t.x + "," + midY + " " + t.x + "," + t.y,
      stroke: e.weight >= 0 ? "#1565c0" : "#c62828",
      "stroke-width": (0.5 + 5 * r).toFixed(2),
      opacity: (0.15 + 0.75 * r).toFixed(2)
    }, gE);
  });
  var tip = document.getElementById("tip"), details = document.getElementById("details");
  var pinned = null;
  function describe(n) {
    var name = n.kind === "feature"
      ? (/\.state_write$/.test(n.site || "") ? "write feature " : "feature ") + n.index + " @ layer " + n.layer
      : n.kind === "error" ? "error @ layer " + n.layer
      : n.kind === "embedding" ? "token " + JSON.stringify(tokens[n.position] || "")
      : "logit " + JSON.stringify(n.label || String(n.index));
    return name + ", position " + n.position;
  }
  function text(s) { var d = document.createElement("div"); d.textContent = s; return d.innerHTML; }
  function table(list, key) {
    list = list.slice().sort(function (a, b) { return Math.abs(b.weight) - Math.abs(a.weight); }).slice(0, 12);
    if (!list.length) return "<p>none</p>";
    return "<table>" + list.map(function (e) {
      var o = byId[e[key]];
      return "<tr><td>" + text(o ? describe(o) + (o.label && o.kind !== "logit" ? " " + o.label : "") : e[key]) +
        "</td><td class='w " + (e.weight >= 0 ? "pos" : "neg") + "'>" + e.weight.toPrecision(3) + "</td></tr>";
    }).join("") + "</table>";
  }
  function show(n) {
    details.innerHTML = "<h3>" + text(describe(n)) + "</h3>" +
      (n.label ? "<p><b>label</b> " + text(n.label) + "</p>" : "") +
      "<p><b>value</b> " + n.value.toPrecision(4) + (n.site ? " &nbsp; <b>site</b> " + text(n.site) : "") + "</p>" +
      "<p><b>inputs</b></p>" + table(n.inE, "source") + "<p><b>outputs</b></p>" + table(n.outE, "target");
  }
  function highlight(n) {
    edges.forEach(function (e) {
      if (!e.path) return;
      var on = n && (e.source === n.id || e.target === n.id);
      e.path.classList.toggle("hot", !!on);
      e.path.classList.toggle("dim", !!n && !on);
    });
  }
  nodes.forEach(function (n) {
    var g = el("g", { "class": "node " + n.kind + (n.target ? " target" : ""), "data-node-id": n.id, transform: "translate(" + n.x + "," + n.y + ")" }, gN);
    if (n.kind === "feature") el("circle", { r: 7 }, g);
    else el("rect", { x: -7, y: -7, width: 14, height: 14, rx: 2 }, g);
    var lab = n.kind === "feature" ? (n.label || String(n.index)) : n.kind === "error" ? "err" : n.kind === "logit" ? (n.label || String(n.index)) : (tokens[n.position] || "");
    var t = el("text", { x: 0, y: n.below ? 19 : -10, "text-anchor": "middle" }, g);
    t.textContent = lab.length > 18 ? lab.slice(0, 17) + "\u2026" : lab;
    g.addEventListener("mouseenter", function (ev) {
      tip.style.display = "block";
      tip.textContent = describe(n) + (n.label ? " \u2014 " + n.label : "") + " (value " + n.value.toPrecision(3) + ")";
      highlight(n); if (!pinned) show(n);
    });
    g.addEventListener("mousemove", function (ev) { tip.style.left = (ev.clientX + 12) + "px"; tip.style.top = (ev.clientY + 12) + "px"; });
    g.addEventListener("mouseleave", function () { tip.style.display = "none"; highlight(pinned); if (pinned) show(pinned); });
    g.addEventListener("click", function () {
      var old = svg.querySelector(".node.sel"); if (old) old.classList.remove("sel");
      pinned = pinned === n ? null : n;
      if (pinned) { g.classList.add("sel"); show(n); }
      highlight(pinned);
    });
  });
  var sc = Object.keys(data.scores).map(function (k) { return k + " " + data.scores[k].toFixed(3); });
  document.getElementById("scores").textContent = nodes.length + " nodes, " + edges.length + " edges" + (data.metadata.linearisation ? " \u00b7 " + data.metadata.linearisation + " linearisation" : "") + (sc.length ? " \u00b7 " + sc.join(" \u00b7 ") : "");
  var first = nodes.filter(function (n) { return n.target; })[0];
  if (first) show(first);  // the panel starts on the (first) target logit
  document.body.setAttribute("data-rendered", "true");
})();
</script>
</body>
</html>
"""

__all__ = ["feature_labels", "graph_payload", "label_graph", "render_html", "write_html"]
