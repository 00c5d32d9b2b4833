"""Where things live in a hybrid model: the block list, each block's sequence mixer (a gated
delta net, a short convolution or softmax attention) and its MLP, found from the modules a block
holds, never from the model's type name."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from archscope import BackendError

#: Block lists: causal-LM wrappers ``model.layers``, base models ``layers``, multimodal wrappers
#: whose language model sits one level down.
STACK_PATHS = ("model.layers", "layers", "model.language_model.layers")
EMBED_NAMES = ("embed_tokens", "embeddings", "embedding")
#: The final norm of the language model (LFM2 calls it ``embedding_norm``).
FINAL_NORM_NAMES = ("norm", "final_layernorm", "norm_f", "embedding_norm")
MLP_NAMES = ("mlp", "feed_forward")
#: Blocks that normalise a sub-layer's output before adding it to the residual (OLMo style):
#: there the site is the norm's output, the value really added.
POST_NORMS = ("post_attention_layernorm", "post_feedforward_layernorm")
#: The same around every mixer, attention or not (LFM3; the norms may be identities).
OPERATOR_POST_NORMS = ("post_operator_norm", "post_ffn_norm")

GATED_DELTA = "gated_delta"
SHORT_CONV = "short_conv"
LIGHTNING = "lightning"
ATTENTION = "attention"


def get(obj: Any, path: str) -> Any:
    """``obj.a.b`` for ``path`` "a.b", or None when a part is missing (never raises)."""
    for part in path.split("."):
        try:
            obj = getattr(obj, part, None)
        except Exception:
            return None
        if obj is None:
            return None
    return obj


def _is_conv1d(module: Any) -> bool:
    return type(module).__name__ == "Conv1d" and get(module, "kernel_size") is not None


def is_gated_delta_net(module: Any) -> bool:
    """A gated delta net: a depthwise ``conv1d`` over q/k/v, a per-head decay ``A_log`` and
    head sizes ``head_k_dim`` / ``head_v_dim``."""
    return (
        _is_conv1d(get(module, "conv1d"))
        and get(module, "A_log") is not None
        and all(get(module, a) is not None for a in ("num_v_heads", "head_k_dim", "head_v_dim"))
    )


def is_kimi_delta_attention(module: Any) -> bool:
    """Kimi delta attention (a gated delta rule with a decay per key channel): a depthwise
    ``conv1d`` over q/k/v, a ``forget_gate`` holding the decay ``A_log`` and ``num_heads`` /
    ``head_dim``."""
    return (
        _is_conv1d(get(module, "conv1d"))
        and get(module, "forget_gate.A_log") is not None
        and all(get(module, a) is not None for a in ("num_heads", "head_dim"))
    )


def is_short_conv(module: Any) -> bool:
    """A gated short convolution: ``in_proj`` -> depthwise ``conv`` -> ``out_proj``."""
    return (
        _is_conv1d(get(module, "conv"))
        and get(module, "in_proj") is not None
        and get(module, "out_proj") is not None
    )


def is_lightning_attention(module: Any) -> bool:
    """Lightning (decayed linear) attention: a fused ``qkv_proj``, an ``output_gate``, a
    per-head decay ``slope_rate`` and ``num_attention_heads`` / ``head_dim``."""
    return all(
        get(module, a) is not None
        for a in ("qkv_proj", "output_gate", "slope_rate", "num_attention_heads", "head_dim")
    )


def mixer_kind(block: Any) -> tuple[str, str] | None:
    """(child name, kind) of a block's recurrent sequence mixer, or None."""
    for name, child in _children(block):
        if is_gated_delta_net(child) or is_kimi_delta_attention(child):
            return name, GATED_DELTA
        if is_short_conv(child):
            return name, SHORT_CONV
        if is_lightning_attention(child):
            return name, LIGHTNING
    return None


