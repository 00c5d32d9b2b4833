"""Where things live in a Mamba-family model: finding the block list and each block's SSM mixer,
attention and MLP by structure, and the site table built from what each layer has."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from archscope import BackendError

if TYPE_CHECKING:
    import torch

    from archscope.engine import SiteTable

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


class MambaStack(Protocol):
    """What the run helpers (plan, states, native, continuing) read from the backend: they take
    this view of it instead of the backend class, so no helper imports the backend."""

    model: Any
    native: bool
    layers: list[LayerMap]

    @property
    def table(self) -> SiteTable: ...

    @property
    def state_sites(self) -> list[str]: ...

    @property
    def ssm_layers(self) -> list[LayerMap]: ...

    @property
    def device(self) -> torch.device: ...

    def require(self, capability: str) -> None: ...

    def logits_of(self, output: Any) -> torch.Tensor | None: ...
