"""The patching engine: one clean and one corrupted run cached, then many patched runs batched.

A patched run is described by a *spec*: the (site, columns) cells it takes from the clean run.
`PatchRuns.run_specs` stacks many specs into one forward pass: the corrupted batch is repeated
once per spec and each block of rows is patched at its own cells by a per-row function edit,
so a layer x position sweep costs (cells x pairs / batch_size) forward passes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..backends import Backend, Edit
from ._align import Columns, aligned_source, check_token_site, columns, replicate
from ._metric import LogitDiff, MetricFn, Readout, as_metric, mean_value, metric_name

if TYPE_CHECKING:
    import torch

#: One patched run: the cells it copies from the clean run, as (site, column indices).
Spec = Sequence[tuple[str, Sequence[int]]]


def backend_of(model: Any, hint: str | None = None) -> Backend:
    """A `Backend` as given, or the one `Backend.for_model` picks for ``model``."""
    return model if isinstance(model, Backend) else Backend.for_model(model, hint=hint)


@dataclass
class PatchRuns:
    """A clean and a corrupted batch run once each, with what patched runs reuse: the clean
    activations of the patched sites, the metric (fitted on the two runs) and its values."""

    backend: Backend
    clean: dict[str, Any]
    corrupted: dict[str, Any]
    metric: MetricFn
    readout: Readout
    cols: Columns
    clean_metric: float
    corrupted_metric: float
    metric_name: str
    clean_acts: dict[str, torch.Tensor] = field(default_factory=dict)
    _aligned: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def build(cls, backend: Backend, clean: Any, corrupted: Any, sites: Sequence[str],
              positions: Any = "all", metric_fn: MetricFn | None = None) -> PatchRuns:
        backend.require("edit")
        # The backend's own request check first: it names read-only sites and what is valid.
        backend.check_request([], [Edit.replace(s, 0.0) for s in sites])
        for site in sites:
            check_token_site(backend, site)
        sites = [backend.site_info(s).name for s in sites]
        clean_b = backend.prepare_inputs(clean)
        corr_b = backend.prepare_inputs(corrupted)
        cols = columns(positions, clean_b["attention_mask"], corr_b["attention_mask"])
        readout = Readout(backend, metric_fn)
        capture = list(dict.fromkeys([*sites, *readout.capture]))
        clean_run = backend.run(clean_b, capture=capture)
        corr_run = backend.run(corr_b, capture=readout.capture)
        clean_logits, clean_mask = readout.logits(clean_run)
        corr_logits, corr_mask = readout.logits(corr_run)
        if metric_fn is None:
            metric: MetricFn = LogitDiff.between(clean_logits, clean_mask, corr_logits,
                                                 corr_mask)
        else:
            metric = as_metric(metric_fn)
        return cls(
            backend=backend, clean=clean_b, corrupted=corr_b, metric=metric, readout=readout,
            cols=cols,
            clean_metric=float(mean_value(metric(clean_logits, clean_mask))),
            corrupted_metric=float(mean_value(metric(corr_logits, corr_mask))),
            metric_name=metric_name(metric_fn if metric_fn is not None else metric),
            clean_acts={s: clean_run.activations[s] for s in sites},
        )

    @property
    def rows(self) -> int:
        return int(self.corrupted["input_ids"].shape[0])

    @property
    def seq(self) -> int:
        return int(self.corrupted["input_ids"].shape[1])

    def aligned(self, site: str) -> torch.Tensor:
        """The clean activations of ``site`` on the corrupted run's positions."""
        if site not in self._aligned:
            self._aligned[site] = aligned_source(self.clean_acts[site], self.cols, self.seq)
        return self._aligned[site]

    def run_specs(self, specs: Sequence[Spec], batch_size: int = 64,
                  progress: Any = None) -> list[float]:
        """The metric (mean over rows) of one patched run per spec, batched."""
        per_forward = max(1, batch_size // self.rows)
        values: list[float] = []
        for start in range(0, len(specs), per_forward):
            chunk = specs[start:start + per_forward]
            values.extend(self._run_chunk(chunk))
            if progress is not None:
                progress(len(chunk))
        return values

    def _run_chunk(self, chunk: Sequence[Spec]) -> list[float]:
        import torch

        n, k = self.rows, len(chunk)
        valid = self.cols.valid
        select: dict[str, torch.Tensor] = {}
        for j, spec in enumerate(chunk):
            for site, cols in spec:
                sel = select.setdefault(site, torch.zeros(k * n, self.seq, dtype=torch.bool,
                                                          device=valid.device))
                for c in cols:
                    rows = valid[:, c].nonzero().flatten()
                    sel[j * n + rows, self.cols.corrupted[rows, c]] = True
        edits = [self._edit(site, sel, k) for site, sel in select.items() if bool(sel.any())]
        result = self.backend.run(replicate(self.corrupted, k), capture=self.readout.capture,
                                  edits=edits)
        logits, mask = self.readout.logits(result)
        return [float(mean_value(self.metric(logits[j * n:(j + 1) * n], mask[j * n:(j + 1) * n])))
                for j in range(k)]

    def _edit(self, site: str, sel: torch.Tensor, k: int) -> Edit:
        """A function edit that puts the clean values where ``sel`` (rows, seq) is set."""
        import torch

        positions = sel.any(0).nonzero().flatten().tolist()
        where = sel[:, positions, None]
        source = self.aligned(site)[:, positions]
        source = source.repeat(k, *([1] * (source.dim() - 1)))

        def patch(value: torch.Tensor) -> torch.Tensor:
            return torch.where(where.to(value.device), source.to(value.device, value.dtype),
                               value)

        return Edit.apply(site, patch, positions=positions)
