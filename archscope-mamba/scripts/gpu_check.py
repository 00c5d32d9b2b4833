#!/usr/bin/env python
"""Check the `mamba` backend on a CUDA device against the CPU (PyTorch) path, and time both.

For HF Mamba and Mamba-2 (and native mamba_ssm models when ``mamba_ssm`` imports), residual,
state and logits sites read on the device (float32 and bfloat16) are compared with the same
sites read on the CPU in float32; a plain forward and an all-``ssm_state`` extraction are timed
on both. Prints a Markdown summary and a final JSON line; ``--out DIR`` also writes
``gpu_check.json`` and ``gpu_check.md`` there.

It runs where the archscope packages are not installed: it puts ``core/src`` and
``archscope-mamba/src`` on ``sys.path`` and builds ``MambaBackend(model)`` directly.
``--device cpu`` runs the same checks on the CPU (a smoke test of the script itself).

    python archscope-mamba/scripts/gpu_check.py [--device cuda|cpu] [--out DIR]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
import traceback
import types
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "core" / "src"), str(ROOT / "archscope-mamba" / "src")]
warnings.filterwarnings("ignore")

try:  # archscope's hookspecs need pluggy; the backend itself does not
    import pluggy  # noqa: F401
except ImportError:
    stub = types.ModuleType("pluggy")
    stub.HookspecMarker = stub.HookimplMarker = lambda name: (  # type: ignore[attr-defined]
        lambda fn=None, **kw: fn if fn is not None else (lambda f: f)
    )
    sys.modules["pluggy"] = stub

import torch  # noqa: E402

from archscope import Edit  # noqa: E402
from archscope_mamba.backend import MambaBackend  # noqa: E402
from archscope_mamba.testing import (  # noqa: E402
    make_model,
    make_native_model,
    reference_activations,
)

#: Relative error ||device - cpu|| / ||cpu|| allowed per dtype.
REL_TOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2}
BATCH, SEQ = 4, 128


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _median_ms(fn: Any, device: str, runs: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _compare(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> dict[str, Any]:
    worst_rel, worst_abs, worst_site = 0.0, 0.0, ""
    for name, ref in want.items():
        value = got[name].detach().float().cpu()
        ref = ref.float()
        rel = float((value - ref).norm() / ref.norm().clamp_min(1e-12))
        if rel >= worst_rel:
            worst_rel, worst_site = rel, name
        worst_abs = max(worst_abs, float((value - ref).abs().max()))
    return {
        "max_rel": worst_rel,
        "max_abs": worst_abs,
        "worst_site": worst_site,
        "sites": len(want),
    }


def kernel_paths() -> dict[str, bool]:
    found = {}
    for name in ("mamba_ssm", "causal_conv1d"):
        try:
            __import__(name)
            found[name] = True
        except Exception:
            found[name] = False
    return found


def check_hf(family: str, device: str, runs: int) -> dict[str, Any]:
    cpu_model = make_model(family, size="bench")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 256, (BATCH, SEQ), generator=gen)
    cpu_backend = MambaBackend(cpu_model)
    names = [
        n
        for n, i in cpu_backend.sites().items()
        if i.site.role in ("residual", "ssm_state", "conv_state")
    ] + ["logits"]
    state_names = [n for n, i in cpu_backend.sites().items() if i.site.role == "ssm_state"]
    reference = cpu_backend.run(ids, capture=names).activations
    report: dict[str, Any] = {"family": family, "batch": [BATCH, SEQ], "dtypes": {}}
    with torch.no_grad():
        report["cpu_plain_ms"] = _median_ms(
            lambda: cpu_model(ids, use_cache=False), "cpu", max(3, runs // 3)
        )
    report["cpu_states_ms"] = _median_ms(
        lambda: cpu_backend.run(ids, capture=state_names), "cpu", max(3, runs // 3)
    )
    for dtype in (torch.float32, torch.bfloat16):
        entry: dict[str, Any] = {}
        try:
            model = copy.deepcopy(cpu_model).to(device=device, dtype=dtype)
            backend = MambaBackend(model)
            dev_ids = ids.to(device)
            got = backend.run(dev_ids, capture=names).activations
            entry.update(_compare(got, reference))
            entry["ok"] = entry["max_rel"] <= REL_TOL[dtype]
            with torch.no_grad():
                entry["plain_ms"] = _median_ms(
                    lambda m=model, x=dev_ids: m(x, use_cache=False), device, runs
                )
                entry["plain_cache_ms"] = _median_ms(
                    lambda m=model, x=dev_ids: m(x, use_cache=True), device, runs
                )
            entry["states_ms"] = _median_ms(
                lambda b=backend, x=dev_ids: b.run(x, capture=state_names), device, runs
            )
            same = backend.run(dev_ids, edits=[Edit.apply("layer_1.residual", lambda x: x)])
            entry["identity_edit_bit_identical"] = bool(
                torch.equal(same.logits, backend.run(dev_ids).logits)
            )
            if dtype == torch.float32:  # reported apart: it leans on the HF cache API
                try:
                    a, b, suffix = dev_ids[:, :16], dev_ids[:, 16:40], dev_ids[:, 40:48]
                    patched = backend.state_patch(a, b, suffix).logits
                    full = backend.run(torch.cat([b, suffix], dim=1)).logits[:, 24:]
                    entry["state_patch_max_abs"] = float((patched - full).abs().max())
                    entry["state_patch_ok"] = entry["state_patch_max_abs"] <= 1e-3
                except Exception as exc:
                    entry["state_patch_max_abs"] = f"error: {type(exc).__name__}: {exc}"[:200]
                    entry["state_patch_ok"] = False
        except Exception as exc:
            entry = {
                "ok": False,
                "error": f"{type(exc).__name__}: {exc}",
                "trace": traceback.format_exc(limit=4),
            }
        report["dtypes"][str(dtype).removeprefix("torch.")] = entry
    return report


def check_native(layer: str, device: str, runs: int) -> dict[str, Any]:
    """mamba_ssm's MambaLMHeadModel: residual sums against its fused forward (own block hooks)
    and states against stepping its own InferenceParams, via the package's reference."""
    model = make_native_model(layer, n_layer=4, vocab_size=256, device=device)
    backend = MambaBackend(model)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (BATCH, SEQ), generator=gen).to(device)
    reference = reference_activations(model, "native", ids)
    sums = {k: v for k, v in reference.items() if k.endswith(".residual")}
    stepped = {k: v.float().cpu() for k, v in reference.items() if k.endswith("_state")}
    got = backend.run(ids, capture=[*sums, *stepped]).activations
    report: dict[str, Any] = {"family": f"native-{layer}", "batch": [BATCH, SEQ]}
    report["residual_vs_fused_forward"] = _compare(
        got, {k: v.float().cpu() for k, v in sums.items()}
    )
    report["state_vs_stepping"] = _compare(got, stepped)
    report["ok"] = (
        report["residual_vs_fused_forward"]["max_rel"] <= 1e-4
        and report["state_vs_stepping"]["max_rel"] <= 1e-3
    )
    state_names = [n for n in stepped if n.endswith("ssm_state")]
    with torch.no_grad():
        report["plain_ms"] = _median_ms(lambda: model(ids), device, runs)
    report["states_ms"] = _median_ms(lambda: backend.run(ids, capture=state_names), device, runs)
    return report


