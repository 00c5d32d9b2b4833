"""The `rwkv` backend: Hugging Face RWKV (v4) causal LMs, with the model's ``state`` list as
per-layer state sites, the time-mix's effective attention (`archscope_recurrent.writes`), and
runs without the inference-time rescaling of the residual."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from archscope.backends import BackendError
from archscope.engine import RunContext, SiteTable
from archscope.recurrence import write_sites_of

from .hf_shared import Family, StateTensor, _HFRecurrentBackend
from .writes import declare_rwkv_sites, rwkv_hooks

if TYPE_CHECKING:
    import torch


RWKV = Family(
    name="rwkv",
    module="transformers.models.rwkv",
    blocks="rwkv.blocks",
    embeddings="rwkv.embeddings",
    final_norm="rwkv.ln_out",
    head="head",
    mixer="attention",
    mlp="feed_forward",
    head_is_logits=True,
    states=(
        StateTensor(
            "ffn_shift_state",
            ("batch", "d_model"),
            "channel-mix token shift: its normalised input at the last token (state[0])",
        ),
        StateTensor(
            "attn_shift_state",
            ("batch", "d_model"),
            "time-mix token shift: its normalised input at the last token (state[1])",
        ),
        StateTensor("wkv_num_state", ("batch", "d_attn"), "WKV numerator (state[2])"),
        StateTensor("wkv_den_state", ("batch", "d_attn"), "WKV denominator (state[3])"),
        StateTensor("wkv_max_state", ("batch", "d_attn"), "WKV running maximum (state[4])"),
    ),
)


class RWKVBackend(_HFRecurrentBackend):
    """Hugging Face RWKV (v4) causal LMs: ``RwkvForCausalLM``.

    Runs with ``rescale_every=0`` semantics (no halving of the residual every few layers in
    eval mode), restoring the model's weights and setting afterwards. State sites
    ``layer_i.{ffn_shift,attn_shift,wkv_num,wkv_den,wkv_max}_state`` are the layer's slices of
    the model's ``state`` list. ``layer_i.effective_attention`` (batch, groups, seq, key) is the
    WKV recurrence's per-channel softmax over past positions averaged over equal groups of
    channels (`archscope_recurrent.writes`); RWKV-4 has no outer-product state write.
    """

    name = "rwkv"
    description = "Hugging Face RWKV causal LMs (residual, time-mix/channel-mix, recurrent state)"
    family = RWKV

    def _state_example(self) -> list[tuple[torch.Tensor, ...]]:
        import torch

        config = self.model.config
        d_attn = config.attention_hidden_size
        dims = (config.hidden_size, config.hidden_size, d_attn, d_attn, d_attn)
        return [tuple(torch.zeros(1, d) for d in dims) for _ in range(config.num_hidden_layers)]

    def _state_from_output(self, output: Any) -> dict[str, torch.Tensor]:
        state = output.state
        return {
            f"layer_{i}.{s.role}": state[k][:, :, i].clone()
            for i in range(self.model.config.num_hidden_layers)
            for k, s in enumerate(self.family.states)
        }

    def _state_arguments(self, initial: Mapping[str, torch.Tensor], batch: int) -> dict[str, Any]:
        import torch

        if not initial:
            return {}
        self._check_initial(initial, batch)
        config = self.model.config
        dtype = self._part(self.family.embeddings).weight.dtype
        state = []
        for k, spec in enumerate(self.family.states):
            layers = []
            for i in range(config.num_hidden_layers):
                value = initial.get(f"layer_{i}.{spec.role}")
                if value is None:  # the model's own starting state
                    d = config.hidden_size if k < 2 else config.attention_hidden_size
                    value = torch.full((batch, d), -1e30 if k == 4 else 0.0)
                layers.append(value.to(device=self.device, dtype=dtype if k < 2 else torch.float32))
            state.append(torch.stack(layers, -1).contiguous())  # the model updates it in place
        return {"state": state}

    def _declare_writes(self, table: SiteTable, layer: int) -> None:
        declare_rwkv_sites(table, layer, int(self.model.config.attention_hidden_size))

    @contextlib.contextmanager
    def run_settings(self, ctx: RunContext) -> Iterator[None]:
        with self._no_rescaling():
            if not write_sites_of(ctx.capture):
                yield
                return
            blocks = self._part(self.family.blocks)
            with rwkv_hooks(ctx, [getattr(b, self.family.mixer) for b in blocks]):
                yield

    @contextlib.contextmanager
    def _no_rescaling(self) -> Iterator[None]:
        """Run with ``rescale_every=0``: undo the in-eval division of the output weights (exact:
        powers of two), and put weights, setting and flag back afterwards."""
        import torch

        rwkv, config = self.model.rwkv, self.model.config
        every, rescaled = config.rescale_every, rwkv.layers_are_rescaled
        undo = bool(rescaled and every > 0)
        # factors of 1 are skipped: an in-place no-op would still bump the weights' version and
        # break the backward pass of a run with gradients (attribution patching)
        weights = (
            [
                (b.attention.output.weight, b.feed_forward.value.weight, 2 ** (i // every))
                for i, b in enumerate(rwkv.blocks)
                if i // every > 0
            ]
            if undo
            else []
        )
        if any(
            hasattr(w, "SCB") or hasattr(w, "quant_state") for a, v, _ in weights for w in (a, v)
        ):
            raise BackendError(
                "rwkv: cannot undo the inference rescaling of quantized weights; "
                "load the model with rescale_every=0"
            )
        with torch.no_grad():
            for a, v, factor in weights:
                a.mul_(factor)
                v.mul_(factor)
        config.rescale_every = 0
        rwkv.layers_are_rescaled = not rwkv.training  # keeps the forward from rescaling
        try:
            yield
        finally:
            config.rescale_every = every
            rwkv.layers_are_rescaled = rescaled
            with torch.no_grad():
                for a, v, factor in weights:
                    a.div_(factor)
                    v.div_(factor)