def _children(module: Any) -> list[tuple[str, Any]]:
    named = getattr(module, "named_children", None)
    if named is None:
        return []
    try:
        return list(named())
    except Exception:
        return []


def find_stack(model: Any) -> tuple[str, Any] | None:
    """(path, block list) of the first block list holding at least one recurrent mixer."""
    for path in STACK_PATHS:
        blocks = get(model, path)
        if blocks is None or isinstance(blocks, str):
            continue
        try:
            items = list(blocks)
        except TypeError:
            continue
        if items and any(mixer_kind(b) is not None for b in items):
            return path, blocks
    return None


@dataclass
class Layer:
    """One block: its sequence mixer and MLP, and the shapes of its recurrent states."""

    index: int
    block: Any
    kind: str  # GATED_DELTA, SHORT_CONV or ATTENTION
    mixer: str  # child name of the sequence mixer
    mixer_out: str  # path (under the block) whose output is the mixer's contribution
    mlp_out: str | None
    #: (heads, key_dim, value_dim) of a gated delta net's or lightning attention's matrix state
    state_shape: tuple[int, ...] | None = None
    #: (channels, kernel) of the causal-conv window
    conv_shape: tuple[int, int] | None = None
    #: the layer's index in the model's cache
    cache_index: int = 0
    #: child name of the MLP / MoE module, whose input is ``layer_i.mlp_in``
    mlp: str | None = None

    @property
    def recurrent(self) -> bool:
        return self.kind != ATTENTION


def describe(index: int, block: Any) -> Layer:
    """The `Layer` of ``block`` (an error naming its children when it has no sequence mixer)."""
    found = mixer_kind(block)
    if found is None:
        if get(block, "self_attn") is None:
            names = ", ".join(n for n, _ in _children(block))
            raise BackendError(
                f"block {index} ({type(block).__name__}) has no sequence mixer: no gated delta "
                f"net, short convolution or self_attn among its children ({names})"
            )
        found = ("self_attn", ATTENTION)
    mixer, kind = found
    post_norms = all(get(block, n) is not None for n in POST_NORMS)
    mlp = next((n for n in MLP_NAMES if get(block, n) is not None), None)
    mixer_out: str = mixer
    mlp_out: str | None = mlp
    if post_norms and kind == ATTENTION:
        mixer_out, mlp_out = POST_NORMS[0], POST_NORMS[1]
    elif all(get(block, n) is not None for n in OPERATOR_POST_NORMS):
        mixer_out, mlp_out = OPERATOR_POST_NORMS
    module = get(block, mixer)
    layer = Layer(index, block, kind, mixer, mixer_out, mlp_out, mlp=mlp)
    layer.cache_index = int(getattr(module, "layer_idx", index))
    if kind == GATED_DELTA:
        if is_kimi_delta_attention(module):  # one head size for keys and values
            heads, key_dim = int(module.num_heads), int(module.head_dim)
            layer.state_shape = (heads, key_dim, key_dim)
        else:
            layer.state_shape = (
                int(module.num_v_heads),
                int(module.head_k_dim),
                int(module.head_v_dim),
            )
        conv = module.conv1d
        layer.conv_shape = (int(conv.in_channels), int(conv.kernel_size[0]))
    elif kind == LIGHTNING:
        heads, head_dim = int(module.num_attention_heads), int(module.head_dim)
        layer.state_shape = (heads, head_dim, head_dim)
    elif kind == SHORT_CONV:
        conv = module.conv
        layer.conv_shape = (int(conv.in_channels), int(conv.kernel_size[0]))
    return layer


def base_of(model: Any, stack_path: str) -> Any:
    """The module that holds the block list (and the embedding and final norm)."""
    return get(model, stack_path.rsplit(".", 1)[0]) if "." in stack_path else model


def first_child(parent: Any, names: tuple[str, ...]) -> tuple[str | None, Any]:
    for name in names:
        module = get(parent, name)
        if module is not None:
            return name, module
    return None, None
