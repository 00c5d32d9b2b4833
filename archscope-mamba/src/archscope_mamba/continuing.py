"""Continuing a Mamba-family model from a given recurrent state (``initial_state`` and
``state_patch``): the state is put into the model's own cache and the input decoded token by token,
the only way the models' caches reproduce a full run."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from archscope.compat import cache_argument
from archscope.engine import RunRequest
from archscope.recurrence import feed_tokens, given_states

from .native import NativeInferenceParams
from .states import output_cache

if TYPE_CHECKING:
    import torch

    from .plan import RunPlan
    from .structure import MambaStack


def continue_from_state(backend: MambaStack, ctx: RunRequest, plan: RunPlan) -> Any:
    """Decode the batch token by token from ``ctx.initial_state`` (the only way the models'
    caches reproduce a full run); token sites and logits are concatenated over steps. None when
    the steps stopped early (as a stopped forward returns nothing; the cache stays in ``plan``)."""

    backend.require("state_patch")
    ids = ctx.batch["input_ids"]
    plan.cache = cache_from_state(
        backend, ctx.initial_state or {}, int(ids.shape[0]), int(ids.shape[1])
    )
    hooked_tokens = set(backend.table.names(kind="token", hooked=True))

    def step(t: int) -> Any:
        plan.step = t
        if backend.native:
            out = backend.model(ids[:, t : t + 1], inference_params=plan.cache)
            plan.cache.seqlen_offset += 1
            return out
        out = backend.model(
            input_ids=ids[:, t : t + 1],
            use_cache=True,
            **{cache_argument(backend.model): plan.cache},
        )
        plan.cache = output_cache(out) or plan.cache
        return out

    logits = feed_tokens(
        ctx.store,
        plan.steps,
        step,
        [n for n in ctx.capture if n in hooked_tokens],
        backend.logits_of,
    )
    if logits is None:  # the steps stopped after the deepest captured site: no logits
        return None
    return _Continued(logits, plan.cache)


def cache_from_state(
    backend: MambaStack, state: Mapping[str, torch.Tensor], batch: int, steps: int
) -> Any:
    """A cache holding ``state`` (every state site, checked), ready to decode ``steps`` tokens."""
    given = given_states(backend.table, backend.state_sites, state, batch)
    device = backend.device
    if backend.native:
        cache = NativeInferenceParams(max_seqlen=steps, max_batch_size=batch, seqlen_offset=1)
        for layer in backend.ssm_layers:
            i = layer.index
            cache.key_value_memory_dict[layer.cache_index] = (
                given[f"layer_{i}.conv_state"].to(device).clone(),
                given[f"layer_{i}.ssm_state"].to(device).clone(),
            )
        return cache
    from transformers import DynamicCache

    hf_cache = DynamicCache(config=backend.model.config)
    for layer in backend.ssm_layers:
        i = layer.index
        hf_cache.update_conv_state(
            given[f"layer_{i}.conv_state"].to(device).clone(), layer.cache_index
        )
        hf_cache.update_recurrent_state(
            given[f"layer_{i}.ssm_state"].to(device).clone(), layer.cache_index
        )
    return hf_cache


@dataclass
class _Continued:
    """Output of a run continued from a state: logits over all steps and the final cache."""

    logits: Any
    cache: Any
