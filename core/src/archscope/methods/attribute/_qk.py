"""AtP* on attention queries and keys (Kramár et al. 2024): a layer x position sweep whose
nodes are the keys (or queries) of one attention layer at one position, all heads together.

Plain AtP estimates a node's effect linearly, ``grad · (clean - corrupted)``; where the
softmax saturates the gradient is near zero although the exact effect is large. AtP*'s fix
recomputes the softmax of the patched query-key logits exactly and linearises only after it:
for a key node at position t, with logits ``S`` and probabilities ``A`` of the corrupted run,

    estimate = sum over heads h, queries s of  g_A[h, s, :] · (softmax(S'[h, s, :]) - A[h, s, :])

where ``S'`` is ``S`` with column t raised by ``scaling * q_s · (k_t(clean) - k_t)`` and
``g_A`` the gradient of the metric with respect to the probabilities (a query node changes
its own row by ``scaling * (q_s(clean) - q_s) · k``). The exact sweep replaces the key (query)
at that position by the clean run's and runs the rest of the model.

The nodes live inside the attention function, which no site exposes: the queries and keys
are read, and replaced, where transformers' attention modules hand them to their eager
attention function (``eager_attention_forward`` of the module's modelling file), for the
duration of a run only. Each run checks on the model that the probabilities are
``softmax(scaling * q kᵀ + mask)`` and that the output is ``probabilities @ v``; an attention
that computes anything else (soft-capping, sinks, ...) is refused rather than estimated wrongly.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ...backends import Backend, Edit
from ...errors import InputError, SiteError
from ...guards import model_lock
from ._align import aligned_source, replicate
from ._engine import PatchRuns, backend_of
from ._metric import MetricFn, gap_fraction, mean_value
from ._patch import _detached, _drop_sites, _gradients_possible, _magnitude, _pearson
from ._results import PatchSweep

if TYPE_CHECKING:
    import torch

NODES = ("key", "query")
ESTIMATORS = ("atp", "atp*")


@dataclass
class _Layer:
    """What one attention layer's call saw: queries, keys (kv heads), logits, probabilities."""

    q: torch.Tensor
    k: torch.Tensor
    scores: torch.Tensor | None = None
    probs: torch.Tensor | None = None
    scaling: float = 1.0


@dataclass
class _Tap:
    """Reads (and optionally changes) the queries and keys each attention layer passes to
    its eager attention function."""

    backend: Backend
    layer_of: dict[int, int]
    modules: list[Any]
    seen: dict[int, _Layer] = field(default_factory=dict)

    @classmethod
    def of(cls, backend: Backend) -> _Tap:
        layer_of: dict[int, int] = {}
        modules = []
        for i in range(backend.n_layers):
            for name in (f"layer_{i}.attn_pattern", f"layer_{i}.attn"):
                module = _attention_module(backend, name)
                if module is not None:
                    layer_of[id(module)] = i
                    modules.append(module)
                    break
        if not modules:
            raise SiteError(
                f"backend {backend.name!r} has no attention layer whose queries and keys "
                "archscope can read (an attention module of transformers that calls its "
                "modelling file's eager_attention_forward); AtP* on queries and keys applies "
                "to attention only. For SSM and RNN layers use patch_sweep / "
                "attribution_patch (grad_drop=True where the layers add to a residual stream)"
            )
        return cls(backend, layer_of, modules)

    @property
    def layers(self) -> list[int]:
        return sorted(self.layer_of.values())

    @property
    def capture(self) -> list[str]:
        """Nothing beyond the readout: `calls` itself switches the model to eager attention."""
        return []

    @contextlib.contextmanager
    def calls(self, fn: Callable[..., Any]) -> Iterator[None]:
        """During the block, each tapped layer's eager attention call goes through
        ``fn(layer, original, module, query, key, value, mask, scaling, args, kwargs)``."""
        homes: dict[str, Any] = {
            type(m).__module__: sys.modules[type(m).__module__] for m in self.modules
        }
        saved = {name: home.eager_attention_forward for name, home in homes.items()}

        def wrap(original: Callable[..., Any]) -> Callable[..., Any]:
            def eager(
                module: Any, query: Any, key: Any, value: Any, mask: Any, *a: Any, **kw: Any
            ) -> Any:
                layer = self.layer_of.get(id(module))
                if layer is None:
                    return original(module, query, key, value, mask, *a, **kw)
                scaling = kw.get("scaling")
                if scaling is None:
                    scaling = query.shape[-1] ** -0.5
                return fn(layer, original, module, query, key, value, mask, float(scaling), a, kw)

            return eager

        called: set[int] = set()

        def seen(fn_: Callable[..., Any]) -> Callable[..., Any]:
            def inner(layer: int, *args: Any) -> Any:
                called.add(layer)
                return fn_(layer, *args)

            return inner

        fn = seen(fn)
        model = self.backend.model
        config = getattr(model, "config", None)
        before = getattr(config, "_attn_implementation", None)
        with model_lock(model):
            try:
                _set_attention(model, "eager")
                for name, home in homes.items():
                    home.eager_attention_forward = wrap(saved[name])
                yield
            finally:
                for name, home in homes.items():
                    home.eager_attention_forward = saved[name]
                _set_attention(model, before)
        unseen = sorted(set(self.layers) - called)
        if unseen:
            raise SiteError(
                f"attention layers {unseen} did not call their eager attention function in "
                "this run, so their queries and keys could not be read; this model's attention "
                "does not go through transformers' attention interface"
            )


