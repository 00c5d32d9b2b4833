"""How well attribution patching ranks what exact patching finds: Pearson r between each
estimate and the exact sweep, for plain AtP, AtP* (the attention softmax of the patched
query-key logits recomputed exactly) and GradDrop (magnitudes, against |exact|), on the zoo's
trained models (the binding task), on the recall models shipped as test data (multi-query
associative recall, which they solve: held-out recall 0.999-1.0), and on random-weight models
of six families.

    python benchmarks/bench_atp.py [--pairs 16] [--recall-pairs 16] [--only LABEL,...]
        [--out results/atp.md]

Rows per model: the residual stream (RNN hidden state) x position, and where the model has
attention the keys and queries of each attention layer x position. The recall models' residual
rows start at the embedding (they have one or two layers: the cells that carry a binding sit
there). Each sweep's exact cells come from batched patched runs of the model itself; the
part-way patches of the recall rows end on their sweep's exact cell (checked).
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from machine import describe, parser, write

from archscope.methods.attribute import attention_node_sweep, attribution_patch
from archscope.methods.attribute._patch import _pearson  # the sweeps' own r, over held cells

warnings.filterwarnings("ignore")


def answer_metric(clean_ids: list[int], corrupted_ids: list[int]) -> Any:
    """Per row: logit of the clean answer minus the corrupted answer at the last real token."""
    good, bad = torch.tensor(clean_ids), torch.tensor(corrupted_ids)

    def metric(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(logits.shape[0])
        last = mask.long().cumsum(1).argmax(1)
        n = logits.shape[0] // len(good)  # patched runs repeat the batch
        at = logits[rows, last]
        return at[rows, good.repeat(n)] - at[rows, bad.repeat(n)]

    return metric


def zoo_case(name: str, pairs: int) -> tuple[Any, Any, Any, Any]:
    import archscope_zoo

    _model, tokenizer, backend = archscope_zoo.load(name)
    task = archscope_zoo.datasets("binding", pairs)
    clean = tokenizer(task.clean, return_tensors="pt", padding=True)
    corrupted = tokenizer(task.corrupted, return_tensors="pt", padding=True)
    good, bad = task.answer_ids(tokenizer)
    return backend, dict(clean), dict(corrupted), answer_metric(good, bad)


def random_case(family: str, pairs: int, seq: int = 12) -> tuple[Any, Any, Any, Any]:
    """A seeded random model; clean and corrupted differ in one early token; the metric is
    the logit difference of two fixed tokens at the last position."""
    import archscope

    if family in ("gpt2", "llama", "gpt_neox"):
        from archscope_transformer.testing import tiny_model

        model = tiny_model(family, n_layers=4)
    else:
        from archscope_mamba.testing import make_model

        model = make_model(family)
    backend = archscope.Backend.for_model(model)
    gen = torch.Generator().manual_seed(0)
    vocab = int(model.config.vocab_size)
    clean = torch.randint(4, vocab, (pairs, seq), generator=gen)
    corrupted = clean.clone()
    corrupted[:, 1] = torch.randint(4, vocab, (pairs,), generator=gen)
    ones = torch.ones_like(clean)
    return (
        backend,
        {"input_ids": clean, "attention_mask": ones},
        {"input_ids": corrupted, "attention_mask": ones},
        answer_metric([5] * pairs, [6] * pairs),
    )


ROOT = Path(__file__).resolve().parent.parent
#: held-out prompts: the recall tests use HELDOUT_SEED + 0..2, training seeds lie below it
RECALL_SEED_OFFSET = 3


def _recall_module() -> Any:
    """core/tests/test_write_sae_recall.py: the task (`mqar`), the fixtures and their loader."""
    tests = str(ROOT / "core" / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    import test_write_sae_recall

    return test_write_sae_recall


def recall_prompts(
    pairs: int, corrupt: str
) -> tuple[torch.Tensor, torch.Tensor, list[int], list[int]]:
    """``pairs`` held-out recall prompts ``k1 v1 ... k4 v4 q`` and their corrupted copies:
    ``corrupt="value"`` replaces the queried pair's value by another value (the corrupted
    answer); ``"key"`` swaps the queried pair's key with another pair's key (the query now finds
    that pair's value). Returns clean ids, corrupted ids, clean and corrupted answers."""
    rec = _recall_module()
    ids, answer, query = rec.mqar(pairs, rec.HELDOUT_SEED + RECALL_SEED_OFFSET)
    gen = torch.Generator().manual_seed(0)
    rows = torch.arange(pairs)
    corrupted = ids.clone()
    if corrupt == "value":
        first = rec.N_KEYS + 1  # values are first .. first + N_KEYS - 1
        shift = torch.randint(1, rec.N_KEYS, (pairs,), generator=gen)
        bad = first + (answer - first + shift) % rec.N_KEYS
        corrupted[rows, 2 * query + 1] = bad
    elif corrupt == "key":
        other = (query + torch.randint(1, rec.PAIRS, (pairs,), generator=gen)) % rec.PAIRS
        corrupted[rows, 2 * query] = ids[rows, 2 * other]
        corrupted[rows, 2 * other] = ids[rows, 2 * query]
        bad = ids[rows, 2 * other + 1]
    else:
        raise ValueError(f"corrupt={corrupt!r}: use 'value' or 'key'")
    return ids, corrupted, answer.tolist(), bad.tolist()


def recall_case(family: str, pairs: int, corrupt: str) -> tuple[Any, Any, Any, Any]:
    """A recall model, ``pairs`` prompts corrupted as ``corrupt`` says (`recall_prompts`); the
    metric: logit of the clean answer minus the corrupted answer at the query (last) position."""
    import os

    import archscope

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rec = _recall_module()
    if family in rec.HYBRID:
        from archscope_hybrid.testing import missing

        if missing(family):
            raise RuntimeError(str(missing(family)))
    model = rec._model(family)
    clean, corrupted, good, bad = recall_prompts(pairs, corrupt)
    ones = torch.ones_like(clean)
    with torch.no_grad():
        right = (model(clean).logits[:, -1].argmax(-1) == torch.tensor(good)).float().mean()
        moved = (model(corrupted).logits[:, -1].argmax(-1) == torch.tensor(bad)).float().mean()
    print(
        f"recall:{family} ({corrupt}): clean answered {float(right):.2f}, "
        f"corrupted gives its own answer {float(moved):.2f}",
        flush=True,
    )
    return (
        archscope.Backend.for_model(model),
        {"input_ids": clean, "attention_mask": ones},
        {"input_ids": corrupted, "attention_mask": ones},
        answer_metric(good, bad),
    )


def _abs(matrix: list[list[float | None]]) -> list[list[float | None]]:
    return [[None if v is None else abs(v) for v in row] for row in matrix]


def _early(matrix: list[list[float | None]]) -> list[list[float | None]]:
    """The sweep without its last position (the query's, where the last residual row is the
    whole answer): the cells that carry what an earlier token decides."""
    return [row[:-1] for row in matrix]


def largest_cell_ratio(sweep: Any) -> str:
    """Estimate / exact at the largest exact cell before the last position: 1 where the effect
    is linear, near 0 (or negative) where the estimate misses an all-or-nothing effect."""
    cells = [
        (abs(x), x, y)
        for ex, at in zip(_early(sweep.gap_restored), _early(sweep.attribution), strict=True)
        for x, y in zip(ex, at, strict=True)
        if x is not None and y is not None
    ]
    if not cells:
        return "–"
    _, x, y = max(cells)
    return f"{y / x:.2f} (of {x:.2g})"


#: how far the largest early cell is patched toward its clean value in `part_way`
ALPHAS = (0.25, 0.5, 0.75, 1.0)


def part_way(sweep: Any, backend: Any, clean: Any, corrupted: Any, metric: Any) -> str:
    """The largest exact cell before the last position patched part way: the corrupted value
    plus alpha x (clean - corrupted) at that site and position, for each alpha of `ALPHAS`, as
    a share of the gap; beside it AtP's line (alpha x its estimate). A straight line is what
    AtP assumes; a curve flat at first, then a jump, is an all-or-nothing effect."""
    from archscope import Edit

    (_, r, c) = max(
        (abs(x), r, c)
        for r, row in enumerate(_early(sweep.gap_restored))
        for c, x in enumerate(row)
        if x is not None
    )
    site = sweep.sites[r][c]
    assert clean["attention_mask"].all(), "part_way reads columns as positions: no padding"
    source = backend.run(clean, capture=[site]).activations[site]
    gap = sweep.clean_metric - sweep.corrupted_metric
    values = []
    for alpha in ALPHAS:

        def mix(value: torch.Tensor, alpha: float = alpha) -> torch.Tensor:
            out = value.clone()
            out[:, c] = value[:, c] + alpha * (source[:, c].to(value) - value[:, c])
            return out

        result = backend.run(corrupted, capture=["logits"], edits=[Edit.apply(site, mix)])
        value = float(metric(result.logits, corrupted["attention_mask"]).mean())
        values.append((value - sweep.corrupted_metric) / gap)
    exact, estimate = sweep.gap_restored[r][c], sweep.attribution[r][c]
    # the last point is the sweep's own exact cell, recomputed here
    assert abs(values[-1] - exact) < 1e-3 * max(1.0, abs(exact)), (values[-1], exact)
    curve = " / ".join(f"{v:.2f}" for v in values)
    line = " / ".join(f"{alpha * estimate:.2f}" for alpha in ALPHAS)
    return f"{sweep.rows[r]}, position {sweep.columns[c]} | {curve} | {line}"


def rows_for(
    label: str,
    backend: Any,
    clean: Any,
    corrupted: Any,
    metric: Any,
    embed: bool = False,
    curves: list[str] | None = None,
) -> list[str]:
    out = []

    def r(value: float | None) -> str:
        return "–" if value is None else f"{value:.3f}"

    def timed(fn: Any, **kw: Any) -> Any:
        start = time.perf_counter()
        return fn(backend, clean, corrupted, metric_fn=metric, **kw), time.perf_counter() - start

    def size(sweep: Any) -> str:
        """The gap and the largest exact cell (a share of the gap): a sweep whose cells are
        all at float noise has no ranking to recover."""
        biggest = max(abs(v) for row in sweep.gap_restored for v in row if v is not None)
        gap = sweep.clean_metric - sweep.corrupted_metric
        return f"{gap:.3g} | {biggest:.2g}"

    def early_r(sweep: Any) -> str:
        return r(_pearson(_early(sweep.gap_restored), _early(sweep.attribution)))

    def magnitude_r(sweep: Any, absolute: bool = False) -> str:
        """r of GradDrop (or, ``absolute``, of |AtP|) with |exact|, and in brackets without
        the last position: GradDrop helps where it beats |AtP| at ranking magnitudes."""
        exact = _abs(sweep.gap_restored)
        estimate = _abs(sweep.attribution) if absolute else sweep.attribution
        whole = _pearson(exact, estimate)
        return f"{r(whole)} ({r(_pearson(_early(exact), _early(estimate)))})"

    extra = {"embed": True} if embed else {}
    atp, _ = timed(attribution_patch, exact=True, **extra)
    try:
        gd, _ = timed(attribution_patch, exact=True, grad_drop=True, **extra)
        gd_r = magnitude_r(gd)
    except Exception as err:  # one layer, or a stacked RNN: no residual contributions to drop
        gd_r = f"n/a ({type(err).__name__})"
    if curves is not None:
        curves.append(f"| {label} | {part_way(atp, backend, clean, corrupted, metric)} |")
    where = backend.layer_names()[0].split(".")[1]
    out.append(
        f"| {label} | {'embedding + ' if embed else ''}{where} x position | "
        f"{sum(v is not None for row in atp.gap_restored for v in row)} | {size(atp)} | "
        f"{r(atp.correlation)} "
        f"| n/a (no softmax on this path) | {magnitude_r(atp, absolute=True)} | {gd_r} | – "
        f"| {early_r(atp)} | – | {largest_cell_ratio(atp)} | – |"
    )
    for node in ("key", "query"):
        try:
            plain, _ = timed(attention_node_sweep, node=node, estimator="atp")
        except Exception:
            break  # no attention
        star, _ = timed(attention_node_sweep, node=node, estimator="atp*")
        star_gd, _ = timed(attention_node_sweep, node=node, estimator="atp*", grad_drop=True)
        cells = sum(v is not None for row in star.gap_restored for v in row)
        out.append(
            f"| {label} | attention {node} nodes x position | {cells} | {size(star)} | "
            f"{r(plain.correlation)} | "
            f"{r(star.correlation)} | {magnitude_r(star, absolute=True)} | – "
            f"| {magnitude_r(star_gd)} | {early_r(plain)} "
            f"| {early_r(star)} | {largest_cell_ratio(plain)} | {largest_cell_ratio(star)} |"
        )
    return out


def main() -> None:
    p = parser(__doc__, "atp.md", repeats=1)
    p.add_argument("--pairs", type=int, default=16, help="prompts of the zoo and random rows")
    p.add_argument(
        "--recall-pairs", type=int, default=16, help="prompts of the recall rows (9 tokens each)"
    )
    p.add_argument("--only", default="", help="comma-separated labels to run (default all)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cases: list[tuple[str, Any, bool]] = [
        (f"zoo:{n}", lambda n=n: zoo_case(n, args.pairs), False)
        for n in ("transformer", "mamba", "lstm")
    ]
    cases += [
        (f"recall:{f} ({c})", lambda f=f, c=c: recall_case(f, args.recall_pairs, c), True)
        for f in _recall_module().FAMILIES  # the recall fixtures the tests ship
        for c in ("value", "key")
    ]
    cases += [
        (f"random {f}", lambda f=f: random_case(f, args.pairs), False)
        for f in ("gpt2", "llama", "gpt_neox", "mamba", "mamba2", "bamba")
    ]
    lines = [
        "# AtP, AtP* and GradDrop against exact patching",
        "",
        f"Machine: {describe()}.",
        "",
        "Pearson r over every cell of the sweep. AtP and AtP* are signed estimates of the exact "
        "effect; GradDrop estimates magnitudes and is correlated with |exact|, beside the "
        "magnitude of the plain estimate (|AtP|, or |AtP*| on attention nodes) against |exact|: "
        "GradDrop helps where it ranks magnitudes better. AtP* = the "
        "query-key softmax fix; AtP*+GradDrop = both, as in Kramár et al. 2024. 'last position "
        "left out': the same r without the last position's cells (the query's, where the last "
        "residual row is the whole answer); in brackets in the GradDrop columns. 'estimate / "
        "exact': at the largest exact cell before the last position (1: linear there).",
        "",
        "| model | nodes | cells | gap | max abs exact cell (share of gap) | r AtP | r AtP* "
        "| r abs AtP (abs AtP* on attention) vs abs | r AtP+GradDrop (vs abs) "
        "| r AtP*+GradDrop (vs abs) "
        "| r AtP, last position left out | r AtP*, last position left out "
        "| AtP estimate / exact | AtP* estimate / exact |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    if args.only:
        wanted = args.only.split(",")
        cases = [case for case in cases if case[0] in wanted or case[0].split(" (")[0] in wanted]
    curves: list[str] = []
    for label, make, embed in cases:
        start = time.perf_counter()
        try:
            backend, clean, corrupted, metric = make()
        except RuntimeError as err:  # a family the installed transformers cannot build
            lines.append(f"| {label} | skipped: {err} |")
            continue
        lines += rows_for(
            label, backend, clean, corrupted, metric, embed=embed, curves=curves if embed else None
        )
        print(label, f"{time.perf_counter() - start:.1f} s", flush=True)
    if curves:
        lines += [
            "",
            "The largest exact cell before the last position of each recall row's residual "
            "sweep, patched part way (the corrupted value + alpha x (clean - corrupted), alpha "
            f"{', '.join(map(str, ALPHAS))}), as a share of the gap, beside AtP's straight line:",
            "",
            "| model | cell | exact | AtP |",
            "|---|---|---|---|",
            *curves,
        ]
    lines.append("")
    write("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
