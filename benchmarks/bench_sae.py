"""SAE training throughput (tokens per second) of each archscope variant on cached activations,
next to a plain PyTorch TopK loop (dense encoder and decoder, autograd, no dead-feature loss)
timed in the same process.

    python benchmarks/bench_sae.py [--threads 2] [--steps 8] [--k 32] [--out results/sae.md]

Default size: d_in 256, 4096 features, batch 4096. SAELens itself is measured side by side,
in its own environment and at equal results, by `runner.py` (workload 7, `RESULTS.md`).
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--d-in", type=int, default=256)
    parser.add_argument("--features", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8, help="training steps per timed run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "sae.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
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
