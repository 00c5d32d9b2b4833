"""Cost of capturing every layer's per-step hidden states of a 3-layer GRU / LSTM language
model through archscope's RNN backend, and of the mLSTM write sites and states of a Hugging
Face xLSTM, relative to a plain forward pass (CPU).

    python benchmarks/bench_recurrent.py [--repeats 20] [--out benchmarks/results/recurrent.md]
    python benchmarks/bench_recurrent.py --mlstm [--mlstm-repeats 7]   # the mLSTM section only

The RNN backend runs the stack one layer at a time with single-layer modules that share the
model's parameters; the target is ≤ 1.10× the plain forward. Timings are medians over
``--repeats`` interleaved runs after warm-up.

mLSTM: a random-weight ``xLSTMForCausalLM`` of width 128, four blocks of 4 heads (d_qk = d_v =
32), batch × tokens 4 × 128 and 1 × 512, the rows of ``bench_hybrid.capture_cases`` with the
final states ``c_state``, ``n_state``, ``m_state``: every state and every write in factored
form against a plain forward (target ≤ 1.10×), the materialised writes and per-position
states, effective attention. ``--mlstm`` replaces only that section of the result file.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import machine

from archscope_recurrent.models import RecurrentLM, RecurrentLMConfig
from archscope_recurrent.rnn import RNNBackend


def median_ms(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return times


def bench(cell: str, batch: int, seq: int, dim: int, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = RecurrentLM(
        RecurrentLMConfig(vocab_size=1000, d_model=dim, hidden_size=dim, num_layers=3, cell=cell)
    ).eval()
    backend = RNNBackend(model)
    ids = torch.randint(0, 1000, (batch, seq))
    hidden = [f"layer_{i}.hidden" for i in range(3)]

    def plain() -> None:
        with torch.no_grad():
            model(ids)

    def capture_hidden() -> None:
        backend.run(ids, capture=hidden)

    def capture_all() -> None:
        backend.run(ids, capture=[*hidden, "logits"])

    cases = {
        "plain forward": plain,
        "all layer_i.hidden": capture_hidden,
        "all layer_i.hidden + logits": capture_all,
    }
    for fn in cases.values():  # warm-up
        for _ in range(3):
            fn()
    samples: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(repeats):  # interleaved, so drift affects every case alike
        for name, fn in cases.items():
            samples[name] += median_ms(fn, 1)
    return {
        **{name: statistics.median(values) for name, values in samples.items()},
        **{f"min {name}": min(values) for name, values in samples.items()},
    }


MLSTM_HEADING = "## mLSTM (xLSTM) write sites and states"


def mlstm_section(repeats: int, threads: int) -> str:
    """The mLSTM rows (see the module's docstring) as a Markdown section."""
    import warnings

    from bench_hybrid import TARGET, capture_cases, rows_for

    from archscope import Backend
    from archscope_recurrent.testing import tiny_xlstm

    warnings.filterwarnings("ignore")
    model = tiny_xlstm(num_layers=4, width=128, vocab=256)
    backend = Backend.for_model(model)
    rows = []
    for batch, seq in ((4, 128), (1, 512)):
        ids = torch.randint(3, 256, (batch, seq), generator=torch.Generator().manual_seed(0))
        cases = capture_cases(backend, ids, ("c_state", "n_state", "m_state"))
        rows += rows_for("mLSTM × 4 (d 128)", cases, batch, seq, repeats)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return "\n".join(
        [
            MLSTM_HEADING,
            "",
            f"Machine: {machine.describe()}; torch threads: {threads}; load average when done: "
            f"{load}. `python benchmarks/bench_recurrent.py --mlstm`: median of {repeats} "
            "interleaved runs after warm-up (ms), ratios the medians of the ratios to the plain "
            "forward of runs made back to back. Final states: `c_state`, `n_state`, `m_state` "
            f"(the model's cache). Target for every state and every write in factored form: ≤ "
            f"{TARGET:.2f}× the plain forward.",
            "",
            "| model | batch × tokens | captured | ms | ratio to its plain forward |",
            "|---|---|---|---|---|",
            *rows,
            "",
        ]
    )


def main() -> None:
    parser = machine.parser(__doc__, "recurrent.md", repeats=100)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--mlstm", action="store_true", help="only the mLSTM section")
    parser.add_argument("--mlstm-repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.mlstm:  # keep the RNN table, replace the mLSTM section
        old = args.out.read_text() if args.out.exists() else ""
        head = old.split(MLSTM_HEADING)[0].rstrip("\n")
        section = mlstm_section(args.mlstm_repeats, args.threads)
        machine.write((head + "\n\n" if head else "") + section, args.out)
        return

    described = machine.describe()
    lines = [
        "# RNN backend: per-layer hidden states vs a plain forward",
        "",
        f"Machine: {described}.",
        f"3-layer RecurrentLM, d_model = hidden = {args.dim}, vocab 1000, batch {args.batch} × "
        f"{args.seq} tokens, no padding, {args.threads} torch thread(s); median of "
        f"{args.repeats} interleaved runs after 3 warm-up runs "
        "(`python benchmarks/bench_recurrent.py`).",
        "",
        "| cell | plain forward (ms) | all `layer_i.hidden` (ms) | ratio | "
        "hidden + logits (ms) | ratio | ratios of the fastest runs |",
        "|---|---|---|---|---|---|---|",
    ]
    for cell in ("gru", "lstm"):
        r = bench(cell, args.batch, args.seq, args.dim, args.repeats)
        base = r["plain forward"]
        lines.append(
            f"| {cell} | {base:.2f} | {r['all layer_i.hidden']:.2f} | "
            f"{r['all layer_i.hidden'] / base:.3f}× | {r['all layer_i.hidden + logits']:.2f} | "
            f"{r['all layer_i.hidden + logits'] / base:.3f}× | "
            f"{r['min all layer_i.hidden'] / r['min plain forward']:.3f}× / "
            f"{r['min all layer_i.hidden + logits'] / r['min plain forward']:.3f}× |"
        )
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    lines += [
        "",
        f"Load average when done: {load} (the machine may be shared: compare ratios, "
        "which are measured in the same interleaved loop).",
        "",
        "Target: ≤ 1.10× the plain forward. `all layer_i.hidden` stops after the last "
        "layer (no head); `hidden + logits` runs the whole model.",
        "",
        mlstm_section(args.mlstm_repeats, args.threads),
    ]
    text = "\n".join(lines)
    machine.write(text, args.out)


if __name__ == "__main__":
    main()
