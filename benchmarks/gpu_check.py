"""The GPU check: one command that measures archscope on a CUDA machine with nothing but the
project installed, on random-weight models at realistic sizes built from configs, in bfloat16,
and writes a JSON results file. Meant to finish in under 8 minutes on one current GPU.

    python benchmarks/gpu_check.py --out results.json            # CUDA, bfloat16, real sizes
    python benchmarks/gpu_check.py --tiny --out tiny.json        # any machine: small configs,
                                                                 # float32 (what the test runs)

Per model (GPT-2 small, a 400M Pythia, Mamba-130M, Mamba-370M, a Qwen3.5-0.8B-size hybrid):

- extraction: every main per-layer site plus ``logits`` against a plain forward of the same
  batch (median of paired ratios), and early stop: ``layer_1`` only (the run stops after
  block 1); the captured logits are compared with the plain forward's first (max abs diff);
- a patch sweep: layers × positions of one clean / corrupted pair (`patch_sweep`), seconds
  and cells per second;
- SAE training: a TopK SAE on a middle layer's activations (collected once), tokens/s;
- write-SAE and graph computation: run where a method of that name is registered
  (`archscope.registry.run_method`, see ``OPTIONAL_METHODS``), else skipped with the reason.

Every timing synchronises the device before and after. ``--budget`` (seconds) stops starting
new workloads once spent, recording them as skipped, so the whole check stays inside its
time. Nothing here needs a GPU to run: without CUDA (or with ``--tiny``) it runs on the CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

#: Methods that run where a plugin registers them (looked up by name in archscope's
#: registry): name -> (what it measures, how it is called). THE PLACE FOR WRITE-SAE AND GRAPH
#: TIMINGS: when those methods exist under another name, add the name here.
OPTIONAL_METHODS: dict[str, tuple[str, str]] = {
    "write-sae": ("write-SAE training (SAEs on the layers' state writes)", "dataset"),
    "graph": ("attribution-graph computation", "batch"),
}


# -- models --------------------------------------------------------------------------------------
def model_specs(tiny: bool) -> dict[str, tuple[str, str, dict[str, Any]]]:
    """name -> (transformers config class, model class, config arguments). Real sizes follow
    the published configs (random weights); ``tiny`` keeps each family's layout, small."""
    if tiny:
        return {
            "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_layer=2, n_embd=64, n_head=4)),
            "pythia": (
                "GPTNeoXConfig",
                "GPTNeoXForCausalLM",
                dict(
                    hidden_size=64,
                    num_hidden_layers=2,
                    num_attention_heads=4,
                    intermediate_size=128,
                    vocab_size=512,
                ),
            ),
            "mamba-130m": (
                "MambaConfig",
                "MambaForCausalLM",
                dict(hidden_size=64, num_hidden_layers=2, vocab_size=512, state_size=8),
            ),
            "mamba-370m": (
                "MambaConfig",
                "MambaForCausalLM",
                dict(hidden_size=96, num_hidden_layers=3, vocab_size=512, state_size=8),
            ),
            "qwen3.5-0.8b-hybrid": (
                "Qwen3_5TextConfig",
                "Qwen3_5ForCausalLM",
                dict(
                    hidden_size=64,
                    intermediate_size=128,
                    num_hidden_layers=4,
                    layer_types=["linear_attention"] * 3 + ["full_attention"],
                    num_attention_heads=4,
                    num_key_value_heads=2,
                    head_dim=16,
                    linear_num_key_heads=2,
                    linear_num_value_heads=4,
                    linear_key_head_dim=16,
                    linear_value_head_dim=16,
                    vocab_size=512,
                ),
            ),
        }
    return {
        "gpt2": ("GPT2Config", "GPT2LMHeadModel", {}),  # GPT-2 small: 12 × 768, 124M
        "pythia": (  # Pythia-410M: 24 × 1024
            "GPTNeoXConfig",
            "GPTNeoXForCausalLM",
            dict(
                hidden_size=1024,
                num_hidden_layers=24,
                num_attention_heads=16,
                intermediate_size=4096,
                vocab_size=50304,
                rotary_pct=0.25,
            ),
        ),
        "mamba-130m": (
            "MambaConfig",
            "MambaForCausalLM",
            dict(hidden_size=768, num_hidden_layers=24, vocab_size=50280),
        ),
        "mamba-370m": (
            "MambaConfig",
            "MambaForCausalLM",
            dict(hidden_size=1024, num_hidden_layers=48, vocab_size=50280),
        ),
        "qwen3.5-0.8b-hybrid": (  # Qwen3.5-0.8B's text layout: 3 linear-attention : 1 full
            "Qwen3_5TextConfig",
            "Qwen3_5ForCausalLM",
            dict(
                hidden_size=1024,
                intermediate_size=3584,
                num_hidden_layers=24,
                layer_types=(["linear_attention"] * 3 + ["full_attention"]) * 6,
                num_attention_heads=8,
                num_key_value_heads=2,
                head_dim=256,
                linear_num_key_heads=16,
                linear_num_value_heads=16,
                linear_key_head_dim=128,
                linear_value_head_dim=128,
                vocab_size=248320,
                tie_word_embeddings=True,
            ),
        ),
    }


