"""Result dataclasses of the patching methods, with JSON, Markdown and heat-map figures."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ...results import Result, pyplot


def _fmt(value: float | None) -> str:
    return (
        "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"
    )


def _heatmap(
    ax: Any, matrix: list[list[float | None]], rows: list[str], cols: list[Any], title: str
) -> Any:
    values = [[math.nan if v is None else v for v in row] for row in matrix]
    finite = [abs(v) for row in values for v in row if not math.isnan(v)]
    bound = max([1.0, *finite])
    image = ax.imshow(
        values, cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto", interpolation="nearest"
    )
    ax.set_yticks(range(len(rows)), rows)
    step = max(1, len(cols) // 16)
    ax.set_xticks(range(0, len(cols), step), [str(c) for c in cols[::step]])
    ax.set_title(title)
    return image


@dataclass
class PatchResult(Result):
    """One activation-patching experiment (archscope 0.2's fields, meanings fixed).

    ``gap_restored = (patched_metric - baseline_metric) / (clean_metric - baseline_metric)``:
    ``clean_metric`` is the source (clean) run's metric, ``baseline_metric`` the unpatched
    target (corrupted) run's, ``patched_metric`` the target run with the sites patched.
    (0.2 stored the source run's metric in ``baseline_metric`` and the target's in
    ``clean_metric``.) NaN when the clean and baseline metrics are equal.
    """

    layer_range: tuple[int, int]
    gap_restored: float
    target_metric: str
    baseline_metric: float
    patched_metric: float
    clean_metric: float
    sites: list[str] = field(default_factory=list)
    positions: Any = "all"

    def to_markdown(self) -> str:
        return "\n".join(
            [
                "## Activation patching",
                "",
                f"- sites: {', '.join(self.sites)} (positions: {self.positions})",
                f"- metric: {self.target_metric}",
                "",
                "| run | metric |",
                "|---|---|",
                f"| clean (source) | {self.clean_metric:.4f} |",
                f"| corrupted (target) | {self.baseline_metric:.4f} |",
                f"| patched | {self.patched_metric:.4f} |",
                "",
                f"**gap restored: {_fmt(self.gap_restored)}**",
            ]
        )


@dataclass
class DIMResult(Result):
    """Per-component share of a metric gap (archscope 0.2's fields, plus details).

    ``components[c]`` is the fraction of the gap ``total = metric(a) - metric(b)`` that
    patching component ``c``'s output from run a into run b (at the chosen layers) restores;
    signed, so it is positive whenever the patch moves b towards a, whichever way the gap
    points. ``joint`` patches every listed component at once; ``joint - sum(components)`` is
    their interaction. All NaN when ``total`` is 0 (nothing to decompose).
    """

    components: dict[str, float]
    total: float
    layer_range: tuple[int, int]
    effects: dict[str, float] = field(default_factory=dict)
    joint: float = math.nan
    sites: dict[str, list[str]] = field(default_factory=dict)
    clean_metric: float = math.nan
    corrupted_metric: float = math.nan
    metric: str = "custom"

    def to_markdown(self) -> str:
        rows = [
            f"| {c} | {_fmt(v)} | {self.effects.get(c, math.nan):.4f} | "
            f"{', '.join(self.sites.get(c, []))} |"
            for c, v in self.components.items()
        ]
        return "\n".join(
            [
                f"## DIM decomposition (layers {self.layer_range[0]}–{self.layer_range[1]})",
                "",
                f"gap (a − b) = {self.total:.4f} ({self.metric}); all components together restore "
                f"{_fmt(self.joint)}",
                "",
                "| component | share of gap | metric change | sites |",
                "|---|---|---|---|",
                *rows,
            ]
        )


@dataclass
class PatchSweep(Result):
    """A patching sweep: gap restored per cell, rows = layers, columns = positions (counted
    among real tokens) or components. ``gap_restored`` holds exact patching, ``attribution``
    the gradient estimate (AtP); either may be None. ``correlation`` is their Pearson
    correlation over the cells where both exist. Cells a layer lacks are None."""

    backend: str
    metric: str
    axis: str
    rows: list[str]
    columns: list[Any]
    sites: list[list[str | None]]
    clean_metric: float
    corrupted_metric: float
    positions: Any = "all"
    gap_restored: list[list[float | None]] | None = None
    attribution: list[list[float | None]] | None = None
    correlation: float | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    #: what ``attribution`` holds: "AtP" (signed), "AtP*" (signed; the softmax of the
    #: patched query-key logits exact), or "AtP+GradDrop" / "AtP*+GradDrop" (magnitudes, as
    #: shares of the gap's magnitude; ``correlation`` is then with the exact effects' magnitudes)
    estimator: str = "AtP"

    def figure(self) -> Any:
        """Heat map(s): layers × columns, red = restores the clean behaviour."""
        plt = pyplot()
        panels = [
            (name, m)
            for name, m in (
                ("exact patching", self.gap_restored),
                ("attribution patching", self.attribution),
            )
            if m is not None
        ]
        fig, axes = plt.subplots(
            1,
            len(panels),
            squeeze=False,
            figsize=(4 + 0.25 * len(self.columns) * len(panels), 1.5 + 0.4 * len(self.rows)),
        )
        image = None
        for ax, (name, matrix) in zip(axes[0], panels, strict=True):
            image = _heatmap(ax, matrix, self.rows, self.columns, name)
            ax.set_xlabel("position (real tokens)" if self.axis == "position" else "component")
        if image is not None:
            fig.colorbar(image, ax=list(axes[0]), label="gap restored")
        title = f"{self.backend}: {self.metric}"
        if self.correlation is not None:
            title += f" (exact vs {self.estimator} r = {self.correlation:.2f})"
        fig.suptitle(title)
        return fig

    def to_markdown(self) -> str:
        lines = [
            f"## Patching sweep ({self.backend}, {self.metric}), layers × {self.axis}",
            "",
            f"clean {self.clean_metric:.4f}, corrupted {self.corrupted_metric:.4f}",
        ]
        for name, matrix in (
            ("gap restored", self.gap_restored),
            (f"attribution ({self.estimator})", self.attribution),
        ):
            if matrix is None:
                continue
            lines += [
                "",
                f"### {name}",
                "",
                "| layer | " + " | ".join(map(str, self.columns)) + " |",
                "|---" * (len(self.columns) + 1) + "|",
            ]
            lines += [
                f"| {r} | " + " | ".join(_fmt(v) for v in row) + " |"
                for r, row in zip(self.rows, matrix, strict=True)
            ]
        if self.correlation is not None:
            against = "|exact|" if "GradDrop" in self.estimator else "exact"
            lines += [
                "",
                f"Pearson correlation {against} vs {self.estimator}: {self.correlation:.3f}",
            ]
        return "\n".join(lines)


@dataclass
class StatePatchResult(Result):
    """State patching: the recurrent state after the corrupted prefix, with one layer's state
    of one kind swapped for the clean prefix's, continued on the shared suffix.

    ``gap_restored[layer][kind]`` per swapped site (None where a layer has no state of that
    kind); ``per_layer`` swaps every state of the layer; ``all_states`` swaps everything and
    reproduces the clean run (≈ 1.0, a check)."""

    backend: str
    metric: str
    layers: list[int]
    kinds: list[str]
    gap_restored: list[list[float | None]]
    per_layer: list[float]
    all_states: float
    #: The metric of the run with every state swapped (equals ``clean_metric`` when the
    #: backend continues runs exactly).
    all_states_metric: float
    clean_metric: float
    corrupted_metric: float
    suffix_tokens: int
    #: The real-token position the states were swapped after, when given as ``after=``.
    after: int | None = None

    def figure(self) -> Any:
        plt = pyplot()
        fig, ax = plt.subplots(
            figsize=(3 + 1.2 * (len(self.kinds) + 1), 1.5 + 0.4 * len(self.layers))
        )
        matrix = [[*row, per] for row, per in zip(self.gap_restored, self.per_layer, strict=True)]
        image = _heatmap(
            ax,
            matrix,
            [f"layer_{i}" for i in self.layers],
            [*self.kinds, "all"],
            f"{self.backend}: state patching",
        )
        fig.colorbar(image, ax=ax, label="gap restored")
        return fig

    def to_markdown(self) -> str:
        head = "| layer | " + " | ".join(self.kinds) + " | all of the layer |"
        rows = [
            f"| {i} | " + " | ".join(_fmt(v) for v in row) + f" | {_fmt(per)} |"
            for i, row, per in zip(self.layers, self.gap_restored, self.per_layer, strict=True)
        ]
        return "\n".join(
            [
                f"## State patching ({self.backend}, {self.metric})",
                "",
                (
                    f"suffix: last {self.suffix_tokens} token(s)"
                    if self.after is None
                    else f"states swapped after real token {self.after}; suffix: "
                    f"{self.suffix_tokens} token(s)"
                )
                + f"; clean {self.clean_metric:.4f}, "
                f"corrupted {self.corrupted_metric:.4f}; every state swapped: "
                f"{_fmt(self.all_states)}",
                "",
                head,
                "|---" * (len(self.kinds) + 2) + "|",
                *rows,
            ]
        )
