"""What native ``mamba_ssm`` models need: their inference-parameter cache, the residual stream
of blocks that return ``(hidden_states, residual)``, and the states of right-padded rows (the
models take no attention mask)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from archscope.engine import RunRequest

from .plan import RowsView, RunPlan

if TYPE_CHECKING:
    import torch


@dataclass
class NativeInferenceParams:
    """The cache object native ``mamba_ssm`` mixers read and write (same fields as
    ``mamba_ssm.utils.generation.InferenceParams``; mixers keep ``(conv_state, ssm_state)``
    per layer in ``key_value_memory_dict``)."""

    max_seqlen: int
    max_batch_size: int
    seqlen_offset: int = 0
    batch_size_offset: int = 0
    key_value_memory_dict: dict[int, Any] = field(default_factory=dict)
    lengths_per_sample: Any = None


class NativeResidualView(RowsView):
    """Native blocks return ``(hidden_states, residual)``; the stream is their sum. An edited
    stream is written as ``(zeros, edited sum)`` so the next block's ``hidden + residual`` is
    exact. (Used with ``Hookpoint(index=None)``: the view sees the whole output.)"""

    def read(self, raw: Any, run: RunRequest) -> torch.Tensor:
        hidden, residual = raw
        return hidden + residual if residual is not None else hidden  # type: ignore[no-any-return]

    def write(self, value: torch.Tensor, raw: Any, run: RunRequest) -> Any:
        hidden, residual = raw
        kept = residual if residual is not None else hidden
        return (hidden.new_zeros(hidden.shape), value.to(kept.dtype))


def native_states_of_padded_rows(model: Any, ctx: RunRequest, plan: RunPlan) -> None:
    """Native models run pads like tokens: give each right-padded row the state its real
    tokens reach alone (one extra pass per padded row, its captures discarded)."""
    mask = ctx.attention_mask
    if mask is None or bool(mask.all()):
        return
    lengths = mask.sum(-1).tolist()
    store = ctx.store
    try:
        for row, n in enumerate(lengths):
            if n == mask.shape[1]:
                continue
            ctx.store = {}
            alone = NativeInferenceParams(max_seqlen=int(n), max_batch_size=1)
            model(ctx.batch["input_ids"][row : row + 1, : int(n)], inference_params=alone)
            for index, states in alone.key_value_memory_dict.items():
                for full, single in zip(
                    plan.cache.key_value_memory_dict[index], states, strict=True
                ):
                    full[row] = single[0]
    finally:
        ctx.store = store
