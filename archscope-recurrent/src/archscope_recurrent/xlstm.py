"""The `xlstm` backend: Hugging Face xLSTM causal LMs, with the cache's ``(C, n, m)`` per layer
as state sites, the mLSTM's per-position writes and effective attention (`archscope_recurrent.
writes`), and the model's soft-capped logits."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, cast

from archscope.backends import BackendError
from archscope.compat import cache_argument
from archscope.engine import RunContext, SiteTable
from archscope.recurrence import write_sites_of

from .hf_shared import Family, StateTensor, _HFRecurrentBackend
from .writes import declare_mlstm_sites, mlstm_hooks

if TYPE_CHECKING:
    import torch


XLSTM = Family(
    name="xlstm",
    module="transformers.models.xlstm",
    blocks="backbone.blocks",
    embeddings="backbone.embeddings",
    final_norm="backbone.out_norm",
    head="lm_head",
    mixer="mlstm_layer",
    mlp="ffn",
    head_is_logits=False,
    states=(
        StateTensor("c_state", ("batch", "head", "d_qk", "d_v"), "mLSTM matrix memory C"),
        StateTensor("n_state", ("batch", "head", "d_qk"), "mLSTM normaliser n"),
        StateTensor("m_state", ("batch", "head", "one"), "mLSTM stabiliser m"),
    ),
)


class XLSTMBackend(_HFRecurrentBackend):
    """Hugging Face xLSTM causal LMs: ``xLSTMForCausalLM``.

    State sites ``layer_i.{c,n,m}_state`` are the layer's ``cache.rnn_state[i] = (C, n, m)``.
    ``logits`` are the model's soft-capped output (read-only); ``unembed`` applies the same cap.
    Write sites ``layer_i.{state_write,write_value,write_key,write_decay,ssm_states}`` and
    ``layer_i.effective_attention`` are computed from the mLSTM kernel's inputs while it runs
    (`archscope_recurrent.writes`); edits of the writes are carried through the rest of the
    recurrence.
    """

    name = "xlstm"
    description = "Hugging Face xLSTM causal LMs (residual, mLSTM/FFN sub-layers, (C, n, m) state)"
    family = XLSTM

    def _state_example(self) -> list[tuple[torch.Tensor, ...]]:
        import torch

        c = self.model.config
        return [
            (
                torch.zeros(1, c.num_heads, c.qk_head_dim, c.v_head_dim),
                torch.zeros(1, c.num_heads, c.qk_head_dim),
                torch.zeros(1, c.num_heads, 1),
            )
            for _ in range(c.num_hidden_layers)
        ]

    def _declare_writes(self, table: SiteTable, layer: int) -> None:
        c = self.model.config
        declare_mlstm_sites(table, layer, c.num_heads, c.qk_head_dim, c.v_head_dim)

    def run_settings(self, ctx: RunContext) -> contextlib.AbstractContextManager[Any]:
        if not write_sites_of([*ctx.capture, *ctx.edits]):
            return contextlib.nullcontext()
        blocks = self._part(self.family.blocks)
        return mlstm_hooks(self, ctx, [getattr(b, self.family.mixer) for b in blocks])

    def _state_from_output(self, output: Any) -> dict[str, torch.Tensor]:
        cache = getattr(output, "cache", None) or getattr(output, "cache_params", None)
        if cache is None:
            raise BackendError(
                "xlstm: the model returned no cache; it was called without use_cache=True"
            )
        rnn_state = cache.rnn_state
        return {
            f"layer_{i}.{s.role}": rnn_state[i][k].clone()
            for i in range(len(rnn_state))
            for k, s in enumerate(self.family.states)
        }

    def _state_arguments(self, initial: Mapping[str, torch.Tensor], batch: int) -> dict[str, Any]:
        if not initial:
            return {}
        self._check_initial(initial, batch)
        from transformers.models.xlstm.modeling_xlstm import xLSTMCache

        dtype = self._part(self.family.embeddings).weight.dtype
        cache = xLSTMCache(self.model.config, batch, dtype=dtype, device=str(self.device))
        for i, layer in cache.rnn_state.items():
            cache.rnn_state[i] = tuple(  # type: ignore[assignment]
                initial[f"layer_{i}.{s.role}"].to(device=self.device, dtype=zero.dtype).clone()
                if f"layer_{i}.{s.role}" in initial
                else zero
                for s, zero in zip(self.family.states, layer, strict=True)
            )
        # transformers before 5.24 names the argument cache_params (read from **kwargs)
        return {cache_argument(self.model, ("cache",), fallback="cache_params"): cache}

    def unembed(self, residual: torch.Tensor) -> torch.Tensor:
        from transformers.models.xlstm.modeling_xlstm import soft_cap

        logits = super().unembed(residual)
        return cast(
            "torch.Tensor", soft_cap(logits.float(), self.model.config.output_logit_soft_cap)
        )
