"""Cost of the run guards (per-model lock, inference mode, input and device checks) on a
single-threaded run: `Backend.run` as shipped against `Backend.run` with those guards replaced
by no-ops. Small models, CPU, one torch thread; each guarded timing directly follows an
unguarded one and the reported ratio is the median of these paired ratios.

    .venv/bin/python benchmarks/bench_guards.py [--repeats 30]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

import archscope
import archscope.guards as guards


def _models() -> dict[str, Any]:
    import transformers

    from archscope_mamba.testing import make_model
    from archscope_recurrent.testing import tiny_recurrent_lm

    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_layer=4, n_embd=128, n_head=4, vocab_size=1000)
    ).eval()
    return {
        "gpt2 4x128": gpt2,
        "mamba (tiny)": make_model("mamba"),
        "lstm (tiny)": tiny_recurrent_lm("lstm"),
    }


@contextlib.contextmanager
def _without_guards() -> Any:
    """`Backend.run` with the guards replaced by no-ops (run imports them at each call)."""
    saved = {
        n: getattr(guards, n)
        for n in ("check_device", "check_inputs", "inference_mode", "model_lock")
    }
    guards.check_device = lambda *a, **k: None
    guards.check_inputs = lambda *a, **k: None
    guards.inference_mode = lambda *a, **k: contextlib.nullcontext()  # type: ignore[assignment,misc]
    guards.model_lock = lambda *a, **k: contextlib.nullcontext()  # type: ignore[assignment]
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(guards, name, value)


def _time(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(
        "| model | run, guarded (ms) | run, no guards (ms) | median paired ratio | guards alone (us) |"
    )
    print("|---|---|---|---|---|")
    for name, model in _models().items():
        backend = archscope.Backend.for_model(model)
        ids = torch.randint(4, 100, (4, 32))
        site = backend.layer_names()[-1]

        def guarded(backend: Any = backend, ids: Any = ids, site: str = site) -> Any:
            return backend.run(ids, capture=[site, "logits"], stop_early=False)

        def bare() -> Any:
            with _without_guards():
                return guarded()

        for _ in range(3):  # warm-up
            guarded(), bare()
        ratios, runs, bares = [], [], []
        for _ in range(args.repeats):
            b = _time(bare)
            g = _time(guarded)
            ratios.append(g / b)
            runs.append(g)
            bares.append(b)
        batch = backend.prepare_inputs(ids)

        def guards_alone(backend: Any = backend, batch: Any = batch) -> None:
            for _ in range(200):
                guards.check_device(backend.device, backend.name)
                guards.check_inputs(batch, backend.input_limits(), backend.name)
                with guards.model_lock(backend.model), guards.inference_mode(backend.model):
                    pass

        alone = statistics.median(_time(guards_alone) for _ in range(5)) / 200
        print(
            f"| {name} | {1000 * statistics.median(runs):.2f} | "
            f"{1000 * statistics.median(bares):.2f} | {statistics.median(ratios):.3f} | "
            f"{1e6 * alone:.0f} |"
        )


if __name__ == "__main__":
    main()
