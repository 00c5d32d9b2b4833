"""Export to circuit-tracer's graph JSON and the HTML viewer, on a graph built by hand.

The viewer is rendered in a real headless browser (Debian's chromium): the DOM after its script
ran must hold exactly the graph's nodes and edges, and a screenshot is kept (its path is
printed; set ARCHSCOPE_VIEWER_SCREENSHOT to copy it somewhere, e.g. docs/)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from archscope.errors import ParameterError

_spec = importlib.util.spec_from_file_location(
    "archscope_graphs_test_fixtures", Path(__file__).with_name("graph_fixtures.py")
)
assert _spec is not None and _spec.loader is not None
fixtures = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = fixtures
_spec.loader.exec_module(fixtures)

# circuit-tracer's ``frontend/graph_models.py`` (safety-research/circuit-tracer): required
# fields of each model, used as an independent check of the layout
CT_REQUIRED = {
    "metadata": {"slug", "scan", "transcoder_list", "prompt_tokens", "prompt"},
    "qParams": {"pinnedIds", "supernodes", "linkType", "clickedId", "sg_pos"},
    "node": {"node_id", "feature", "layer", "ctx_idx", "feature_type", "jsNodeId"},
    "link": {"source", "target", "weight"},
}


def test_export_matches_circuit_tracers_layout_and_the_graph(tmp_path: Path) -> None:
    from archscope_graphs.export import write_graph_files

    graph = fixtures.small_graph()
    path = write_graph_files(graph, tmp_path, slug="small")
    data = json.loads(path.read_text())
    assert set(data) == {"metadata", "qParams", "nodes", "links"}
    assert CT_REQUIRED["metadata"] <= set(data["metadata"])
    assert CT_REQUIRED["qParams"] <= set(data["qParams"])
    assert all(CT_REQUIRED["node"] <= set(n) for n in data["nodes"])
    assert all(set(e) == CT_REQUIRED["link"] for e in data["links"])
    ids = {n["node_id"]: n for n in data["nodes"]}
    # circuit-tracer's id scheme, written out here by hand
    expected = {
        "E_11_0": "embedding",
        "E_42_1": "embedding",
        "0_3_1": "cross layer transcoder",
        "1_7_1": "cross layer transcoder",
        "0_1_1": "mlp reconstruction error",
        "3_99_1": "logit",
        "3_98_1": "logit",
    }
    assert {k: v["feature_type"] for k, v in ids.items()} == expected
    assert ids["3_99_1"]["is_target_logit"] and not ids["3_98_1"]["is_target_logit"]
    assert ids["3_99_1"]["token_prob"] == pytest.approx(0.6)
    assert ids["0_1_1"]["feature"] == -1 and ids["E_42_1"]["layer"] == "E"
    assert ids["0_3_1"]["activation"] == pytest.approx(1.25)
    # feature numbers: Cantor pairing of (layer, index), by hand
    assert ids["0_3_1"]["feature"] == 9 and ids["1_7_1"]["feature"] == 43
    names = {"emb_0": "E_11_0", "emb_1": "E_42_1", "f0": "0_3_1", "f1": "1_7_1"}
    names |= {"err": "0_1_1", "logit_sat": "3_99_1", "logit_ran": "3_98_1"}
    want = {(names[s], names[t]): w for t, s, w in fixtures.EDGES}
    got = {(e["source"], e["target"]): e["weight"] for e in data["links"]}
    assert got == pytest.approx(want)
    assert data["metadata"]["prompt_tokens"] == ["the", " cat"]
    listing = json.loads((tmp_path / "graph-metadata.json").read_text())
    assert [g["slug"] for g in listing["graphs"]] == ["small"]
    write_graph_files(graph, tmp_path, slug="small")  # the same slug replaces its entry
    write_graph_files(graph, tmp_path, slug="other")
    listing = json.loads((tmp_path / "graph-metadata.json").read_text())
    assert sorted(g["slug"] for g in listing["graphs"]) == ["other", "small"]


def test_influence_follows_paths_to_the_targets() -> None:
    from archscope_graphs.export import node_influence

    graph = fixtures.small_graph()
    infl = node_influence(graph)
    ids = [n.id for n in graph.nodes]
    # by hand: row-normalised |A|; target weights 0.6/0.8 (sat), 0.2/0.8 (ran)
    w_sat, w_ran = 0.75, 0.25
    f1_direct = w_sat * 3.0 / 3.4 + w_ran * 1.0
    err_direct = w_sat * 0.4 / 3.4
    assert float(infl[ids.index("f1")]) == pytest.approx(f1_direct)
    assert float(infl[ids.index("err")]) == pytest.approx(err_direct)
    f0 = f1_direct * 1.5 / 2.0
    assert float(infl[ids.index("f0")]) == pytest.approx(f0)
    emb1 = f0 * 1.0 + err_direct * 1.0
    assert float(infl[ids.index("emb_1")]) == pytest.approx(emb1)


def test_export_refuses_bad_input(tmp_path: Path) -> None:
    from archscope_graphs.export import to_circuit_tracer

    graph = fixtures.small_graph()
    with pytest.raises(ParameterError, match="slug"):
        to_circuit_tracer(graph, slug="a/b")
    graph.adjacency = torch.zeros(3, 3)
    with pytest.raises(ParameterError, match="adjacency of shape"):
        to_circuit_tracer(graph)


def test_page_is_self_contained() -> None:
    from archscope_graphs.viewer import render_html

    graph = fixtures.small_graph()
    graph.nodes[2].label = "</script><b>x</b>"  # must not end the data element
    page = render_html(graph, title="t")
    assert "</script><b>" not in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "@import" not in page and "url(" not in page
    assert page.count("<script") == 2


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _browser(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    exe = _chromium()
    assert exe is not None
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    return subprocess.run(
        [exe, *flags, *args], capture_output=True, text=True, timeout=120, check=False
    )


@pytest.mark.skipif(
    _chromium() is None,
    reason="no chromium on this machine (apt-get install -y chromium; .ci/run installs it)",
)
def test_viewer_renders_the_nodes_and_edges_in_a_browser(tmp_path: Path) -> None:
    from archscope_graphs.viewer import write_html

    graph = fixtures.small_graph()
    page = write_html(graph, tmp_path / "graph.html", title="hand-built graph")
    done = _browser(tmp_path, "--virtual-time-budget=5000", "--dump-dom", page.as_uri())
    assert done.returncode == 0, done.stderr[-2000:]
    dom = done.stdout
    assert 'data-rendered="true"' in dom, "the page's script did not finish"
    node_ids = re.findall(r'<g class="node [^"]*" data-node-id="([^"]+)"', dom)
    assert sorted(node_ids) == sorted(n.id for n in graph.nodes)
    edges = re.findall(
        r'<path class="edge" data-source="([^"]+)" data-target="([^"]+)" data-weight="([^"]+)"',
        dom,
    )
    got = {(s, t): float(w) for s, t, w in edges}
    assert got == pytest.approx({(s, t): w for t, s, w in fixtures.EDGES})
    # colour by sign, width by size
    strokes = dict(
        re.findall(r'data-source="f1" data-target="(logit_\w+)"[^>]*stroke="(#[0-9a-f]+)"', dom)
    )
    assert strokes == {"logit_sat": "#1565c0", "logit_ran": "#c62828"}
    assert "cat-ness" in dom and "7 nodes, 7 edges" in dom
    shot = tmp_path / "viewer.png"
    done = _browser(
        tmp_path,
        "--virtual-time-budget=5000",
        "--hide-scrollbars",
        "--window-size=1000,560",
        f"--screenshot={shot}",
        page.as_uri(),
    )
    assert done.returncode == 0 and shot.is_file() and shot.stat().st_size > 1000
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    print(f"viewer screenshot: {shot}")
    keep = os.environ.get("ARCHSCOPE_VIEWER_SCREENSHOT")
    if keep:
        shutil.copyfile(shot, keep)