def _attention_module(backend: Backend, site: str) -> Any:
    """The attention module behind ``site`` when its modelling file has an eager attention
    function (the one place its queries and keys pass), else None."""
    if site not in backend.sites():
        return None
    hookpoint = getattr(backend, "hookpoint", None)
    if hookpoint is None:
        return None
    module = getattr(hookpoint(site), "module", None)
    if isinstance(module, str):
        module = backend.model.get_submodule(module)
    if module is None or not hasattr(module, "forward"):
        return None
    home = sys.modules.get(type(module).__module__)
    return module if callable(getattr(home, "eager_attention_forward", None)) else None


def _set_attention(model: Any, wanted: str | None) -> None:
    """Switch the attention implementation (transformers' own switch where the model has
    one, else its config, which older modelling files read at every call)."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) == wanted:
        return
    if wanted is not None and getattr(model, "_can_set_attn_implementation", lambda: False)():
        model.set_attn_implementation(wanted)
    else:
        config._attn_implementation = wanted


def _expand(k: torch.Tensor, heads: int) -> torch.Tensor:
    """Key or value heads repeated for grouped-query attention (head h reads kv head h // r)."""
    rep = heads // k.shape[1]
    return k if rep == 1 else k.repeat_interleave(rep, dim=1)


def _scores(q: torch.Tensor, k: torch.Tensor, mask: Any, scaling: float) -> torch.Tensor:
    import torch

    s = torch.matmul(q.double(), _expand(k, q.shape[1]).double().transpose(-1, -2)) * scaling
    if mask is not None:
        s = s + mask[..., : k.shape[-2]].double()
    return s


def _check_softmax(layer: int, scores: torch.Tensor, probs: torch.Tensor) -> None:
    import torch

    expected = torch.softmax(scores, -1)
    if not torch.allclose(expected, probs.double(), atol=1e-4, rtol=1e-3):
        worst = float((expected - probs.double()).abs().max())
        raise InputError(
            f"attention layer {layer} does not compute softmax(scaling * q kᵀ + mask) "
            f"(largest difference {worst:.2e}): its logits hold more than queries and keys "
            "(soft-capping, sinks, ...), so AtP*'s exact softmax would be wrong there. Use "
            "plain AtP (estimator='atp') for this model"
        )


def attention_node_sweep(
    model: Any,
    clean: Any,
    corrupted: Any,
    *,
    node: str = "key",
    estimator: str = "atp*",
    grad_drop: bool = False,
    layers: Sequence[int] | None = None,
    positions: Any = "all",
    metric_fn: MetricFn | None = None,
    exact: bool = True,
    batch_size: int = 64,
    backend_hint: str | None = None,
) -> PatchSweep:
    """Gap restored by patching the keys (``node="key"``) or queries (``"query"``) of one
    attention layer at one position, all heads together: the exact effect (``exact``, one
    patched forward per cell, batched) and the estimate ``estimator``: ``"atp"`` (plain AtP,
    linear in the key or query) or ``"atp*"`` (AtP*'s fix: the softmax of the patched
    query-key logits recomputed exactly, linear after the probabilities). ``grad_drop``: the
    estimate with GradDrop, the mean over layers l of its magnitude with layer l's residual
    contributions detached (magnitudes; the correlation is then with |exact|).

    Rows are the attention layers (``layers``: their indices, default all); columns the
    real-token ``positions``. Runs on attention layers of transformers' modelling files; other
    layers (SSM mixers, RNNs) have no queries and keys: see ``docs/patching.md``.
    """
    if node not in NODES:
        raise InputError(f"node={node!r}: use 'key' or 'query'")
    if estimator not in ESTIMATORS:
        raise InputError(
            f"estimator={estimator!r}: use 'atp' (linear) or 'atp*' (the attention softmax of "
            "the patched logits recomputed exactly)"
        )
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    backend = backend_of(model, backend_hint)
    backend.require("edit")
    tap = _Tap.of(backend)
    chosen = tap.layers if layers is None else [int(i) for i in layers]
    missing = [i for i in chosen if i not in tap.layers]
    if missing or not chosen:
        raise SiteError(
            f"layers {missing or chosen} have no attention whose {node}s can be patched; "
            f"attention layers of this model: {tap.layers}"
        )
    drops = _drop_sites(backend) if grad_drop else None
    start = time.perf_counter()
    with _gradients_possible(True):
        ctx = PatchRuns.build(backend, clean, corrupted, [], positions, metric_fn)
        seconds = {"cache": time.perf_counter() - start}
        clean_seen = _record(tap, backend, ctx.clean, ctx.readout.capture)
        exact_matrix = None
        if exact:
            start = time.perf_counter()
            exact_matrix = _exact(tap, ctx, clean_seen, chosen, node, batch_size)
            seconds["exact"] = time.perf_counter() - start
        start = time.perf_counter()
        passes = [[]] if drops is None else drops
        total: dict[int, Any] = {}
        for dropped in passes:
            changes = _estimates(tap, ctx, clean_seen, chosen, node, estimator, dropped)
            for i, v in changes.items():
                total[i] = total.get(i, 0) + (v.abs() if drops is not None else v)
        seconds["attribution"] = time.perf_counter() - start
    gap = ctx.clean_metric - ctx.corrupted_metric
    atp_matrix: list[list[float | None]] = []
    for i in chosen:
        if drops is not None:
            per = total[i] / (len(drops) - 1)
            atp_matrix.append([float(v) / abs(gap) if gap != 0 else float("nan") for v in per])
        else:
            atp_matrix.append(
                [
                    gap_fraction(
                        ctx.corrupted_metric + float(v), ctx.corrupted_metric, ctx.clean_metric
                    )
                    for v in total[i]
                ]
            )
    gap_fraction(ctx.clean_metric, ctx.corrupted_metric, ctx.clean_metric, "attention_node_sweep")
    name = ("AtP*" if estimator == "atp*" else "AtP") + ("+GradDrop" if grad_drop else "")
    correlation = None
    if exact_matrix is not None:
        correlation = _pearson(_magnitude(exact_matrix) if grad_drop else exact_matrix, atp_matrix)
    return PatchSweep(
        backend=backend.name,
        metric=ctx.metric_name,
        axis="position",
        rows=[f"layer_{i}" for i in chosen],
        columns=list(ctx.cols.labels),
        sites=[[f"layer_{i}.attn_{node}"] * len(ctx.cols) for i in chosen],
        clean_metric=ctx.clean_metric,
        corrupted_metric=ctx.corrupted_metric,
        positions=positions if isinstance(positions, str) else list(ctx.cols.labels),
        gap_restored=exact_matrix,
        attribution=atp_matrix,
        correlation=correlation,
        seconds=seconds,
        estimator=name,
    )


def _record(
    tap: _Tap, backend: Backend, batch: dict[str, Any], capture: list[str]
) -> dict[int, _Layer]:
    """Each attention layer's queries and keys on ``batch``."""
    seen: dict[int, _Layer] = {}

    def fn(
        layer: int,
        original: Any,
        module: Any,
        q: Any,
        k: Any,
        v: Any,
        mask: Any,
        scaling: float,
        a: Any,
        kw: Any,
    ) -> Any:
        seen[layer] = _Layer(q.detach(), k.detach(), scaling=scaling)
        return original(module, q, k, v, mask, *a, **kw)

    with tap.calls(fn):
        backend.run(batch, capture=list(dict.fromkeys([*tap.capture, *capture])))
    return seen


def _aligned(ctx: PatchRuns, clean: torch.Tensor) -> torch.Tensor:
    """Clean (rows, heads, seq, d) values on the corrupted run's positions."""
    return aligned_source(clean.transpose(1, 2), ctx.cols, ctx.seq).transpose(1, 2)


def _estimates(
    tap: _Tap,
    ctx: PatchRuns,
    clean_seen: dict[int, _Layer],
    chosen: list[int],
    node: str,
    estimator: str,
    dropped: list[str],
) -> dict[int, torch.Tensor]:
    """Per chosen layer, the estimated change of the metric per column (summed over rows),
    from one forward and one backward pass (``dropped`` sites detached)."""
    import torch

    backend = ctx.backend
    batch = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in ctx.corrupted.items()}
    seen: dict[int, _Layer] = {}
    leaves: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def fn(
        layer: int,
        original: Any,
        module: Any,
        q: Any,
        k: Any,
        v: Any,
        mask: Any,
        scaling: float,
        a: Any,
        kw: Any,
    ) -> Any:
        dq = torch.zeros_like(q, requires_grad=True)
        dk = torch.zeros_like(k, requires_grad=True)
        out, probs = original(module, q + dq, k + dk, v, mask, *a, **kw)
        scores = _scores(q.detach(), k.detach(), mask, scaling)
        _check_softmax(layer, scores, probs.detach())
        mixed = torch.matmul(probs.detach().to(v.dtype), _expand(v, q.shape[1])).transpose(1, 2)
        if not torch.allclose(mixed, out.detach(), atol=1e-5, rtol=1e-4):
            raise InputError(
                f"attention layer {layer}'s output is not its probabilities times its values "
                "(dropout on, or another attention function): AtP* cannot read its pattern"
            )
        dp = torch.zeros_like(probs, requires_grad=True)
        # the same output, now with a handle on the gradient at the probabilities
        out = torch.matmul((probs + dp).to(v.dtype), _expand(v, q.shape[1])).transpose(1, 2)
        leaves[layer] = (dq, dk, dp)
        seen[layer] = _Layer(q.detach(), k.detach(), scores, probs.detach(), scaling)
        return out.contiguous(), probs

    edits = [Edit.apply(s, _detached) for s in dropped]
    with tap.calls(fn):
        result = backend.run(
            batch,
            capture=list(dict.fromkeys([*tap.capture, *ctx.readout.capture])),
            edits=edits,
            grad=True,
        )
    logits, mask = ctx.readout.logits(result, grad=True)
    value = mean_value(ctx.metric(logits, mask))
    flat = [t for i in chosen for t in leaves[i]]
    # GradDrop's pass through the nodes' own (only attention) layer cuts every path from them
    # to the metric, which then has no gradient at all: their estimates from that pass are 0
    grads: tuple[torch.Tensor | None, ...] = (None,) * len(flat)
    if value.requires_grad:
        grads = torch.autograd.grad(value, flat, allow_unused=True)
    out: dict[int, torch.Tensor] = {}
    for j, i in enumerate(chosen):
        g_q, g_k, g_p = (
            torch.zeros_like(t) if g is None else g
            for t, g in zip(leaves[i], grads[3 * j : 3 * j + 3], strict=True)
        )
        out[i] = _layer_estimate(ctx, seen[i], clean_seen[i], node, estimator, g_q, g_k, g_p)
    return out


