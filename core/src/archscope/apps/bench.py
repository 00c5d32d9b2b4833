"""The standard per-model profile: held-out probe AUROC per layer, circuit scores, SAE quality,
logit vs tuned lens, an activation-patching heat map, recurrent-state variance, size and
runtime — one comparable `InterpProfile` per model, rendered alone or side by side."""

from __future__ import annotations

import math
import random
import time
import warnings
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


def _equal_length_pairs(
    profile: InterpProfile, contrast: Contrast
) -> tuple[list[list[int]], list[list[int]]]:
    """The contrast pairs whose sides have equal token lengths; the others are named in the
    profile's notes (patching swaps activations position by position)."""
    pairs = contrast.pairs()
    kept = [(a, b) for a, b in pairs if len(a) == len(b)]
    if len(kept) < len(pairs):
        lengths = ", ".join(f"{len(a)}/{len(b)}" for a, b in pairs if len(a) != len(b))
        profile.notes.append(
            f"patching: {len(pairs) - len(kept)} of {len(pairs)} contrast pairs tokenise to "
            f"different lengths (clean/corrupted tokens: {lengths}) and were left out"
            + ("; no pair was left, so the patching map is missing" if not kept else "")
        )
    return [a for a, _ in kept], [b for _, b in kept]


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


_HEADLINE = [
    ("parameters", lambda p: f"{p.n_params:,}"),
    ("layers", lambda p: str(p.n_layers)),
    ("hidden size", lambda p: str(p.hidden_dim)),
    (
        "probe AUROC, best layer (held-out)",
        lambda p: (
            "; ".join(f"{task} {_fmt(max(v.values()))}" for task, v in p.probe_auroc.items() if v)
            or "-"
        ),
    ),
    ("induction (x chance)", lambda p: _fmt(p.induction_head_relative, 1)),
    ("copy accuracy", lambda p: _fmt(p.copy_accuracy)),
    ("next-token concentration", lambda p: _fmt(p.concentration_relative)),
    (
        "SAE explained variance (dense / rank-1 / TopK)",
        lambda p: " / ".join(
            _fmt(p.sae.get(t, {}).get("explained_variance")) for t in ("dense", "rank1", "topk")
        ),
    ),
    (
        "SAE L0 (dense / rank-1 / TopK)",
        lambda p: " / ".join(
            _fmt(p.sae.get(t, {}).get("l0"), 1) for t in ("dense", "rank1", "topk")
        ),
    ),
    ("tuned lens beats logit lens (layers)", lambda p: _lens_wins(p)),
    ("patching: max gap restored", lambda p: _fmt(p.patching.get("max"))),
    ("state variance ratio", lambda p: _fmt(p.ssm_state_variance_ratio)),
    ("runtime (s)", lambda p: _fmt(p.runtime_seconds, 1)),
]


def _lens_wins(p: InterpProfile) -> str:
    layers = list(p.lens_kl)
    if not layers:
        return "-"
    wins = sum(v["tuned"] < v["logit"] for v in list(p.lens_kl.values())[:-1])
    return f"{wins}/{max(len(layers) - 1, 0)}"


def profile_to_markdown(profile: InterpProfile | Sequence[InterpProfile]) -> str:
    """One profile as a table (several: one comparison table, a column per model), followed
    by the per-layer probe and lens tables."""
    profiles = [profile] if isinstance(profile, InterpProfile) else list(profile)
    if not profiles:
        raise InputError("profile_to_markdown needs at least one profile")
    head = "| | " + " | ".join(f"{p.model_name} ({p.arch_family})" for p in profiles) + " |"
    lines = ["## Interpretability profile", "", head, "|---|" + "---:|" * len(profiles)]
    for label, get in _HEADLINE:
        lines.append(f"| {label} | " + " | ".join(get(p) for p in profiles) + " |")
    for p in profiles:
        lines += ["", f"### {p.model_name}: per layer (tasks: {p.tasks})", ""]
        tasks = list(p.probe_auroc)
        lines.append(
            "| layer | "
            + " | ".join(f"{t} AUROC (held-out / train)" for t in tasks)
            + " | logit-lens KL | tuned-lens KL |"
        )
        lines.append("|---|" + "---:|" * (len(tasks) + 2))
        sites = list(dict.fromkeys([s for t in tasks for s in p.probe_auroc[t]] + list(p.lens_kl)))
        for site in sites:
            cells = [
                f"{_fmt(p.probe_auroc[t].get(site))} / "
                f"{_fmt(p.probe_train_auroc.get(t, {}).get(site))}"
                for t in tasks
            ]
            kl = p.lens_kl.get(site, {})
            cells += [_fmt(kl.get("logit")), _fmt(kl.get("tuned"))]
            lines.append(f"| {site} | " + " | ".join(cells) + " |")
        if p.notes:
            lines += ["", "Notes:", *[f"- {n}" for n in p.notes]]
    return "\n".join(lines)


