"""What one run is: the request every extension point of the engine receives (`RunRequest`)
and what `Backend.run` returns (`RunResult`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from .edits import Edit
from .errors import NotCapturedError
from .sites import Site

if TYPE_CHECKING:
    import torch

__all__ = ["RunRequest", "RunResult"]


@dataclass
class RunResult:
    """What `Backend.run` returns."""

    logits: torch.Tensor | None
    activations: dict[str, torch.Tensor]
    attention_mask: torch.Tensor | None
    #: The recurrent state after the last real token (``return_state=True``), usable as
    #: ``initial_state`` of a later run.
    state: dict[str, torch.Tensor] | None = None

    def __getitem__(self, site: str | Site) -> torch.Tensor:
        if isinstance(site, str) and site in self.activations:  # canonical: no parsing
            return self.activations[site]
        key = str(Site.parse(site))
        if key not in self.activations:
            raise NotCapturedError(
                f"{key!r} was not captured; captured: {', '.join(sorted(self.activations))}"
            )
        return self.activations[key]

    def __contains__(self, site: object) -> bool:
        return isinstance(site, (str, Site)) and str(site) in self.activations


@dataclass
class RunRequest:
    """One run, as `Backend.execute` and every extension point of the engine receive it: the
    prepared batch, the site names to capture (canonical, parsed once by `Backend.run`), the
    edits grouped by site name and the run options; then what the run fills in: the values
    captured so far (``store``), the site after which the forward pass stops (``stop_after``)
    and ``extra``, per-run data of a backend's own (e.g. a plan computed once and read by its
    views)."""

    batch: dict[str, Any]
    capture: list[str]
    edits: dict[str, list[Edit]]
    stop_early: bool = True
    initial_state: Mapping[str, torch.Tensor] | None = None
    return_state: bool = False
    grad: bool = False
    stop_after: str | None = None
    store: dict[str, torch.Tensor] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    #: The attention mask's padding side when `Backend.run` already knows it ("none": every
    #: token is real), else None (`archscope.batch.padding_side` tells).
    padding: str | None = None

    @property
    def attention_mask(self) -> torch.Tensor | None:
        return self.batch.get("attention_mask")

    @property
    def padding_side(self) -> str:
        """The attention mask's padding side ("none", "left", "right" or "mixed"): the one
        `Backend.run` carried in ``padding``, else `archscope.batch.padding_side` of the mask
        ("none" without a mask)."""
        if self.padding is not None:
            return self.padding
        mask = self.attention_mask
        if mask is None:
            return "none"
        from .batch import padding_side

        return padding_side(mask)

    @property
    def batch_size(self) -> int:
        """Rows in the batch."""
        return int(self._tokens().shape[0])

    @property
    def seq_len(self) -> int:
        """Positions per row."""
        return int(self._tokens().shape[1])

    def _tokens(self) -> Any:
        for key in ("input_ids", "inputs_embeds", "attention_mask"):
            if key in self.batch:
                return self.batch[key]
        return next(iter(self.batch.values()))

    def fresh(self, **changes: Any) -> RunRequest:
        """A copy with ``changes`` and nothing captured yet (own store and extra)."""
        changes.setdefault("store", {})
        changes.setdefault("extra", {})
        changes.setdefault("stop_after", None)
        if "batch" in changes:  # another batch: its padding is not known yet
            changes.setdefault("padding", None)
        return replace(self, **changes)
