"""Cost of the hybrid backend's write sites and effective attention, relative to a plain
forward pass of the same batch (CPU, the models' PyTorch paths).

    python benchmarks/bench_hybrid.py [--repeats 9] [--out benchmarks/results/hybrid-writes.md]

Two random-weight Qwen3.5-style text models of width 128 (gated delta nets with 4 value heads
of 32 channels, keys 2 × 32): four recurrent layers (the recurrent path alone), and the same
with every second layer softmax attention (4 heads), where effective attention of the
recurrent layers is set against the attention pattern of the attention layers of the same
model. Rows: a plain forward, capturing every layer's write factors (``write_value``,
``write_key``, ``write_decay``), every ``state_write``, every ``state_write`` + ``ssm_states``
+ ``ssm_state`` (every state and every write), every ``effective_attention``, every
``attn_pattern``. Timings are medians over ``--repeats`` interleaved rounds after warm-up;
ratios are medians of the ratios of runs made back to back. Target for every state and every
write: ≤ 1.10× the plain forward.
"""

from __future__ import annotations

import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
import machine

from archscope import Backend

warnings.filterwarnings("ignore")
TARGET = 1.10


def make(layer_types: list[str]) -> Any:
    import transformers

    torch.manual_seed(0)
    config = transformers.Qwen3_5TextConfig(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=len(layer_types),
        layer_types=layer_types,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        linear_num_value_heads=4,
        linear_num_key_heads=2,
        linear_key_head_dim=32,
        linear_value_head_dim=32,
        linear_conv_kernel_dim=4,
    )
    return transformers.Qwen3_5ForCausalLM(config).eval()


def interleaved(cases: dict[str, Any], repeats: int) -> tuple[dict[str, float], dict[str, float]]:
    """Median ms of each case, and the median ratio of each case to the first one, over
    ``repeats`` interleaved rounds after two warm-up calls each."""
    for fn in cases.values():
        for _ in range(2):
            fn()
    samples: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - start) * 1000)
    base = next(iter(samples.values()))
    medians = {k: statistics.median(v) for k, v in samples.items()}
    ratios = {
        k: statistics.median(x / b for x, b in zip(v, base, strict=True))
        for k, v in samples.items()
    }
    return medians, ratios


def bench(name: str, layer_types: list[str], batch: int, seq: int, repeats: int) -> list[str]:
    model = make(layer_types)
    backend = Backend.for_model(model)
    ids = torch.randint(3, 256, (batch, seq), generator=torch.Generator().manual_seed(0))
    sites = backend.sites()

    def role(*roles: str) -> list[str]:
        return [n for n, i in sites.items() if i.site.role in roles]

    def plain() -> None:
        with torch.no_grad():
            model(ids, **backend_mask(backend))

    cases = {
        "plain forward": plain,
        "every write_value + write_key + write_decay (factored)": lambda: backend.run(
            ids, capture=role("write_value", "write_key", "write_decay")
        ),
        "every state_write": lambda: backend.run(ids, capture=role("state_write")),
        "every state_write + ssm_states + ssm_state": lambda: backend.run(
            ids, capture=role("state_write", "ssm_states", "ssm_state")
        ),
        "every effective_attention": lambda: backend.run(ids, capture=role("effective_attention")),
    }
    if role("attn_pattern"):
        cases["every attn_pattern"] = lambda: backend.run(ids, capture=role("attn_pattern"))
    medians, ratios = interleaved(cases, repeats)
    return [
        f"| {name} | {batch} × {seq} | {k} | {medians[k]:.1f} | {ratios[k]:.2f}× |" for k in cases
    ]


def backend_mask(backend: Any) -> dict[str, Any]:
    """What the backend passes for the mask (an all-recurrent stack needs the per-type mapping)."""
    mask = backend.mask_argument(None)
    return {} if mask is None else {"attention_mask": mask}


def main() -> int:
    p = machine.parser(__doc__, "hybrid-writes.md", repeats=9)
    p.add_argument("--seq", type=int, nargs="+", default=[128, 512])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for seq in args.seq:
        batch = 4 if seq <= 128 else 1
        rows += bench("GDN × 4 (d 128)", ["linear_attention"] * 4, batch, seq, args.repeats)
        print("\n".join(rows[-5:]), flush=True)
        hybrid = ["linear_attention", "full_attention"] * 2
        rows += bench("GDN + attention × 2 (d 128)", hybrid, batch, seq, args.repeats)
        print("\n".join(rows[-6:]), flush=True)
    text = "\n".join(
        [
            "# archscope-hybrid: cost of the write sites and of effective attention",
            "",
            f"Machine: {machine.describe()}; torch threads: {args.threads}.",
            "",
            f"Median of {args.repeats} interleaved runs after warm-up (ms); ratios are medians "
            "of the ratios to the plain forward of runs made back to back. The write sites are "
            "computed from the mixers' own projections during the run (hooks on their "
            "sub-modules, the causal convolution recomputed); `ssm_states` runs one extra "
            "sequential delta-rule scan per layer in PyTorch; effective attention is one "
            "(seq × seq) triangular solve per head and row.",
            "",
            "| model | batch × tokens | captured | ms | ratio to its plain forward |",
            "|---|---|---|---|---|",
            *rows,
            "",
        ]
    )
    machine.write(text, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
