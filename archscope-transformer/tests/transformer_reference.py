"""Test helpers: cached tiny models of every family and the test's own reference map.

`REFERENCE` is written by hand from the modelling files, independently of the backend's
structure search: for each family, where the attention and MLP outputs that are added to
the residual live, and the MLP's output projection (whose input are the hidden units).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any

import torch

from archscope_transformer.testing import tiny_model

# family -> (block list, attention output, MLP output, MLP output projection); paths are
# relative to a block; "[0]" = first element of the module's tuple output.
REFERENCE: dict[str, tuple[str, str, str, str]] = {
    "gpt2": ("transformer.h", "attn[0]", "mlp", "mlp.c_proj"),
    "llama": ("model.layers", "self_attn[0]", "mlp", "mlp.down_proj"),
    "mistral": ("model.layers", "self_attn[0]", "mlp", "mlp.down_proj"),
    "qwen2": ("model.layers", "self_attn[0]", "mlp", "mlp.down_proj"),
    "qwen3": ("model.layers", "self_attn[0]", "mlp", "mlp.down_proj"),
    "gpt_neox": ("gpt_neox.layers", "attention[0]", "mlp", "mlp.dense_4h_to_h"),
    "gptj": ("transformer.h", "attn[0]", "mlp", "mlp.fc_out"),
    "gpt_neo": ("transformer.h", "attn[0]", "mlp", "mlp.c_proj"),
    "opt": ("model.decoder.layers", "self_attn[0]", "fc2", "fc2"),
    "bloom": ("transformer.h", "self_attention.dense", "mlp.dense_4h_to_h", "mlp.dense_4h_to_h"),
    "falcon": ("transformer.h", "self_attention[0]", "mlp", "mlp.dense_4h_to_h"),
    "mpt": ("transformer.blocks", "attn[0]", "ffn.down_proj", "ffn.down_proj"),
    "phi": ("model.layers", "self_attn[0]", "mlp", "mlp.fc2"),
    "phi3": ("model.layers", "self_attn[0]", "mlp", "mlp.down_proj"),
    "gemma": ("model.layers", "self_attn[0]", "mlp", "mlp.down_proj"),
    "gemma2": (
        "model.layers",
        "post_attention_layernorm",
        "post_feedforward_layernorm",
        "mlp.down_proj",
    ),
    "starcoder2": ("model.layers", "self_attn[0]", "mlp", "mlp.c_proj"),
    "olmo": ("model.layers", "self_attn[0]", "mlp", "mlp.down_proj"),
}

TOL = 1e-5


@cache
def model_of(family: str, n_layers: int = 3) -> Any:
    """One shared model per family (tests must leave it as they found it)."""
    return tiny_model(family, n_layers=n_layers)


def blocks_of(model: Any, family: str) -> list[Any]:
    return list(model.get_submodule(REFERENCE[family][0]))


def _split(spec: str) -> tuple[str, int | None]:
    if spec.endswith("[0]"):
        return spec[:-3], 0
    return spec, None


@contextmanager
def recording(model: Any, family: str) -> Iterator[dict[str, torch.Tensor]]:
    """The test's own forward hooks: per block, its output, the attention and MLP outputs
    and the input of the MLP output projection (all cloned)."""
    _, attn_spec, mlp_spec, proj_spec = REFERENCE[family]
    seen: dict[str, torch.Tensor] = {}
    handles = []

    def keep(key: str, index: int | None) -> Callable[..., None]:
        def hook(module: Any, args: Any, output: Any) -> None:
            value = output[index] if index is not None else output
            if isinstance(value, tuple):
                value = value[0]
            seen[key] = value.detach().clone()

        return hook

    def keep_input(key: str) -> Callable[..., None]:
        def hook(module: Any, args: Any) -> None:
            seen[key] = args[0].detach().clone()

        return hook

    try:
        for i, block in enumerate(blocks_of(model, family)):
            handles.append(block.register_forward_hook(keep(f"{i}.block", None)))
            for role, spec in (("attn", attn_spec), ("mlp", mlp_spec)):
                path, index = _split(spec)
                handles.append(
                    block.get_submodule(path).register_forward_hook(keep(f"{i}.{role}", index))
                )
            handles.append(
                block.get_submodule(proj_spec).register_forward_pre_hook(
                    keep_input(f"{i}.mlp_hidden")
                )
            )
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def hook_snapshot(model: Any) -> dict[str, tuple[int, int]]:
    """Per module, how many forward (pre-)hooks it has; transformers' own output-capturing
    hooks are installed once and stay, so tests compare snapshots around a backend call."""
    return {
        name: (len(m._forward_hooks), len(m._forward_pre_hooks))
        for name, m in model.named_modules()
    }


def ids_for(seed: int = 0, batch: int = 2, seq: int = 7) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(4, 100, (batch, seq), generator=generator)
