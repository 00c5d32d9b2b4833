"""Where things live in a Mamba-family model: finding the block list and each block's SSM mixer,
attention and MLP by structure, and the site table built from what each layer has."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from archscope import BackendError, Site, SiteInfo
from archscope.engine import Hookpoint

if TYPE_CHECKING:
    from .backend import MambaBackend

# -- where things live -------------------------------------------------------------------------
#: Block lists: Mamba-style ``backbone.layers``, hybrids ``model.layers``, base models ``layers``.
STACK_PATHS = ("backbone.layers", "model.layers", "layers")
#: The SSM mixer inside a block (Zamba2's hybrid layers keep theirs one level down).
SSM_PATHS = ("mixer", "mamba", "mamba_decoder.mamba")
#: Attention inside a block. Zamba2's hybrid layers add the shared transformer's output through
#: their own ``linear`` (into the mixer input), which is the per-layer attention contribution.
ATTN_PATHS = ("self_attn", "mixer", "linear")
#: MLP / MoE inside a block (Nemotron-H's MLP layers call theirs ``mixer``).
MLP_PATHS = ("feed_forward", "mlp", "mixer", "shared_mlp")
EMBED_PATHS = ("embeddings", "embed_tokens", "embedding")
FINAL_NORM_PATHS = ("norm_f", "final_layernorm", "norm")

#: Site order inside layer i is ``1 + 10 * i + offset`` (forward order, for stopping early).
_ORDER = {
    "attn_first": 1,
    "mixer": 2,
    "attn": 3,
    "mlp": 4,
    "residual": 5,
    "ssm_state": 6,
    "conv_state": 7,
}


def _get(obj: Any, path: str) -> Any:
    for part in path.split("."):
        try:
            obj = getattr(obj, part, None)
        except Exception:  # an object whose attribute access raises is not ours
            return None
        if obj is None:
            return None
    return obj


def is_ssm_mixer(module: Any) -> bool:
    """A selective-SSM mixer: ``A_log`` and ``conv1d``, and ``dt_bias`` (Mamba-2) or
    ``dt_proj`` (Mamba)."""
    return (
        _get(module, "A_log") is not None
        and _get(module, "conv1d") is not None
        and (_get(module, "dt_bias") is not None or _get(module, "dt_proj") is not None)
    )


def _is_attention(module: Any) -> bool:
    if module is None or is_ssm_mixer(module):
        return False
    if any(_get(module, a) is not None for a in ("q_proj", "qkv_proj", "Wqkv", "k_proj")):
        return True
    name = type(module).__name__
    return "Attention" in name or name == "MHA"


def _is_mlp(module: Any) -> bool:
    if module is None or is_ssm_mixer(module) or _is_attention(module):
        return False
    return callable(module)


def find_stack(model: Any) -> tuple[str, Any] | None:
    """(path, block list) of the first block list holding at least one SSM mixer."""
    for path in STACK_PATHS:
        blocks = _get(model, path)
        try:
            items = list(blocks) if blocks is not None and not isinstance(blocks, str) else []
        except TypeError:
            continue
        if items and any(_ssm_path(b) is not None for b in items):
            return path, blocks
    return None


def _ssm_path(block: Any) -> str | None:
    for path in SSM_PATHS:
        if is_ssm_mixer(_get(block, path)):
            return path
    return None


def is_native(model: Any) -> bool:
    """A native ``mamba_ssm`` stack: ``backbone.embedding`` and blocks that return
    ``(hidden_states, residual)`` (they carry ``fused_add_norm``)."""
    stack = find_stack(model)
    if stack is None:
        return False
    first = next(iter(stack[1]))
    return type(model).__module__.startswith("mamba_ssm") or (
        _get(model, "backbone.embedding") is not None and hasattr(first, "fused_add_norm")
    )


# -- per-layer description ---------------------------------------------------------------------
@dataclass
class LayerMap:
    """What one block has: paths (relative to the block) of its sub-layers, if any."""

    index: int
    block: Any
    ssm: str | None = None
    attn: str | None = None
    mlp: str | None = None
    cache_index: int = 0
    #: ("mamba", d_inner, d_state) or ("mamba2", heads, head_dim, d_state)
    state_shape: tuple[Any, ...] = ()
    conv_shape: tuple[int, int] = (0, 0)


def describe_layer(i: int, block: Any) -> LayerMap:
    layer = LayerMap(index=i, block=block, ssm=_ssm_path(block))
    used = {layer.ssm}
    if _get(block, "shared_transformer") is not None and _get(block, "linear") is not None:
        layer.attn = "linear"  # Zamba2 hybrid layer
    else:
        layer.attn = next(
            (
                p
                for p in ATTN_PATHS
                if p not in used and p != "linear" and _is_attention(_get(block, p))
            ),
            None,
        )
    used.add(layer.attn)
    if _get(block, "block_sparse_moe") is None:  # GraniteMoeHybrid with experts: no one module
        layer.mlp = next((p for p in MLP_PATHS if p not in used and _is_mlp(_get(block, p))), None)
    if layer.ssm is not None:
        mixer = _get(block, layer.ssm)
        layer.cache_index = int(getattr(mixer, "layer_idx", i))
        kernel = int(mixer.conv1d.kernel_size[0])
        layer.conv_shape = (int(mixer.conv1d.in_channels), kernel)
        d_state = int(_first_attr(mixer, ("ssm_state_size", "d_state")))
        if _get(mixer, "dt_bias") is not None:  # Mamba-2: one dt per head
            heads = int(mixer.A_log.shape[0])
            head_dim = int(_first_attr(mixer, ("head_dim", "headdim")))
            layer.state_shape = ("mamba2", heads, head_dim, d_state)
        else:
            layer.state_shape = ("mamba", int(mixer.A_log.shape[0]), d_state)
    return layer


def _first_attr(obj: Any, names: tuple[str, ...]) -> Any:
    for name in names:
        value = getattr(obj, name, None)
        if value is not None:
            return value
    raise BackendError(f"{type(obj).__name__} has none of the attributes {names}")


def build_site_table(backend: MambaBackend) -> dict[str, tuple[SiteInfo, Hookpoint | None]]:
    """The site table of ``backend``: each layer's sub-layers, its residual stream and its
    recurrent states (read from the cache, so without a hookpoint), in forward order."""
    d = backend.d_model
    tok = ("batch", "seq", "d_model")
    table: dict[str, tuple[SiteInfo, Hookpoint | None]] = {}

    def add(
        name: str,
        kind: str,
        shape: tuple[str, ...],
        dim: int,
        order: float,
        hp: Hookpoint | None,
        writable: bool = True,
        desc: str = "",
        **extra: Any,
    ) -> None:
        info = SiteInfo(
            Site.parse(name),
            kind,
            shape,
            dim,
            writable=writable,
            order=order,
            description=desc,
            extra=extra,
        )
        table[name] = (info, hp)

    config = getattr(backend.model, "config", None)
    scaled_embedding = float(getattr(config, "embedding_multiplier", 1.0) or 1.0) != 1.0
    if backend.embedding is not None and not scaled_embedding and not backend.native:
        embed_hp = Hookpoint(backend.embedding)
    else:  # the embedding is scaled (or native): read the stream where block 0 takes it
        embed_hp = Hookpoint(backend.layers[0].block, io="input", index=0, arg="hidden_states")
    add("embed", "token", tok, d, 0, embed_hp, desc="residual stream before block 0")

    for layer in backend.layers:
        i, base = layer.index, 1 + 10 * layer.index
        if layer.attn is not None:
            offset = _ORDER["attn_first"] if layer.attn == "linear" else _ORDER["attn"]
            add(
                f"layer_{i}.attn",
                "token",
                tok,
                d,
                base + offset,
                Hookpoint(_get(layer.block, layer.attn)),
                desc="attention sub-layer output",
            )
        if layer.ssm is not None:
            add(
                f"layer_{i}.mixer",
                "token",
                tok,
                d,
                base + _ORDER["mixer"],
                Hookpoint(_get(layer.block, layer.ssm)),
                desc="SSM mixer output",
            )
        if layer.mlp is not None:
            add(
                f"layer_{i}.mlp",
                "token",
                tok,
                d,
                base + _ORDER["mlp"],
                Hookpoint(_get(layer.block, layer.mlp)),
                desc="MLP / MoE output",
            )
        add(
            f"layer_{i}.residual",
            "token",
            tok,
            d,
            base + _ORDER["residual"],
            Hookpoint(layer.block, index=0),
            desc="residual stream after the block",
        )
        if layer.ssm is not None:
            kind, *sizes = layer.state_shape
            shape = (
                ("batch", "d_inner", "d_state")
                if kind == "mamba"
                else ("batch", "heads", "head_dim", "d_state")
            )
            # States are set through run(initial_state=...) / state_patch, not edits.
            add(
                f"layer_{i}.ssm_state",
                "state",
                shape,
                sizes[-1],
                base + _ORDER["ssm_state"],
                None,
                writable=False,
                desc="SSM state after the last real token",
                size=tuple(sizes),
            )
            add(
                f"layer_{i}.conv_state",
                "state",
                ("batch", "channels", "kernel"),
                layer.conv_shape[1],
                base + _ORDER["conv_state"],
                None,
                writable=False,
                desc="causal-conv input window after the last real token",
                size=layer.conv_shape,
            )

    end = 1 + 10 * len(backend.layers)
    if backend.native and backend.lm_head is not None:
        # The fused add+norm path calls a kernel, not norm_f: read the head's input instead.
        add("final_norm", "token", tok, d, end, Hookpoint(backend.lm_head, io="input", arg="input"))
    elif backend.final_norm is not None:
        add("final_norm", "token", tok, d, end, Hookpoint(backend.final_norm))
    if backend.lm_head is not None:
        vocab = int(backend.lm_head.weight.shape[0])
        add(
            "logits",
            "token",
            ("batch", "seq", "vocab"),
            vocab,
            end + 1,
            None,
            writable=False,
            desc="output logits",
        )
    return table
