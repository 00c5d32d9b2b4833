"""Attribution graphs: archscope against circuit-tracer on the same model and transcoders.

    .venv/bin/python benchmarks/bench_graphs.py [--venvs DIR] [--lengths 8 16 32 64]
        [--repeats 3] [--threads 1] [--out benchmarks/results/graphs.md]
        [--memory-lengths 64 256 1024 2048 4096] [--memory-models lstm mamba]

1. Model: a seeded random-weight 2-layer Llama-style model (transformers ``LlamaForCausalLM``,
   d_model 64, 4 heads, 2 key/value heads, gated SiLU MLP of 256, RMSNorm, rotary positions,
   vocabulary 100), the same weights in TransformerLens (mapped here by hand, no folding or
   centring). Rotary positions mean the embedding node is the token embedding on both sides
   (GPT-2's learned positions would be part of archscope's ``embed`` site and a constant in
   circuit-tracer). Logits of both must agree to 1e-4 before anything else.
2. Transcoders: one ReLU transcoder per layer (MLP input → MLP output, 256 features), trained
   with `archscope_graphs.transcoders.train_transcoders` on random token sequences, written with
   `export_circuit_tracer` and loaded in circuit-tracer with ``load_relu_transcoder`` into a
   ``TranscoderSet`` reading ``mlp.hook_in`` (the MLP's input, after RMSNorm and its weight:
   archscope's ``layer_l.mlp_in``) and writing ``hook_mlp_out`` (archscope's ``layer_l.mlp``).
3. Equal graphs: for each prompt (BOS + random tokens), both compute the unpruned graph with
   the same logit targets (the top logits, at most 10, until 0.95 probability) and every edge
   that both define is compared (node ids mapped by (layer, position, feature) / (layer,
   position) / position / token). Conventions that differ, and how they are compared:
   - circuit-tracer zeroes the transcoder features and the error at position 0 (the BOS); the
     BOS position's MLP output becomes a constant there. archscope keeps them as nodes. The
     comparison drops archscope's position-0 feature and error nodes; every other edge must be
     equal, because the rest of the frozen model is the same linear map.
   - circuit-tracer's logit rows explain the logit minus the mean logit over the vocabulary
     (its "demeaned" unembedding columns); archscope's explain the logit itself. The effect on
     the mean logit is the same for every target, so the differences between two logit rows are
     compared (row_i − row_0 on both sides), and the rows themselves are reported.
   - both freeze attention patterns and the normalisation scales (RMSNorm's 1/rms), hold the
     errors constant and scale a feature's column by its activation; feature rows are effects on
     the feature's pre-activation (encoder row · MLP input) on both sides.
4. Timing (only after the graphs agree): ``attribute(..., prune=False)`` against
   circuit-tracer's ``attribute`` (TransformerLens backend), both in float32 on the same CPU,
   median of ``--repeats`` rounds; circuit-tracer runs in its own venv
   (``benchmarks/.venvs/circuit-tracer``, created on first use as in validate_graph_json.py)
   through a subprocess, timed inside that process after a warm-up run; both tools run with
   ``--threads`` torch threads (default 1: on a machine shared with other jobs, a thread
   more than the free cores makes every one of the many small operations wait for a
   descheduled thread, which the timing would then measure instead of the tools), and both
   report wall-clock and CPU seconds (``time.process_time`` of the timing process). The
   rounds alternate: each times every prompt once with circuit-tracer, then once with
   archscope, so that a machine whose load drifts weighs on both alike. Batch sizes: each tool's default
   (archscope 128 rows, circuit-tracer 512) and archscope at 512 too.
5. Memory on recurrent models (archscope only): the zoo LSTM's and Mamba's pruned graphs at
   growing prompt lengths, each in a fresh subprocess; the growth of the peak resident memory
   (VmHWM, reset just before the graph) against the graph's node count, the pruned graph's
   size and what a dense (n, n) adjacency would take. The default lengths run long: 4,096
   LSTM tokens took 678 s, 1,024 Mamba tokens 328 s (``benchmarks/results/graphs.md``); pass
   shorter ``--memory-lengths`` (or none, to skip the memory runs) for a quick check.

The tables go to ``--out`` (Markdown).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from validate_graph_json import ensure_venv  # noqa: E402

N_LAYERS = 2
D_MODEL = 64
D_MLP = 256
HEADS = 4
KV_HEADS = 2
N_FEATURES = 256
SEED = 0

CT_SIDE = r"""
import json, statistics, sys, time
from pathlib import Path
import torch
from safetensors.torch import load_file, save_file
from transformer_lens import HookedTransformerConfig
from transformers import PreTrainedTokenizerFast
from circuit_tracer import attribute
from circuit_tracer.replacement_model.replacement_model_transformerlens import (
    TransformerLensReplacementModel,
)
from circuit_tracer.transcoder.single_layer_transcoder import TranscoderSet, load_relu_transcoder

