"""Activation patching, patching sweeps, attribution patching (AtP) and DIM decomposition.

Everything goes through the backend protocol: sites from ``backend.sites()``, patches as
`Edit`s of `Backend.run`, gradients with ``run(grad=True)``. Metrics: see `._metric`.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ...backends import Backend, Edit
from ...errors import InputError, SiteError
from ...sites import Site
from ._engine import PatchRuns, Spec, backend_of
from ._metric import MetricFn, gap_fraction, mean_value
from ._results import DIMResult, PatchResult, PatchSweep

if TYPE_CHECKING:
    import torch

#: Component names a caller may use → site roles.
COMPONENT_ROLES = {"attention": "attn", "attn": "attn", "mixer": "mixer", "mlp": "mlp"}
#: Column order of a layer × component sweep.
_COMPONENT_ORDER = ("attn", "mixer", "mlp")


def _layers(backend: Backend, layers: Sequence[int] | None) -> list[int]:
    n = backend.n_layers
    if layers is None:
        return list(range(n))
    chosen = [int(i) for i in layers]
    if not chosen:
        raise InputError("layer_indices is empty: give at least one layer index")
    bad = [i for i in chosen if not 0 <= i < n]
    if bad:
        raise SiteError(f"layer indices {bad} out of range: the model has {n} layers (0..{n - 1})")
    return chosen


def _role(backend: Backend, site: str | None) -> str:
    return backend.primary_role if site is None else COMPONENT_ROLES.get(site, site)


def _site(backend: Backend, layer: int, role: str) -> str:
    return backend.site_info(str(Site(role, layer))).name


def activation_patch(
    model: Any,
    prompt_source: Any,
    prompt_target: Any,
    layer_indices: Sequence[int] | None = None,
    metric_fn: MetricFn | None = None,
    backend_hint: str | None = None,
    *,
    site: str | None = None,
    sites: Sequence[str] | None = None,
    positions: Any = "all",
) -> PatchResult:
    """Run ``prompt_target`` with the activations of ``prompt_source`` patched in.

    Patches role ``site`` (default: the backend's main per-layer site, the residual stream or
    RNN hidden state; or ``attn``/``attention``, ``mlp``, ``mixer``, ``cell``, ...) of every
    layer in ``layer_indices`` (None: every layer) together, or the explicit ``sites`` names
    (``sites=["embed"]`` needs no layers; ``layer_indices`` must then be left out). ``positions``:
    ``"all"``, ``"last"`` or real-token indices (negative from the last real token), counted
    per row among real tokens. ``metric_fn(logits, mask) -> per-row value`` (one-argument
    functions get 0.2's ``outputs`` object with ``.logits``); None = `LogitDiff`. Inputs are
    token batches (``{"input_ids", "attention_mask"}`` or id tensors) with the same rows.
    """
    backend = backend_of(model, backend_hint)
    if sites is None:
        layers = _layers(backend, layer_indices)
        role = _role(backend, site)
        names = [_site(backend, i, role) for i in layers]
    else:
        if layer_indices is not None:
            raise InputError(
                f"give either layer_indices ({list(layer_indices)}) or sites ({list(sites)}), "
                "not both: sites name every patched site, layers included"
            )
        names = [backend.site_info(s).name for s in sites]
        layers = sorted({i for i in (Site.parse(s).layer for s in names) if i is not None})
        if not names:
            raise InputError("sites is empty: give at least one site to patch")
    ctx = PatchRuns.build(backend, prompt_source, prompt_target, names, positions, metric_fn)
    cells = list(range(len(ctx.cols)))
    patched = ctx.run_specs([[(s, cells) for s in names]], batch_size=ctx.rows)[0]
    return PatchResult(
        layer_range=(min(layers), max(layers)) if layers else (-1, -1),
        gap_restored=float(
            gap_fraction(patched, ctx.corrupted_metric, ctx.clean_metric, "activation_patch")
        ),
        target_metric=ctx.metric_name,
        baseline_metric=ctx.corrupted_metric,
        patched_metric=patched,
        clean_metric=ctx.clean_metric,
        sites=names,
        positions=positions if isinstance(positions, str) else list(ctx.cols.labels),
    )


def _grid(
    backend: Backend, layers: list[int], axis: str, role: str, components: Sequence[str] | None
) -> tuple[list[str], list[list[str | None]]]:
    """Component columns (axis "component") and the site of each (layer, column) cell."""
    if axis == "position":
        return [role], [[_site(backend, i, role)] for i in layers]
    table = backend.sites()
    if components is None:
        roles = [r for r in _COMPONENT_ORDER if any(str(Site(r, i)) in table for i in layers)]
    else:
        unknown = [
            c
            for c in components
            if c not in COMPONENT_ROLES and not any(str(Site(c, i)) in table for i in layers)
        ]
        if unknown:
            raise SiteError(
                f"components {unknown} are not sites of these layers; valid: "
                "attention (attn), mixer, mlp, or any per-layer role the backend has"
            )
        roles = [COMPONENT_ROLES.get(c, c) for c in components]
    if not roles:
        raise SiteError(
            f"backend {backend.name!r} has no attention, mixer or MLP sites in "
            f"layers {layers}; sweep over positions instead"
        )
    return roles, [
        [str(Site(r, i)) if str(Site(r, i)) in table else None for r in roles] for i in layers
    ]


def _pearson(a: list[list[float | None]], b: list[list[float | None]]) -> float | None:
    import torch

    pairs = [
        (x, y)
        for ra, rb in zip(a, b, strict=True)
        for x, y in zip(ra, rb, strict=True)
        if x is not None and y is not None and math.isfinite(x) and math.isfinite(y)
    ]
    if len(pairs) < 2:
        return None
    t = torch.tensor(pairs, dtype=torch.float64)
    t = t - t.mean(0)
    denom = float(t[:, 0].norm() * t[:, 1].norm())
    return float((t[:, 0] * t[:, 1]).sum()) / denom if denom > 0 else None


def patch_sweep(  # noqa: C901 - validates each option of the sweep in turn
    model: Any,
    clean: Any,
    corrupted: Any,
    *,
    layers: Sequence[int] | None = None,
    axis: str = "position",
    site: str | None = None,
    embed: bool = False,
    components: Sequence[str] | None = None,
    positions: Any = "all",
    metric_fn: MetricFn | None = None,
    exact: bool = True,
    attribution: bool = False,
    batch_size: int = 64,
    backend_hint: str | None = None,
    grad_drop: bool = False,
) -> PatchSweep:
    """Gap restored by patching each cell alone: layers × positions (``axis="position"``,
    role ``site`` at each real-token position of ``positions``) or layers × components
    (``axis="component"``: attention / mixer / MLP outputs, all ``positions`` at once).

    ``embed=True`` adds the embedding output as a first row (axis "position"): with it the
    rows are the residual stream before every block and after the last.

    ``exact`` runs every patched forward (``batch_size`` rows per forward pass: the corrupted
    batch repeated, each block patched at its own cell). ``attribution`` adds the AtP estimate
    of every cell from one forward and one backward pass; with both, their correlation.
    ``grad_drop`` (with ``attribution``) replaces AtP by AtP with GradDrop (Kramár et al.
    2024): one backward pass per layer with that layer's residual contributions detached,
    the mean magnitude of the estimates; it estimates |effect| and is correlated with the
    magnitude of the exact effect.
    """
    if grad_drop and not attribution:
        raise InputError(
            "grad_drop=True changes the attribution estimate: set attribution=True with it "
            "(or use attribution_patch(..., grad_drop=True))"
        )
    if axis not in ("position", "component"):
        raise InputError(f"axis {axis!r}: use 'position' or 'component'")
    if not (exact or attribution):
        raise InputError("nothing to compute: set exact=True, attribution=True or both")
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    backend = backend_of(model, backend_hint)
    chosen = _layers(backend, layers)
    role = _role(backend, site)
    columns, grid = _grid(backend, chosen, axis, role, components)
    row_names = [f"layer_{i}" for i in chosen]
    if embed:
        if axis != "position":
            raise InputError(
                "embed=True adds a row to a layer x position sweep; use axis='position'"
            )
        grid = [[backend.site_info("embed").name], *grid]
        row_names = ["embed", *row_names]
    sites = [s for row in grid for s in row if s is not None]
    start = time.perf_counter()
    with _gradients_possible(attribution):  # AtP's tensors must not be inference tensors
        ctx = PatchRuns.build(backend, clean, corrupted, sites, positions, metric_fn)
    seconds = {"cache": time.perf_counter() - start}
    n_cols = len(ctx.cols) if axis == "position" else len(columns)
    all_cols = list(range(len(ctx.cols)))

    def cell_spec(r: int, c: int) -> Spec | None:
        if axis == "position":
            name = grid[r][0]
            return [(name, [c])] if name is not None else None
        name = grid[r][c]
        return [(name, all_cols)] if name is not None else None

    exact_matrix: list[list[float | None]] | None = None
    if exact:
        start = time.perf_counter()
        specs: list[Spec] = []
        where: list[tuple[int, int]] = []
        for r in range(len(grid)):
            for c in range(n_cols):
                spec = cell_spec(r, c)
                if spec is not None:
                    specs.append(spec)
                    where.append((r, c))
        values = ctx.run_specs(specs, batch_size)
        exact_matrix = [[None for _ in range(n_cols)] for _ in grid]
        for (r, c), v in zip(where, values, strict=True):
            exact_matrix[r][c] = gap_fraction(v, ctx.corrupted_metric, ctx.clean_metric)
        seconds["exact"] = time.perf_counter() - start
    atp_matrix = None
    if attribution:
        start = time.perf_counter()
        drops = _drop_sites(backend) if grad_drop else None
        atp_matrix = _attribution(ctx, grid, axis, n_cols, drops)
        seconds["attribution"] = time.perf_counter() - start
    gap_fraction(ctx.clean_metric, ctx.corrupted_metric, ctx.clean_metric, "patch_sweep")
    return PatchSweep(
        backend=backend.name,
        metric=ctx.metric_name,
        axis=axis,
        rows=row_names,
        columns=list(ctx.cols.labels) if axis == "position" else columns,
        sites=[[row[0]] * n_cols for row in grid] if axis == "position" else grid,
        clean_metric=ctx.clean_metric,
        corrupted_metric=ctx.corrupted_metric,
        positions=positions if isinstance(positions, str) else list(ctx.cols.labels),
        gap_restored=exact_matrix,
        attribution=atp_matrix,
        correlation=(
            _pearson(_magnitude(exact_matrix) if grad_drop else exact_matrix, atp_matrix)
            if exact_matrix is not None and atp_matrix is not None
            else None
        ),
        seconds=seconds,
        estimator="AtP+GradDrop" if grad_drop else "AtP",
    )


def attribution_patch(
    model: Any,
    clean: Any,
    corrupted: Any,
    *,
    exact: bool = False,
    grad_drop: bool = False,
    **kwargs: Any,
) -> PatchSweep:
    """Attribution patching (AtP; Nanda 2023, Kramár et al. 2024): every cell of a sweep
    estimated to first order from one forward and one backward pass on the corrupted input,
    ``grad(metric) · (clean − corrupted)`` summed over the cell, as a fraction of the gap.
    ``exact=True`` also runs the exact sweep and reports the correlation. ``grad_drop``:
    AtP with GradDrop (magnitudes; see `patch_sweep`). Other arguments as in `patch_sweep`;
    AtP* on attention queries and keys: `attention_node_sweep`."""
    return patch_sweep(
        model, clean, corrupted, exact=exact, attribution=True, grad_drop=grad_drop, **kwargs
    )


def _gradients_possible(on: bool) -> contextlib.AbstractContextManager[Any]:
    """With ``on``: gradients enabled and inference mode off, whatever the caller set."""
    import torch

    if not on:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(torch.inference_mode(False))
    stack.enter_context(torch.enable_grad())
    return stack


def _magnitude(matrix: list[list[float | None]]) -> list[list[float | None]]:
    return [[None if v is None else abs(v) for v in row] for row in matrix]


def _drop_sites(backend: Backend) -> list[list[str]]:
    """Per layer, the sites whose values that layer adds to the residual stream (attention,
    mixer, MLP outputs): GradDrop stops the gradient through them, one layer at a time."""
    table = backend.sites()
    per_layer = [
        [str(Site(r, i)) for r in _COMPONENT_ORDER if str(Site(r, i)) in table]
        for i in range(backend.n_layers)
    ]
    if backend.n_layers < 2 or not all(per_layer):
        lacking = [i for i, sites in enumerate(per_layer) if not sites]
        raise InputError(
            f"GradDrop drops one layer's residual contribution at a time, so it needs two layers "
            f"or more, each with attention, mixer or MLP output sites; backend "
            f"{backend.name!r} has {backend.n_layers} layer(s)"
            + (f" and layers {lacking} have none of those sites" if lacking else "")
            + ". A model without a residual stream (a stacked RNN) has no such contribution: "
            "use plain AtP (grad_drop=False)"
        )
    return per_layer


def _attribution(
    ctx: PatchRuns,
    grid: list[list[str | None]],
    axis: str,
    n_cols: int,
    drops: list[list[str]] | None = None,
) -> list[list[float | None]]:
    """AtP. The gradient is taken with respect to a zero tensor *added* to each site through
    an `Edit`, so it is the derivative of the metric with respect to that site's value as the
    backend's own edit semantics define it (for recurrent layers, the state at that step and
    everything recomputed from it), the same change an exact patch makes. Gradients are on
    here also when the caller runs under ``torch.no_grad()`` or ``torch.inference_mode()``."""

    with _gradients_possible(True):
        return _attribution_grid(ctx, grid, axis, n_cols, drops)


def _attribution_grid(
    ctx: PatchRuns,
    grid: list[list[str | None]],
    axis: str,
    n_cols: int,
    drops: list[list[str]] | None = None,
) -> list[list[float | None]]:
    import torch

    backend = ctx.backend
    sites = list(dict.fromkeys(s for row in grid for s in row if s is not None))
    # tensors made under inference_mode cannot take part in autograd: use normal copies
    batch = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in ctx.corrupted.items()}
    corrupted = backend.run(batch, capture=sites)
    if drops is None:
        per_site = _atp_changes(ctx, batch, corrupted.activations, sites, [])
    else:
        # GradDrop: |estimate| with layer l's residual contributions detached, summed over
        # layers and divided by L - 1 (a node inside layer l gets 0 from that layer's pass)
        per_site = {}
        for dropped in drops:
            changes = _atp_changes(ctx, batch, corrupted.activations, sites, dropped)
            for s, v in changes.items():
                per_site[s] = per_site.get(s, 0) + v.abs()
        per_site = {s: v / (len(drops) - 1) for s, v in per_site.items()}
    gap = ctx.clean_metric - ctx.corrupted_metric
    out: list[list[float | None]] = []
    for row in grid:
        line: list[float | None] = []
        for c in range(n_cols):
            name = row[0] if axis == "position" else row[c]
            if name is None:
                line.append(None)
                continue
            change = per_site[name][c] if axis == "position" else per_site[name].sum()
            if drops is not None:  # a magnitude, as a share of the gap's magnitude
                line.append(float(change) / abs(gap) if gap != 0 else float("nan"))
                continue
            line.append(
                gap_fraction(
                    ctx.corrupted_metric + float(change), ctx.corrupted_metric, ctx.clean_metric
                )
            )
        out.append(line)
    return out


def _atp_changes(
    ctx: PatchRuns,
    batch: dict[str, Any],
    corrupted: dict[str, torch.Tensor],
    sites: list[str],
    dropped: list[str],
) -> dict[str, torch.Tensor]:
    """Per site, the AtP estimate of the metric's change per column, ``grad · (clean -
    corrupted)`` summed over each column's rows; the gradient is taken with ``dropped`` sites
    detached (their values unchanged, no gradient through them; GradDrop)."""
    import torch

    deltas = {s: torch.zeros_like(corrupted[s], requires_grad=True) for s in sites}
    edits = [Edit.add(s, deltas[s]) for s in sites]
    edits += [Edit.apply(s, _detached) for s in dropped]
    result = ctx.backend.run(batch, capture=ctx.readout.capture, edits=edits, grad=True)
    logits, mask = ctx.readout.logits(result, grad=True)
    value = mean_value(ctx.metric(logits, mask))
    grads = torch.autograd.grad(value, [deltas[s] for s in sites], allow_unused=True)
    cols = ctx.cols
    valid = cols.valid
    per_site: dict[str, torch.Tensor] = {}
    for s, g in zip(sites, grads, strict=True):
        diff = ctx.aligned(s) - corrupted[s]
        g = torch.zeros_like(diff) if g is None else g
        contrib = (g.double() * diff.double()).flatten(2).sum(-1)  # (rows, seq)
        safe = cols.corrupted.clamp(min=0)
        per_site[s] = (contrib.gather(1, safe) * valid).sum(0)  # per column
    return per_site


def _detached(value: torch.Tensor) -> torch.Tensor:
    return value.detach()


def dim_decompose(
    model: Any,
    prompt_a: Any,
    prompt_b: Any,
    layer_indices: list[int],
    metric_fn: MetricFn | None = None,
    components: tuple[str, ...] = ("attention", "mlp"),
    backend_hint: str | None = None,
    *,
    positions: Any = "all",
) -> DIMResult:
    """Share of the gap ``metric(a) - metric(b)`` each component carries: component ``c``'s
    outputs at ``layer_indices`` are copied from run a into run b and the fraction of the gap
    restored is reported (signed; NaN when the gap is 0).

    Components: ``attention`` (``attn``), ``mixer``, ``mlp`` or any per-layer role. The
    default pair adapts to the backend: the roles among attention, mixer and MLP that these
    layers have (a Mamba block: mixer; a hybrid: all three). An explicitly named component
    that none of the layers has is an error; layers without it are skipped.
    """
    backend = backend_of(model, backend_hint)
    layers = _layers(backend, layer_indices)
    table = backend.sites()
    requested = list(components)
    if tuple(components) == ("attention", "mlp"):
        present = [r for r in _COMPONENT_ORDER if any(str(Site(r, i)) in table for i in layers)]
        requested = ["attention" if r == "attn" else r for r in present]
    chosen: dict[str, list[str]] = {}
    for comp in requested:
        role = COMPONENT_ROLES.get(comp, comp)
        names = [str(Site(role, i)) for i in layers if str(Site(role, i)) in table]
        if not names:
            roles = sorted({n.split(".", 1)[1] for n in table if n.startswith("layer_")})
            raise SiteError(
                f"component {comp!r} (site role {role!r}) is in none of layers "
                f"{layers}; roles of backend {backend.name!r}: {', '.join(roles)}"
            )
        chosen[comp] = names
    if not chosen:
        raise SiteError(
            f"backend {backend.name!r} has no attention, mixer or MLP sites in "
            f"layers {layers}; name the components to decompose"
        )
    all_sites = [s for names in chosen.values() for s in names]
    ctx = PatchRuns.build(backend, prompt_a, prompt_b, all_sites, positions, metric_fn)
    cells = list(range(len(ctx.cols)))
    specs: list[Spec] = [[(s, cells) for s in names] for names in chosen.values()]
    specs.append([(s, cells) for s in all_sites])
    values = ctx.run_specs(specs, batch_size=ctx.rows * len(specs))
    clean, corr = ctx.clean_metric, ctx.corrupted_metric
    gap_fraction(clean, corr, clean, "dim_decompose")  # warns once on a zero gap
    return DIMResult(
        components={
            c: gap_fraction(v, corr, clean) for c, v in zip(chosen, values[:-1], strict=True)
        },
        total=clean - corr,
        layer_range=(min(layers), max(layers)),
        effects={c: v - corr for c, v in zip(chosen, values[:-1], strict=True)},
        joint=gap_fraction(values[-1], corr, clean),
        sites=chosen,
        clean_metric=clean,
        corrupted_metric=corr,
        metric=ctx.metric_name,
    )
