"""Reading recurrent states from the caches hybrid models fill during a forward pass."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from archscope import BackendError

if TYPE_CHECKING:
    import torch


def read_state(cache: Any, index: int, conv: bool, name: str) -> torch.Tensor:
    """Layer ``index``'s conv window (``conv``) or matrix state from an HF cache
    (``get_conv_state`` / ``get_recurrent_state``, or the layer's own holders)."""
    value = None
    linear = getattr(cache, "get_linear_cache", None)  # lightning attention's own cache class
    getter = getattr(cache, "get_conv_state" if conv else "get_recurrent_state", None)
    if linear is not None and not conv:
        value = linear(index)
        value = value if hasattr(value, "detach") else None
    elif getter is not None:
        value = getter(index)
    else:
        layers = getattr(cache, "layers", None)
        if layers is not None:
            held = getattr(layers[index], "conv_states" if conv else "recurrent_states", None)
            value = held.get(0) if isinstance(held, dict) else held
    if value is None:
        raise BackendError(f"the model's cache holds no value for {name} (cache layer {index})")
    return cast("torch.Tensor", value.detach().clone())
