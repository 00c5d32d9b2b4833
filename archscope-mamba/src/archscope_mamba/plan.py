"""How one run of a Mamba-family model is carried out: the plan decided from the padding and the
request (left-shifting right-padded rows, stepping from a given state), and the views that show
token sites in the caller's layout under that plan."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from archscope import BackendError, Edit, SiteInfo
from archscope.engine import RunRequest, View, apply_edit

if TYPE_CHECKING:
    import torch

    from .structure import MambaStack


@dataclass
class RunPlan:
    """How one run is carried out (decided once per run, before hooks are attached)."""

    wants_state: bool
    #: Per-row right shift that turns a right-padded batch into a left-padded one.
    shift: torch.Tensor | None = None
    original_mask: torch.Tensor | None = None
    stepping: bool = False
    step: int = 0
    steps: int = 0
    cache: Any = None


def run_plan(backend: MambaStack, ctx: RunRequest) -> RunPlan:
    """The plan of the run ``ctx`` (decided on first call, then kept in ``ctx.extra``)."""
    plan: RunPlan | None = ctx.extra.get("mamba_plan")
    if plan is not None:
        return plan
    import torch

    states = set(backend.state_sites)
    plan = RunPlan(wants_state=ctx.return_state or any(n in states for n in ctx.capture))
    mask = ctx.attention_mask
    side = ctx.padding_side
    if ctx.initial_state is not None:
        plan.stepping = True
        plan.steps = int(ctx.batch["input_ids"].shape[1])
        plan.original_mask = mask  # edit positions count the suffix's real tokens
        if side == "left":  # (rows padded on both sides are refused before this)
            raise BackendError(
                "a run from initial_state continues each row from its state, so the "
                "suffix may only be right-padded; got a left-padded attention_mask"
            )
        if side == "right" and plan.wants_state:
            raise BackendError(
                "the state after a right-padded suffix would include the pads: give "
                "suffixes of equal length when asking for states from a continued run"
            )
    elif backend.native and side != "none":
        if side == "left":
            raise BackendError(
                "native mamba_ssm models take no attention mask, so only right padding "
                "keeps real tokens exact; got a left-padded batch"
            )
        if plan.wants_state and ctx.edits:
            raise BackendError(
                "native mamba_ssm models take no attention mask, so the state of a "
                "right-padded row is re-computed from its real tokens alone, which cannot "
                "carry edits: run rows of equal length when editing and reading states"
            )
    elif plan.wants_state and side == "right":
        # HF models keep updating the state over right pads: run the rows left-padded
        # (pads are masked to zero inputs, so the state stays at zero until the first real
        # token) and give token sites back in the caller's layout.
        assert mask is not None
        plan.original_mask = mask
        plan.shift = (mask.shape[1] - mask.sum(-1)).to(torch.long)
    ctx.extra["mamba_plan"] = plan
    return plan


class RowsView(View):
    """Token sites under the run's plan: rows shifted from right to left padding are shown (and
    edited, with the caller's mask) in the caller's layout; during a run continued from a state,
    an edit sees the whole suffix, of which the hook holds one decoding step."""

    def __init__(self, plan_of: Callable[[RunRequest], RunPlan]) -> None:
        self.plan_of = plan_of

    def read(self, raw: Any, run: RunRequest) -> torch.Tensor:
        shift = self.plan_of(run).shift
        return raw if shift is None else roll_rows(raw, -shift)

    def write(self, value: torch.Tensor, raw: Any, run: RunRequest) -> Any:
        shift = self.plan_of(run).shift
        return value if shift is None else roll_rows(value, shift)

    def edit(
        self, value: torch.Tensor, edit: Edit, info: SiteInfo, run: RunRequest
    ) -> torch.Tensor:
        plan = self.plan_of(run)
        if not plan.stepping:
            return apply_edit(value, edit, info, run.attention_mask)
        import torch

        full = value.new_zeros((value.shape[0], plan.steps, *value.shape[2:]))
        full[:, plan.step] = value[:, 0]
        mask = plan.original_mask
        if mask is None:
            mask = torch.ones(full.shape[:2], dtype=torch.long, device=value.device)
        return apply_edit(full, edit, info, mask)[:, plan.step : plan.step + 1]


def roll_rows(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate each row of ``x`` (batch, seq, ...) right along seq by ``shift[row]``."""
    import torch

    seq = x.shape[1]
    index = (torch.arange(seq, device=x.device)[None, :] - shift.to(x.device)[:, None]) % seq
    index = index.reshape(*index.shape, *([1] * (x.dim() - 2))).expand_as(x)
    return torch.gather(x, 1, index)