work = Path(sys.argv[1])
spec = json.loads((work / "spec.json").read_text())
torch.set_num_threads(spec["threads"])
L, d, H, KV, dh = spec["n_layers"], spec["d_model"], spec["heads"], spec["kv_heads"], spec["d_head"]
cfg = HookedTransformerConfig(
    n_layers=L, d_model=d, n_heads=H, n_key_value_heads=KV, d_head=dh, d_mlp=spec["d_mlp"],
    d_vocab=spec["vocab"], n_ctx=spec["n_ctx"], act_fn="silu", normalization_type="RMS",
    positional_embedding_type="rotary", rotary_dim=dh, rotary_base=spec["rope_theta"],
    gated_mlp=True, final_rms=True, eps=spec["eps"], original_architecture="LlamaForCausalLM",
    default_prepend_bos=False, dtype=torch.float32, device="cpu", tokenizer_prepends_bos=True,
)
hf = load_file(str(work / "model.safetensors"))
sd = {"embed.W_E": hf["model.embed_tokens.weight"], "ln_final.w": hf["model.norm.weight"],
      "unembed.W_U": hf["lm_head.weight"].T.contiguous(), "unembed.b_U": torch.zeros(spec["vocab"])}
for l in range(L):
    p = f"model.layers.{l}."
    q = hf[p + "self_attn.q_proj.weight"].view(H, dh, d).transpose(1, 2)
    k = hf[p + "self_attn.k_proj.weight"].view(KV, dh, d).transpose(1, 2)
    v = hf[p + "self_attn.v_proj.weight"].view(KV, dh, d).transpose(1, 2)
    o = hf[p + "self_attn.o_proj.weight"].view(d, H, dh).permute(1, 2, 0)
    b = f"blocks.{l}."
    sd.update({
        b + "ln1.w": hf[p + "input_layernorm.weight"],
        b + "ln2.w": hf[p + "post_attention_layernorm.weight"],
        b + "attn.W_Q": q, b + "attn._W_K": k, b + "attn._W_V": v, b + "attn.W_O": o,
        b + "attn.b_Q": torch.zeros(H, dh), b + "attn._b_K": torch.zeros(KV, dh),
        b + "attn._b_V": torch.zeros(KV, dh), b + "attn.b_O": torch.zeros(d),
        b + "mlp.W_in": hf[p + "mlp.up_proj.weight"].T, b + "mlp.W_gate": hf[p + "mlp.gate_proj.weight"].T,
        b + "mlp.W_out": hf[p + "mlp.down_proj.weight"].T,
        b + "mlp.b_in": torch.zeros(spec["d_mlp"]), b + "mlp.b_out": torch.zeros(d),
    })
tcs = {l: load_relu_transcoder(str(work / "transcoders" / f"layer_{l}.safetensors"), l,
                               device=torch.device("cpu"), dtype=torch.float32,
                               lazy_encoder=False, lazy_decoder=False) for l in range(L)}
