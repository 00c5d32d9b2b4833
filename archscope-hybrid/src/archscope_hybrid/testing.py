"""Tiny random-weight models of every family the `hybrid` backend serves, for tests, and
independent references (hand-placed hooks, the model's own outputs and cache).

`make_model(family)` builds one (float32, eval mode, seeded). `FAMILIES` are hybrids of
recurrent and attention layers; `RECURRENT_FAMILIES` are stacks of recurrent layers only (state
patching applies to them). A family whose classes the installed transformers lacks is listed in
`missing(family)`; tests skip it with that reason.
"""

from __future__ import annotations

from typing import Any

from archscope.compat import transformers_release
from archscope.errors import ParameterError

from .backend import CACHE_WITHOUT_ATTENTION

VOCAB = 100
D_MODEL = 32

_ATTN: dict[str, Any] = dict(num_attention_heads=4, num_key_value_heads=2, head_dim=8)
_GDN: dict[str, Any] = dict(
    linear_num_value_heads=4,
    linear_num_key_heads=2,
    linear_key_head_dim=8,
    linear_value_head_dim=8,
    linear_conv_kernel_dim=4,
)
_HYBRID = ["linear_attention", "full_attention", "linear_attention", "full_attention"]
_CONV_HYBRID = ["conv", "full_attention", "conv", "full_attention"]

#: family -> (config class, model class, config kwargs)
_SPECS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "qwen3_next": (
        "Qwen3NextConfig",
        "Qwen3NextForCausalLM",
        dict(
            intermediate_size=64,
            num_hidden_layers=4,
            layer_types=_HYBRID,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=16,
            decoder_sparse_step=2,
            **_ATTN,
            **_GDN,
        ),
    ),
    "qwen3_5_text": (
        "Qwen3_5TextConfig",
        "Qwen3_5ForCausalLM",
        dict(intermediate_size=64, num_hidden_layers=4, layer_types=_HYBRID, **_ATTN, **_GDN),
    ),
    "olmo_hybrid": (
        "OlmoHybridConfig",
        "OlmoHybridForCausalLM",
        # the default pad id lies outside a small vocabulary
        dict(
            intermediate_size=64,
            num_hidden_layers=4,
            layer_types=_HYBRID,
            pad_token_id=0,
            num_attention_heads=4,
            num_key_value_heads=2,
            **_GDN,
        ),
    ),
    "lfm2": (
        "Lfm2Config",
        "Lfm2ForCausalLM",
        dict(
            intermediate_size=64,
            num_hidden_layers=4,
            layer_types=_CONV_HYBRID,
            num_attention_heads=4,
            num_key_value_heads=2,
        ),
    ),
    "lfm2_moe": (
        "Lfm2MoeConfig",
        "Lfm2MoeForCausalLM",
        dict(
            intermediate_size=64,
            moe_intermediate_size=16,
            num_hidden_layers=4,
            layer_types=_CONV_HYBRID,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_experts=4,
            num_experts_per_tok=2,
            num_dense_layers=1,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        ),
    ),
    "lfm3": (
        "Lfm3Config",
        "Lfm3ForCausalLM",
        dict(
            intermediate_size=64,
            num_hidden_layers=4,
            layer_types=_CONV_HYBRID,
            num_attention_heads=4,
            num_key_value_heads=2,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        ),
    ),
    "minimax": (
        "MiniMaxConfig",
        "MiniMaxForCausalLM",
        dict(
            intermediate_size=64,
            num_hidden_layers=4,
            layer_types=_HYBRID,
            num_local_experts=2,
            num_experts_per_tok=1,
            block_size=4,
            **_ATTN,
        ),
    ),
    "kimi_linear": (
        "KimiLinearConfig",
        "KimiLinearForCausalLM",
        # a config of linear layers only fails in transformers' mask code: mix in attention
        dict(
            intermediate_size=64,
            num_hidden_layers=4,
            layer_types=_HYBRID,
            num_attention_heads=4,
            num_key_value_heads=4,
            linear_attn_config=dict(head_dim=8, num_heads=4, short_conv_kernel_size=4),
            mlp_layer_types=["dense"] * 4,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        ),
    ),
    # Stacks of recurrent layers only: state patching and continuing from a state.
    "qwen3_5_linear": (
        "Qwen3_5TextConfig",
        "Qwen3_5ForCausalLM",
        dict(
            intermediate_size=64,
            num_hidden_layers=2,
            layer_types=["linear_attention"] * 2,
            **_ATTN,
            **_GDN,
        ),
    ),
    "lfm2_conv": (
        "Lfm2Config",
        "Lfm2ForCausalLM",
        dict(
            intermediate_size=64,
            num_hidden_layers=2,
            layer_types=["conv", "conv"],
            num_attention_heads=4,
            num_key_value_heads=2,
        ),
    ),
}

