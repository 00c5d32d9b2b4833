"""Side-by-side benchmarks of archscope against the libraries users would pick instead.

    .venv/bin/python benchmarks/runner.py [--device cpu|cuda] [--only 1,3] [--quick]
                                          [--venvs DIR] [--rounds N] [--out FILE]

Each contender runs in its own process (``worker.py``), in its own virtual environment for the
peers (created from ``requirements/*.txt`` on first use, torch installed first so pip never picks
another build). Every process loads the same saved random-weight model and the same inputs; the
runner compares what each library returns with archscope's output (max abs difference) and
refuses to time a contender that returns something else. Timings are interleaved: in each round
every process times a plain forward of its own copy of the model and then the contender, one
process after the other, so load from other programs hits all alike; the ratio reported is the
median of these paired ratios. Peak memory is the ``ru_maxrss`` of each contender's process,
read right after its first run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TORCH = "torch==2.13.0"
TOLERANCE = 2e-4  # float32 kernels differ (eager vs SDPA attention) by ~1e-6 relative

#: Peer environments: name -> (requirements file, module whose import proves it works).
VENVS = {
    "tl": ("tl.txt", "transformer_lens"),
    "nnsight": ("nnsight.txt", "pyvene"),
    "tunedlens": ("tunedlens.txt", "tuned_lens"),
    "archscope02": ("archscope02.txt", "archscope.bench"),
    "saelens": ("saelens.txt", "sae_lens"),
}
#: contender -> (environment, distributions whose versions the table shows, label).
CONTENDERS = {
    "plain": ("main", (), "plain forward (transformers)"),
    "archscope": ("main", ("archscope", "archscope-transformer", "archscope-mamba"), "archscope"),
    "archscope02": ("archscope02", ("archscope",), "archscope 0.2.2"),
    "archscope_02api": (
        "main",
        ("archscope", "archscope-transformer"),
        "archscope, 0.2's benchmark() call",
    ),
    "transformer_lens": ("tl", ("transformer-lens",), "TransformerLens (TransformerBridge)"),
    "nnsight": ("nnsight", ("nnsight",), "nnsight"),
    "pyvene": ("nnsight", ("pyvene",), "pyvene"),
    "tuned_lens": ("tunedlens", ("tuned-lens",), "tuned-lens LogitLens"),
    "tuned_lens_train": ("tunedlens", ("tuned-lens",), "tuned-lens TunedLens (its train recipe)"),
    "archscope_atp": ("main", ("archscope",), "archscope attribution patching (AtP)"),
    "sae_lens": ("saelens", ("sae-lens",), "SAELens (SAETrainer)"),
    "sae_lens_export": ("saelens", ("sae-lens",), "archscope SAE loaded by SAELens"),
}


class BenchError(RuntimeError):
    """A benchmark that cannot give a fair number (unequal outputs, a failed environment)."""


@dataclass
class Workload:
    number: int
    key: str
    title: str
    model: str  # key of MODELS
    batch: int
    seq: int
    sites: list[str]
    contenders: list[str]
    logits: bool = False
    stop_after: int | None = None
    #: contender -> {site: why it differs by design}; other differences refuse the contender.
    waive: dict[str, dict[str, str]] = field(default_factory=dict)
    target: str = ""
    rounds: int | None = None  # fewer for long workloads
    #: keys compared with archscope's (None: every key archscope returns)
    compare_keys: list[str] | None = None
    untimed: list[str] = field(default_factory=list)  # checked only
    extra: dict[str, Any] = field(default_factory=dict)  # passed to the workers
    note: str = ""


@dataclass
class Row:
    contender: str
    label: str
    versions: dict[str, str] = field(default_factory=dict)
    max_diff: float | None = None
    note: str = ""
    times: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    rss_peak_mb: float | None = None
    rss_added_mb: float | None = None
    excluded: str = ""

    @property
    def version(self) -> str:
        """The contender's own distributions (torch and transformers are the same for all)."""
        return (
            ", ".join(
                f"{k} {v}" for k, v in self.versions.items() if k not in ("torch", "transformers")
            )
            or "-"
        )