def to_markdown(summary: dict[str, Any]) -> str:
    env = summary["environment"]
    lines = [
        "# archscope-mamba GPU check",
        "",
        f"- device: {env['device_name']} ({summary['device']}); torch {env['torch']}, "
        f"transformers {env['transformers']}; kernels: {env['kernels']}",
        f"- batch {BATCH} x {SEQ} tokens; reference: the same sites on CPU in float32",
        "",
        "| model | dtype | max rel. error | worst site | plain fwd ms | fwd+cache ms "
        "| all ssm_state ms | identity edit exact | state patch max abs | ok |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for item in summary["hf"]:
        for dtype, e in item["dtypes"].items():
            if "error" in e:
                lines.append(
                    f"| {item['family']} | {dtype} | error: {e['error'][:80]} | | | | | | | no |"
                )
                continue
            lines.append(
                f"| {item['family']} | {dtype} | {e['max_rel']:.2e} | {e['worst_site']} | "
                f"{e['plain_ms']:.2f} | {e['plain_cache_ms']:.2f} | {e['states_ms']:.2f} | "
                f"{e['identity_edit_bit_identical']} | {e.get('state_patch_max_abs', '-')} | "
                f"{'yes' if e['ok'] else 'NO'} |"
            )
        lines.append(
            f"| {item['family']} | float32 on CPU | - | - | {item['cpu_plain_ms']:.2f} | "
            f"- | {item['cpu_states_ms']:.2f} | - | - | - |"
        )
    for item in summary["native"]:
        if "error" in item:
            lines.append(f"\n- {item['family']}: error {item['error']}")
            continue
        lines.append(
            f"\n- {item['family']}: residual vs fused forward rel. "
            f"{item['residual_vs_fused_forward']['max_rel']:.2e}, state vs stepping rel. "
            f"{item['state_vs_stepping']['max_rel']:.2e}; plain {item['plain_ms']:.2f} ms, "
            f"all ssm_state {item['states_ms']:.2f} ms; ok: {item['ok']}"
        )
    if summary.get("native_skipped"):
        lines.append(f"\n- native mamba_ssm: not run ({summary['native_skipped']})")
    lines.append(
        f"\nall site comparisons ok: {summary['all_ok']}; state patching ok: "
        f"{summary['state_patch_ok']}; wall time {summary['wall_s']:.1f} s"
    )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None, help="folder for the JSON/MD files")
    parser.add_argument("--runs", type=int, default=10, help="timed runs per measurement")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device; use --device cpu")
    if args.device.startswith("cuda"):
        # Compare true float32: no TF32 in matmuls or cuDNN convolutions.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    started = time.perf_counter()
    import transformers

    kernels = kernel_paths()
    summary: dict[str, Any] = {
        "device": args.device,
        "environment": {
            "device_name": (
                torch.cuda.get_device_name(0)
                if args.device.startswith("cuda")
                else platform.processor() or platform.machine()
            ),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
            "kernels": kernels,
        },
        "hf": [check_hf(family, args.device, args.runs) for family in ("mamba", "mamba2")],
        "native": [],
    }
    if kernels["mamba_ssm"] and args.device.startswith("cuda"):
        for layer in ("Mamba1", "Mamba2"):
            try:
                summary["native"].append(check_native(layer, args.device, args.runs))
            except Exception as exc:
                summary["native"].append(
                    {
                        "family": f"native-{layer}",
                        "ok": False,
                        "error": f"{type(exc).__name__}: {exc}",
                    }
                )
    else:
        summary["native_skipped"] = (
            "mamba_ssm is not importable" if not kernels["mamba_ssm"] else "needs a CUDA device"
        )
    summary["all_ok"] = all(
        e.get("ok") for h in summary["hf"] for e in h["dtypes"].values()
    ) and all(n.get("ok") for n in summary["native"])
    summary["state_patch_ok"] = all(
        h["dtypes"]["float32"].get("state_patch_ok", False) for h in summary["hf"]
    )
    summary["wall_s"] = time.perf_counter() - started
    markdown = to_markdown(summary)
    print(markdown)
    print(json.dumps(summary))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_check.json").write_text(json.dumps(summary, indent=2))
        (args.out / "gpu_check.md").write_text(markdown + "\n")
    return 0 if summary["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