def build(spec: tuple[str, str, dict[str, Any]], device: Any, dtype: Any) -> Any:
    """A random-weight model from its config, initialised on ``device`` (fast on a GPU),
    then cast to ``dtype``; eval mode."""
    import torch
    import transformers

    config_name, model_name, kwargs = spec
    config = getattr(transformers, config_name)(**kwargs)
    torch.manual_seed(0)
    with torch.device(device):
        model = getattr(transformers, model_name)(config)
    return model.to(dtype=dtype).eval()


# -- timing ----------------------------------------------------------------------------------------
class Clock:
    """Seconds of a call, the device synchronised before and after."""

    def __init__(self, device: Any) -> None:
        import torch

        self.sync: Callable[[], None] = (
            torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        )

    def __call__(self, fn: Callable[[], Any]) -> float:
        self.sync()
        start = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - start

    def paired(self, base: Callable[[], Any], other: Callable[[], Any], rounds: int) -> dict:
        """Median seconds of each and the median of paired ratios (order alternating)."""
        base(), other()  # warm-up
        bs, os_, ratios = [], [], []
        for i in range(rounds):
            if i % 2:
                b, o = self(base), self(other)
            else:
                o, b = self(other), self(base)
            bs.append(b)
            os_.append(o)
            ratios.append(o / b)
        m = statistics.median
        return {"plain_s": m(bs), "archscope_s": m(os_), "ratio": m(ratios), "rounds": rounds}


# -- workloads -------------------------------------------------------------------------------------
def extraction(backend: Any, model: Any, ids: Any, clock: Clock, rounds: int) -> dict:
    import torch

    mask = torch.ones_like(ids)
    sites = backend.layer_names()

    def plain() -> Any:
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask, use_cache=False).logits

    result = backend.run({"input_ids": ids, "attention_mask": mask}, capture=[*sites, "logits"])
    diff = float((result.logits.float() - plain().float()).abs().max())
    every = clock.paired(
        plain,
        lambda: backend.run({"input_ids": ids, "attention_mask": mask}, capture=[*sites, "logits"]),
        rounds,
    )
    early_site = sites[min(1, len(sites) - 1)]
    early = clock.paired(
        plain,
        lambda: backend.run({"input_ids": ids, "attention_mask": mask}, capture=[early_site]),
        rounds,
    )
    return {
        "batch": list(ids.shape),
        "sites": len(sites) + 1,
        "logits_max_abs_diff_vs_plain": diff,
        "all_sites_and_logits": every,
        "early_stop_site": early_site,
        "early_stop": early,
    }