tset = TranscoderSet(tcs, feature_input_hook="mlp.hook_in", feature_output_hook="hook_mlp_out")
tok = PreTrainedTokenizerFast(tokenizer_file=str(work / "tokenizer.json"), bos_token="<s>",
                              eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
model = TransformerLensReplacementModel(cfg)
model.tokenizer = tok  # set_tokenizer would reload it by name: it is a local file here
mine = {k: v for k, v in model.state_dict().items()}
missing = [k for k in mine if k not in sd and not k.endswith(("IGNORE", "mask", "rotary_sin", "rotary_cos"))]
assert not missing, missing
model.load_state_dict({**mine, **sd})
model._configure_replacement_model(tset)
model.eval()
report = {"logits": {}, "graphs": {}, "times": {}, "cpu": {}}
prompts = torch.load(work / "prompts.pt", weights_only=True)
for name, ids in prompts.items():
    with torch.no_grad():
        logits = model(ids[None])[0]
    ref = torch.load(work / f"logits_{name}.pt", weights_only=True)
    report["logits"][name] = float((logits - ref).abs().max())
def run(ids, batch_size):
    return attribute(ids, model, max_n_logits=spec["max_logits"],
                     desired_logit_prob=spec["desired_prob"], batch_size=batch_size)
for name, ids in prompts.items() if not spec["time"] else ():
    g = run(ids, 512)
    save_file({"adjacency": g.adjacency_matrix.float().contiguous(),
               "active": g.active_features.long().contiguous(),
               "selected": g.selected_features.long().contiguous(),
               "values": g.activation_values.float().contiguous()}, str(work / f"ct_{name}.safetensors"))
    report["graphs"][name] = {"logit_tokens": [int(t.vocab_idx) for t in g.logit_targets],
                              "nodes": int(g.adjacency_matrix.shape[0])}
if spec["time"]:
    for name, ids in prompts.items():
        run(ids, 512)
        times, cpu = [], []
        for _ in range(spec["repeats"]):
            t0, c0 = time.perf_counter(), time.process_time(); run(ids, 512)
            times.append(time.perf_counter() - t0); cpu.append(time.process_time() - c0)
        report["times"][name] = times
        report["cpu"][name] = cpu
print(json.dumps(report))
"""


def build(work: Path, lengths: list[int]) -> dict[str, Any]:
    """The model, tokenizer, transcoders and prompts, written to ``work`` for circuit-tracer;
    returns the archscope side."""
    import torch
    from safetensors.torch import save_file

    import archscope
    from archscope_graphs.transcoders import export_circuit_tracer, train_transcoders
    from archscope_transformer.testing import VOCAB, tiny_model, tiny_tokenizer

    model = tiny_model(
        "llama",
        n_layers=N_LAYERS,
        seed=SEED,
        hidden_size=D_MODEL,
        intermediate_size=D_MLP,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
    )
    tokenizer = tiny_tokenizer()
    backend = archscope.Backend.for_model(model)
    gen = torch.Generator().manual_seed(SEED)
    data = torch.randint(4, VOCAB, (256, 32), generator=gen)
    data[:, 0] = tokenizer.bos_token_id
    transcoders = train_transcoders(
        backend, data, n_features=N_FEATURES, epochs=4, sparsity=0.3, progress=False
    )
    export_circuit_tracer(transcoders, work / "transcoders")
    save_file(
        {k: v.detach().contiguous() for k, v in model.state_dict().items()},
        str(work / "model.safetensors"),
    )
    tokenizer.backend_tokenizer.save(str(work / "tokenizer.json"))
    prompts = {}
    for n in lengths:
        ids = torch.randint(4, VOCAB, (n,), generator=gen)
        ids[0] = tokenizer.bos_token_id
        prompts[f"T{n}"] = ids
        with torch.no_grad():
            logits = model(ids[None]).logits[0]
        torch.save(logits, work / f"logits_T{n}.pt")
    torch.save(prompts, work / "prompts.pt")
    cfg = model.config
    spec = {
        "n_layers": N_LAYERS,
        "d_model": D_MODEL,
        "heads": HEADS,
        "kv_heads": KV_HEADS,
        "d_head": D_MODEL // HEADS,
        "d_mlp": D_MLP,
        "vocab": VOCAB,
        "n_ctx": max(lengths),
        "rope_theta": float(_rope_theta(cfg)),
        "eps": float(cfg.rms_norm_eps),
        "max_logits": 10,
        "desired_prob": 0.95,
        "threads": torch.get_num_threads(),
    }
    return {"backend": backend, "transcoders": transcoders, "prompts": prompts, "spec": spec}


def _rope_theta(cfg: Any) -> float:
    params = getattr(cfg, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))


def run_ct(python: Path, work: Path, spec: dict[str, Any], timing: bool, repeats: int) -> Any:
    (work / "spec.json").write_text(json.dumps({**spec, "time": timing, "repeats": repeats}))
    done = subprocess.run(
        [str(python), "-c", CT_SIDE, str(work)], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        print(done.stdout[-2000:], done.stderr[-6000:], sep="\n")
        raise SystemExit("circuit-tracer's side failed")
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(ours: Any, work: Path, name: str, ct_tokens: list[int]) -> dict[str, Any]:
    """Map circuit-tracer's nodes onto archscope's and compare every edge both define."""
    from safetensors.torch import load_file

    ct = load_file(str(work / f"ct_{name}.safetensors"))
    adj_ct = ct["adjacency"].double()
    active = ct["active"][ct["selected"]]  # (n, 3) layer, pos, feature
    seq = len(ours.tokens)
    n_ct_feat = len(active)
    ct_index: dict[tuple[Any, ...], int] = {}
    for i, (layer, pos, feat) in enumerate(active.tolist()):
        ct_index[("feature", layer, pos, feat)] = i
    for layer in range(N_LAYERS):
        for pos in range(seq):
            ct_index[("error", layer, pos)] = n_ct_feat + layer * seq + pos
    for pos in range(seq):
        ct_index[("embedding", pos)] = n_ct_feat + N_LAYERS * seq + pos
    for k, tok in enumerate(ct_tokens):
        ct_index[("logit", tok)] = n_ct_feat + (N_LAYERS + 1) * seq + k
    assert len(ct_index) == adj_ct.shape[0], (len(ct_index), adj_ct.shape)

    def key(node: Any) -> tuple[Any, ...]:
        if node.kind == "feature":
            return ("feature", node.layer, node.position, node.index)
        if node.kind == "error":
            return ("error", node.layer, node.position)
        if node.kind == "embedding":
            return ("embedding", node.position)
        return ("logit", node.index)

    ours_keys = [key(n) for n in ours.nodes]
    # archscope's BOS features and errors have no counterpart (circuit-tracer zeroes them)
    bos_only = [
        k
        for k, n in zip(ours_keys, ours.nodes, strict=True)
        if n.kind in ("feature", "error") and n.position == 0
    ]
    missing_ct = [k for k in ct_index if k not in set(ours_keys)]
    extra = [k for k in ours_keys if k not in ct_index]
    assert all(k[0] == "feature" and k[2] == 0 for k in extra), (
        f"archscope-only nodes beyond the BOS features: {extra[:5]}"
    )
    # circuit-tracer keeps BOS error nodes with a zeroed error: left out of the comparison
    shared = [i for i, k in enumerate(ours_keys) if k in ct_index and k not in set(bos_only)]
    assert not missing_ct, f"circuit-tracer nodes archscope lacks: {missing_ct[:5]}"
    a = ours.adjacency.double()[shared][:, shared]
    order = [ct_index[ours_keys[i]] for i in shared]
    b = adj_ct[order][:, order]
    logit_rows = [j for j, i in enumerate(shared) if ours.nodes[i].kind == "logit"]
    other = [j for j in range(len(shared)) if j not in set(logit_rows)]
    diff_other = float((a[other] - b[other]).abs().max()) if other else 0.0
    da = a[logit_rows] - a[logit_rows[0]]
    db = b[logit_rows] - b[logit_rows[0]]
    diff_logit_pairs = float((da - db).abs().max())
    diff_logit_raw = float((a[logit_rows] - b[logit_rows]).abs().max())
    return {
        "nodes_ours": len(ours.nodes),
        "nodes_ct": int(adj_ct.shape[0]),
        "features_ct": n_ct_feat,
        "bos_nodes_dropped": len(bos_only),
        "edges_compared": int((a != 0).sum() + (b != 0).sum()) // 2,
        "max_abs_edge": float(b.abs().max()),
        "max_diff_feature_error_rows": diff_other,
        "max_diff_logit_row_differences": diff_logit_pairs,
        "max_diff_logit_rows_raw": diff_logit_raw,
    }


def time_ours(
    side: dict[str, Any], name: str, repeats: int, batch_size: int, warm_up: bool = True
) -> tuple[list[float], list[float]]:
    """Wall-clock and CPU (this process's) seconds of ``repeats`` graphs."""
    from archscope_graphs.attribution import attribute

    ids = side["prompts"][name]
    kw = {"transcoders": side["transcoders"], "prune": False, "batch_size": batch_size}
    if warm_up:
        attribute(side["backend"], ids, **kw)
    times, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        attribute(side["backend"], ids, **kw)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return times, cpu


MEMORY_SIDE = r"""
import json, sys
import torch
import archscope
from archscope_graphs.attribution import attribute

def hwm_kb():  # this process's peak resident memory (VmHWM starts afresh at exec)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

def reset_hwm():  # Linux: writing 5 to clear_refs resets VmHWM to the current RSS
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

import time
model, n = sys.argv[1], int(sys.argv[2])
_, tok, backend = archscope.load_model(f"zoo:{model}")
gen = torch.Generator().manual_seed(0)
ids = torch.randint(4, 200, (n,), generator=gen)
reset_hwm()
before = hwm_kb()
t0 = time.perf_counter()
g = attribute(backend, ids, max_logits=1, batch_size=32)
seconds = time.perf_counter() - t0
after = hwm_kb()
print(json.dumps({"model": model, "n": n, "before_kb": before, "after_kb": after,
                  "seconds": seconds, "nodes_full": g.metadata["pruned_from"],
                  "nodes_pruned": len(g.nodes), "edges_pruned": int((g.adjacency != 0).sum()),
                  "d": int(backend.site_info("embed").dim)}))
"""


def memory(lengths: list[int], models: list[str]) -> list[dict[str, Any]]:
    rows = []
    for model in models:
        for n in lengths:
            done = subprocess.run(
                [sys.executable, "-c", MEMORY_SIDE, model, str(n)], capture_output=True, text=True
            )
            if done.returncode != 0:
                print(done.stderr[-3000:])
                raise SystemExit(f"the memory run of zoo:{model} at {n} tokens failed")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print("memory", rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--venvs", type=Path, default=HERE / ".venvs")
    parser.add_argument("--lengths", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of both tools (on a machine shared with other jobs, more threads "
        "than free cores make every operation wait for a descheduled thread)",
    )
    parser.add_argument(
        "--memory-lengths", type=int, nargs="*", default=[64, 256, 1024, 2048, 4096]
    )
    parser.add_argument("--memory-models", nargs="*", default=["lstm", "mamba"])
    parser.add_argument("--no-timing", action="store_true", help="the equality table only")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "graphs.md")
    parser.add_argument("--keep", type=Path, default=None, help="keep the exchanged files here")
    args = parser.parse_args(argv)
    python = ensure_venv(args.venvs)
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        side = build(work, args.lengths)
        first = run_ct(python, work, side["spec"], timing=False, repeats=0)
        print("logits, archscope's model vs TransformerLens:", first["logits"])
        worst_logit = max(first["logits"].values())
        if worst_logit > 1e-4:
            raise SystemExit(f"the two models differ (logits to {worst_logit:.3g})")
        from archscope_graphs.attribution import attribute

        checks = {}
        for name, ids in side["prompts"].items():
            ours = attribute(side["backend"], ids, transcoders=side["transcoders"], prune=False)
            ct_tokens = first["graphs"][name]["logit_tokens"]
            ours_tokens = [ours.nodes[i].index for i in ours.targets]
            assert ours_tokens == ct_tokens, (ours_tokens, ct_tokens)
            checks[name] = compare(ours, work, name, ct_tokens)
            print(name, checks[name], flush=True)
        worst = max(
            max(c["max_diff_feature_error_rows"], c["max_diff_logit_row_differences"])
            for c in checks.values()
        )
        if worst > 1e-4:
            raise SystemExit(f"the graphs differ by {worst:.3g} > 1e-4: no timing")
        times: dict[str, dict[str, list[float]]] = {name: {} for name in side["prompts"]}
        # rounds alternate between the two tools (a loaded machine drifts): each round times
        # every prompt once on each side, after one warm-up run in that round's process
        for r in range(0 if args.no_timing else args.repeats):
            timed = run_ct(python, work, side["spec"], timing=True, repeats=1)
            for name in side["prompts"]:
                t = times[name]
                t.setdefault("circuit_tracer_512", []).extend(timed["times"][name])
                t.setdefault("cpu_circuit_tracer_512", []).extend(timed["cpu"][name])
                for batch in (128, 512):
                    wall, cpu = time_ours(side, name, 1, batch, warm_up=r == 0)
                    t.setdefault(f"archscope_{batch}", []).extend(wall)
                    t.setdefault(f"cpu_archscope_{batch}", []).extend(cpu)
                print(name, {k: [round(x, 3) for x in v] for k, v in t.items()}, flush=True)
        if args.no_timing:
            times = {}
    mem = memory(args.memory_lengths, args.memory_models) if args.memory_lengths else []
    write_report(args.out, python, side["spec"], first["logits"], checks, times, mem)
    return 0


def write_report(
    out: Path,
    python: Path,
    spec: dict[str, Any],
    logits: dict[str, float],
    checks: dict[str, Any],
    times: dict[str, Any],
    mem: list[dict[str, Any]],
) -> None:
    import platform

    import torch

    version = subprocess.run(
        [
            str(python),
            "-c",
            "import importlib.metadata as m; print(m.version('circuit-tracer'), "
            "m.version('transformer-lens'))",
        ],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    lines = [
        "# Attribution graphs: archscope against circuit-tracer",
        "",
        "`.venv/bin/python benchmarks/bench_graphs.py` (see its docstring for the setup).",
        f"Machine: {platform.machine()}, torch {torch.__version__}, {spec['threads']} torch "
        f"thread{'s' if spec['threads'] > 1 else ''} per tool; "
        f"circuit-tracer / transformer-lens {version} (TransformerLens backend).",
        f"Model: Llama-style, {spec['n_layers']} layers, d_model {spec['d_model']}, MLP "
        f"{spec['d_mlp']}, vocabulary {spec['vocab']}; ReLU transcoders of {N_FEATURES} features "
        "per layer trained by archscope; graphs unpruned, top logits (≤ 10, 0.95).",
        "",
        "## Equal graphs (before timing)",
        "",
        "| prompt | logits max diff | nodes archscope / circuit-tracer | BOS nodes dropped | "
        "max abs edge | max diff, feature rows | max diff, logit row differences | "
        "logit rows raw (mean-logit convention) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, c in checks.items():
        lines.append(
            f"| {name} | {logits[name]:.1e} | {c['nodes_ours']} / {c['nodes_ct']} | "
            f"{c['bos_nodes_dropped']} | {c['max_abs_edge']:.3g} | "
            f"{c['max_diff_feature_error_rows']:.1e} | "
            f"{c['max_diff_logit_row_differences']:.1e} | {c['max_diff_logit_rows_raw']:.3g} |"
        )
    lines += [
        "",
        "## Time per graph (median, seconds: wall clock / CPU of the timing process)",
        "",
        "| prompt | archscope (batch 128) | archscope (batch 512) | circuit-tracer (batch 512) |"
        " circuit-tracer / archscope best, wall | CPU |",
        "|---|---|---|---|---|---|",
    ]
    for name, t in times.items():
        m = {k: statistics.median(v) for k, v in t.items()}
        best = min(m["archscope_128"], m["archscope_512"])
        best_cpu = min(m["cpu_archscope_128"], m["cpu_archscope_512"])
        cells = [
            f"{m[k]:.3f} / {m['cpu_' + k]:.3f}"
            for k in ("archscope_128", "archscope_512", "circuit_tracer_512")
        ]
        lines.append(
            f"| {name} | {' | '.join(cells)} | {m['circuit_tracer_512'] / best:.2f}× | "
            f"{m['cpu_circuit_tracer_512'] / best_cpu:.2f}× |"
        )
    if mem:
        lines += [
            "",
            "## Memory on recurrent zoo models (archscope only, pruned graphs)",
            "",
            "| model | tokens | nodes (full graph) | nodes / edges (pruned) | "
            "peak RSS growth (MiB) | a dense adjacency would be (MiB) | seconds |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in mem:
            growth = (r["after_kb"] - r["before_kb"]) / 1024
            dense = r["nodes_full"] ** 2 * 4 / 2**20
            lines.append(
                f"| {r['model']} | {r['n']} | {r['nodes_full']} | {r['nodes_pruned']} / "
                f"{r['edges_pruned']} | {growth:.1f} | {dense:.1f} | {r['seconds']:.1f} |"
            )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