#: The Qwen3.5 multimodal wrapper (its language model holds the blocks; a one-block vision tower).
_WRAPPER = ("Qwen3_5Config", "Qwen3_5ForConditionalGeneration", "qwen3_5_text")
_VISION: dict[str, Any] = dict(
    depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=D_MODEL
)

FAMILIES: tuple[str, ...] = (
    "qwen3_next",
    "qwen3_5_text",
    "qwen3_5",
    "olmo_hybrid",
    "lfm2",
    "lfm2_moe",
    "lfm3",
    "minimax",
    "kimi_linear",
)
RECURRENT_FAMILIES: tuple[str, ...] = ("qwen3_5_linear", "lfm2_conv")
ALL_FAMILIES: tuple[str, ...] = FAMILIES + RECURRENT_FAMILIES


#: The first transformers release a family was checked on, where the oldest release the
#: package allows (5.6.0) differs: there OLMo-hybrid's gated delta net has another layout, and
#: stacks without attention layers fail in the causal-mask code even with the mask mapping.
FLOORS: dict[str, tuple[int, int]] = {
    "olmo_hybrid": (5, 25),
    "qwen3_5_linear": CACHE_WITHOUT_ATTENTION,
    "lfm2_conv": CACHE_WITHOUT_ATTENTION,
}


def missing(family: str, check_floor: bool = True) -> str | None:
    """Why ``family`` cannot be built or checked with the installed transformers (None: it
    can). ``check_floor=False``: only whether its classes exist, below its entry in `FLOORS`
    too."""
    import transformers

    floor = FLOORS.get(family)
    if check_floor and floor is not None and transformers_release() < floor:
        return (
            f"family {family!r} is checked from transformers {'.'.join(map(str, floor))} on; "
            f"installed: {transformers.__version__}"
        )
    config_name, model_name, _ = _WRAPPER if family == "qwen3_5" else _SPECS[family]
    absent = [n for n in (config_name, model_name) if not hasattr(transformers, n)]
    if absent:
        return (
            f"transformers {transformers.__version__} has no {', '.join(absent)} "
            f"(family {family!r} needs a later release)"
        )
    return None


def make_model(family: str, seed: int = 0, check_floor: bool = True) -> Any:
    """A float32 tiny model of ``family`` (one of `ALL_FAMILIES`), eval mode, seeded.
    ``check_floor=False`` builds it below the release `FLOORS` checks it from too (for tests of
    what the backend does there)."""
    import torch
    import transformers

    if family not in ALL_FAMILIES:
        raise ParameterError(f"unknown family {family!r}; known: {', '.join(ALL_FAMILIES)}")
    reason = missing(family, check_floor=check_floor)
    if reason is not None:
        raise ParameterError(reason)
    torch.manual_seed(seed)
    if family == "qwen3_5":
        config_name, model_name, text_family = _WRAPPER
        text = dict(vocab_size=VOCAB, hidden_size=D_MODEL, **_SPECS[text_family][2])
        config = getattr(transformers, config_name)(text_config=text, vision_config=_VISION)
        return getattr(transformers, model_name)(config).eval()
    config_name, model_name, kwargs = _SPECS[family]
    config = getattr(transformers, config_name)(vocab_size=VOCAB, hidden_size=D_MODEL, **kwargs)
    return getattr(transformers, model_name)(config).eval()


def random_ids(batch: int, seq: int, seed: int = 1) -> Any:
    """Token ids in [3, VOCAB) (clear of the configs' pad/bos/eos ids)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, seq), generator=gen)


def make_foreign_models() -> dict[str, Any]:
    """Tiny models the `hybrid` backend must not claim: a transformer, Mamba, Jamba, a torch
    LSTM."""
    import torch
    import transformers

    torch.manual_seed(0)
    small: dict[str, Any] = dict(vocab_size=VOCAB, hidden_size=D_MODEL, num_hidden_layers=2)
    models: dict[str, Any] = {
        "llama": transformers.LlamaForCausalLM(
            transformers.LlamaConfig(
                **small, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2
            )
        ),
        "mamba": transformers.MambaForCausalLM(
            transformers.MambaConfig(**small, state_size=8, expand=2, conv_kernel=4)
        ),
        "lstm": torch.nn.LSTM(8, 8, num_layers=2, batch_first=True),
    }
    return {name: model.eval() for name, model in models.items()}


# -- independent references ---------------------------------------------------------------------
def _layer_roles(block: Any) -> dict[str, str]:
    """role -> child path of one block, written out per family layout (the backend finds the
    same by structure): ``linear_attn`` / ``conv`` are mixers, ``self_attn`` attention, and
    OLMo-style post-normed attention blocks add their norms' outputs."""
    names = {n for n, _ in block.named_children()}
    roles: dict[str, str] = {}
    linear_at_self_attn = ("LightningAttention", "DeltaAttention")  # MiniMax, Kimi-Linear
    if type(getattr(block, "self_attn", None)).__name__.endswith(linear_at_self_attn):
        return {"mixer": "self_attn", "mlp": "mlp"}
    if "linear_attn" in names:
        roles["mixer"] = "linear_attn"
    elif "conv" in names:
        roles["mixer"] = "conv"
    if "self_attn" in names:
        post = "post_feedforward_layernorm" in names
        roles["attn"] = "post_attention_layernorm" if post else "self_attn"
        if post:
            roles["mlp"] = "post_feedforward_layernorm"
    roles.setdefault("mlp", "mlp" if "mlp" in names else "feed_forward")
    if "post_operator_norm" in names:  # LFM3 normalises both sub-layers' outputs
        role = "attn" if "self_attn" in names else "mixer"
        roles.update({role: "post_operator_norm", "mlp": "post_ffn_norm"})
    return roles