# --------------------------------------------------------------------------- pure parts


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--only", default="", help="comma-separated workload numbers (1-9)")
    parser.add_argument(
        "--quick", action="store_true", help="small batches and 3 rounds: a smoke run of every path"
    )
    parser.add_argument(
        "--rounds", type=int, default=None, help="timed rounds per workload (default 5, --quick 3)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per process (1: least disturbed by other programs)",
    )
    parser.add_argument(
        "--venvs",
        type=Path,
        default=Path(os.environ.get("ARCHSCOPE_BENCH_VENVS", HERE / ".venvs")),
        help="folder of the peers' environments (created when missing); env ARCHSCOPE_BENCH_VENVS",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="Markdown file for the tables (default: print only)"
    )
    args = parser.parse_args(argv)
    try:
        args.only = sorted({int(x) for x in args.only.split(",") if x.strip()})
    except ValueError:
        parser.error(f"--only takes workload numbers like 1,3,9, got {args.only!r}")
    if any(n not in range(1, 10) for n in args.only):
        parser.error(f"--only: workloads are numbered 1-9, got {args.only}")
    args.rounds_given = args.rounds is not None  # an explicit --rounds applies to every workload
    if args.rounds is None:
        args.rounds = 3 if args.quick else 5
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args


def compare(
    reference: dict[str, Any],
    candidate: dict[str, Any],
    waive: dict[str, str] | None = None,
    tolerance: float = TOLERANCE,
) -> tuple[float, list[str]]:
    """Max abs difference of ``candidate`` against ``reference`` over the reference's keys.
    Raises BenchError naming the first site that is missing, shaped differently or differs by
    more than ``tolerance``, unless that site is waived; returns the notes on waived sites."""
    waive = waive or {}
    worst, notes = 0.0, []
    for key, ref in reference.items():
        if key not in candidate:
            if key in waive:
                notes.append(f"{key}: not returned ({waive[key]})")
                continue
            raise BenchError(f"missing {key!r}; returned {sorted(candidate)}")
        got = candidate[key]
        if tuple(got.shape) != tuple(ref.shape):
            raise BenchError(f"{key}: shape {tuple(got.shape)}, expected {tuple(ref.shape)}")
        got, ref = got.float(), ref.float()
        if not bool((got.isnan() == ref.isnan()).all()):
            raise BenchError(f"{key}: NaN at other places than archscope's")
        finite = ~ref.isnan()
        if not bool(finite.any()):
            raise BenchError(f"{key}: no finite values to compare (all NaN)")
        diff = float((got[finite] - ref[finite]).abs().max())
        if diff > tolerance:
            if key in waive:
                notes.append(f"{key} differs by {diff:.3g} ({waive[key]})")
                continue
            raise BenchError(
                f"{key} differs from archscope's by {diff:.3g} (tolerance {tolerance:g})"
            )
        worst = max(worst, diff)
    return worst, notes


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def format_table(rows: Sequence[Row]) -> str:
    """One Markdown table: timings, paired ratios to the plain forward, memory, equality."""
    lines = [
        "| contender | version | max abs diff vs archscope | median ms | min–max ms | "
        "ratio to plain forward | its time / archscope's | peak RSS MB | "
        "RSS added by the run MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    ours = [statistics.median(r.times) for r in rows if r.contender == "archscope" and r.times]
    for row in rows:
        version = row.version
        diff = "-" if row.max_diff is None else f"{row.max_diff:.2g}"
        if row.excluded:
            lines.append(
                f"| {row.label} | {version} | {diff} | not timed: {row.excluded} | | | | | |"
            )
            continue
        if row.times:
            med = _ms(statistics.median(row.times))
            span = f"{_ms(min(row.times))}–{_ms(max(row.times))}"
            ratio = f"{statistics.median(row.ratios):.3f}"
            versus = f"{statistics.median(row.times) / ours[0]:.2f}×" if ours else "-"
        else:
            med = span = ratio = versus = "-"
        peak = "-" if row.rss_peak_mb is None else f"{row.rss_peak_mb:.0f}"
        added = "-" if row.rss_added_mb is None else f"{row.rss_added_mb:.0f}"
        lines.append(
            f"| {row.label} | {version} | {diff} | {med} | {span} | {ratio} | "
            f"{versus} | {peak} | {added} |"
        )
    notes = [f"- {row.label}: {row.note}" for row in rows if row.note]
    return "\n".join(lines + (["", *notes] if notes else []))


def rounds_of(work: Any, args: argparse.Namespace) -> int:
    """The timed rounds of ``work``: an explicit ``--rounds``, else the workload's own (fewer
    for long ones), else the default."""
    if getattr(args, "rounds_given", False):
        return int(args.rounds)
    return int(work.rounds or args.rounds)


def round_robin(n_workers: int, rounds: int) -> list[list[int]]:
    """The order of the workers in each round, rotated so no contender always goes first."""
    return [[(r + i) % n_workers for i in range(n_workers)] for r in range(rounds)]


# --------------------------------------------------------------------------- environments


def _quiet_pip(python: Path, *args: str) -> None:
    subprocess.run(
        [str(python), "-m", "pip", "-q", "--disable-pip-version-check", "install", *args],
        check=True,
    )


def ensure_venv(name: str, root: Path) -> Path:
    """The python of peer environment ``name`` under ``root``, created if it does not work."""
    if name == "main":
        return Path(sys.executable)
    requirements, module = VENVS[name]
    python = root / name / "bin" / "python"
    if (
        python.exists()
        and subprocess.run([str(python), "-c", f"import {module}"], capture_output=True).returncode
        == 0
    ):
        return python
    print(f"creating environment {root / name} ({requirements})", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(root / name)], check=True)
    _quiet_pip(python, TORCH)  # first, so the peer's own requirement cannot pull another build
    _quiet_pip(python, TORCH, "-r", str(HERE / "requirements" / requirements))
    return python