def _layer_estimate(
    ctx: PatchRuns,
    corr: _Layer,
    clean: _Layer,
    node: str,
    estimator: str,
    g_q: torch.Tensor,
    g_k: torch.Tensor,
    g_p: torch.Tensor,
) -> torch.Tensor:
    """The estimated change of the metric per column of one layer's key or query nodes."""
    import torch

    cols = ctx.cols
    mine, source = (corr.k, clean.k) if node == "key" else (corr.q, clean.q)
    delta = (_aligned(ctx, source) - mine).double()  # (rows, heads, seq, d)
    rows = torch.arange(delta.shape[0])
    change = torch.zeros(len(cols), dtype=torch.float64)
    for c in range(len(cols)):
        valid = cols.valid[:, c]
        t = cols.corrupted[:, c].clamp(min=0)
        if not bool(valid.any()):
            continue
        d_t = delta[rows, :, t]  # (rows, heads, d)
        if estimator == "atp":
            g = (g_k if node == "key" else g_q)[rows, :, t].double()
            per_row = (g * d_t).sum((-1, -2))
        else:
            assert corr.scores is not None and corr.probs is not None
            per_row = _softmax_fix(corr, node, d_t, t, g_p.double())
        change[c] = (per_row * valid).sum()
    return change


def _softmax_fix(
    corr: _Layer, node: str, d_t: torch.Tensor, t: torch.Tensor, g_p: torch.Tensor
) -> torch.Tensor:
    """Per row, ``sum g_p · (softmax(S') - A)`` over the heads and queries the node reaches."""
    import torch

    assert corr.scores is not None and corr.probs is not None
    scores, probs = corr.scores, corr.probs.double()
    heads = corr.q.shape[1]
    rows = torch.arange(scores.shape[0])
    if node == "key":
        # column t of every query row moves by scaling * q_s · dk_t
        shift = torch.einsum(
            "rhsd,rhd->rhs", corr.q.double(), _expand(d_t[:, :, None], heads)[:, :, 0]
        )
        new = scores.clone()
        new[rows, :, :, t] += shift * corr.scaling
        moved = torch.softmax(new, -1) - probs
        return (g_p * moved).sum((1, 2, 3))
    # query t's row moves by scaling * dq_t · k
    keys = _expand(corr.k, heads).double()  # (rows, heads, seq, d)
    shift = torch.einsum("rhd,rhsd->rhs", d_t, keys) * corr.scaling
    row = scores[rows, :, t] + shift  # (rows, heads, keys)
    moved = torch.softmax(row, -1) - probs[rows, :, t]
    return (g_p[rows, :, t] * moved).sum((1, 2))


