"""Check archscope's circuit-tracer files with circuit-tracer itself, in its own environment.

    .venv/bin/python benchmarks/validate_graph_json.py [--venvs DIR] [--keep DIR]

1. Graph JSON: a hand-built attribution graph and, when ``archscope_graphs.attribution`` is
   present, a graph of the zoo transformer, are written with
   `archscope_graphs.export.write_graph_files`, then parsed by circuit-tracer's pydantic models
   (``circuit_tracer.frontend.graph_models.Model``): every node and link must survive the
   parse, every link's endpoints must be nodes, and the index ``graph-metadata.json`` must hold
   the graph's ``Metadata``.
2. Transcoder files: single-layer ReLU, JumpReLU and skip transcoders written with
   `export_circuit_tracer` are loaded with circuit-tracer's ``load_relu_transcoder`` and must
   encode and decode random inputs as archscope does (max abs difference printed, < 1e-5).

The environment (``benchmarks/.venvs/circuit-tracer`` by default) is created on first use:
``torch==2.13.0`` first (so pip never picks another build), then ``requirements/
circuit-tracer.txt``. Exit status 0 when everything validates.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
TORCH = "torch==2.13.0"
REQUIREMENTS = HERE / "requirements" / "circuit-tracer.txt"

CHECK = r"""
import json, sys
from pathlib import Path
import torch
from circuit_tracer.frontend.graph_models import Metadata, Model
from circuit_tracer.transcoder.single_layer_transcoder import load_relu_transcoder

work = Path(sys.argv[1])
report = {"graphs": {}, "transcoders": {}}
for path in sorted(work.glob("graphs/*.json")):
    if path.name == "graph-metadata.json":
        continue
    raw = json.loads(path.read_text())
    model = Model.model_validate(raw)
    ids = {n.node_id for n in model.nodes}
    assert len(ids) == len(model.nodes), "duplicate node ids"
    assert len(model.nodes) == len(raw["nodes"]) and len(model.links) == len(raw["links"])
    for link in model.links:
        assert link["source"] in ids and link["target"] in ids, link
        assert isinstance(link["weight"], float)
    kinds = sorted({n.feature_type for n in model.nodes})
    report["graphs"][path.name] = {"nodes": len(model.nodes), "links": len(model.links),
                                   "feature_types": kinds,
                                   "targets": sum(n.is_target_logit for n in model.nodes)}
index = json.loads((work / "graphs" / "graph-metadata.json").read_text())
for entry in index["graphs"]:
    Metadata.model_validate(entry)
ref = torch.load(work / "reference.pt", weights_only=True)
for name in ref["names"]:
    tc = load_relu_transcoder(str(work / "transcoders" / name / "layer_0.safetensors"), 0,
                              device=torch.device("cpu"), dtype=torch.float32,
                              lazy_encoder=False, lazy_decoder=False)
    x = ref["x"]
    acts = tc.encode(x)
    out = tc.decode(acts, x)
    report["transcoders"][name] = {
        "acts_max_abs_diff": float((acts - ref[name + ".acts"]).abs().max()),
        "out_max_abs_diff": float((out - ref[name + ".out"]).abs().max()),
        "active": int((acts != 0).sum()),
    }