# --------------------------------------------------------------------------- processes


class Worker:
    """A contender's process; requests and replies are JSON lines. ``send`` and ``receive``
    are separate so that several processes can start (import, load) at the same time."""

    def __init__(self, python: Path, spec: dict[str, Any], log: Path) -> None:
        self.log = log.open("w")
        self.proc = subprocess.Popen(
            [str(python), str(HERE / "worker.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            cwd=HERE,
        )
        self.setup: dict[str, Any] = {}
        self.send({"op": "setup", "spec": spec})

    def send(self, request: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()

    def receive(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise BenchError(f"worker exited (see {self.log.name})")
        reply: dict[str, Any] = json.loads(line)
        if not reply.get("ok"):
            raise BenchError(reply.get("error", "failed"))
        return reply

    def ask(self, request: dict[str, Any]) -> dict[str, Any]:
        self.send(request)
        return self.receive()

    def close(self) -> None:
        try:
            self.ask({"op": "exit"})
        except (BenchError, BrokenPipeError, ValueError):
            pass
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


# --------------------------------------------------------------------------- models, workloads


def build_models(folder: Path, device: str) -> dict[str, Path]:
    """Random-weight models (seeded) saved once; every process loads these same weights."""
    import torch
    import transformers

    from archscope_mamba.testing import make_model

    configs = {
        "gpt2": transformers.GPT2Config(n_layer=6, n_embd=256, n_head=8),
        "llama": transformers.LlamaConfig(
            num_hidden_layers=12,
            hidden_size=256,
            intermediate_size=688,
            num_attention_heads=8,
            num_key_value_heads=8,
            vocab_size=32000,
        ),
    }
    paths = {}
    for name, config in configs.items():
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config)
        paths[name] = folder / name
        model.save_pretrained(paths[name])
    # A word-level tokenizer for the profiles (their texts are English words; the model is
    # random, so only the cost matters), saved next to the GPT-2 weights.
    from archscope.apps.bench import generic_tasks
    from archscope_transformer.testing import tiny_tokenizer

    tasks = generic_tasks(None)
    texts = [t for d in (*tasks.probes.values(), tasks.texts) for t in (d.texts or [])]
    if tasks.contrast is not None:
        texts += [*tasks.contrast.clean, *tasks.contrast.corrupted]
    words = sorted({w for text in texts for w in text.split()})
    tokenizer = tiny_tokenizer(words=words)
    tokenizer.pad_token = "<pad>"
    torch.manual_seed(0)
    make_model("mamba", size="bench").save_pretrained(folder / "mamba")
    paths["mamba"] = folder / "mamba"
    for path in paths.values():  # some peers load a tokenizer with the model
        tokenizer.save_pretrained(path)
    return paths


N_LAYERS = {"gpt2": 6, "llama": 12, "mamba": 4}
VOCAB = {"gpt2": 50257, "llama": 32000, "mamba": 256}


def residuals(model: str) -> list[str]:
    return [f"layer_{i}.residual" for i in range(N_LAYERS[model])]


def workloads(quick: bool) -> list[Workload]:
    b, t = (4, 64) if quick else (16, 128)
    last_norm = "0.2.2 returns transformers' last hidden state, taken after the final norm"
    extraction = ["archscope", "transformer_lens", "nnsight", "pyvene", "archscope02"]
    return sorted(
        [
            Workload(
                1,
                "gpt2_resid",
                "all residual sites + logits, 6-layer GPT-2 (d_model 256)",
                "gpt2",
                b,
                t,
                residuals("gpt2"),
                extraction,
                logits=True,
                waive={
                    "archscope02": {
                        "layer_5.residual": last_norm,
                        "logits": "0.2.2 returns no logits",
                    }
                },
                target="≤ 1.02× plain forward and ≤ the fastest peer",
            ),
            Workload(
                2,
                "gpt2_early",
                "layer_1.residual only (stop after block 1), 6-layer GPT-2",
                "gpt2",
                b,
                t,
                ["layer_1.residual"],
                ["archscope", "transformer_lens", "nnsight", "archscope02"],
                stop_after=1,
                target="≤ 0.33× plain forward",
            ),
            Workload(
                3,
                "llama_resid",
                "all residual sites + logits, 12-layer Llama (d_model 256)",
                "llama",
                b,
                t,
                residuals("llama"),
                extraction,
                logits=True,
                waive={
                    "archscope02": {
                        "layer_11.residual": last_norm,
                        "logits": "0.2.2 returns no logits",
                    }
                },
            ),
            Workload(
                4,
                "mamba_ssm",
                "ssm_state and per-token ssm_states of every layer, 4-layer Mamba (d_model 128)",
                "mamba",
                8 if not quick else 2,
                64 if not quick else 32,
                [f"layer_{i}.{role}" for i in range(4) for role in ("ssm_state", "ssm_states")],
                ["archscope", "transformer_lens"],
            ),
            Workload(
                5,
                "patching",
                "layer × position activation patching sweep, 6-layer GPT-2",
                "gpt2",
                4 if not quick else 2,
                64 if not quick else 16,
                [],
                ["archscope", "transformer_lens", "archscope_atp"],
                rounds=2,
                compare_keys=["gap_restored"],
                extra={"rows": 64},
                target="≥ 4× faster than TransformerLens's sweep; attribution patching ≥ 100×",
                note="Residual stream before every block (TransformerLens's `resid_pre`, "
                "archscope's `patch_sweep(embed=True)` rows) × every position; metric: "
                "the clean run's top last token's logit minus the corrupted run's, as "
                "the fraction of the gap restored (archscope's default, written out "
                "for TransformerLens). Corrupted inputs: the clean ids with 4 positions "
                "replaced, the last among them. AtP is an estimate and is not compared.",
            ),
            Workload(
                8,
                "profile",
                "the profile (archscope.apps.bench) of the 6-layer GPT-2",
                "gpt2",
                1,
                8,
                [],
                ["archscope", "archscope_02api", "archscope02"],
                rounds=1 if quick else 2,
                target="full profile ≤ archscope 0.2.2's time; 0.2's benchmark() call ≥ 5× "
                "faster than archscope 0.2.2",
                note="Each library's own profile of the same model and tokenizer (word-level, "
                "the model is random so only the cost matters). 'archscope': the full 0.3 "
                "profile (`benchmark(..., full=True)` = `profile_backend`: every layer, "
                "tuned lens, patching map, untrained control); 'archscope, 0.2's "
                "benchmark() call': what 0.2 computed (a probe per task at 0.2's layers, "
                "circuits, dense and rank-1 SAEs). They compute different things, so no "
                "outputs are compared. The 'ratio' column divides by a plain forward of "
                "1 × 8 tokens and means little here.",
            ),
            *(
                Workload(
                    7,
                    f"sae_{kind}",
                    f"SAE training throughput, {kind} SAE (d_in 256, "
                    f"4096 features, batch 4096{', k 32' if kind == 'topk' else ''}), "
                    "cached layer_3.residual activations of the 6-layer GPT-2",
                    "gpt2",
                    0,
                    0,
                    [],
                    ["archscope", "sae_lens", "sae_lens_export"],
                    rounds=2 if quick else 3,
                    compare_keys=["reconstruction"],
                    untimed=["sae_lens_export"],
                    extra={
                        "sae_type": kind,
                        "features": 4096,
                        "batch": 4096,
                        "k": 32,
                        "lr": 1e-3,
                        "l1": 0.2,
                        "check_epochs": 2 if quick else 20,
                    },
                    target="≥ 1.5× SAELens throughput" if kind == "topk" else "",
                    note="Each timed run trains a fresh SAE for one epoch over the same cached "
                    "activations; 'plain forward' here is a plain PyTorch training loop "
                    "of the same architecture (dense matmuls, Adam), the in-run "
                    "yardstick. The archscope SAE is exported with "
                    "`archscope.methods.sae.export_saelens` and loaded by SAELens "
                    "(`SAE.load_from_disk`): its row compares SAELens's reconstruction "
                    "with archscope's on held-out activations. Results: the first, untimed "
                    "run of each trainer trains the same SAE for more epochs (the number "
                    "in the notes) and reports held-out explained variance and L0.",
                )
                for kind in ("topk", "standard")
            ),
            Workload(
                6,
                "logit_lens",
                "logit lens over all layers, 6-layer GPT-2",
                "gpt2",
                4 if not quick else 2,
                64 if not quick else 32,
                residuals("gpt2"),
                ["archscope", "tuned_lens"],
            ),
        ],
        key=lambda w: w.number,
    )


def scaling_sizes(quick: bool) -> list[tuple[int, int]]:
    """(batch, seq): the batch grows at a fixed length, then the length at a fixed batch."""
    if quick:
        return [(1, 64), (2, 64), (4, 64), (2, 32), (2, 128)]
    return [(2, 128), (4, 128), (8, 128), (16, 128), (4, 64), (4, 256), (4, 512)]


def save_inputs(path: Path, model: str, batch: int, seq: int) -> None:
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB[model], (batch, seq), generator=generator)
    corrupted = ids.clone()  # for the patching sweep: 4 positions of every row replaced,
    # the last among them, so the clean and corrupted runs' top next tokens differ
    where = torch.cat([torch.randperm(seq - 1, generator=generator)[:3], torch.tensor([seq - 1])])
    corrupted[:, where] = torch.randint(0, VOCAB[model], (batch, len(where)), generator=generator)
    save_file(
        {"input_ids": ids, "attention_mask": torch.ones_like(ids), "corrupted_ids": corrupted},
        str(path),
    )


def cache_activations(path: Path, model_dir: Path, n_train: int, n_eval: int) -> None:
    """layer_3.residual of the GPT-2 over random tokens, shuffled: the SAE training data
    every trainer reads."""
    import torch
    import transformers
    from safetensors.torch import save_file

    import archscope

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    backend = archscope.Backend.for_model(model)
    seq = 128
    n_rows = -(-(n_train + n_eval) // seq)
    ids = torch.randint(0, VOCAB["gpt2"], (n_rows, seq), generator=torch.Generator().manual_seed(2))
    chunks = [
        backend.run(ids[i : i + 32], capture=["layer_3.residual"])["layer_3.residual"]
        for i in range(0, n_rows, 32)
    ]
    acts = torch.cat(chunks).reshape(-1, 256)
    acts = acts[torch.randperm(len(acts), generator=torch.Generator().manual_seed(3))]
    save_file(
        {
            "train": acts[:n_train].contiguous(),
            "eval": acts[n_train : n_train + n_eval].contiguous(),
        },
        str(path),
    )


def _prepare_inputs(
    work: Workload, args: argparse.Namespace, models: dict[str, Path], tmp: Path
) -> Path:
    inputs = tmp / f"{work.key}.inputs.safetensors"
    if work.key.startswith("sae"):
        acts = tmp / "sae.activations.safetensors"
        if not acts.exists():
            cache_activations(acts, models["gpt2"], 4096 * (2 if args.quick else 8), 2048)
        work.extra["acts"] = str(acts)
    save_inputs(inputs, work.model, max(work.batch, 1), max(work.seq, 1))
    return inputs


class Session:
    """The contenders' processes of one workload and what they reported."""

    def __init__(
        self, work: Workload, args: argparse.Namespace, tmp: Path, plain: bool = True
    ) -> None:
        self.work, self.args, self.tmp = work, args, tmp
        # plain: a plain forward in its own process, the yardstick of timed workloads
        self.contenders = ["plain", *work.contenders] if plain else list(work.contenders)
        self.rows = {name: Row(name, CONTENDERS[name][2]) for name in self.contenders}
        self.workers: dict[str, Worker] = {}
        self.outputs: dict[str, dict[str, Any]] = {}

    def fail(self, name: str, error: Exception, what: str = "failed") -> None:
        self.rows[name].excluded = f"{what}: {error}"[:300]
        print(f"  {name}: {self.rows[name].excluded}", flush=True)
        if name in self.workers:
            self.workers.pop(name).close()

    def start(self, models: dict[str, Path], inputs: Path, pythons: dict[str, Path]) -> None:
        """All processes start (import, load the model) at once."""
        work, args = self.work, self.args
        for name in self.contenders:
            env, dists, _ = CONTENDERS[name]
            spec = {
                "workload": work.key,
                "contender": name,
                "model_dir": str(models[work.model]),
                "inputs": str(inputs),
                "device": args.device,
                "threads": args.threads,
                "sites": work.sites,
                "logits": work.logits,
                "stop_after": work.stop_after,
                "dists": list(dists),
                "tmp": str(self.tmp),
                **work.extra,
            }
            try:
                pythons[env] = pythons.get(env) or ensure_venv(env, args.venvs)
                self.workers[name] = Worker(pythons[env], spec, self.tmp / f"{work.key}.{name}.log")
            except (subprocess.CalledProcessError, OSError) as error:
                self.fail(name, error)
        for name in list(self.workers):
            try:
                self.workers[name].setup = self.workers[name].receive()
                self.rows[name].versions = self.workers[name].setup["versions"]
            except BenchError as error:
                self.fail(name, error)

    def first_calls(self) -> None:
        """At once too (peak memory is per process); archscope's first, since a contender
        may read what it wrote (the SAE export)."""
        from safetensors.torch import load_file

        order = sorted(self.workers, key=lambda n: n != "archscope")
        for group in (order[:1], order[1:]):
            for name in group:
                path = self.tmp / f"{self.work.key}.{name}.st"
                self.workers[name].send({"op": "check", "path": str(path)})
            for name in group:
                try:
                    reply = self.workers[name].receive()
                except BenchError as error:
                    self.fail(name, error)
                    continue
                row = self.rows[name]
                row.rss_peak_mb = reply["rss_peak_mb"]
                row.rss_added_mb = reply["rss_peak_mb"] - reply["rss_before_mb"]
                self.outputs[name] = load_file(str(self.tmp / f"{self.work.key}.{name}.st"))
                row.note = "; ".join(f"{k}: {v}" for k, v in reply.get("report", {}).items())

    def check(self) -> None:
        """Every contender's output against archscope's; unequal ones are not timed."""
        work = self.work
        reference = self.outputs.get("archscope")
        if reference is None and work.compare_keys is not None:
            reference = {}  # the peers are still timed against the plain yardstick
        if reference is None:
            raise BenchError(
                f"workload {work.number}: archscope itself failed "
                f"({self.rows['archscope'].excluded})"
            )
        for name, out in self.outputs.items():
            row = self.rows[name]
            keys = set(reference) if work.compare_keys is None else set(work.compare_keys)
            if name == "plain":
                keys &= {"logits"}  # a plain forward returns only what the model returns
            if work.compare_keys is not None:
                keys &= set(out)  # contenders with no comparable output are not compared
            ref = {k: v for k, v in reference.items() if k in keys}
            try:
                if ref and name != "archscope":
                    row.max_diff, notes = compare(ref, out, work.waive.get(name))
                    row.note = "; ".join(x for x in [row.note, *notes] if x)
                elif name == "archscope":
                    row.max_diff = 0.0
            except BenchError as error:
                self.fail(name, error, "unequal output")
            print(f"  {name}: max abs diff {row.max_diff} {row.excluded}", flush=True)
        for name in work.untimed:
            if name in self.workers:
                self.workers.pop(name).close()

    def time(self) -> None:
        names = list(self.workers)
        for name in names:  # warm-up round (the first call above was the first warm-up)
            self.workers[name].ask({"op": "time"})
        for order in round_robin(len(names), rounds_of(self.work, self.args)):
            for i in order:
                reply = self.workers[names[i]].ask({"op": "time"})
                self.rows[names[i]].times.append(reply["case"])
                self.rows[names[i]].ratios.append(reply["case"] / reply["plain"])

    def close(self) -> None:
        for worker in self.workers.values():
            worker.close()


def run_workload(
    work: Workload,
    args: argparse.Namespace,
    models: dict[str, Path],
    tmp: Path,
    pythons: dict[str, Path],
) -> list[Row]:
    """Check every contender against archscope, then time the survivors round-robin."""
    inputs = _prepare_inputs(work, args, models, tmp)
    session = Session(work, args, tmp)
    try:
        session.start(models, inputs, pythons)
        session.first_calls()
        session.check()
        session.time()
    finally:
        session.close()
    return list(session.rows.values())


def run_scaling(
    args: argparse.Namespace, models: dict[str, Path], tmp: Path, pythons: dict[str, Path]
) -> tuple[str, list[tuple[int, int, Row, Row]]]:
    """Workload 9: archscope's all-residual extraction (stops after the last block) as the
    number of tokens grows; time and peak memory against a plain forward at each size."""
    results = []
    for batch, seq in scaling_sizes(args.quick):
        work = Workload(
            9, f"scaling_{batch}x{seq}", "", "gpt2", batch, seq, residuals("gpt2"), ["archscope"]
        )
        rows = run_workload(work, args, models, tmp, pythons)
        results.append((batch, seq, rows[0], rows[1]))
        print(f"  {batch}x{seq}: done", flush=True)
    lines = [
        "| batch × seq | tokens | plain forward ms | archscope all residuals ms | ratio | "
        "archscope µs per token | peak RSS plain MB | peak RSS archscope MB | "
        "RSS added by archscope's run MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for batch, seq, plain, ours in results:
        tokens = batch * seq
        med = statistics.median(ours.times)
        lines.append(
            f"| {batch} × {seq} | {tokens} | {_ms(statistics.median(plain.times))} | "
            f"{_ms(med)} | {statistics.median(ours.ratios):.3f} | "
            f"{med / tokens * 1e6:.0f} | {plain.rss_peak_mb:.0f} | "
            f"{ours.rss_peak_mb:.0f} | {ours.rss_added_mb:.0f} |"
        )
    return "\n".join(lines), results


def lens_rows(path: Path, seq: int = 64) -> None:
    """The zoo's training and held-out texts as token streams cut into rows of ``seq`` tokens
    (no padding): what both tuned-lens trainers read."""
    import torch
    from safetensors.torch import save_file

    from archscope.data import Dataset
    from archscope_zoo import corpus
    from archscope_zoo.source import load_tokenizer

    tokenizer = load_tokenizer()

    def rows(texts: list[str]) -> torch.Tensor:
        stream = [t for row in Dataset.from_texts(texts, tokenizer=tokenizer).ids() for t in row]
        return torch.tensor(stream[: len(stream) // seq * seq]).reshape(-1, seq)

    save_file(
        {"train_ids": rows(corpus.training_texts(400)), "eval_ids": rows(corpus.heldout_texts(96))},
        str(path),
    )


def time_to(curve: tuple[list[float], list[float]], target: float) -> float | None:
    """Training seconds until the held-out KL first reaches ``target`` (None: never)."""
    return next((t for t, kl in zip(*curve, strict=True) if kl <= target), None)


def run_lens_training(args: argparse.Namespace, tmp: Path, pythons: dict[str, Path]) -> str:
    """Workload (6), second part: both tuned lenses trained on the zoo's trained Llama-style
    transformer; the training time each needs to reach the held-out KL both reach."""
    from archscope_zoo.store import models_dir

    epochs = 4 if args.quick else 12
    work = Workload(
        6,
        "lens_training",
        "",
        "zoo",
        0,
        0,
        [],
        ["archscope", "tuned_lens_train"],
        compare_keys=[],
        extra={"epochs": epochs, "lr": 1e-2},
    )
    inputs = tmp / "lens_training.inputs.safetensors"
    lens_rows(inputs)
    session = Session(work, args, tmp, plain=False)
    try:
        session.start({"zoo": models_dir() / "transformer"}, inputs, pythons)
        session.first_calls()
    finally:
        session.close()
    curves = {
        name: (out["seconds"].tolist(), out["heldout_kl"].tolist())
        for name, out in session.outputs.items()
    }
    if len(curves) < 2:
        failed = "; ".join(f"{r.label}: {r.excluded}" for r in session.rows.values() if r.excluded)
        raise BenchError(f"a trainer failed: {failed}")
    target = max(min(kl) for _, kl in curves.values())
    lines = [
        f"Held-out KL target: {target:.4f} nats (the best both reach in {epochs} epochs).",
        "",
        "| trainer | version | held-out KL after each epoch | best | training s to "
        "the target | total training s | peak RSS MB |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for name, (seconds, kl) in curves.items():
        row = session.rows[name]
        reached = time_to((seconds, kl), target)
        lines.append(
            f"| {row.label} | {row.version}"
            f" | {' '.join(f'{k:.3f}' for k in kl)} | {min(kl):.4f} | "
            f"{'-' if reached is None else f'{reached:.2f}'} | {seconds[-1]:.2f} | "
            f"{row.rss_peak_mb or 0:.0f} |"
        )
    ours, theirs = (time_to(curves[n], target) for n in ("archscope", "tuned_lens_train"))
    if ours and theirs:
        lines += ["", f"archscope reaches the target in {theirs / ours:.1f}x less training time."]
    return "\n".join(lines)


def machine(device: str) -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"
    if device == "cuda":
        import torch

        text = f"{torch.cuda.get_device_name()}; " + text
    return text + f"; load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.time()
    pythons: dict[str, Path] = {}
    sections = [
        f"Machine: {machine(args.device)}; torch threads per process: {args.threads}; "
        f"device {args.device}; {args.rounds} interleaved rounds after one warm-up "
        "(fewer where a workload's section says so)."
    ]
    with tempfile.TemporaryDirectory(prefix="archscope-bench-") as name:
        tmp = Path(name)
        models = build_models(tmp, args.device)
        for work in workloads(args.quick):
            if args.only and work.number not in args.only:
                continue
            print(f"== ({work.number}) {work.title}", flush=True)
            try:
                rows = run_workload(work, args, models, tmp, pythons)
            except BenchError as error:
                print(f"  not measured: {error}", flush=True)
                sections.append(f"## ({work.number}) {work.title}\n\nNot measured: {error}")
                continue
            table = format_table(rows)
            if work.key.startswith("sae"):
                n = 4096 * (2 if args.quick else 8)
                table += "\n\nTraining throughput, tokens/s (median): " + ", ".join(
                    f"{r.label} {n / statistics.median(r.times):,.0f}" for r in rows if r.times
                )
            print(table, flush=True)
            sections.append(
                f"## ({work.number}) {work.title}\n\nbatch {work.batch} × "
                f"{work.seq} tokens, {rounds_of(work, args)} interleaved rounds. "
                f"{('Target: ' + work.target) if work.target else ''}"
                f" {work.note}\n\n{table}"
            )
        if not args.only or 6 in args.only:
            print("== (6) tuned-lens training time to equal held-out KL", flush=True)
            try:
                table = run_lens_training(args, tmp, pythons)
            except BenchError as error:
                table = f"Not measured: {error}"
            print(table, flush=True)
            sections.append(
                "## (6) tuned-lens training time to equal held-out KL (the zoo's "
                "2-layer Llama-style transformer, d_model 64)\n\n" + table
            )
        if not args.only or 9 in args.only:
            print("== (9) scaling", flush=True)
            table, _ = run_scaling(args, models, tmp, pythons)
            print(table, flush=True)
            sections.append(
                f"## (9) scaling: all residual sites of the 6-layer GPT-2 as "
                f"batch × sequence grows\n\n{table}"
            )
    command = "python benchmarks/runner.py " + " ".join(sys.argv[1:] if argv is None else argv)
    sections.append(
        f"Command: `{command.strip()}`; wall time {time.time() - started:.0f} s; "
        f"load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}."
    )
    text = "\n\n".join(sections) + "\n"
    if args.out:
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
