"""Continuing a hybrid model from given recurrent states (``initial_state`` / ``state_patch``):
the states are put into the model's own cache and the input is fed one token at a time, as
generation does, which reproduces a full run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from archscope.compat import cache_argument
from archscope.engine import RunRequest
from archscope.recurrence import feed_tokens, given_states

if TYPE_CHECKING:
    from archscope.hookpoints import SiteTable


class HybridStack(Protocol):
    """What continuing a run needs of the backend (`HybridBackend` has it)."""

    model: Any
    layers: Any

    @property
    def state_sites(self) -> list[str]: ...

    @property
    def table(self) -> SiteTable: ...

    @property
    def device(self) -> Any: ...

    def require(self, capability: str) -> None: ...

    def mask_argument(self, mask: Any) -> Any: ...

    def logits_of(self, output: Any) -> Any: ...


@dataclass
class Plan:
    """How one run is carried out (decided once per run, kept in ``run.extra``)."""

    wants_state: bool
    stepping: bool = False
    step: int = 0
    steps: int = 0
    cache: Any = None


def continue_from_state(backend: HybridStack, ctx: RunRequest, plan: Plan) -> Any:
    """Feed the batch token by token from ``ctx.initial_state``; token sites and logits are
    concatenated over the steps."""
    backend.require("state_patch")
    ids = ctx.batch["input_ids"]
    plan.cache = cache_from_state(backend, ctx.initial_state or {}, int(ids.shape[0]))
    keyword = cache_argument(backend.model)
    hooked = set(backend.table.names(kind="token", hooked=True))
    mask = backend.mask_argument(None)

    def step(t: int) -> Any:
        plan.step = t
        out = backend.model(
            input_ids=ids[:, t : t + 1],
            attention_mask=mask,
            use_cache=True,
            **{keyword: plan.cache},
        )
        plan.cache = getattr(out, "cache", None) or plan.cache
        return out

    token_sites = [n for n in ctx.capture if n in hooked]
    logits = feed_tokens(ctx.store, plan.steps, step, token_sites, backend.logits_of)
    return Continued(logits, plan.cache)


def cache_from_state(backend: HybridStack, state: Any, batch: int) -> Any:
    """A cache of the model holding ``state`` (every state site, checked)."""
    given = given_states(backend.table, backend.state_sites, state, batch)
    from transformers import DynamicCache

    device = backend.device
    cache = DynamicCache(config=backend.model.config)
    for layer in backend.layers:
        i = layer.index
        if layer.conv_shape is not None:
            conv = given[f"layer_{i}.conv_state"].to(device).clone()
            cache.update_conv_state(conv, layer.cache_index)
        if layer.state_shape is not None:
            matrix = given[f"layer_{i}.ssm_state"].to(device).clone()
            cache.update_recurrent_state(matrix, layer.cache_index)
    return cache


@dataclass
class Continued:
    """Output of a run continued from a state: logits over all steps and the final cache."""

    logits: Any
    cache: Any