def _exact(
    tap: _Tap,
    ctx: PatchRuns,
    clean_seen: dict[int, _Layer],
    chosen: list[int],
    node: str,
    batch_size: int,
) -> list[list[float | None]]:
    """The exact sweep: per (layer, column), the keys (queries) there replaced by the clean
    run's, everything else computed; ``batch_size`` rows per forward pass."""
    import torch

    n = ctx.rows
    cells = [(i, c) for i in chosen for c in range(len(ctx.cols))]
    sources = {
        i: _aligned(ctx, clean_seen[i].k if node == "key" else clean_seen[i].q) for i in chosen
    }
    values: list[float] = []
    per_forward = max(1, batch_size // n)
    for begin in range(0, len(cells), per_forward):
        chunk = cells[begin : begin + per_forward]
        k = len(chunk)
        select: dict[int, torch.Tensor] = {}
        for j, (i, c) in enumerate(chunk):
            sel = select.setdefault(i, torch.zeros(k * n, ctx.seq, dtype=torch.bool))
            rows = ctx.cols.valid[:, c].nonzero().flatten()
            sel[j * n + rows, ctx.cols.corrupted[rows, c]] = True

        def fn(
            layer: int,
            original: Any,
            module: Any,
            q: Any,
            key: Any,
            v: Any,
            mask: Any,
            scaling: float,
            a: Any,
            kw: Any,
            select: dict[int, Any] = select,
            k: int = k,
        ) -> Any:
            if layer in select:
                where = select[layer][:, None, :, None].to(q.device)
                src = sources[layer].repeat(k, 1, 1, 1).to(q.device, q.dtype)
                if node == "key":
                    key = torch.where(where, src, key)
                else:
                    q = torch.where(where, src, q)
            return original(module, q, key, v, mask, *a, **kw)

        with tap.calls(fn):
            result = ctx.backend.run(
                replicate(ctx.corrupted, k),
                capture=list(dict.fromkeys([*tap.capture, *ctx.readout.capture])),
            )
        logits, mask = ctx.readout.logits(result)
        values += [
            float(mean_value(ctx.metric(logits[j * n : (j + 1) * n], mask[j * n : (j + 1) * n])))
            for j in range(k)
        ]
    matrix: list[list[float | None]] = [[None] * len(ctx.cols) for _ in chosen]
    for (i, c), v in zip(cells, values, strict=True):
        matrix[chosen.index(i)][c] = gap_fraction(v, ctx.corrupted_metric, ctx.clean_metric)
    return matrix
