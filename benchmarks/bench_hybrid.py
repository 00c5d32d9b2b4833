"""Cost of the hybrid backend's write sites, states and effective attention, relative to a
plain forward pass of the same batch (CPU, the models' PyTorch paths).

    python benchmarks/bench_hybrid.py [--repeats 7] [--seq 128 512] [--out benchmarks/results/hybrid-writes.md]

Random-weight models of width 128 with four mixer layers: Qwen3.5-style gated delta nets (4
value heads of 32 channels, keys 2 × 32) alone (the recurrent path) and with every second layer
softmax attention; Kimi-Linear (KDA, 4 heads of 32, one decay per key channel) and MiniMax
(lightning attention, 4 heads of 32), each with every second layer attention (transformers'
mask code needs one in these families). Batch × tokens 4 × 128 and 1 × 512.

Rows, per model, measured interleaved in one process (`interleaved`): a plain forward
(``model(ids)``, which fills the model's cache as transformers does by default); the same again
(how far two identical runs differ); a plain forward without a cache; every state and every
write in factored form (``write_value`` + ``write_key`` + ``write_decay`` + ``ssm_state`` +
``conv_state`` of every layer: the target row); every ``state_write`` (materialised); every
``ssm_states`` (per position); both with every ``ssm_state``; every ``effective_attention``;
every ``attn_pattern``. Target for every state and every write: ≤ 1.10× the plain forward.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
import machine

from archscope import Backend

warnings.filterwarnings("ignore")
TARGET = 1.10
FACTORED = "every state and every write, factored"


def make(family: str, layer_types: list[str]) -> Any:
    """A width-128 random-weight model of ``family`` ("gdn", "kda" or "lightning")."""
    import transformers

    torch.manual_seed(0)
    common: dict[str, Any] = dict(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=len(layer_types),
        layer_types=layer_types,
        num_attention_heads=4,
    )
    if family == "gdn":
        config = transformers.Qwen3_5TextConfig(
            **common,
            num_key_value_heads=2,
            head_dim=32,
            linear_num_value_heads=4,
            linear_num_key_heads=2,
            linear_key_head_dim=32,
            linear_value_head_dim=32,
            linear_conv_kernel_dim=4,
        )
        return transformers.Qwen3_5ForCausalLM(config).eval()
    if family == "kda":
        config = transformers.KimiLinearConfig(
            **common,
            num_key_value_heads=4,
            linear_attn_config=dict(head_dim=32, num_heads=4, short_conv_kernel_size=4),
            mlp_layer_types=["dense"] * len(layer_types),
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
        return transformers.KimiLinearForCausalLM(config).eval()
    config = transformers.MiniMaxConfig(
        **common, num_key_value_heads=2, head_dim=32, num_local_experts=2, num_experts_per_tok=1
    )
    return transformers.MiniMaxForCausalLM(config).eval()


def interleaved(
    cases: dict[str, Callable[[], Any]], repeats: int
) -> tuple[dict[str, float], dict[str, float]]:
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


def capture_cases(
    backend: Any,
    ids: torch.Tensor,
    states: tuple[str, ...],
    plain_kwargs: dict[str, Any] | None = None,
) -> dict[str, Callable[[], Any]]:
    """The rows for one model: ``states`` are the roles of its final states (cache sites)."""
    model = backend.model
    sites = backend.sites()
    kwargs = plain_kwargs or {}

    def role(*roles: str) -> list[str]:
        return [n for n, i in sites.items() if i.site.role in roles]

    def plain(**extra: Any) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                model(ids, **kwargs, **extra)

        return run

    def capture(*roles: str) -> Callable[[], Any]:
        names = role(*roles)
        return lambda: backend.run(ids, capture=names)

    cases = {
        "plain forward": plain(),
        "plain forward (again: noise)": plain(),
        "plain forward, use_cache=False": plain(use_cache=False),
        f"{FACTORED} (write_value + write_key + write_decay + {' + '.join(states)})": capture(
            "write_value", "write_key", "write_decay", *states
        ),
        "every state_write": capture("state_write"),
        "every ssm_states (per position)": capture("ssm_states"),
        "every state_write + ssm_states + final state": capture(
            "state_write", "ssm_states", *states
        ),
        "every effective_attention": capture("effective_attention"),
    }
    if role("attn_pattern"):
        cases["every attn_pattern"] = capture("attn_pattern")
    return cases


def rows_for(
    name: str, cases: dict[str, Callable[[], Any]], batch: int, seq: int, repeats: int
) -> list[str]:
    medians, ratios = interleaved(cases, repeats)
    rows = []
    for k in cases:
        ratio = f"{ratios[k]:.2f}×"
        if k.startswith(FACTORED):
            ratio = f"**{ratio}** ({'met' if ratios[k] <= TARGET else 'missed'})"
        rows.append(f"| {name} | {batch} × {seq} | {k} | {medians[k]:.1f} | {ratio} |")
    print("\n".join(rows), flush=True)
    return rows


MODELS = {
    "GDN × 4 (Qwen3.5-style, recurrent path)": ("gdn", ["linear_attention"] * 4),
    "GDN + attention × 2 (Qwen3.5-style)": ("gdn", ["linear_attention", "full_attention"] * 2),
    "KDA + attention × 2 (Kimi-Linear)": ("kda", ["linear_attention", "full_attention"] * 2),
    "lightning + attention × 2 (MiniMax)": (
        "lightning",
        ["linear_attention", "full_attention"] * 2,
    ),
}


def bench(name: str, batch: int, seq: int, repeats: int) -> list[str]:
    family, layer_types = MODELS[name]
    model = make(family, layer_types)
    backend = Backend.for_model(model)
    ids = torch.randint(3, 256, (batch, seq), generator=torch.Generator().manual_seed(0))
    mask = backend.mask_argument(None)
    plain = {} if mask is None else {"attention_mask": mask}
    cases = capture_cases(backend, ids, ("ssm_state", "conv_state"), plain)
    return rows_for(name, cases, batch, seq, repeats)


def main() -> int:
    p = machine.parser(__doc__, "hybrid-writes.md", repeats=7)
    p.add_argument("--seq", type=int, nargs="+", default=[128, 512])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for seq in args.seq:
        batch = 4 if seq <= 128 else 1
        for name in args.models:
            rows += bench(name, batch, seq, args.repeats)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    text = "\n".join(
        [
            "# archscope-hybrid: cost of the write sites, the states and effective attention",
            "",
            f"Machine: {machine.describe()}; torch threads: {args.threads}; load average "
            f"when done: {load}.",
            "",
            f"Median of {args.repeats} interleaved runs after warm-up (ms); ratios are medians "
            "of the ratios to the plain forward of runs made back to back "
            "(`python benchmarks/bench_hybrid.py`). Target for every state and every write in "
            f"factored form: ≤ {TARGET:.2f}× the plain forward.",
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
