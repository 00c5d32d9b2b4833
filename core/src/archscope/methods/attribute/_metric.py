"""Metrics of patched runs, and reading only the logits a metric needs.

A metric is ``metric_fn(logits, mask) -> per-row scalar`` (a (rows,) tensor, or one number);
runs are compared by its mean over rows. The default, `LogitDiff`, reads one position, so the
runs that feed it stop after the last layer and unembed only that position.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ...batch import last_real_index
from ...errors import InputError

if TYPE_CHECKING:
    import torch

    from ...backends import Backend, RunResult

MetricFn = Callable[..., Any]


@dataclass
class LogitDiff:
    """The default metric: logit of the clean run's top next token minus the logit of the
    corrupted run's top next token, at each row's last real position (per row).

    Both tokens are fixed from the unpatched runs (`LogitDiff.between`), so the metric is
    high on the clean run, low on the corrupted one, and patching moves it between the two.
    A row whose two runs agree on the top token contributes 0 to every run.
    """

    clean_token: torch.Tensor
    corrupted_token: torch.Tensor
    #: Reads only the last real position (lets runs unembed that position alone).
    last_position_only = True
    name = "logit_diff"

    @classmethod
    def between(
        cls,
        clean_logits: torch.Tensor,
        clean_mask: torch.Tensor,
        corrupted_logits: torch.Tensor,
        corrupted_mask: torch.Tensor,
    ) -> LogitDiff:
        return cls(
            _last(clean_logits, clean_mask).argmax(-1),
            _last(corrupted_logits, corrupted_mask).argmax(-1),
        )

    def __call__(self, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        last = _last(logits, mask)
        rows = self.clean_token.shape[0]
        if last.shape[0] != rows:
            raise InputError(
                f"LogitDiff was fitted on {rows} rows, got logits of {last.shape[0]} rows"
            )
        a = last.gather(1, self.clean_token[:, None].to(last.device))
        b = last.gather(1, self.corrupted_token[:, None].to(last.device))
        return (a - b)[:, 0]


def _last(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    import torch

    if mask is None:
        return logits[:, -1]
    rows = torch.arange(logits.shape[0], device=logits.device)
    return logits[rows, last_real_index(mask).to(logits.device)]


def as_metric(metric_fn: MetricFn) -> MetricFn:
    """``metric_fn(logits, mask)``; a one-argument function gets archscope 0.2's argument
    instead, an object with ``.logits`` (and ``.attention_mask``)."""
    try:
        params = [
            p
            for p in inspect.signature(metric_fn).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
        ]
        var = any(
            p.kind is p.VAR_POSITIONAL for p in inspect.signature(metric_fn).parameters.values()
        )
    except (TypeError, ValueError):
        return metric_fn
    if len(params) == 1 and not var:
        from ...legacy import outputs_metric

        return outputs_metric(metric_fn)
    return metric_fn


def metric_name(metric_fn: MetricFn) -> str:
    return str(getattr(metric_fn, "name", None) or getattr(metric_fn, "__name__", "custom"))


def mean_value(value: Any) -> torch.Tensor:
    """A metric's value as one 0-d tensor: the mean over rows of a per-row metric."""
    import torch

    if not isinstance(value, torch.Tensor):
        value = torch.tensor(float(value), dtype=torch.float64)
    out: torch.Tensor = value.double().mean() if value.dim() else value.double()
    return out


class Readout:
    """Produces the logits a metric reads from a run.

    With a metric that reads only each row's last real position (``last_position_only``) and
    a backend that can unembed, runs capture the last layer's main site, stop there, and
    unembed that one position: ``(rows, 1, vocab)`` logits with an all-ones mask. Otherwise
    runs return the full logits.
    """

    def __init__(self, backend: Backend, metric_fn: MetricFn | None) -> None:
        self.backend = backend
        last_only = metric_fn is None or bool(getattr(metric_fn, "last_position_only", False))
        self.fast = last_only and "unembed" in backend.capabilities
        if not self.fast:
            backend.require("logits")
        self.final = backend.layer_names()[-1] if self.fast else "logits"

    @property
    def capture(self) -> list[str]:
        return [self.final]

    def logits(self, result: RunResult, grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, mask) of a run; ``grad`` keeps the graph (the run had ``grad=True``)."""
        import torch

        mask = result.attention_mask
        if not self.fast:
            logits = result.activations["logits"]
            if mask is None:
                mask = torch.ones(logits.shape[:2], dtype=torch.long, device=logits.device)
            return logits, mask
        hidden = result.activations[self.final]
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        if mask is None:
            last = torch.full_like(rows, hidden.shape[1] - 1)
        else:
            last = last_real_index(mask).to(hidden.device)
        with torch.set_grad_enabled(grad):
            logits = self.backend.unembed(hidden[rows, last][:, None])
        return logits, torch.ones(logits.shape[:2], dtype=torch.long, device=logits.device)


def gap_fraction(value: float, corrupted: float, clean: float, what: str = "") -> float:
    """(value − corrupted) / (clean − corrupted), signed: 1 = the clean run's metric, 0 = the
    corrupted run's, negative = moved away from clean. NaN, with a warning, when the two runs'
    metrics are equal (no gap to restore; 0.2 reported 0.0 or divided by 1e-9 there)."""
    gap = clean - corrupted
    if abs(gap) <= 1e-7 * max(1.0, abs(clean), abs(corrupted)):
        if what:
            warnings.warn(
                f"archscope: {what}: clean and corrupted metrics are equal ({clean:.6g}), so "
                "there is no gap to restore; gap_restored is NaN. Choose inputs whose "
                "metric differs (with the default metric: whose top next tokens differ)",
                stacklevel=3,
            )
        return math.nan
    return (value - corrupted) / gap