def patch(backend: Any, ids: Any, clock: Clock) -> dict:
    from archscope.methods.attribute import patch_sweep

    clean = ids[:1]
    corrupted = clean.clone()
    corrupted[0, -2:] = ids[1 % len(ids), -2:]  # the last two tokens swapped for others
    out: dict[str, Any] = {}

    def sweep() -> None:
        out["sweep"] = patch_sweep(backend, clean, corrupted, axis="position")

    seconds = clock(sweep)
    result = out["sweep"]
    cells = sum(v is not None for row in result.gap_restored or [] for v in row)
    return {
        "positions": int(clean.shape[1]),
        "rows": len(result.rows),
        "cells": cells,
        "seconds": seconds,
        "cells_per_s": cells / seconds if seconds else None,
    }


def sae(backend: Any, ids: Any, device: Any, clock: Clock, epochs: int) -> dict:
    import torch

    from archscope.collect import collect
    from archscope.methods.sae import SAEConfig, fit_sae

    sites = backend.layer_names()
    site = sites[len(sites) // 2]
    acts = collect(backend, {"input_ids": ids}, [site], pool=None)[site]
    acts = acts.to(device=device, dtype=torch.float32)
    dim = int(acts.shape[-1])
    config = SAEConfig(
        input_dim=dim,
        n_features=8 * dim,
        sae_type="topk",
        k=32 if dim >= 256 else 8,
        batch_size=4096 if len(acts) >= 4096 else 256,
        learning_rate=1e-3,
        seed=0,
    )
    found: dict[str, Any] = {}

    def train() -> None:
        found["sae"] = fit_sae(acts, config, epochs=epochs, device=device.type)

    seconds = clock(train)
    return {
        "site": site,
        "tokens": len(acts),
        "width": 8 * dim,
        "k": config.k,
        "epochs": epochs,
        "seconds": seconds,
        "tokens_per_s": len(acts) * epochs / seconds if seconds else None,
    }


def optional_method(name: str, backend: Any, ids: Any, clock: Clock) -> dict:
    """A registered method by name, with its quick parameters, timed; or why it was skipped."""
    from archscope.plugins import get_manager
    from archscope.registry import run_method

    what, kind = OPTIONAL_METHODS[name]
    entry = get_manager().methods.get(name)
    if entry is None:
        reason = f"no method {name!r} ({what}) is registered in this installation"
        print(f"  {name}: skipped: {reason}", flush=True)
        return {"skipped": reason}
    method = entry.obj
    missing = method.missing(frozenset(backend.capabilities))
    if missing:
        reason = f"backend {backend.name!r} lacks {missing}"
        print(f"  {name}: skipped: {reason}", flush=True)
        return {"skipped": reason}
    if kind == "dataset":
        from archscope.data import Dataset

        data: Any = Dataset(token_ids=[row.tolist() for row in ids.cpu()])
    else:
        data = {"input_ids": ids}
    params = method.quick_params()
    seconds = clock(lambda: run_method(name, backend, data, **params))
    return {"what": what, "params": params, "seconds": seconds}


# -- the check -------------------------------------------------------------------------------------
def machine(device: Any, dtype: Any) -> dict:
    import torch
    import transformers

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
    }
    try:
        from importlib import metadata

        info["archscope"] = metadata.version("archscope")
    except Exception:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_gib"] = round(
            torch.cuda.get_device_properties(device).total_memory / 2**30, 1
        )
    return info


