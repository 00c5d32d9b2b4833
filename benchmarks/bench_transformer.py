"""Cost of archscope-transformer's hooks against a plain forward pass.

6-layer GPT-2 (d_model 256, GPT-2 vocabulary), batch 16 x 128 tokens, CPU. Every case runs
in the same process; each timing of a case directly follows a timing of the baseline, a plain
``model(**batch)`` under ``torch.no_grad()``, and the ratio reported is the median of these
paired ratios (robust to the load of a shared machine drifting between rounds).
Targets: all residual sites (with logits) <= 1.02x; ``layer_1.residual`` alone <= 0.33x
(the forward pass stops after block 1).

    .venv/bin/python benchmarks/bench_transformer.py [--repeats 12]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers

from archscope_transformer.backend import TransformerBackend

N_LAYERS, D_MODEL, BATCH, SEQ = 6, 256, 16, 128
RESIDUAL = ["embed", *(f"layer_{i}.residual" for i in range(N_LAYERS))]
TARGETS = {"all residual sites + logits": 1.02, "layer_1.residual only": 0.33}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--device", default="cpu", help="cpu (the target) or cuda")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "transformer.md"))
    args = parser.parse_args()

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=N_LAYERS, n_embd=D_MODEL, n_head=8)
    model = transformers.GPT2LMHeadModel(config).eval().to(args.device)
    batch = {
        "input_ids": torch.randint(0, config.vocab_size, (BATCH, SEQ)),
        "attention_mask": torch.ones(BATCH, SEQ, dtype=torch.long),
    }
    batch = {k: v.to(args.device) for k, v in batch.items()}
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    backend = TransformerBackend(model)

    def plain() -> None:
        with torch.no_grad():
            model(**batch)

    cases: dict[str, Callable[[], object]] = {
        "plain forward (baseline)": plain,
        "all residual sites + logits": lambda: backend.run(batch, capture=[*RESIDUAL, "logits"]),
        "all residual sites (stops after the last block)": lambda: backend.run(
            batch, capture=RESIDUAL
        ),
        "layer_1.residual only": lambda: backend.run(batch, capture=["layer_1.residual"]),
        "all attn + mlp sites + logits": lambda: backend.run(
            batch,
            capture=[f"layer_{i}.{r}" for i in range(N_LAYERS) for r in ("attn", "mlp")]
            + ["logits"],
        ),
    }

    def timed(run: Callable[[], object]) -> float:
        sync()
        start = time.perf_counter()
        run()
        sync()
        return time.perf_counter() - start

    times: dict[str, list[float]] = {name: [] for name in cases}
    ratios: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(2):  # warm-up
        for run in cases.values():
            run()
    for _ in range(args.repeats):
        for name, run in cases.items():
            base = timed(plain)
            elapsed = timed(run)
            times[name].append(elapsed)
            ratios[name].append(elapsed / base)

    rows = [
        "| case | median ms | ratio to plain forward (median of paired ratios) | target |",
        "|---|---:|---:|---:|",
    ]
    for name, values in times.items():
        ratio = statistics.median(ratios[name])
        target = TARGETS.get(name)
        verdict = (
            ""
            if target is None
            else f"<= {target:.2f} " + ("(met)" if ratio <= target else "(MISSED)")
        )
        rows.append(f"| {name} | {statistics.median(values) * 1e3:.1f} | {ratio:.3f} | {verdict} |")
    table = "\n".join(rows)
    gpu = f"GPU: {torch.cuda.get_device_name()}; " if args.device.startswith("cuda") else ""
    machine = (
        f"{gpu}CPU: {cpu_model()}; {os.cpu_count()} cores; torch threads "
        f"{torch.get_num_threads()}; torch {torch.__version__}; transformers "
        f"{transformers.__version__}; Python {platform.python_version()}"
    )
    setup = (
        f"GPT-2, {N_LAYERS} layers, d_model {D_MODEL}, vocabulary {config.vocab_size}, "
        f"batch {BATCH} x {SEQ} tokens, float32 on {args.device}, {args.repeats} runs per "
        "case, each paired with a baseline run just before it (one process, after 2 "
        "warm-up rounds)"
    )
    print(table)
    print()
    print(machine)
    text = (
        f"# archscope-transformer benchmark\n\n{setup}.\n\n{machine}.\n\n{table}\n\n"
        "Produced by `benchmarks/bench_transformer.py`.\n"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
