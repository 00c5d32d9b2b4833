"""Write SAEs on zoo:mamba (4-layer Mamba, d_inner 128, d_state 16: one write is a 128 × 16
matrix): training throughput (writes/s) of the write SAE against the residual TopK SAE at the
same dictionary size and k, on the same tokens, the two fits interleaved in one process; then
the substitution test's cost per firing, against a plain forward of the same text. CPU, one
torch thread.

    .venv/bin/python benchmarks/bench_write_sae.py [--texts 48] [--repeats 3] [--features 256]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

import archscope
import archscope_zoo
from archscope.collect import collect
from archscope.methods.sae import SAEConfig, fit_sae
from archscope.methods.write_sae import (
    collect_writes,
    fit_write_sae,
    substitution_test,
    write_layout,
    write_site,
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--texts", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--features", type=int, default=256)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--layer", type=int, default=1)
    parser.add_argument("--firings", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    _, tokenizer, backend = archscope.load_model("zoo:mamba")
    rows = [tokenizer.encode(t)[:48] for t in archscope_zoo.datasets("heldout", n=args.texts)]
    site = write_site(backend, args.layer)
    layout = write_layout(backend, site, 0, rows[0])
    writes = collect_writes(backend, rows, layout)
    residual_site = f"layer_{args.layer}.residual"
    data = archscope.data.Dataset(token_ids=rows)
    residual = collect(backend, data, [residual_site], pool=None)[residual_site].float()
    n = len(writes)
    print(f"{n} tokens; write {layout.d_value}x{layout.d_key}, residual {residual.shape[1]}")
    times: dict[str, list[float]] = {"write": [], "residual": []}
    for repeat in range(args.repeats):
        start = time.perf_counter()
        fit_write_sae(
            writes,
            layout,
            n_features=args.features,
            k=args.k,
            epochs=args.epochs,
            batch_size=256,
            seed=repeat,
        )
        times["write"].append(time.perf_counter() - start)
        config = SAEConfig(
            input_dim=int(residual.shape[1]),
            n_features=args.features,
            sae_type="topk",
            k=args.k,
            batch_size=256,
            seed=repeat,
        )
        start = time.perf_counter()
        fit_sae(residual, config, epochs=args.epochs)
        times["residual"].append(time.perf_counter() - start)
    for name, values in times.items():
        rate = n * args.epochs / statistics.median(values)
        print(f"{name} SAE: {rate:.0f} tokens/s (median of {args.repeats})")
    ratio = statistics.median(w / r for w, r in zip(times["write"], times["residual"], strict=True))
    print(f"write / residual time per token: {ratio:.2f}x (paired median)")
    sae = fit_write_sae(writes, layout, n_features=args.features, k=args.k, epochs=4)
    texts = [tokenizer.encode(t) for t in archscope_zoo.datasets("binding", n=32).clean]
    start = time.perf_counter()
    for row in texts[:8]:
        backend.run(torch.tensor([row]), capture=["logits"])
    forward = (time.perf_counter() - start) / 8
    for closed in (False, True):
        result = substitution_test(
            sae, backend, texts, max_firings=args.firings, per_text=8, closed_form=closed
        )
        print(
            f"substitution test (closed form {'on' if closed else 'off'}): "
            f"{result.seconds_per_firing * 1e3:.1f} ms per firing = "
            f"{result.seconds_per_firing / forward:.1f} plain forwards of one text "
            f"({forward * 1e3:.1f} ms); win rate {result.win_rate:.3f}, control "
            f"{result.control_win_rate:.3f}, R² {result.closed_form_r2}"
        )


if __name__ == "__main__":
    main()
