"""The standard per-model profile: held-out probe AUROC per layer, circuit scores, SAE quality,
logit vs tuned lens, an activation-patching heat map, recurrent-state variance, size and
runtime — one comparable `InterpProfile` per model, rendered alone or side by side.

Every number comes with controls: the same measurement on an untrained copy of the model
(same architecture, re-initialised with the profile's seed; `InterpProfile.untrained`) and,
for probes, on shuffled labels. Probes read one vector per text, pooled as ``pool`` says
(the last real token, the mean over real tokens, or one real-token position)."""

from __future__ import annotations

import math
import random
import time
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..data import Contrast, Dataset
from ..errors import ArchscopeError, InputError
from ..results import Result, pyplot

if TYPE_CHECKING:
    from ..backends import Backend


# -- what a profile runs on ---------------------------------------------------------------------
@dataclass
class ProfileTasks:
    """The data a profile uses: labelled probe sets (name → Dataset with 0/1 labels), texts for
    the SAE and the lenses, and contrast pairs for the patching heat map. A model source may
    supply its own (the zoo's planted attributes); otherwise `generic_tasks` is used."""

    probes: dict[str, Dataset]
    texts: Dataset
    contrast: Contrast | None = None
    source: str = "generic"
    #: Token ids the induction test draws its repeated blocks from (default: the vocabulary).
    induction_ids: list[int] | None = None
    #: Documents that repeat a span, and (first, second, length) of the span in each: the
    #: induction score is then read on them (`circuits.repeated_span_score`).
    induction_rows: list[list[int]] | None = None
    induction_spans: list[tuple[int, int, int]] | None = None
    #: The right next token after each clean / corrupted prompt: patching then measures the
    #: logit difference between them (else the runs' own top tokens).
    answers: tuple[list[int], list[int]] | None = None


_POSITIVE = ["good", "great", "wonderful", "happy", "excellent", "lovely", "nice", "pleasant"]
_NEGATIVE = ["bad", "awful", "terrible", "sad", "horrible", "nasty", "poor", "dreadful"]
_SUBJECTS = [
    "the film",
    "the meal",
    "the day",
    "my trip",
    "the book",
    "the song",
    "the show",
    "our visit",
]
_MATH = [
    "two plus three is five",
    "seven times six equals forty two",
    "the sum of four and five is nine",
    "ten minus three is seven",
    "eight divided by two is four",
    "the square of three is nine",
    "one plus one makes two",
    "six times two is twelve",
]
_PROSE = [
    "the cat sat on the warm mat",
    "she walked to the old market",
    "the river ran past the town",
    "he opened the window at dawn",
    "the bird sang in the tall tree",
    "they met at the small cafe",
    "the wind moved the dry leaves",
    "we read by the fire",
]


