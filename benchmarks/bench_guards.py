"""Cost of the run guards (per-model lock, inference mode, input limits) on a single-threaded
run: `Backend.run` against the same request handed straight to `Backend.execute`, which skips
the guards. Tiny and small models, CPU; each timing of ``run`` directly follows one of
``execute`` and the reported ratio is the median of these paired ratios.

    .venv/bin/python benchmarks/bench_guards.py [--repeats 30]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

import archscope
from archscope.backends import RunRequest


def _models() -> dict[str, Any]:
    import transformers

    from archscope_mamba.testing import make_model
    from archscope_recurrent.testing import tiny_recurrent_lm

    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=4, n_embd=128, n_head=4, vocab_size=1000)).eval()
    return {"gpt2 4x128": gpt2, "mamba (tiny)": make_model("mamba"),
            "lstm (tiny)": tiny_recurrent_lm("lstm")}


def _time(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| model | run (ms) | execute (ms) | median paired ratio |")
    print("|---|---|---|---|")
    for name, model in _models().items():
        backend = archscope.Backend.for_model(model)
        ids = torch.randint(4, 100, (4, 32))
        site = backend.layer_names()[-1]
        batch = backend.prepare_inputs(ids)
        request = RunRequest(batch, [site, "logits"], {}, stop_early=False)

        def guarded(backend: Any = backend, ids: Any = ids, site: str = site) -> Any:
            return backend.run(ids, capture=[site, "logits"], stop_early=False)

        def bare(backend: Any = backend, request: RunRequest = request) -> Any:
            return backend.execute(request)

        for _ in range(3):  # warm-up
            guarded(), bare()
        ratios, runs, bares = [], [], []
        for _ in range(args.repeats):
            b = _time(bare)
            g = _time(guarded)
            ratios.append(g / b)
            runs.append(g)
            bares.append(b)
        print(f"| {name} | {1000 * statistics.median(runs):.2f} | "
              f"{1000 * statistics.median(bares):.2f} | {statistics.median(ratios):.3f} |")


if __name__ == "__main__":
    main()