def language_model(model: Any) -> Any:
    """The module holding the blocks, the embedding and the final norm (a multimodal wrapper
    keeps it as ``model.language_model``)."""
    return getattr(model.model, "language_model", model.model)


def _text_config(model: Any) -> Any:
    return getattr(model.config, "text_config", model.config)


def _final_norm(model: Any) -> Any:
    inner = language_model(model)
    return inner.embedding_norm if hasattr(inner, "embedding_norm") else inner.norm


def reference_activations(model: Any, input_ids: Any) -> dict[str, Any]:
    """Sites of an unpadded batch computed without archscope: hooks on hand-picked modules, the
    model's own hidden states and logits, and the states in the model's own cache after the same
    input."""
    import torch

    out: dict[str, Any] = {}
    handles = []

    def keep(name: str) -> Any:
        def hook(module: Any, args: Any, output: Any) -> None:
            value = output[0] if isinstance(output, tuple) else output
            out[name] = value.detach().clone()

        return hook

    layers = language_model(model).layers
    handles.append(language_model(model).embed_tokens.register_forward_hook(keep("embed")))
    for i, block in enumerate(layers):
        for role, path in _layer_roles(block).items():
            handles.append(
                block.get_submodule(path).register_forward_hook(keep(f"layer_{i}.{role}"))
            )
        handles.append(block.register_forward_hook(keep(f"layer_{i}.residual")))
    handles.append(_final_norm(model).register_forward_hook(keep("final_norm")))
    try:
        with torch.no_grad():
            full = model(input_ids, output_hidden_states=True, **_mask_kwargs(model, None))
    finally:
        for handle in handles:
            handle.remove()
    out["logits"] = full.logits.detach().clone()
    # hidden_states[i + 1] is block i's output, except the last entry (after the final norm)
    for i in range(len(layers) - 1):
        if not torch.equal(full.hidden_states[i + 1], out[f"layer_{i}.residual"]):
            raise AssertionError(f"hidden_states[{i + 1}] differs from block {i}'s output")
    out.update(cache_states(model, input_ids))
    return out


def _mask_kwargs(model: Any, attention_mask: Any) -> dict[str, Any]:
    """A stack without attention layers fails in transformers' causal-mask code: it gets the
    per-layer-type mask mapping the models accept in place of a mask."""
    types = set(_text_config(model).layer_types)
    if "full_attention" in types:
        return {"attention_mask": attention_mask}
    return {"attention_mask": {t: attention_mask for t in types}}


def recurrent_layer_indices(model: Any) -> list[int]:
    types = list(_text_config(model).layer_types)
    return [i for i, t in enumerate(types) if t != "full_attention"]


def cache_states(model: Any, input_ids: Any, attention_mask: Any = None) -> dict[str, Any]:
    """``layer_i.ssm_state`` / ``layer_i.conv_state`` from the model's own cache after one
    forward pass (a stack without attention layers gets the mask mapping in place of a mask)."""
    import torch

    with torch.no_grad():
        out = model(input_ids, use_cache=True, **_mask_kwargs(model, attention_mask))
    # the output field was renamed within transformers 5.x
    cache = getattr(out, "cache", None) or out.past_key_values
    states: dict[str, Any] = {}
    for i in recurrent_layer_indices(model):
        if hasattr(cache, "get_linear_cache"):  # MiniMax keeps its own list of matrices
            states[f"layer_{i}.ssm_state"] = cache.get_linear_cache(i).clone()
            continue
        matrix = cache.layers[i].recurrent_states
        conv = cache.layers[i].conv_states
        matrix, conv = (h.get(0) if isinstance(h, dict) else h for h in (matrix, conv))
        if matrix is not None:
            states[f"layer_{i}.ssm_state"] = matrix.clone()
        if conv is None:
            raise AssertionError(f"the cache holds no conv state for recurrent layer {i}")
        states[f"layer_{i}.conv_state"] = conv.clone()
    return states