def comparison_figure(profiles: Sequence[InterpProfile]) -> Any:
    """Probe AUROC per layer (one line per model and task) and logit vs tuned lens KL per
    layer, side by side."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for p in profiles:
        for task, curve in p.probe_auroc.items():
            left.plot(
                range(len(curve)), list(curve.values()), marker="o", label=f"{p.model_name}: {task}"
            )
        if p.lens_kl:
            xs = range(len(p.lens_kl))
            right.plot(
                xs,
                [v["logit"] for v in p.lens_kl.values()],
                "--",
                marker="o",
                label=f"{p.model_name}: logit lens",
            )
            right.plot(
                xs,
                [v["tuned"] for v in p.lens_kl.values()],
                marker="o",
                label=f"{p.model_name}: tuned lens",
            )
    left.set(
        title="Probe AUROC per layer (held-out)", xlabel="layer", ylabel="AUROC", ylim=(0.4, 1.02)
    )
    left.axhline(0.5, color="grey", lw=0.5)
    right.set(title="KL to the final distribution (held-out)", xlabel="layer", ylabel="KL (nats)")
    for ax in (left, right):
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def patching_figure(profiles: Sequence[InterpProfile]) -> Any:
    """The activation-patching heat maps (layers x positions) of the profiles that have one."""
    plt = pyplot()
    shown = [p for p in profiles if p.patching.get("matrix")]
    if not shown:
        raise ArchscopeError("no profile has a patching heat map")
    fig, axes = plt.subplots(1, len(shown), figsize=(4.2 * len(shown), 3.6), squeeze=False)
    for ax, p in zip(axes[0], shown, strict=True):
        image = ax.imshow(p.patching["matrix"], aspect="auto", cmap="RdBu_r", vmin=-1, vmax=1)
        ax.set(title=f"{p.model_name}: gap restored", xlabel="position", ylabel="layer")
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


def sae_figure(profiles: Sequence[InterpProfile]) -> Any:
    """SAE explained variance against L0 per SAE type, one marker per model."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    markers = {"dense": "o", "rank1": "s", "topk": "^"}
    for p in profiles:
        for kind, metrics in p.sae.items():
            ax.scatter(
                metrics.get("l0", float("nan")),
                metrics.get("explained_variance", float("nan")),
                marker=markers.get(kind, "x"),
                label=f"{p.model_name}: {kind}",
            )
    ax.set(
        title="SAE quality", xlabel="L0 (active features per token)", ylabel="explained variance"
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def write_report(profiles: Sequence[InterpProfile], path: str | Path) -> Path:
    """Write ``path`` (.md with PNG figures beside it, or .json) for one or more profiles."""
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".json":
        path.write_text(json.dumps([p.to_dict() for p in profiles], indent=2) + "\n")
        return path
    if path.suffix.lower() != ".md":
        raise InputError(f"write the report as .md (with figures) or .json, not {path.name}")
    stem = path.with_suffix("")
    figures = [
        ("Probe AUROC and lens KL per layer", comparison_figure, f"{stem.name}-layers.png"),
        ("Activation patching", patching_figure, f"{stem.name}-patching.png"),
        ("SAE quality", sae_figure, f"{stem.name}-sae.png"),
    ]
    parts = [profile_to_markdown(profiles), ""]
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


def _split_rows(n: int, held_out: float, seed: int) -> tuple[list[int], list[int]]:
    from ..methods.splits import held_out_split

    return held_out_split(n, held_out, seed)


def _probe_part(profile: InterpProfile, backend: Backend, tasks: ProfileTasks, quick: bool) -> None:
    from ..methods.probes import probe_sweep

    for task, dataset in tasks.probes.items():
        # Newton's method solves these small penalised logistic regressions in ~10 iterations
        # (the held-out AUROC of 100 AdamW epochs on the zoo's tasks, in far less time).
        sweep = probe_sweep(
            backend, dataset, folds=3 if quick else 5, solver="newton", epochs=50, weight_decay=1e-2
        )
        profile.probe_auroc[task] = {r.site: float(r.heldout_auroc) for r in sweep.layers}
        profile.probe_train_auroc[task] = {r.site: float(r.train_auroc) for r in sweep.layers}
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


def _sae_part(
    profile: InterpProfile, backend: Backend, tasks: ProfileTasks, site: str, quick: bool, seed: int
) -> None:
    from ..collect import collect
    from ..methods.sae import SAEConfig, fit_sae, reconstruction_metrics

    acts = collect(backend, tasks.texts, [site], pool=None)[site].float()
    train_idx, test_idx = _split_rows(len(acts), 0.2, seed)
    train, test = acts[train_idx], acts[test_idx]
    dim = int(acts.shape[1])
    profile.sae_site = site
    for kind in ("dense", "rank1", "topk"):
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

    # lr 1e-2 for 3 epochs reaches the held-out KL of 12 epochs at 1e-3 on the zoo's models
    lens = TunedLens.fit_rows(
        backend, tasks.texts.ids(), epochs=1 if quick else 3, lr=1e-2, held_out=0.25, seed=seed
    )
    report = lens.report
    assert report is not None  # fit_rows always evaluates on held-out rows
    profile.lens_kl = {
        site: {"logit": float(a), "tuned": float(b)}
        for site, a, b in zip(report.layers, report.kl_logit, report.kl_tuned, strict=True)
    }


def _patching_part(profile: InterpProfile, backend: Backend, tasks: ProfileTasks) -> None:
    import torch

    from ..methods.attribute import LogitDiff, patch_sweep

    assert tasks.contrast is not None
    clean_ids, corrupted_ids = _equal_length_pairs(profile, tasks.contrast)
    if not clean_ids:
        return
    metric = None
    if tasks.answers is not None:
        metric = LogitDiff(torch.tensor(tasks.answers[0][:1]), torch.tensor(tasks.answers[1][:1]))
    sweep = patch_sweep(
        backend, clean_ids[:1], corrupted_ids[:1], axis="position", metric_fn=metric
    )
    matrix = [
        [float("nan") if v is None else float(v) for v in row] for row in sweep.gap_restored or []
    ]
    finite = [v for row in matrix for v in row if math.isfinite(v)]
    profile.patching = {
        "matrix": matrix,
        "rows": list(sweep.rows),
        "columns": [str(c) for c in sweep.columns],
        "max": max(finite) if finite else None,
    }


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
) -> InterpProfile:
    """The profile of the model behind ``backend``: each part runs where the backend has the
    capabilities it needs; a part that cannot run is named in ``notes``, never hidden.

    ``threads``: torch threads while profiling (restored afterwards). Default: one for models
    under 50M parameters, whose small matrix products run faster on one thread, and the
    current setting otherwise.
    """
    import torch

    n_params = _n_params(backend.model)
    previous = torch.get_num_threads()
    wanted = threads if threads is not None else (1 if n_params < 50_000_000 else previous)
    torch.set_num_threads(wanted)
    try:
        return _profile(backend, tokenizer, name, arch_family, tasks, quick, seed, n_params)
    finally:
        torch.set_num_threads(previous)


