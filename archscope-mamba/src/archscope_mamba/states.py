"""Reading recurrent states from the caches Mamba-family models fill during a forward pass (HF
caches of every transformers release, and native ``mamba_ssm`` inference parameters)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from archscope import BackendError

if TYPE_CHECKING:
    import torch

    from .plan import RunPlan
    from .structure import MambaStack


def read_states(backend: MambaStack, plan: RunPlan, names: list[str]) -> dict[str, torch.Tensor]:
    """The recurrent states ``names`` from the cache the run left in ``plan``."""
    if plan.cache is None:
        raise BackendError(
            f"backend 'mamba': the forward pass returned no cache, so {names} cannot be read"
        )
    out = {}
    for name in names:
        site = backend.table.info(name).site  # names are canonical: no parsing
        assert site.layer is not None
        layer = backend.layers[site.layer]
        conv = site.role == "conv_state"
        if backend.native:
            value = plan.cache.key_value_memory_dict[layer.cache_index][0 if conv else 1]
        else:
            value = read_cache_state(plan.cache, layer.cache_index, conv)
        if value is None:
            raise BackendError(f"the cache holds no value for {name}")
        out[name] = value.detach().clone()
    return out


def output_cache(output: Any) -> Any:
    """The cache an HF forward returned (``cache`` since transformers 5; ``cache_params`` /
    ``past_key_values`` in earlier releases)."""
    for name in ("cache", "cache_params", "past_key_values"):
        value = getattr(output, name, None)
        if value is not None:
            return value
    return None


def read_cache_state(cache: Any, index: int, conv: bool) -> Any:
    """A layer's conv or SSM state from an HF cache: ``get_conv_state`` /
    ``get_recurrent_state`` (transformers 5 caches) or ``conv_states`` / ``ssm_states`` (the
    ``MambaCache`` family of earlier releases)."""
    getter = getattr(cache, "get_conv_state" if conv else "get_recurrent_state", None)
    if getter is not None:
        return getter(index)
    layers = getattr(cache, "layers", None)
    if layers is not None:  # 5.x releases before the getters: a tensor or {0: tensor} per layer
        held = getattr(layers[index], "conv_states" if conv else "recurrent_states", None)
        return held.get(0) if isinstance(held, dict) else held
    states = getattr(cache, "conv_states" if conv else "ssm_states", None)
    return None if states is None else states[index]