def run_check(args: argparse.Namespace) -> dict:
    import torch

    import archscope

    cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    if args.dtype:
        dtype = getattr(torch, args.dtype)
    batch, seq = (2, 8) if args.tiny else (8, 512)
    sae_rows = 4 if args.tiny else 64
    rounds = args.rounds or (2 if args.tiny else 10)
    clock = Clock(device)
    start = time.perf_counter()
    results: dict[str, Any] = {
        "machine": machine(device, dtype),
        "tiny": bool(args.tiny),
        "batch": [batch, seq],
        "models": {},
    }
    print(f"gpu_check on {results['machine'].get('gpu', device)} ({dtype})", flush=True)
    specs = model_specs(args.tiny)
    chosen = args.models.split(",") if args.models else list(specs)
    unknown = [m for m in chosen if m not in specs]
    if unknown:
        raise SystemExit(f"unknown models {unknown}; choose from {', '.join(specs)}")
    for name in chosen:
        entry: dict[str, Any] = {}
        results["models"][name] = entry
        if time.perf_counter() - start > args.budget:
            entry["skipped"] = f"time budget of {args.budget} s spent"
            continue
        print(f"{name}:", flush=True)
        try:
            built = time.perf_counter()
            model = build(specs[name], device, dtype)
            entry["build_s"] = round(time.perf_counter() - built, 2)
            entry["parameters"] = sum(p.numel() for p in model.parameters())
            backend = archscope.Backend.for_model(model)
            entry["backend"] = backend.name
            vocab = int(model.get_input_embeddings().num_embeddings)
            g = torch.Generator().manual_seed(0)
            ids = torch.randint(4, vocab, (batch, seq), generator=g).to(device)
            sae_ids = torch.randint(4, vocab, (sae_rows, seq), generator=g).to(device)
            positions = min(seq, 8 if args.tiny else 32)
            work: list[tuple[str, Callable[[], dict]]] = [
                ("extraction", partial(extraction, backend, model, ids, clock, rounds)),
                ("patch_sweep", partial(patch, backend, ids[:, :positions], clock)),
                ("sae", partial(sae, backend, sae_ids, device, clock, 2 if args.tiny else 5)),
                *(
                    (key, partial(optional_method, key, backend, ids[:2, :64], clock))
                    for key in OPTIONAL_METHODS
                ),
            ]
            for key, fn in work:
                if time.perf_counter() - start > args.budget:
                    entry[key] = {"skipped": f"time budget of {args.budget} s spent"}
                    continue
                try:
                    entry[key] = fn()
                except Exception as exc:  # one failing workload must not hide the others
                    entry[key] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
                    traceback.print_exc()
                print(f"  {key}: {json.dumps(entry[key], default=str)[:300]}", flush=True)
            del model, backend
        except Exception as exc:
            entry["error"] = f"{type(exc).__name__}: {exc}"[:500]
            traceback.print_exc()
        finally:
            if cuda:
                with contextlib.suppress(Exception):
                    entry["peak_gpu_memory_gib"] = round(
                        torch.cuda.max_memory_allocated() / 2**30, 2
                    )
                    torch.cuda.reset_peak_memory_stats()
                    torch.cuda.empty_cache()
    results["total_s"] = round(time.perf_counter() - start, 1)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="results file (JSON)")
    p.add_argument("--tiny", action="store_true", help="small configs in float32 (CPU test)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even where CUDA exists")
    p.add_argument("--models", default="", help="comma-separated subset of the models")
    p.add_argument("--rounds", type=int, default=0, help="paired rounds per timing")
    p.add_argument("--dtype", default="", help="override: float32, bfloat16, float16")
    p.add_argument(
        "--budget", type=float, default=420.0, help="seconds after which no workload starts"
    )
    args = p.parse_args(argv)
    import torch

    if not args.tiny and not args.cpu and not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device here; the real-size check is meant for a GPU. Running "
            "it on the CPU anyway would take far longer than 8 minutes: use --tiny for a CPU "
            "check of the script, or --cpu to insist.",
            file=sys.stderr,
        )
        return 2
    with contextlib.suppress(Exception):
        import transformers

        transformers.logging.set_verbosity_error()
    results = run_check(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str))
    failed = [
        f"{m}.{k}"
        for m, entry in results["models"].items()
        for k, v in entry.items()
        if (k == "error") or (isinstance(v, dict) and "error" in v)
    ]
    print(
        f"wrote {args.out} in {results['total_s']} s" + (f"; errors in {failed}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
