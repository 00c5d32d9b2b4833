"""Where the parts of a Hugging Face decoder-only LM live, found by structure.

No model type is named here. The block list is the `nn.ModuleList` whose length is the
config's layer count; everything else is looked up by the attribute names in the tables
below, tried in order. Reading a model never imports torch or transformers: a model that
exists has already loaded them.
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass
from typing import Any, cast

from archscope.engine import Hookpoint
from archscope.errors import BackendError
from archscope.modules import accepts

# -- the site map, as tables of candidate attribute names (first match wins) --------------------

#: Config attributes holding the number of blocks.
LAYER_COUNT = ("num_hidden_layers", "n_layer", "n_layers", "num_layers")
#: The final norm: a child of the module that holds the block list.
FINAL_NORM = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "norm_f", "ln_out", "out_norm")
#: A projection between the final norm and the unembedding (OPT-350m style), if present.
OUTPUT_PROJECTION = ("project_out",)
#: Inside a block: the attention sub-module.
ATTENTION = ("self_attn", "attn", "attention", "self_attention")
#: Inside a block: the MLP sub-module. When none exists, the block holds the MLP's linears.
MLP = ("mlp", "feed_forward", "ffn")
#: Inside the MLP: its output projection. Its input are the hidden units (`mlp_hidden`).
MLP_OUTPUT = ("down_proj", "c_proj", "dense_4h_to_h", "fc_out", "fc2", "w2")
#: Inside the attention: its output projection (used when the module adds the residual itself).
ATTENTION_OUTPUT = ("o_proj", "c_proj", "dense", "out_proj")
#: Post-sub-layer norms ("sandwich" blocks): when a block has both, the attention and MLP
#: outputs are normalised before being added to the residual, so the sites read the norms.
POST_NORMS = ("post_attention_layernorm", "post_feedforward_layernorm")
#: Class-name fragments of recurrent / state-space layers: a model holding any of them is
#: served by the recurrent or Mamba backends, also when it has attention layers too (hybrids).
RECURRENT_MARKERS = ("mamba", "mixer", "rwkv", "lstm", "ssm", "rnn", "recurrent")


class StructureError(BackendError, ValueError):
    """The model's blocks, norm, head or sub-layers could not be found (an archscope
    `BackendError`, and a `ValueError` as before)."""


@dataclass(frozen=True)
class BlockParts:
    """The sites of one block, in the order the forward pass produces them: where each value
    lives, as a `Hookpoint` naming its module by its path under the model."""

    block: Any
    attention: Any
    attn_pattern: Hookpoint
    attn: Hookpoint
    mlp_hidden: Hookpoint | None
    mlp: Hookpoint
    d_mlp: int | None
    #: the MLP's input (its normalised residual), where the MLP is a sub-module of its own that
    #: takes only that input (not OPT's in-block linears, not Bloom/MPT's residual-adding MLPs)
    mlp_in: Hookpoint | None = None


@dataclass(frozen=True)
class Structure:
    blocks_path: str
    blocks: list[Any]
    final_norm: Any
    final_norm_path: str
    output_projection: Any | None
    head: Any
    parts: list[BlockParts]
    d_model: int
    vocab: int
    n_heads: int | None
    softcap: float | None


def first_param(fn: Any, default: str = "hidden_states") -> str:
    try:
        params = [p for p in inspect.signature(fn).parameters if p != "self"]
    except (TypeError, ValueError):
        return default
    return params[0] if params else default


def is_hf_causal_lm(model: Any) -> bool:
    """A transformers `PreTrainedModel` with generation support and no encoder (by its MRO)."""
    mro = type(model).__mro__
    is_pretrained = any(
        c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers") for c in mro
    )
    generates = any(c.__name__ == "GenerationMixin" for c in mro)
    config = getattr(model, "config", None)
    return (
        is_pretrained
        and generates
        and config is not None
        and not getattr(config, "is_encoder_decoder", False)
    )


def recurrent_layers(model: Any) -> list[str]:
    """Class names of recurrent / state-space layers inside the model."""
    found = []
    for module in model.modules():
        name = type(module).__name__
        if any(marker in name.lower() for marker in RECURRENT_MARKERS):
            found.append(name)
    return sorted(set(found))


def _child(parent: Any, names: tuple[str, ...]) -> tuple[str, Any] | tuple[None, None]:
    for name in names:
        module = getattr(parent, name, None)
        if module is not None and _is_module(module):
            return name, module
    return None, None


def _is_module(obj: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.nn.Module)


def _layer_count(config: Any) -> int:
    for attr in LAYER_COUNT:
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    raise StructureError(
        f"the config ({type(config).__name__}) has none of {', '.join(LAYER_COUNT)}"
        ": cannot tell how many blocks the model has"
    )


def _find_blocks(model: Any, n_layers: int) -> tuple[str, Any, Any]:
    torch = sys.modules["torch"]
    root = getattr(model, "base_model", model)
    candidates = []
    lists = []
    for path, module in root.named_modules():
        if isinstance(module, torch.nn.ModuleList):
            lists.append(f"{path} ({len(module)})")
            if len(module) == n_layers:
                # prefer a list of blocks with attention, then the shallowest
                blockish = len(module) > 0 and _child(module[0], ATTENTION)[1] is not None
                candidates.append((not blockish, path.count("."), path, module))
    if not candidates:
        raise StructureError(
            f"could not find the block list of {type(model).__name__}: no nn.ModuleList of "
            f"length {n_layers} (the config's layer count) under {type(root).__name__}; "
            f"module lists found: {', '.join(lists) or 'none'}"
        )
    *_, path, blocks = min(candidates, key=lambda c: c[:3])
    parent = root.get_submodule(path.rpartition(".")[0]) if "." in path else root
    prefix = "" if root is model else f"{_attr_name(model, root)}."
    return prefix + path, blocks, parent


def _attr_name(model: Any, child: Any) -> str:
    for name, module in model.named_children():
        if module is child:
            return cast(str, name)
    return type(child).__name__


def _block_parts(block: Any, path: str) -> BlockParts:
    attn_name, attention = _child(block, ATTENTION)
    if attention is None:
        children = [n for n, _ in block.named_children()]
        raise StructureError(
            f"{path} ({type(block).__name__}) has no attention sub-module: looked for "
            f"{', '.join(ATTENTION)}; its children are {', '.join(children)}"
        )
    mlp_name, mlp = _child(block, MLP)
    mlp_path = f"{path}.{mlp_name}"
    if mlp is None:  # MLP linears directly in the block (OPT)
        mlp, mlp_path = block, path
    out_name, mlp_out = _child(mlp, MLP_OUTPUT)
    if mlp_out is None and mlp is block:
        children = [n for n, _ in block.named_children()]
        raise StructureError(
            f"{path} ({type(block).__name__}) has no MLP: looked for a sub-module named "
            f"{', '.join(MLP)} or an output projection named {', '.join(MLP_OUTPUT)} in the "
            f"block; its children are {', '.join(children)}"
        )
    attn_path = f"{path}.{attn_name}"
    pattern = Hookpoint(attn_path, index=1)
    attn = Hookpoint(attn_path, index=0, clone=True)
    mlp_port = Hookpoint(mlp_path, index=0, clone=True)
    # A sub-module that takes the residual as an argument adds it itself (Bloom, MPT): read
    # its output projection instead, which is what it adds.
    if accepts(attention.forward, "residual", declared=True):
        name, proj = _child(attention, ATTENTION_OUTPUT)
        if proj is None:
            raise StructureError(
                f"{attn_path} adds the residual itself but has no output "
                f"projection named {', '.join(ATTENTION_OUTPUT)}"
            )
        attn = Hookpoint(f"{attn_path}.{name}", clone=True)
    if mlp is not block and accepts(mlp.forward, "residual", declared=True):
        if mlp_out is None:
            raise StructureError(
                f"{mlp_path} adds the residual itself but has no output "
                f"projection named {', '.join(MLP_OUTPUT)}"
            )
        mlp_port = Hookpoint(f"{mlp_path}.{out_name}", clone=True)
    elif mlp is block:
        mlp_port = Hookpoint(f"{mlp_path}.{out_name}", clone=True)
    if all(getattr(block, n, None) is not None for n in POST_NORMS):
        attn = Hookpoint(f"{path}.{POST_NORMS[0]}", clone=True)
        mlp_port = Hookpoint(f"{path}.{POST_NORMS[1]}", clone=True)
    mlp_in = None
    if mlp is not block and not accepts(mlp.forward, "residual", declared=True):
        mlp_in = Hookpoint(mlp_path, io="input", arg=first_param(mlp.forward))
    hidden = None
    d_mlp = None
    if mlp_out is not None:
        hidden = Hookpoint(
            f"{mlp_path}.{out_name}", io="input", arg=first_param(mlp_out.forward, "input")
        )
        d_mlp = _in_features(mlp_out)
    return BlockParts(
        block=block,
        attention=attention,
        attn_pattern=pattern,
        attn=attn,
        mlp_hidden=hidden,
        mlp=mlp_port,
        d_mlp=d_mlp,
        mlp_in=mlp_in,
    )


def _in_features(linear: Any) -> int | None:
    if hasattr(linear, "in_features"):
        return int(linear.in_features)
    weight = getattr(linear, "weight", None)
    if weight is not None and weight.dim() == 2:  # transformers' Conv1D stores (in, out)
        return int(weight.shape[0] if type(linear).__name__ == "Conv1D" else weight.shape[1])
    return None


def find_structure(model: Any) -> Structure:
    """Map a Hugging Face decoder-only LM, or raise `StructureError` naming what is missing."""
    if "torch" not in sys.modules or not _is_module(model):
        raise StructureError(f"{type(model).__name__} is not a torch module")
    config = getattr(model, "config", None)
    if config is None:
        raise StructureError(f"{type(model).__name__} has no .config: not a Hugging Face model")
    n_layers = _layer_count(config)
    blocks_path, blocks, parent = _find_blocks(model, n_layers)
    norm_name, norm = _child(parent, FINAL_NORM)
    if norm is None:
        children = [n for n, _ in parent.named_children()]
        raise StructureError(
            f"could not find the final norm of {type(model).__name__}: {type(parent).__name__} "
            f"(which holds {blocks_path}) has no child named {', '.join(FINAL_NORM)}; its "
            f"children are {', '.join(children)}"
        )
    parent_path = blocks_path.rpartition(".")[0]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise StructureError(
            f"{type(model).__name__}.get_output_embeddings() returned None: "
            "the model has no unembedding (load it with an LM head, e.g. "
            "AutoModelForCausalLM)"
        )
    _, projection = _child(parent, OUTPUT_PROJECTION)
    parts = [_block_parts(block, f"{blocks_path}.{i}") for i, block in enumerate(blocks)]
    d_model = getattr(config, "hidden_size", None) or getattr(config, "d_model", None)
    vocab = getattr(head, "out_features", None) or getattr(config, "vocab_size", None)
    n_heads = getattr(config, "num_attention_heads", None)
    softcap = getattr(config, "final_logit_softcapping", None)
    return Structure(
        blocks_path=blocks_path,
        blocks=list(blocks),
        final_norm=norm,
        final_norm_path=f"{parent_path}.{norm_name}" if parent_path else str(norm_name),
        output_projection=projection,
        head=head,
        parts=parts,
        d_model=int(d_model or 0),
        vocab=int(vocab or 0),
        n_heads=int(n_heads) if n_heads else None,
        softcap=float(softcap) if softcap else None,
    )