def _profile(
    backend: Backend,
    tokenizer: Any,
    name: str,
    arch_family: str | None,
    tasks: ProfileTasks | None,
    quick: bool,
    seed: int,
    n_params: int,
) -> InterpProfile:
    import torch

    start = time.perf_counter()
    tasks = tasks or generic_tasks(tokenizer, seed=seed)
    layers = backend.layer_names()
    caps = set(backend.capabilities)
    profile = InterpProfile(
        model_name=name,
        arch_family=arch_family or backend.name,
        n_params=n_params,
        n_layers=len(layers),
        hidden_dim=_hidden_dim(backend),
        tasks=tasks.source,
    )
    t = profile.timings
    torch.manual_seed(seed)
    _timed(t, "probes", lambda: _probe_part(profile, backend, tasks, quick))
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
        _timed(t, "patching", lambda: _patching_part(profile, backend, tasks))
    if "recurrent_state" in caps:
        _timed(t, "state", lambda: _state_part(profile, backend, tasks))
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
) -> InterpProfile:
    """archscope 0.2's entry point: the profile of ``model`` (see `profile_backend`). The
    per-task layer arguments are accepted for compatibility: every layer is now probed and
    the best held-out layer reported. ``tokenize_fn`` is not needed (texts are tokenized with
    ``tokenizer``)."""
    from ..backends import Backend

    backend = Backend.for_model(model, hint=backend_hint)
    return profile_backend(
        backend, tokenizer, name=model_name, arch_family=arch_family, tasks=tasks, quick=quick
    )


def profile_models(
    specs: Sequence[str],
    *,
    hint: str | None = None,
    quick: bool = False,
    progress: Callable[[str], None] | None = None,
) -> list[InterpProfile]:
    """Load each model spec and profile it, with the tasks its model source supplies (the
    zoo's planted attributes) or the generic English ones."""
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
        profiles.append(profile_backend(backend, tokenizer, name=spec, tasks=tasks, quick=quick))
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
