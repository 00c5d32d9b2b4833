"""The patching engine: one clean and one corrupted run cached, then many patched runs batched.

A patched run is described by a *spec*: the (site, columns) cells it takes from the clean run.
`PatchRuns.run_specs` stacks many specs into one forward pass: the corrupted batch is repeated
once per spec and each block of rows is patched at its own cells by a per-row function edit,
so a layer x position sweep costs (cells x pairs / batch_size) forward passes.

Blocks before a patched cell see only the corrupted input, so a patched run need not compute
them: where the backend's layer blocks are modules whose output (a tensor) is all the rest of
the model reads (`BlockReplay`, checked on the model itself), each patched forward replays the
corrupted run's outputs of the blocks before (and, for a block's own output, including) the
patched one instead of running them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ...backends import Backend, Edit
from ...guards import model_lock
from ...legacy import as_backend
from ...sites import Site
from ._align import Columns, aligned_source, check_token_site, columns, replicate
from ._metric import LogitDiff, MetricFn, Readout, as_metric, mean_value, metric_name

if TYPE_CHECKING:
    import torch

#: One patched run: the cells it copies from the clean run, as (site, column indices).
Spec = Sequence[tuple[str, Sequence[int]]]


def backend_of(model: Any, hint: str | None = None) -> Backend:
    """A `Backend` as given, or the one `Backend.for_model` picks for ``model``."""
    return as_backend(model, hint)


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
    replay: BlockReplay | None = None
    _aligned: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        backend: Backend,
        clean: Any,
        corrupted: Any,
        sites: Sequence[str],
        positions: Any = "all",
        metric_fn: MetricFn | None = None,
    ) -> PatchRuns:
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
        replay = BlockReplay.of(backend)
        with replay.recording() if replay is not None else contextlib.nullcontext():
            corr_run = backend.run(corr_b, capture=readout.capture)
        clean_logits, clean_mask = readout.logits(clean_run)
        corr_logits, corr_mask = readout.logits(corr_run)
        if replay is not None:
            replay.reference = corr_logits
        if metric_fn is None:
            metric: MetricFn = LogitDiff.between(clean_logits, clean_mask, corr_logits, corr_mask)
        else:
            metric = as_metric(metric_fn)
        return cls(
            backend=backend,
            clean=clean_b,
            corrupted=corr_b,
            metric=metric,
            readout=readout,
            cols=cols,
            clean_metric=float(mean_value(metric(clean_logits, clean_mask))),
            corrupted_metric=float(mean_value(metric(corr_logits, corr_mask))),
            metric_name=metric_name(metric_fn if metric_fn is not None else metric),
            clean_acts={s: clean_run.activations[s] for s in sites},
            replay=replay,
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

    def run_specs(
        self, specs: Sequence[Spec], batch_size: int = 64, progress: Any = None
    ) -> list[float]:
        """The metric (mean over rows) of one patched run per spec, batched."""
        per_forward = max(1, batch_size // self.rows)
        # replay repays its one-time check only when more than one forward pass is run
        replay = self.replay if len(specs) > per_forward else None
        values: list[float] = []
        for start in range(0, len(specs), per_forward):
            chunk = specs[start : start + per_forward]
            values.extend(self._run_chunk(chunk, replay))
            if progress is not None:
                progress(len(chunk))
        return values

    def _run_chunk(self, chunk: Sequence[Spec], replay: BlockReplay | None = None) -> list[float]:
        import torch

        n, k = self.rows, len(chunk)
        valid = self.cols.valid
        select: dict[str, torch.Tensor] = {}
        for j, spec in enumerate(chunk):
            for site, cols in spec:
                sel = select.setdefault(
                    site, torch.zeros(k * n, self.seq, dtype=torch.bool, device=valid.device)
                )
                for c in cols:
                    rows = valid[:, c].nonzero().flatten()
                    sel[j * n + rows, self.cols.corrupted[rows, c]] = True
        edits = [self._edit(site, sel, k) for site, sel in select.items() if bool(sel.any())]
        depth = min((replay.depth(site) for site in select), default=0) if replay else 0
        if depth and replay is not None and replay.verified(self.corrupted, self.readout):
            context: Any = replay.replaying(depth, k)
        else:
            context = contextlib.nullcontext()
        with context:
            result = self.backend.run(
                replicate(self.corrupted, k), capture=self.readout.capture, edits=edits
            )
        logits, mask = self.readout.logits(result)
        return [
            float(mean_value(self.metric(logits[j * n : (j + 1) * n], mask[j * n : (j + 1) * n])))
            for j in range(k)
        ]

    def _edit(self, site: str, sel: torch.Tensor, k: int) -> Edit:
        """A function edit that puts the clean values where ``sel`` (rows, seq) is set."""
        import torch

        # ``sel`` holds columns of the padded batch, so the function sees the whole site
        # (edit positions would count real tokens)
        where = sel[:, :, None]
        source = self.aligned(site)
        source = source.repeat(k, *([1] * (source.dim() - 1)))

        def patch(value: torch.Tensor) -> torch.Tensor:
            return torch.where(where.to(value.device), source.to(value.device, value.dtype), value)

        return Edit.apply(site, patch)


class BlockReplay:
    """The corrupted run's outputs of the layer blocks, replayed in place of running them.

    A backend's layer blocks qualify when every layer's primary site (``layer_names()``) is a
    module output; `verified` then checks on the model that a run replaying all blocks but the
    last gives the corrupted run's readout (a model whose later layers read anything else of
    the skipped ones, such as a shared key/value cache, fails it and is patched without
    replay)."""

    def __init__(self, backend: Backend, blocks: list[Any]) -> None:
        self.backend = backend
        self.blocks = blocks
        self.outputs: list[Any] = [None] * len(blocks)
        self.reference: torch.Tensor | None = None  # the corrupted run's readout
        self._verified: bool | None = None
        self.layer_of = {name: i for i, name in enumerate(backend.layer_names())}

    @classmethod
    def of(cls, backend: Backend) -> BlockReplay | None:
        hookpoint = getattr(backend, "hookpoint", None)
        names = backend.layer_names()
        if hookpoint is None or len(names) < 2:
            return None
        points = [hookpoint(name) for name in names]
        if any(hp is None or hp.io != "output" for hp in points):
            return None
        blocks = [hp.module for hp in points]
        if len(set(map(id, blocks))) != len(blocks):
            return None
        return cls(backend, blocks)

    def depth(self, site: str) -> int:
        """How many leading blocks a run patched at ``site`` may replay."""
        if site in self.layer_of:  # a block's own output: that block too
            return self.layer_of[site] + 1
        parsed = Site.parse(site)
        return parsed.layer if parsed.layer is not None else 0

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:

        def keep(i: int) -> Any:
            def hook(module: Any, args: Any, output: Any) -> None:
                self.outputs[i] = _replayable(output)

            return hook

        handles = [b.register_forward_hook(keep(i)) for i, b in enumerate(self.blocks)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @contextlib.contextmanager
    def replaying(self, depth: int, times: int) -> Iterator[None]:
        """Blocks ``0 .. depth-1`` return their recorded output (tiled ``times`` times along
        the batch) without running; their hooks still fire, so edits at their outputs apply."""
        depth = min(depth, len(self.blocks))
        missing = object()
        # A module may carry its own forward already (accelerate's hooks set one): restore it.
        saved = [b.__dict__.get("forward", missing) for b in self.blocks[:depth]]
        with model_lock(self.backend.model):
            try:
                for block, out in zip(self.blocks[:depth], self.outputs[:depth], strict=True):
                    block.forward = _returning(_tiled(out, times))
                yield
            finally:
                for block, before in zip(self.blocks[:depth], saved, strict=True):
                    if before is missing:
                        block.__dict__.pop("forward", None)
                    else:
                        block.forward = before

    def verified(self, batch: dict[str, Any], readout: Any) -> bool:
        """Once per sweep: does a run replaying every block but the last give the corrupted
        run's readout?"""
        if self._verified is None:
            self._verified = self._check(batch, readout)
        return self._verified

    def _check(self, batch: dict[str, Any], readout: Any) -> bool:
        import torch

        reference = self.reference
        if reference is None or any(out is None for out in self.outputs):
            return False
        try:
            with self.replaying(len(self.blocks) - 1, 1):
                got, _ = readout.logits(self.backend.run(batch, capture=readout.capture))
        except Exception:  # a forward that needs more than the blocks' outputs: no replay
            return False
        scale = float(reference.abs().max()) or 1.0
        return bool(torch.allclose(got, reference, rtol=1e-4, atol=1e-5 * scale))


def _replayable(output: Any) -> Any:
    """A copy of a block's output that can stand in for running it (a later block may add to
    its input in place), or None: a tensor, or a tuple of one tensor and Nones."""
    import torch

    if isinstance(output, torch.Tensor):
        return output.detach().clone()
    if (
        isinstance(output, tuple)
        and output
        and isinstance(output[0], torch.Tensor)
        and all(x is None for x in output[1:])
    ):
        return (output[0].detach().clone(), *output[1:])
    return None


def _tiled(output: Any, times: int) -> Any:
    """The recorded output for a batch repeated ``times`` times, block after block."""
    import torch

    if isinstance(output, torch.Tensor):
        return output.repeat(times, *([1] * (output.dim() - 1)))
    return (_tiled(output[0], times), *output[1:])


def _returning(value: Any) -> Any:
    def forward(*args: Any, **kwargs: Any) -> Any:
        return value

    return forward
