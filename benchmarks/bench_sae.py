"""SAE training throughput (tokens per second) of each archscope variant on cached activations,
next to a plain PyTorch TopK loop (dense encoder and decoder, autograd, no dead-feature loss)
timed in the same process.

    python benchmarks/bench_sae.py [--threads 2] [--steps 8] [--k 32] [--out results/sae.md]

Default size: d_in 256, 4096 features, batch 4096. SAELens itself is measured side by side,
in its own environment and at equal results, by `runner.py` (workload 7, `RESULTS.md`).

    python benchmarks/bench_sae.py --many [--layers 12 --d-model 768 --texts 64 --seq 128]

Many dictionaries from one pass: TopK SAEs on six residual sites of a random-weight GPT-2,
trained together by one `train_saes` call (the model run once per batch of texts) against six
separate `train_saes` calls of one site each, timed interleaved in one process after checking
that both give bit-identical SAEs (`--out` default `results/sae-many.md`).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from machine import describe

from archscope.methods.sae import SAEConfig, build_sae, fit_sae


def plain_topk_loop(x: torch.Tensor, d_sae: int, k: int, batch: int, lr: float) -> None:
    """The straightforward loop: dense matmuls both ways, unit-norm decoder after each step."""
    d_in = x.shape[1]
    w_dec = torch.nn.Parameter(torch.randn(d_sae, d_in) / d_in**0.5)
    w_enc = torch.nn.Parameter(w_dec.detach().t().clone())
    b_enc = torch.nn.Parameter(torch.zeros(d_sae))
    b_dec = torch.nn.Parameter(torch.zeros(d_in))
    opt = torch.optim.Adam([w_enc, b_enc, w_dec, b_dec], lr=lr)
    for start in range(0, len(x), batch):
        xb = x[start : start + batch]
        pre = (xb - b_dec) @ w_enc + b_enc
        top = pre.topk(k, dim=-1)
        z = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
        loss = ((z @ w_dec + b_dec - xb) ** 2).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            w_dec /= w_dec.norm(dim=1, keepdim=True)


def interleaved_rates(
    cases: dict[str, object], n_tokens: int, repeats: int
) -> dict[str, tuple[float, float]]:
    """Median and best tokens/s of each case, timed in interleaved rounds after a warm-up, so
    load drift on a shared machine affects every case alike."""
    for fn in cases.values():
        fn()  # type: ignore[operator]
    rates: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()  # type: ignore[operator]
            rates[name].append(n_tokens / (time.perf_counter() - start))
    return {name: (statistics.median(r), max(r)) for name, r in rates.items()}


def many_sites(args: argparse.Namespace) -> None:
    """Six sites trained together against six separate runs: equality first, then time."""
    from transformers import GPT2Config, GPT2LMHeadModel

    import archscope
    from archscope.methods.sae import train_saes

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=args.vocab,
        n_embd=args.d_model,
        n_head=args.d_model // 64,
        n_layer=args.layers,
        n_positions=args.seq,
    )
    model = GPT2LMHeadModel(config).eval()
    backend = archscope.Backend.for_model(model)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.texts, args.seq), generator=gen).tolist()
    step = max(1, args.layers // 6) if args.sites == "spread" else 1
    sites = [f"layer_{i}.residual" for i in range(args.layers - 1, -1, -step)][:6][::-1]
    settings = dict(
        sae_type="topk",
        n_features=args.mult * args.d_model,
        k=args.k,
        batch_size=args.batch,
        learning_rate=1e-3,
        epochs=args.epochs,
        text_batch_size=16,
        progress=False,
    )

    def together() -> list:
        return train_saes(backend, ids, sites, **settings)  # type: ignore[arg-type]

    def separate() -> list:
        return [train_saes(backend, ids, [s], **settings)[0] for s in sites]  # type: ignore[arg-type]

    def collect_together() -> None:
        archscope.collect(backend, ids, sites, pool=None, batch_size=16, progress=False)

    def collect_separate() -> None:
        for s in sites:
            archscope.collect(backend, ids, [s], pool=None, batch_size=16, progress=False)

    # equality before any timing: every SAE trained together equals its separate twin
    joint, alone = together(), separate()
    for a, b in zip(joint, alone, strict=True):
        for name, t in a.state_tensors().items():
            assert torch.equal(t, b.state_tensors()[name]), (a.site, name)
    n_tok = args.texts * args.seq
    times: dict[str, list[float]] = {"separate": [], "together": [], "c_sep": [], "c_tog": []}
    cases = {
        "separate": separate,
        "together": together,
        "c_sep": collect_separate,
        "c_tog": collect_together,
    }
    for _ in range(args.repeats):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    paired = [s / t for s, t in zip(times["separate"], times["together"], strict=True)]
    paired_c = [s / t for s, t in zip(times["c_sep"], times["c_tog"], strict=True)]
    med = {k: statistics.median(v) for k, v in times.items()}
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    lines = [
        "# Six SAEs from one pass",
        "",
        f"Machine: {describe()}.",
        f"Random-weight GPT-2, {args.layers} layers, d_model {args.d_model}, vocabulary "
        f"{args.vocab}; {args.texts} texts x {args.seq} tokens ({n_tok:,} training tokens); "
        f"TopK SAEs ({args.mult * args.d_model} features, k {args.k}, batch {args.batch}, "
        f"{args.epochs} epoch(s)) on {', '.join(sites)}; {args.threads} torch thread(s); "
        f"{args.repeats} interleaved rounds. Equality checked first: every SAE trained "
        "together is bit-identical to the one trained alone.",
        "",
        "| what | six separate runs, s (median) | one run of six, s (median) | "
        "speed-up (median of paired ratios) | min–max paired |",
        "|---|---:|---:|---:|---:|",
        f"| train_saes (collect + train) | {med['separate']:.2f} | {med['together']:.2f} | "
        f"**{statistics.median(paired):.2f}×** | {min(paired):.2f}–{max(paired):.2f} |",
        f"| the collect alone | {med['c_sep']:.2f} | {med['c_tog']:.2f} | "
        f"{statistics.median(paired_c):.2f}× | {min(paired_c):.2f}–{max(paired_c):.2f} |",
        "",
        f"Training alone (total minus collect, medians): separate "
        f"{med['separate'] - med['c_sep']:.2f} s, together {med['together'] - med['c_tog']:.2f} s. "
        f"Load average when done: {load}.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    out = args.out if args.out_given else args.out.with_name("sae-many.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--many", action="store_true", help="six sites from one pass")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--texts", type=int, default=64)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--mult", type=int, default=4, help="SAE width / d_model (--many)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument(
        "--sites",
        choices=["spread", "last"],
        default="spread",
        help="six residual sites spread over the layers, or the last six layers (--many)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--d-in", type=int, default=256)
    parser.add_argument("--features", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8, help="training steps per timed run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "sae.md")
    args = parser.parse_args()
    args.out_given = "--out" in sys.argv
    torch.set_num_threads(args.threads)
    if args.many:
        if "--batch" not in sys.argv:
            args.batch = 1024
        if "--repeats" not in sys.argv:
            args.repeats = 2
        many_sites(args)
        return
    torch.manual_seed(0)
    n = args.batch * args.steps
    # heavy-tailed, anisotropic activations, roughly like a residual stream
    x = torch.randn(n, args.d_in) * torch.linspace(0.2, 3.0, args.d_in)
    x[:, :4] += 20.0

    cases: dict[str, object] = {}
    for sae_type in ("topk", "batchtopk", "dense", "rank1"):
        cfg = SAEConfig(
            input_dim=args.d_in,
            n_features=args.features,
            sae_type=sae_type,
            k=args.k,
            batch_size=args.batch,
            learning_rate=1e-4,
        )
        sae = build_sae(cfg)
        cases[f"archscope {sae_type}"] = lambda sae=sae, cfg=cfg: fit_sae(x, cfg, 1, sae=sae)
    cases["plain PyTorch TopK loop"] = lambda: plain_topk_loop(
        x, args.features, args.k, args.batch, 1e-4
    )
    rows = [
        (name, med, best) for name, (med, best) in interleaved_rates(cases, n, args.repeats).items()
    ]

    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    lines = [
        "# SAE training throughput",
        "",
        f"Machine: {describe()}.",
        f"d_in {args.d_in}, {args.features} features, batch {args.batch}, k {args.k}, "
        f"{args.threads} torch thread(s); {args.steps} steps per run, median and best of "
        f"{args.repeats} interleaved runs after a warm-up (`python benchmarks/bench_sae.py`).",
        "",
        "| trainer | tokens/s (median) | tokens/s (best) | vs the plain TopK loop (median) |",
        "|---|---|---|---|",
        *[f"| {name} | {m:,.0f} | {b:,.0f} | {m / rows[-1][1]:.2f}× |" for name, m, b in rows],
        "",
        f"Load average when done: {load}. SAELens is measured side by side with archscope "
        "by `runner.py` (workload 7 in `RESULTS.md`).",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