print(json.dumps(report))
"""


def ensure_venv(root: Path) -> Path:
    python = root / "circuit-tracer" / "bin" / "python"
    probe = [str(python), "-c", "import circuit_tracer.frontend.graph_models"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    print(f"creating {root / 'circuit-tracer'} ({REQUIREMENTS.name})", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(root / "circuit-tracer")], check=True)
    pip = [str(python), "-m", "pip", "-q", "--disable-pip-version-check", "install"]
    subprocess.run([*pip, TORCH], check=True)
    subprocess.run([*pip, TORCH, "-r", str(REQUIREMENTS)], check=True)
    return python


def _hand_graph():  # type: ignore[no-untyped-def]
    import torch

    from archscope_graphs.types import AttributionGraph, Node

    nodes = [
        Node("e0", "embedding", -1, 0, 11, label="the"),
        Node("e1", "embedding", -1, 1, 42, label="cat"),
        Node("f0", "feature", 0, 1, 3, value=1.0),
        Node("f1", "feature", 1, 1, 7, value=0.5),
        Node("err", "error", 1, 1, None),
        Node("l0", "logit", 2, 1, 99, value=0.6, label=" sat"),
    ]
    adj = torch.zeros(6, 6)
    adj[2, 1], adj[3, 2], adj[3, 0], adj[4, 1], adj[5, 3], adj[5, 4] = 2, 1.5, -0.5, 0.2, 3, 0.4
    return AttributionGraph([11, 42], ["the", " cat"], nodes, adj, [5])


def _zoo_graph():  # type: ignore[no-untyped-def]
    try:
        from archscope_graphs.attribution import attribute  # type: ignore[attr-defined]
    except ImportError:
        return None
    import archscope

    _, _, backend = archscope.load_model("zoo:transformer")
    return attribute(backend, "the cat sat on the mat . the cat")


def write_inputs(work: Path) -> None:
    import torch

    from archscope_graphs.export import write_graph_files
    from archscope_graphs.transcoders import LayerTranscoder, export_circuit_tracer

    write_graph_files(_hand_graph(), work / "graphs", slug="hand-built")
    zoo = _zoo_graph()
    if zoo is not None:
        write_graph_files(zoo, work / "graphs", slug="zoo-transformer")
    else:
        print("archscope_graphs.attribution is absent: only the hand-built graph is checked")
    gen = torch.Generator().manual_seed(0)
    d, f = 16, 40
    x = torch.randn(64, d, generator=gen)
    ref: dict[str, object] = {"x": x, "names": []}
    for name, kw in {
        "relu": {},
        "jumprelu": {"threshold": torch.rand(f, generator=gen) * 0.5, "activation": "jumprelu"},
        "skip": {"W_skip": torch.randn(d, d, generator=gen) * 0.1},
    }.items():
        tc = LayerTranscoder(
            layer=0,
            W_enc=torch.randn(d, f, generator=gen) * 0.3,
            b_enc=torch.randn(f, generator=gen) * 0.1,
            W_dec={"layer_0.mlp": torch.randn(f, d, generator=gen)},
            b_dec=torch.randn(d, generator=gen),
            **kw,  # type: ignore[arg-type]
        )
        export_circuit_tracer([tc], work / "transcoders" / name)
        acts = tc.encode(x)
        out = tc.decode(acts, "layer_0.mlp")
        sk = tc.skip(x, "layer_0.mlp")
        ref[f"{name}.acts"] = acts
        ref[f"{name}.out"] = out if sk is None else out + sk
        ref["names"].append(name)  # type: ignore[attr-defined]
    torch.save(ref, work / "reference.pt")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--venvs", type=Path, default=HERE / ".venvs")
    parser.add_argument(
        "--keep", type=Path, default=None, help="write the files here and keep them"
    )
    args = parser.parse_args(argv)
    python = ensure_venv(args.venvs)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        write_inputs(work)
        done = subprocess.run(
            [str(python), "-c", CHECK, str(work)], capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            print(done.stdout, done.stderr[-4000:], sep="\n")
            print("FAILED: circuit-tracer refused archscope's files")
            return 1
        report = json.loads(done.stdout.strip().splitlines()[-1])
    version = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('circuit-tracer'))"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    print(f"circuit-tracer {version}")
    for name, row in report["graphs"].items():
        print(f"graph {name}: parsed by Model: {row}")
    worst = 0.0
    for name, row in report["transcoders"].items():
        print(f"transcoder {name}: loaded by load_relu_transcoder: {row}")
        worst = max(worst, row["acts_max_abs_diff"], row["out_max_abs_diff"])
    if worst > 1e-5:
        print(f"FAILED: circuit-tracer's transcoders differ from archscope's by {worst:.3g}")
        return 1
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