def generic_tasks(tokenizer: Any, n: int = 48, seed: int = 0) -> ProfileTasks:
    """Small English probe sets (sentiment: positive vs negative adjectives; math: arithmetic
    statements vs prose) for models without tasks of their own, seeded."""
    rng = random.Random(seed)
    sentiment, labels = [], []
    for i in range(n):
        word = rng.choice(_POSITIVE if i % 2 == 0 else _NEGATIVE)
        sentiment.append(f"{rng.choice(_SUBJECTS)} was {word}")
        labels.append(1 - i % 2)
    math_texts = [(_MATH if i % 2 == 0 else _PROSE)[(i // 2) % 8] for i in range(n)]
    math_labels = [1 - i % 2 for i in range(n)]
    texts = sentiment + math_texts
    clean = [f"{s} and it was" for s in _SUBJECTS[:4]]
    corrupt = [_same_length(tokenizer, c, ("is", "has", "got", "may")) for c in clean]
    return ProfileTasks(
        probes={
            "sentiment": Dataset.from_texts(sentiment, labels, tokenizer=tokenizer),
            "math": Dataset.from_texts(math_texts, math_labels, tokenizer=tokenizer),
        },
        texts=Dataset.from_texts(texts, tokenizer=tokenizer),
        contrast=Contrast(clean, corrupt, tokenizer=tokenizer),
    )


def _same_length(tokenizer: Any, clean: str, swaps: Sequence[str]) -> str:
    """``clean`` with its last word replaced by the first of ``swaps`` that gives as many
    tokens as ``clean`` (patching needs equal lengths; byte-level tokenizers count letters),
    else by the first swap."""
    from ..tokens import encode

    stem = clean.rsplit(" ", 1)[0]
    options = [f"{stem} {w}" for w in swaps]
    try:
        rows = encode(tokenizer, [clean, *options], warn_unknown=False)
    except ArchscopeError:
        return options[0]
    return next(
        (o for o, r in zip(options, rows[1:], strict=True) if len(r) == len(rows[0])), options[0]
    )


def _equal_length_pairs(profile: InterpProfile, pairs: list[tuple[Any, Any]]) -> list[int]:
    """The indices of the contrast pairs whose two sides tokenise to the same length (patching
    swaps activations position by position); the others are named in the profile's notes."""
    unequal = [i for i, (a, b) in enumerate(pairs) if len(a) != len(b)]
    if unequal:
        sizes = ", ".join(f"{len(pairs[i][0])}/{len(pairs[i][1])}" for i in unequal)
        profile.notes.append(
            f"patching: {len(unequal)} of {len(pairs)} contrast pairs tokenise to different "
            f"lengths (pairs {unequal}, clean/corrupted tokens {sizes}) and were left out"
            + (
                "; no pair is left, so the patching map is missing"
                if len(unequal) == len(pairs)
                else ""
            )
        )
    return [i for i in range(len(pairs)) if i not in unequal]


# -- the profile --------------------------------------------------------------------------------
@dataclass
class InterpProfile(Result):
    """One model's profile. The first fields are archscope 0.2's; the per-layer curves and
    tables after them feed the report's figures."""

    model_name: str
    arch_family: str
    n_params: int
    n_layers: int
    hidden_dim: int
    probe_sentiment_auroc: float | None = None
    probe_math_auroc: float | None = None
    induction_head_relative: float | None = None
    copy_accuracy: float | None = None
    concentration_relative: float | None = None
    sae_dense_recon: float | None = None
    sae_rank1_recon: float | None = None
    sae_better: str | None = None
    ssm_state_variance_ratio: float | None = None
    runtime_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    #: task -> held-out AUROC per layer site (train AUROC beside it in probe_train_auroc).
    probe_auroc: dict[str, dict[str, float]] = field(default_factory=dict)
    probe_train_auroc: dict[str, dict[str, float]] = field(default_factory=dict)
    #: SAE type -> {"explained_variance", "l0", "mse", "dead_fraction"} on held-out tokens.
    sae: dict[str, dict[str, float]] = field(default_factory=dict)
    sae_site: str | None = None
    #: per layer site: held-out KL(final || lens) of the logit lens and of the tuned lens.
    lens_kl: dict[str, dict[str, float]] = field(default_factory=dict)
    #: layers x positions gap restored by patching the clean residual into the corrupted run.
    patching: dict[str, Any] = field(default_factory=dict)
    per_head: dict[str, Any] = field(default_factory=dict)
    tasks: str = "generic"
    timings: dict[str, float] = field(default_factory=dict)
    #: How probes pool each text: "last" (last real token), "mean", or "position N".
    pool: str = "last"
    #: task -> held-out AUROC per layer with the labels shuffled (seeded): chance level.
    probe_auroc_shuffled: dict[str, dict[str, float]] = field(default_factory=dict)
    #: The same profile of an untrained copy (same architecture, re-initialised): the control
    #: beside every number. None when controls were not asked for.
    untrained: InterpProfile | None = None
    #: Models with state-write sites: the write SAE's substitution test (site, win rates,
    #: per-atom rates, closed-form vs measured logit shifts); empty otherwise.
    write_sae: dict[str, Any] = field(default_factory=dict)

    def to_markdown(self) -> str:
        return profile_to_markdown(self)

    def figure(self) -> Any:
        return comparison_figure([self])


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def _untrained_value(p: InterpProfile, get: Callable[[InterpProfile], Any]) -> Any:
    return get(p.untrained) if p.untrained is not None else None


def _with_control(p: InterpProfile, get: Callable[[InterpProfile], Any], digits: int = 3) -> str:
    """``value (untrained value)``, or the value alone without a control."""
    value = get(p)
    if p.untrained is None:
        return _fmt(value, digits)
    return f"{_fmt(value, digits)} (untrained {_fmt(get(p.untrained), digits)})"


def _best_probe(p: InterpProfile, task: str) -> float | None:
    values = [v for v in p.probe_auroc.get(task, {}).values() if math.isfinite(v)]
    return max(values) if values else None


def _probe_cell(p: InterpProfile) -> str:
    parts = []
    for task in p.probe_auroc:
        text = f"{task} {_fmt(_best_probe(p, task))}"
        extra = []
        if p.untrained is not None:
            extra.append(f"untrained {_fmt(_best_probe(p.untrained, task))}")
        shuffled = [v for v in p.probe_auroc_shuffled.get(task, {}).values() if math.isfinite(v)]
        if shuffled:
            extra.append(f"shuffled labels {_fmt(max(shuffled))}")
        parts.append(text + (f" ({', '.join(extra)})" if extra else ""))
    return "; ".join(parts) or "-"


def _patch_flow(p: InterpProfile) -> tuple[str | None, str | None] | None:
    """Where patching finds the contrast (mean over pairs >= half the gap): the last row that
    still holds it on the first changed token, and the first row that holds it on the last
    token. None without a heat map."""
    patch = p.patching
    matrix = patch.get("matrix") if patch else None
    if not matrix:
        return None
    rows = patch.get("rows", [])
    last = len(matrix[0]) - 1
    take_over = next((rows[r] for r in range(len(matrix)) if _finite(matrix[r][last]) >= 0.5), None)
    changed = patch.get("changed") or []
    held = None
    if changed and changed[0] != last:
        kept = [rows[r] for r in range(len(matrix)) if _finite(matrix[r][changed[0]]) >= 0.5]
        held = kept[-1] if kept else None
    return held, take_over


def _patch_cell(p: InterpProfile) -> str:
    def text(q: InterpProfile) -> str:
        flow = _patch_flow(q)
        if flow is None:
            return "-"
        return " / ".join(_row_text(r) if r is not None else "none" for r in flow)

    if not p.patching:
        return "-"
    out = text(p)
    if p.untrained is not None and p.untrained.patching:
        out += f" (untrained {text(p.untrained)})"
    return out + f"; {p.patching.get('n_pairs', 1)} pairs"


_HEADLINE: list[tuple[str, Callable[[InterpProfile], str]]] = [
    ("parameters", lambda p: f"{p.n_params:,}"),
    ("layers", lambda p: str(p.n_layers)),
    ("hidden size", lambda p: str(p.hidden_dim)),
    ("probe AUROC, best layer (held-out)", _probe_cell),
    ("induction (x chance)", lambda p: _with_control(p, lambda q: q.induction_head_relative, 1)),
    ("copy accuracy", lambda p: _with_control(p, lambda q: q.copy_accuracy)),
    ("next-token concentration", lambda p: _with_control(p, lambda q: q.concentration_relative)),
    (
        "SAE explained variance (dense / rank-1 / TopK)",
        lambda p: _with_control(
            p,
            lambda q: " / ".join(
                _fmt(q.sae.get(t, {}).get("explained_variance")) for t in ("dense", "rank1", "topk")
            ),
        ),
    ),
    (
        "SAE L0 (dense / rank-1 / TopK)",
        lambda p: " / ".join(
            _fmt(p.sae.get(t, {}).get("l0"), 1) for t in ("dense", "rank1", "topk")
        ),
    ),
    ("tuned lens beats logit lens (layers)", lambda p: _lens_wins(p)),
    ("patching: contrast held on the changed token until / on the last token from", _patch_cell),
    ("state variance ratio", lambda p: _with_control(p, lambda q: q.ssm_state_variance_ratio)),
    ("runtime (s)", lambda p: _fmt(p.runtime_seconds, 1)),
]


def _lens_wins(p: InterpProfile) -> str:
    layers = list(p.lens_kl)
    if not layers:
        return "-"
    wins = sum(v["tuned"] < v["logit"] for v in list(p.lens_kl.values())[:-1])
    return f"{wins}/{max(len(layers) - 1, 0)}"


def _layer_index(site: str) -> int | None:
    """The layer number of ``layer_3.residual`` or of a sweep row ``layer_3``."""
    head = site.split(".", 1)[0]
    if head.startswith("layer_") and head[6:].isdigit():
        return int(head[6:])
    return None


def _pool_text(pool: str) -> str:
    return {"last": "the last real token", "mean": "the mean over real tokens"}.get(pool, pool)


def summary_sentences(profiles: Sequence[InterpProfile]) -> list[str]:
    """Up to three sentences on what differs between the profiled models and where, computed
    from their numbers: where probes find each task (against the untrained control), where
    patching restores the contrast, and how the circuits and lenses compare."""
    profiles = list(profiles)
    out = [s for s in (_probe_sentence(profiles), _patching_sentence(profiles)) if s]
    out += [s for s in (_circuit_sentence(profiles), _lens_sentence(profiles)) if s][: 3 - len(out)]
    return out


def _first_layer_at(curve: dict[str, float], level: float) -> int | None:
    for site, value in curve.items():
        if math.isfinite(value) and value >= level:
            return _layer_index(site)
    return None


def _probe_sentence(profiles: list[InterpProfile]) -> str | None:
    tasks = list(dict.fromkeys(t for p in profiles for t in p.probe_auroc))
    if not tasks:
        return None
    clauses = []
    for task in tasks:
        rows = []
        for p in profiles:
            curve = p.probe_auroc.get(task) or {}
            if not curve:
                continue
            controls = p.untrained.probe_auroc.get(task, {}) if p.untrained is not None else {}

            def margin(
                site: str, c: dict[str, float] = controls, v: dict[str, float] = curve
            ) -> float:
                return _finite(v[site]) - _finite(c.get(site, 0.5))

            best_site = max(curve, key=margin)  # the layer furthest above its control
            control = controls.get(best_site)
            rows.append((margin(best_site), p, best_site, curve[best_site], control, curve))
        if not rows:
            continue
        rows.sort(key=lambda r: -r[0])
        _, p, site, value, control, curve = rows[0]
        where = f"layer {_layer_index(site)}"
        clause = (
            f"{task} is decoded furthest above the control in {p.model_name} ({where}: {value:.2f}"
        )
        clause += f" vs {control:.2f} untrained)" if control is not None else ")"
        if len(rows) > 1:
            low = rows[-1]
            reach = _first_layer_at(low[5], 0.9)
            clause += f", least in {low[1].model_name} ({low[3]:.2f} vs " + (
                f"{low[4]:.2f} untrained" if low[4] is not None else "chance 0.50"
            )
            clause += f", 0.9 reached at layer {reach})" if reach is not None else ")"
        clauses.append(clause)
    pool = profiles[0].pool
    return (
        f"Held-out probes on {_pool_text(pool)}, against the same probe on an untrained copy: "
        + "; ".join(clauses)
        + "."
    )


def _patching_sentence(profiles: list[InterpProfile]) -> str | None:
    clauses = []
    for p in profiles:
        flow = _patch_flow(p)
        if flow is None:
            continue
        held, take_over = flow
        patch = p.patching
        labels = patch.get("tokens") or patch.get("columns", [])
        changed = patch.get("changed") or []
        text = p.model_name
        if held is not None or (changed and changed[0] != len(labels) - 1):
            word = labels[changed[0]] if changed else "?"
            text += (
                f" carries the '{word}' contrast on that token through {_row_text(held)}"
                if held is not None
                else f" never holds the '{word}' contrast on that token alone"
            )
            text += " and"
        text += (
            f" moves it to the last token from {_row_text(take_over)}"
            if take_over is not None
            else " holds it on the last token at no single layer"
        )
        if p.untrained is not None:
            control = _patch_flow(p.untrained)
            if control is not None:
                text += f" (untrained copy: from {_row_text(control[1]) if control[1] else 'none'})"
        clauses.append(text)
    if not clauses:
        return None
    n = max((p.patching.get("n_pairs", 0) for p in profiles if p.patching), default=0)
    return (
        f"Patching clean activations into the corrupted run ({n} pairs, mean): "
        + "; ".join(clauses)
        + "."
    )


def _row_text(row: str | None) -> str:
    if row is None:
        return "none"
    return "the embedding" if row == "embed" else row.replace("layer_", "layer ")


def _finite(value: Any) -> float:
    return float(value) if value is not None and math.isfinite(value) else float("-inf")


def _circuit_sentence(profiles: list[InterpProfile]) -> str | None:
    rows = [p for p in profiles if p.induction_head_relative is not None]
    if not rows:
        return None
    rows.sort(key=lambda p: -(p.induction_head_relative or 0.0))
    parts = []
    for p in rows:
        control = _untrained_value(p, lambda q: q.induction_head_relative)
        parts.append(
            f"{p.model_name} {p.induction_head_relative:.1f}x"
            + (f" (untrained {control:.1f}x)" if control is not None else "")
        )
    return "Repeated spans are copied at (x chance): " + ", ".join(parts) + "."


def _lens_sentence(profiles: list[InterpProfile]) -> str | None:
    rows = [p for p in profiles if p.lens_kl]
    if not rows:
        return None
    parts = []
    for p in rows:
        first = _first_layer_at({s: -v["logit"] for s, v in p.lens_kl.items()}, -1.0)
        parts.append(
            f"{p.model_name} from "
            + (f"layer {first}" if first is not None else "no layer before the last")
        )
    return "The logit lens is within 1 nat of the final prediction: " + ", ".join(parts) + "."


def profile_to_markdown(profile: InterpProfile | Sequence[InterpProfile]) -> str:
    """One profile as a table (several: one comparison table, a column per model), each number
    with its control beside it, followed by the per-layer probe and lens tables."""
    profiles = [profile] if isinstance(profile, InterpProfile) else list(profile)
    if not profiles:
        raise InputError("profile_to_markdown needs at least one profile")
    head = "| | " + " | ".join(f"{p.model_name} ({p.arch_family})" for p in profiles) + " |"
    lines = ["## Interpretability profile", ""]
    summary = summary_sentences(profiles)
    if summary:
        lines += [" ".join(summary), ""]
    lines.append(
        f"Probes pool {_pool_text(profiles[0].pool)}. Controls: "
        + (
            "every number in parentheses is the same measurement on an untrained copy "
            "(same architecture, re-initialised); probes are also fitted on shuffled labels."
            if any(p.untrained is not None for p in profiles)
            else "none (profiled without controls)."
        )
    )
    lines += ["", head, "|---|" + "---:|" * len(profiles)]
    for label, get in _HEADLINE:
        lines.append(f"| {label} | " + " | ".join(get(p) for p in profiles) + " |")
    for p in profiles:
        lines += ["", *_per_layer_table(p)]
        if p.notes:
            lines += ["", "Notes:", *[f"- {n}" for n in p.notes]]
    return "\n".join(lines)


def _per_layer_table(p: InterpProfile) -> list[str]:
    """Per layer: each task's held-out / train AUROC with its controls, and the lens KLs."""
    lines = [f"### {p.model_name}: per layer (tasks: {p.tasks})", ""]
    tasks = list(p.probe_auroc)
    u = p.untrained
    cols = []
    for t in tasks:
        cols.append(f"{t} AUROC (held-out / train)")
        if u is not None:
            cols.append(f"{t} untrained")
        if t in p.probe_auroc_shuffled:
            cols.append(f"{t} shuffled labels")
    cols += ["logit-lens KL", "tuned-lens KL"]
    if u is not None:
        cols += ["logit-lens KL untrained", "tuned-lens KL untrained"]
    lines.append("| layer | " + " | ".join(cols) + " |")
    lines.append("|---|" + "---:|" * len(cols))
    sites = list(dict.fromkeys([s for t in tasks for s in p.probe_auroc[t]] + list(p.lens_kl)))
    for site in sites:
        cells = []
        for t in tasks:
            cells.append(
                f"{_fmt(p.probe_auroc[t].get(site))} / "
                f"{_fmt(p.probe_train_auroc.get(t, {}).get(site))}"
            )
            if u is not None:
                cells.append(_fmt(u.probe_auroc.get(t, {}).get(site)))
            if t in p.probe_auroc_shuffled:
                cells.append(_fmt(p.probe_auroc_shuffled[t].get(site)))
        kl = p.lens_kl.get(site, {})
        cells += [_fmt(kl.get("logit")), _fmt(kl.get("tuned"))]
        if u is not None:
            ukl = u.lens_kl.get(site, {})
            cells += [_fmt(ukl.get("logit")), _fmt(ukl.get("tuned"))]
        lines.append(f"| {site} | " + " | ".join(cells) + " |")
    return lines


def _layer_axis(ax: Any, sites: Sequence[str]) -> list[int]:
    """x positions of ``sites`` (their layer numbers); the axis keeps integer ticks for every
    layer plotted on it so far (models of different depths share one axis)."""
    xs = [_layer_index(s) for s in sites]
    xs_int = [x if x is not None else i for i, x in enumerate(xs)]
    shown = set(getattr(ax, "_archscope_layers", set())) | set(xs_int)
    ax._archscope_layers = shown
    ax.set_xticks(sorted(shown))
    ax.set_xlabel("layer")
    return xs_int


def comparison_figure(profiles: Sequence[InterpProfile]) -> Any:
    """Probe AUROC per layer (one panel per task: one colour per model, solid = trained,
    dashed = untrained copy, dotted = shuffled labels) and the logit lens's KL to the final
    distribution per layer (solid = trained, dashed = untrained; the tuned lens is in the
    per-layer table)."""
    plt = pyplot()
    tasks = list(dict.fromkeys(t for p in profiles for t in p.probe_auroc))
    n_panels = len(tasks) + 1
    fig, axes = plt.subplots(1, n_panels, figsize=(4.6 * n_panels, 4), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, task in enumerate(tasks):
        ax = axes[0][k]
        for j, p in enumerate(profiles):
            colour = colours[j % len(colours)]
            curve = p.probe_auroc.get(task)
            if not curve:
                continue
            xs = _layer_axis(ax, list(curve))
            ax.plot(xs, list(curve.values()), marker="o", color=colour, label=p.model_name)
            if p.untrained is not None and p.untrained.probe_auroc.get(task):
                ucurve = p.untrained.probe_auroc[task]
                ax.plot(
                    _layer_axis(ax, list(ucurve)),
                    list(ucurve.values()),
                    "--",
                    marker=".",
                    color=colour,
                    alpha=0.7,
                )
            shuffled = p.probe_auroc_shuffled.get(task)
            if shuffled:
                ax.plot(
                    _layer_axis(ax, list(shuffled)),
                    list(shuffled.values()),
                    ":",
                    color=colour,
                    alpha=0.5,
                )
        ax.axhline(0.5, color="grey", lw=0.5)
        ax.set(
            title=f"{task}: probe AUROC (held-out), {_pool_text(profiles[0].pool)}\n"
            "solid: trained, dashed: untrained copy, dotted: shuffled labels",
            ylabel="AUROC",
            ylim=(0.3, 1.02),
        )
        ax.title.set_fontsize(9)
        ax.legend(fontsize=7)
    right = axes[0][-1]
    for j, p in enumerate(profiles):
        colour = colours[j % len(colours)]
        for q, style, tag in ((p, "-", ""), (p.untrained, "--", " untrained")):
            if q is None or not q.lens_kl:
                continue
            xs = _layer_axis(right, list(q.lens_kl))
            right.plot(
                xs,
                [v["logit"] for v in q.lens_kl.values()],
                style,
                marker="o",
                color=colour,
                alpha=1.0 if not tag else 0.5,
                label=None if tag else p.model_name,
            )
    right.set(
        title="logit lens: KL(final ‖ layer), held-out\nsolid: trained, dashed: untrained copy",
        ylabel="KL (nats)",
    )
    right.title.set_fontsize(9)
    right.legend(fontsize=7)
    fig.tight_layout()
    return fig


def patching_figure(profiles: Sequence[InterpProfile]) -> Any:
    """The activation-patching heat maps (layers x positions, mean over the contrast pairs,
    each cell labelled mean ± std), trained model beside its untrained copy."""
    plt = pyplot()
    shown = [p for p in profiles if p.patching.get("matrix")]
    if not shown:
        raise ArchscopeError("no profile has a patching heat map")
    n_cols = 2 if any(p.untrained is not None and p.untrained.patching for p in shown) else 1
    width = max(len(p.patching["matrix"][0]) for p in shown)
    fig, axes = plt.subplots(
        len(shown),
        n_cols,
        figsize=(n_cols * (2.4 + 1.0 * width), 0.8 + 3.2 * len(shown)),
        squeeze=False,
        layout="constrained",
    )
    image = None
    for r, p in enumerate(shown):
        for c, (q, tag) in enumerate(((p, ""), (p.untrained, " (untrained)"))[:n_cols]):
            ax = axes[r][c]
            if q is None or not q.patching.get("matrix"):
                ax.axis("off")
                continue
            patch = q.patching
            matrix = patch["matrix"]
            image = ax.imshow(matrix, aspect="auto", cmap="RdBu_r", vmin=-1, vmax=1)
            labels = patch.get("tokens") or patch.get("columns") or []
            ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
            rows = [str(_layer_index(x)) if x != "embed" else "embed" for x in patch["rows"]]
            ax.set_yticks(range(len(rows)), rows)
            std = patch.get("std")
            for i, line in enumerate(matrix):
                for j, v in enumerate(line):
                    if v is None or not math.isfinite(v):
                        continue
                    text = f"{v:.2f}"
                    if std and std[i][j] is not None and math.isfinite(std[i][j]):
                        text += f"\n±{std[i][j]:.2f}"
                    ax.text(
                        j,
                        i,
                        text,
                        ha="center",
                        va="center",
                        fontsize=6,
                        color="white" if abs(v) > 0.6 else "black",
                    )
            ax.set(
                title=f"{p.model_name}{tag}: gap restored\n"
                f"(mean ± std over {patch.get('n_pairs', 1)} pairs)",
                xlabel="position (first pair's tokens)",
                ylabel="layer",
            )
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), fraction=0.02)
    return fig


def sae_figure(profiles: Sequence[InterpProfile]) -> Any:
    """SAE explained variance against L0 per SAE type, one marker per model (hollow: the
    untrained copy's activations)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    markers = {"dense": "o", "rank1": "s", "topk": "^"}
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for j, p in enumerate(profiles):
        colour = colours[j % len(colours)]
        for q, tag in ((p, ""), (p.untrained, " untrained")):
            if q is None:
                continue
            for kind, metrics in q.sae.items():
                ax.scatter(
                    metrics.get("l0", float("nan")),
                    metrics.get("explained_variance", float("nan")),
                    marker=markers.get(kind, "x"),
                    facecolors="none" if tag else colour,
                    edgecolors=colour,
                    label=f"{p.model_name}{tag}: {kind}",
                )
    ax.set(
        title="SAE quality (filled: trained, hollow: untrained copy)",
        xlabel="L0 (active features per token)",
        ylabel="explained variance",
    )
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return fig


def write_report(profiles: Sequence[InterpProfile], path: str | Path) -> Path:
    """Write ``path`` (.md with PNG figures beside it, or .json) for one or more profiles."""
    import json

    path = Path(path)
    check_report_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".json":
        path.write_text(json.dumps([p.to_dict() for p in profiles], indent=2) + "\n")
        return path
    stem = path.with_suffix("")
    figures = [
        ("Probe AUROC and lens KL per layer", comparison_figure, f"{stem.name}-layers.png"),
        ("Activation patching", patching_figure, f"{stem.name}-patching.png"),
        ("SAE quality", sae_figure, f"{stem.name}-sae.png"),
    ]
    if any(p.write_sae for p in profiles):
        figures.append(("Write SAE substitution test", write_sae_figure, f"{stem.name}-write.png"))
    parts = ["# archscope profile", "", profile_to_markdown(profiles), ""]
    plt = None
    try:
        plt = pyplot()
    except ArchscopeError as exc:
        parts.append(f"(figures skipped: {exc})")
    if plt is not None:
        for title, make, name in figures:
            try:
                fig = make(profiles)
            except ArchscopeError:
                continue
            fig.savefig(path.parent / name, format="png", dpi=110, bbox_inches="tight")
            plt.close(fig)
            parts += [f"### {title}", "", f"![{title}]({name})", ""]
    path.write_text("\n".join(parts) + "\n")
    return path


def check_report_path(path: str | Path) -> None:
    """Refuse (`InputError`) a report name that is neither .md nor .json, before any work."""
    if Path(path).suffix.lower() not in (".md", ".json"):
        raise InputError(f"write the report as .md (with figures) or .json, not {Path(path).name}")


def _split_rows(n: int, held_out: float, seed: int) -> tuple[list[int], list[int]]:
    from ..methods.splits import held_out_split

    return held_out_split(n, held_out, seed)


def check_pool(pool: str | int) -> str | int:
    """``pool`` if it is "last", "mean" or an int (a real-token position; negative counts from
    each text's last real token); a numeric string becomes the int."""
    if isinstance(pool, bool):
        raise InputError(f"pool={pool!r}: use 'last', 'mean' or a real-token position (an int)")
    if isinstance(pool, int):
        return pool
    if isinstance(pool, str):
        if pool in ("last", "mean"):
            return pool
        try:
            return int(pool)
        except ValueError:
            pass
    raise InputError(
        f"pool={pool!r}: use 'last' (the last real token), 'mean' (mean over real tokens) or a "
        "real-token position such as 0 or -2 (negative counts from each text's last token)"
    )


def _pool_name(pool: str | int) -> str:
    return pool if isinstance(pool, str) else f"position {pool}"


def pooled_features(
    backend: Backend, data: Any, sites: Sequence[str], pool: str | int = "last"
) -> dict[str, Any]:
    """One float32 vector per text for each of ``sites``: the last real token, the mean over
    real tokens, or real-token position ``pool`` (an int; negative from the end). A text too
    short for the position is an error naming it."""
    import torch

    from ..collect import collect
    from ..methods.probes import pooled_activations

    pool = check_pool(pool)
    if isinstance(pool, str):
        return pooled_activations(backend, data, list(sites), pool=pool)
    got = collect(backend, data, list(sites), pool=None, dtype=torch.float32)
    assert got.position is not None
    n_docs = int(got.doc.max()) + 1 if len(got) else 0
    lengths = torch.bincount(got.doc, minlength=n_docs)
    short = (lengths <= pool) if pool >= 0 else (lengths < -pool)
    if bool(short.any()):
        bad = torch.nonzero(short).flatten().tolist()
        raise InputError(
            f"pool={pool}: texts {bad[:8]} have only {int(lengths[bad[0]])} real tokens; pick a "
            f"position every text has (the shortest has {int(lengths.min())}), or 'last'/'mean'"
        )
    want = pool if pool >= 0 else lengths[got.doc] + pool
    keep = torch.nonzero(got.position == want).flatten()
    order = got.doc[keep].argsort()
    return {s: got.activations[s][keep[order]] for s in got.activations}


def _probe_part(
    profile: InterpProfile,
    backend: Backend,
    tasks: ProfileTasks,
    quick: bool,
    pool: str | int,
    seed: int,
    shuffled: bool,
    task_sites: dict[str, list[str]] | None = None,
) -> None:
    """Held-out (and training) AUROC of a probe per task and site: every layer, or the sites
    ``task_sites`` names for a task (0.2's profile probed one layer per task)."""
    import torch

    from ..methods.probes import ProbeOptions, _labelled, _reports

    every = backend.layer_names()
    # Newton's method solves these small penalised logistic regressions in ~10 iterations
    # (the held-out AUROC of 100 AdamW epochs, in far less time).
    options = ProbeOptions(
        pool="mean" if pool == "mean" else "last",
        folds=3 if quick else 5,
        epochs=50,
        lr=0.01,
        weight_decay=1e-2,
        batch_size=64,
        solver="newton",
        seed=seed,
    )
    for task, dataset in tasks.probes.items():
        sites = every if task_sites is None else task_sites.get(task, every)
        dataset, labels = _labelled(dataset)
        features = pooled_features(backend, dataset, sites, pool)
        variants = [("trained", labels)]
        if shuffled:
            order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
            variants.append(("shuffled", labels[order]))
        # the k-fold AUROCs alone (the profile keeps no probe fitted on every text), every
        # site and label variant cross-validated together: the same reports as one at a time
        reports = iter(
            _reports(
                backend,
                [(site, features[site], y) for _, y in variants for site in sites],
                options,
                fit_final=False,
            )
        )
        for variant, _ in variants:
            held, train = {}, {}
            for site in sites:
                report = next(reports)
                held[site] = report.heldout_auroc
                train[site] = report.train_auroc
            if variant == "trained":
                profile.probe_auroc[task] = held
                profile.probe_train_auroc[task] = train
            else:
                profile.probe_auroc_shuffled[task] = held
    best = {task: max(v.values()) for task, v in profile.probe_auroc.items() if v}
    profile.probe_sentiment_auroc = best.get("sentiment")
    profile.probe_math_auroc = best.get("math", best.get("topic"))


def _circuit_part(
    profile: InterpProfile, backend: Backend, tokenizer: Any, tasks: ProfileTasks, quick: bool
) -> None:
    from ..methods.circuits import (
        copy_score,
        early_token_attention,
        induction_head_score,
        repeated_span_score,
    )

    trials = 16 if quick else 50
    induction = induction_head_score(
        backend, tokenizer=tokenizer, n_trials=trials, n_pairs=8, candidates=tasks.induction_ids
    )
    profile.induction_head_relative = float(induction.relative)
    if tasks.induction_rows and tasks.induction_spans:
        spans = repeated_span_score(backend, tasks.induction_rows, tasks.induction_spans)
        profile.induction_head_relative = float(spans.relative)
        profile.notes.append(
            f"induction: on the source's repeated-span documents "
            f"({spans.score:.3f} = {spans.relative:.0f}x chance); on random "
            f"repeated blocks {induction.relative:.1f}x chance"
        )
    heads = induction.raw.get("heads") if isinstance(induction.raw, dict) else None
    if heads:
        profile.per_head = {"induction": heads}
    profile.copy_accuracy = float(copy_score(backend, tokenizer, n_trials=trials // 2).score)
    # on the profile's own texts (the built-in English prompts are unknown words to a model
    # with its own small vocabulary)
    own = tasks.texts.texts[:16] if tasks.texts.texts and tokenizer is not None else None
    profile.concentration_relative = float(
        early_token_attention(backend, tokenizer, texts=own).relative
    )


def write_sae_figure(profiles: Sequence[InterpProfile]) -> Any:
    """Per model with write sites: the per-atom win-rate histogram of the substitution test
    and the closed-form against the measured logit shifts."""
    plt = pyplot()
    shown = [p for p in profiles if p.write_sae]
    fig, axes = plt.subplots(len(shown), 2, figsize=(9, 3.4 * len(shown)), squeeze=False)
    for (left, right), p in zip(axes, shown, strict=True):
        w = p.write_sae
        left.hist(w["per_atom_rates"], bins=10, range=(0, 1))
        left.axvline(w["win_rate"], color="k", linestyle="--")
        left.set(
            title=f"{p.model_name} {w['site']}: atom beats deletion",
            xlabel="per-atom win rate (dashed: all firings)",
            ylabel="atoms",
        )
        right.scatter(w["measured"], w["predicted"], s=6, alpha=0.5)
        r2 = w.get("closed_form_r2")
        right.set(
            title=f"closed form, R² = {_fmt(r2)}",
            xlabel="measured logit shift",
            ylabel="predicted",
        )
    fig.tight_layout()
    return fig


def _write_sae_part(
    profile: InterpProfile, backend: Backend, tasks: ProfileTasks, quick: bool, seed: int
) -> None:
    """A write SAE on the first layer with state writes, and its substitution test."""
    from ..methods.write_sae import (
        collect_writes,
        fit_write_sae,
        substitution_test,
        write_layout,
        write_site,
    )

    ids = [row[:64] for row in tasks.texts.ids() if len(row) > 1]
    train, held = ids[: max(1, int(0.8 * len(ids)))], ids[int(0.8 * len(ids)) :] or ids[-1:]
    site = write_site(backend)
    layout = write_layout(backend, site, 0, ids[0])
    writes = collect_writes(backend, train, layout)
    sae = fit_write_sae(writes, layout, k=4, epochs=3 if quick else 8, batch_size=256, seed=seed)
    result = substitution_test(sae, backend, held, max_firings=32 if quick else 192, seed=seed)
    profile.write_sae = {
        "site": site,
        "win_rate": result.win_rate,
        "win_ci": list(result.win_ci),
        "control_win_rate": result.control_win_rate,
        "closed_form_r2": result.closed_form_r2,
        "per_atom_rates": [v[2] for v in result.per_atom.values()],
        "predicted": result.predicted,
        "measured": result.measured,
    }


def _sae_part(
    profile: InterpProfile,
    backend: Backend,
    tasks: ProfileTasks,
    site: str,
    quick: bool,
    seed: int,
    kinds: tuple[str, ...] = ("dense", "rank1", "topk"),
) -> None:
    from ..collect import collect
    from ..methods.sae import SAEConfig, fit_sae, reconstruction_metrics

    acts = collect(backend, tasks.texts, [site], pool=None)[site].float()
    train_idx, test_idx = _split_rows(len(acts), 0.2, seed)
    train, test = acts[train_idx], acts[test_idx]
    dim = int(acts.shape[1])
    profile.sae_site = site
    for kind in kinds:
        config = SAEConfig(
            input_dim=dim,
            n_features=4 * dim,
            sparsity=0.1,
            sae_type=kind,
            learning_rate=4e-3,
            batch_size=128,
            k=max(2, dim // 16),
            seed=seed,
        )
        sae = fit_sae(train, config, epochs=4 if quick else 12)
        metrics = reconstruction_metrics(sae, test)
        profile.sae[kind] = {
            "explained_variance": float(metrics.explained_variance),
            "mse": float(metrics.mse),
            "l0": float(metrics.l0),
            "dead_fraction": float(metrics.dead_fraction),
        }
    profile.sae_dense_recon = profile.sae["dense"]["mse"]
    profile.sae_rank1_recon = profile.sae["rank1"]["mse"]
    profile.sae_better = (
        "dense"
        if profile.sae["dense"]["explained_variance"] >= profile.sae["rank1"]["explained_variance"]
        else "rank1"
    )


def _lens_part(
    profile: InterpProfile, backend: Backend, tasks: ProfileTasks, quick: bool, seed: int
) -> None:
    from ..methods.lens import TunedLens

    # Each layer starts from a closed-form (least-squares) translator where that already
    # removes most of the logit lens's KL, else from zero, and trains with Adam at lr 1e-2 until
    # it stops improving on texts kept aside from training (at most 4 epochs). Against the 3
    # fixed epochs from zero used before, the held-out KL is lower on the zoo's three models
    # and on a random 6-layer GPT-2, which stops after one epoch instead of three
    # (benchmarks/RESULTS.md (8)).
    lens = TunedLens.fit_rows(
        backend,
        tasks.texts.ids(),
        epochs=1 if quick else 4,
        lr=1e-2,
        held_out=0.25,
        seed=seed,
        start="auto",
        patience=2,
    )
    report = lens.report
    assert report is not None  # fit_rows always evaluates on held-out rows
    profile.lens_kl = {
        site: {"logit": float(a), "tuned": float(b)}
        for site, a, b in zip(report.layers, report.kl_logit, report.kl_tuned, strict=True)
    }


def _patching_part(
    profile: InterpProfile, backend: Backend, tasks: ProfileTasks, tokenizer: Any
) -> None:
    """Patching heat map per contrast pair (each pair its own sweep and metric), then the mean,
    std, min and max over the pairs per cell. Pairs whose two sides differ in length, or whose
    length differs from the most common one, cannot share the position axis: they are left
    out and named in ``notes``."""
    import torch

    from ..methods.attribute import LogitDiff, patch_sweep

    assert tasks.contrast is not None
    clean, corrupted = tasks.contrast.datasets()
    pairs = list(zip(clean.ids(), corrupted.ids(), strict=True))
    kept = _equal_length_pairs(profile, pairs)
    if not kept:
        return
    # pairs share the heat map's position axis: the most common length (ties: the earliest)
    first: dict[int, int] = {}
    for i in kept:
        first.setdefault(len(pairs[i][0]), i)
    counts = Counter(len(pairs[i][0]) for i in kept)
    common = max(counts, key=lambda n: (counts[n], -first[n]))
    used = [i for i in kept if len(pairs[i][0]) == common]
    other = [i for i in kept if i not in used]
    if other:
        profile.notes.append(
            f"patching: pairs {other} left out (their length differs from the {common} tokens "
            "of the others, so they cannot share the heat map's position axis)"
        )
    embed = "embed" in backend.sites() and backend.site_info("embed").writable
    per_pair: list[list[list[float]]] = []
    sweep = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a pair without a gap gives NaN cells, counted below
        for i in used:
            metric = None
            if tasks.answers is not None:
                metric = LogitDiff(
                    torch.tensor(tasks.answers[0][i : i + 1]),
                    torch.tensor(tasks.answers[1][i : i + 1]),
                )
            sweep = patch_sweep(
                backend,
                [pairs[i][0]],
                [pairs[i][1]],
                axis="position",
                metric_fn=metric,
                embed=embed,
            )
            per_pair.append(
                [
                    [float("nan") if v is None else float(v) for v in row]
                    for row in sweep.gap_restored or []
                ]
            )
    assert sweep is not None
    stack = torch.tensor(per_pair, dtype=torch.float64)  # (pairs, rows, positions)
    finite = torch.isfinite(stack)
    n_finite = finite.sum(0)
    zero = torch.where(finite, stack, torch.zeros_like(stack))
    mean = zero.sum(0) / n_finite.clamp(min=1)
    var = (torch.where(finite, stack - mean, torch.zeros_like(stack)) ** 2).sum(0) / n_finite.clamp(
        min=1
    )
    inf = torch.tensor(float("inf"), dtype=torch.float64)
    low = torch.where(finite, stack, inf).amin(0)
    high = torch.where(finite, stack, -inf).amax(0)
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    empty = n_finite == 0
    mean, std = torch.where(empty, nan, mean), torch.where(empty, nan, var.sqrt())
    low, high = torch.where(empty, nan, low), torch.where(empty, nan, high)
    no_gap = int((~finite.any(-1).any(-1)).sum())
    if no_gap:
        profile.notes.append(f"patching: {no_gap} of {len(used)} pairs have no gap to restore")
    first_clean, first_corr = pairs[used[0]]
    tokens = [_token_label(tokenizer, a, b) for a, b in zip(first_clean, first_corr, strict=True)]
    changed = sorted(
        {j for i in used for j, (a, b) in enumerate(zip(*pairs[i], strict=True)) if a != b}
    )
    values = mean[torch.isfinite(mean)]
    profile.patching = {
        "matrix": mean.tolist(),
        "std": std.tolist(),
        "min": low.tolist(),
        "max_per_cell": high.tolist(),
        "per_pair": per_pair,
        "n_pairs": len(used),
        "rows": list(sweep.rows),
        "columns": [str(c) for c in sweep.columns],
        "tokens": tokens,
        "changed": changed,
        "max": float(values.max()) if values.numel() else None,
    }


def _token_label(tokenizer: Any, clean: int, corrupted: int) -> str:
    """The clean token's text, or ``clean/corrupted`` where the pair differs."""

    def text(token: int) -> str:
        if tokenizer is None or not hasattr(tokenizer, "decode"):
            return str(token)
        raw = str(tokenizer.decode([token]))
        return raw.strip() or repr(raw)

    return text(clean) if clean == corrupted else f"{text(clean)}/{text(corrupted)}"


def _state_part(profile: InterpProfile, backend: Backend, tasks: ProfileTasks) -> None:
    """Recurrent-state variance ratio: the variance of the final state across texts over its
    mean square, averaged over state sites (0 = every text ends in the same state)."""
    from ..collect import collect

    sites = [n for n, i in backend.sites().items() if i.kind == "state"]
    if not sites:
        return
    states = collect(backend, tasks.texts, sites, pool="last")
    ratios = []
    for site in sites:
        x = states[site].float()
        ratios.append(float(x.var(0).mean() / (x.pow(2).mean() + 1e-12)))
    profile.ssm_state_variance_ratio = sum(ratios) / len(ratios)


def untrained_copy(model: Any, seed: int = 0) -> Any:
    """A freshly initialised model of ``model``'s architecture (seeded): built from its config
    (``type(model)(model.config)``, the class's own initialisation) where it has one, else a
    copy whose submodules are all ``reset_parameters()``. Same device, dtype and mode; the
    original is not touched."""
    import copy

    import torch

    torch.manual_seed(seed)
    fresh = None
    config = getattr(model, "config", None)
    if config is not None:
        try:
            fresh = type(model)(config)
        except TypeError:
            fresh = None
    if fresh is None:
        fresh = copy.deepcopy(model)
        reset = 0
        for module in fresh.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
                reset += 1
        if not reset:
            raise ArchscopeError(
                f"cannot re-initialise {type(model).__qualname__}: it has no config to rebuild "
                "it from and no submodule with reset_parameters(); profile with controls=False"
            )
    param = next(iter(model.parameters()), None)
    if param is not None:
        fresh = fresh.to(device=param.device, dtype=param.dtype)
    return fresh.train(model.training)


def _control_backend(backend: Backend, seed: int) -> Backend:
    """The backend of an untrained copy of ``backend``'s model (the same backend class)."""
    from ..backends import Backend

    fresh = untrained_copy(backend.model, seed)
    try:
        return type(backend)(fresh)
    except TypeError:
        return Backend.for_model(fresh, hint=backend.name)


def profile_backend(
    backend: Backend,
    tokenizer: Any,
    *,
    name: str = "model",
    arch_family: str | None = None,
    tasks: ProfileTasks | None = None,
    quick: bool = False,
    seed: int = 0,
    threads: int | None = None,
    pool: str | int = "last",
    controls: bool = True,
) -> InterpProfile:
    """The profile of the model behind ``backend``: each part runs where the backend has the
    capabilities it needs; a part that cannot run is named in ``notes``, never hidden.

    ``pool``: what a probe reads of each text: "last" (the last real token), "mean" (the mean
    over real tokens) or an int (that real-token position; negative from the end).
    ``controls``: also profile an untrained copy of the model (`untrained_copy`, seeded with
    ``seed``; stored in ``untrained``) and fit the probes on shuffled labels.

    ``threads``: torch threads while profiling (restored afterwards). Default: one for models
    under 50M parameters, whose small matrix products run faster on one thread, and the
    current setting otherwise.
    """
    import torch

    pool = check_pool(pool)
    n_params = _n_params(backend.model)
    previous = torch.get_num_threads()
    wanted = threads if threads is not None else (1 if n_params < 50_000_000 else previous)
    torch.set_num_threads(wanted)
    try:
        tasks = tasks or generic_tasks(tokenizer, seed=seed)
        profile = _profile(
            backend, tokenizer, name, arch_family, tasks, quick, seed, n_params, pool, controls
        )
        if controls:
            control = _control_backend(backend, seed)
            profile.untrained = _profile(
                control,
                tokenizer,
                f"{name} (untrained)",
                arch_family,
                tasks,
                quick,
                seed,
                n_params,
                pool,
                False,
            )
            profile.runtime_seconds = round(
                profile.runtime_seconds + profile.untrained.runtime_seconds, 2
            )
        return profile
    finally:
        torch.set_num_threads(previous)


def _profile(
    backend: Backend,
    tokenizer: Any,
    name: str,
    arch_family: str | None,
    tasks: ProfileTasks,
    quick: bool,
    seed: int,
    n_params: int,
    pool: str | int,
    shuffled: bool,
) -> InterpProfile:
    import torch

    start = time.perf_counter()
    layers = backend.layer_names()
    caps = set(backend.capabilities)
    profile = InterpProfile(
        model_name=name,
        arch_family=arch_family or backend.name,
        n_params=n_params,
        n_layers=len(layers),
        hidden_dim=_hidden_dim(backend),
        tasks=tasks.source,
        pool=_pool_name(pool),
    )
    t = profile.timings
    torch.manual_seed(seed)
    _timed(t, "probes", lambda: _probe_part(profile, backend, tasks, quick, pool, seed, shuffled))
    if "logits" in caps:
        _timed(t, "circuits", lambda: _circuit_part(profile, backend, tokenizer, tasks, quick))
    else:
        profile.notes.append("circuits: the backend produces no logits")
    site = layers[len(layers) // 2]
    _timed(t, "sae", lambda: _sae_part(profile, backend, tasks, site, quick, seed))
    if {"unembed", "logits"} <= caps:
        _timed(t, "lens", lambda: _lens_part(profile, backend, tasks, quick, seed))
    else:
        profile.notes.append("lenses: the backend has no 'unembed'")
    if tasks.contrast is not None and {"edit", "logits"} <= caps:
        _timed(t, "patching", lambda: _patching_part(profile, backend, tasks, tokenizer))
    if "recurrent_state" in caps:
        _timed(t, "state", lambda: _state_part(profile, backend, tasks))
    if {"edit", "logits"} <= caps and any(n.endswith(".state_write") for n in backend.sites()):
        _timed(t, "write_sae", lambda: _write_sae_part(profile, backend, tasks, quick, seed))
    profile.runtime_seconds = round(time.perf_counter() - start, 2)
    return profile


def benchmark(
    model_name: str,
    model: Any,
    tokenizer: Any,
    backend_hint: str | None = None,
    arch_family: str = "transformer",
    tokenize_fn: Any = None,
    sentiment_layer: int | None = None,
    math_layer: int | None = None,
    sae_layer: int | None = None,
    ssm_layer: int | None = None,
    *,
    tasks: ProfileTasks | None = None,
    quick: bool = False,
    full: bool = False,
) -> InterpProfile:
    """archscope 0.2's entry point, computing what 0.2 computed: a probe per task at one layer
    (sentiment at a quarter of the depth, math at half, or ``sentiment_layer`` /
    ``math_layer``; held-out AUROC, training AUROC beside it), the circuit tests, a dense and
    a rank-1 SAE at ``sae_layer`` (default: half the depth) and, for a model with recurrent
    state, the state variance ratio. ``full=True`` gives the whole profile instead
    (`profile_backend`: every layer, the tuned lens, the patching map and the untrained
    control). ``tokenize_fn`` is not needed (texts are tokenized with ``tokenizer``);
    ``ssm_layer`` is accepted for compatibility (every state site is read)."""
    import torch

    from ..backends import Backend

    backend = Backend.for_model(model, hint=backend_hint)
    if full:
        return profile_backend(
            backend, tokenizer, name=model_name, arch_family=arch_family, tasks=tasks, quick=quick
        )
    n_params = _n_params(backend.model)
    previous = torch.get_num_threads()
    torch.set_num_threads(1 if n_params < 50_000_000 else previous)
    try:
        return _legacy_profile(
            backend,
            tokenizer,
            model_name,
            arch_family,
            tasks or generic_tasks(tokenizer, seed=0),
            quick,
            n_params,
            {"sentiment": sentiment_layer, "math": math_layer, "sae": sae_layer},
        )
    finally:
        torch.set_num_threads(previous)


def _legacy_profile(
    backend: Backend,
    tokenizer: Any,
    name: str,
    arch_family: str,
    tasks: ProfileTasks,
    quick: bool,
    n_params: int,
    chosen: dict[str, int | None],
) -> InterpProfile:
    """The parts of the profile archscope 0.2's `benchmark` computed, at 0.2's layers."""
    import torch

    start = time.perf_counter()
    layers = backend.layer_names()
    n = len(layers)
    default = {"sentiment": n // 4, "math": n // 2, "sae": n // 2}
    picked = {}
    for key, value in chosen.items():
        index = default[key] if value is None else value
        if not 0 <= index < n:
            raise InputError(
                f"{key}_layer={value}: the model has layers 0 to {n - 1}; give one of those, "
                "or None for 0.2's default"
            )
        picked[key] = layers[index]
    caps = set(backend.capabilities)
    profile = InterpProfile(
        model_name=name,
        arch_family=arch_family or backend.name,
        n_params=n_params,
        n_layers=n,
        hidden_dim=_hidden_dim(backend),
        tasks=tasks.source,
    )
    t = profile.timings
    torch.manual_seed(0)
    task_sites = {
        task: [picked["math" if task != "sentiment" else "sentiment"]] for task in tasks.probes
    }
    _timed(
        t,
        "probes",
        lambda: _probe_part(profile, backend, tasks, quick, "last", 0, False, task_sites),
    )
    if "logits" in caps:
        _timed(t, "circuits", lambda: _circuit_part(profile, backend, tokenizer, tasks, quick))
    else:
        profile.notes.append("circuits: the backend produces no logits")
    _timed(
        t,
        "sae",
        lambda: _sae_part(profile, backend, tasks, picked["sae"], quick, 0, ("dense", "rank1")),
    )
    if "recurrent_state" in caps:
        _timed(t, "state", lambda: _state_part(profile, backend, tasks))
    profile.notes.append(
        "0.2's profile (benchmark()): probes at one layer per task, circuits, dense and "
        "rank-1 SAEs; profile_backend() or benchmark(..., full=True) gives every layer, the "
        "tuned lens, the patching map and the untrained control"
    )
    profile.runtime_seconds = round(time.perf_counter() - start, 2)
    return profile


def profile_models(
    specs: Sequence[str],
    *,
    hint: str | None = None,
    quick: bool = False,
    progress: Callable[[str], None] | None = None,
    pool: str | int = "last",
    controls: bool = True,
) -> list[InterpProfile]:
    """Load each model spec and profile it (`profile_backend`), with the tasks its model source
    supplies (the zoo's planted attributes) or the generic English ones."""
    from ..loader import find_source, load_model

    profiles = []
    for spec in specs:
        if progress is not None:
            progress(spec)
        _, tokenizer, backend = load_model(spec, arch=hint)
        if tokenizer is None:
            raise InputError(f"{spec} has no tokenizer; the profile needs one for its texts")
        source, rest = find_source(spec)
        tasks = source.profile_tasks(rest, tokenizer) if source is not None else None
        profiles.append(
            profile_backend(
                backend,
                tokenizer,
                name=spec,
                tasks=tasks,
                quick=quick,
                pool=pool,
                controls=controls,
            )
        )
    return profiles


def default_models() -> list[str]:
    """The example models registered model sources name (the zoo's), for ``archscope bench``
    without a model."""
    from ..plugins import get_manager

    return [spec for entry in get_manager().sources for spec in entry.obj.examples]


def _timed(timings: dict[str, float], name: str, work: Callable[[], Any]) -> Any:
    start = time.perf_counter()
    try:
        return work()
    finally:
        timings[name] = round(time.perf_counter() - start, 3)


def _n_params(model: Any) -> int:
    return sum(int(p.numel()) for p in model.parameters())


def _hidden_dim(backend: Backend) -> int:
    return int(backend.site_info(backend.layer_names()[0]).dim)


def _warn_once(message: str) -> None:
    warnings.warn(f"archscope: {message}", stacklevel=3)
