"""Tiny random-weight models of every tested family, for tests, benchmarks and the
conformance kit: ``tiny_model("llama")`` or ``TINY_FAMILIES["llama"]()``.

Each factory builds a seeded model in eval mode from a config (no download): d_model 32,
4 heads, vocabulary of 100, ``n_layers`` blocks (3 by default).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from archscope.errors import MissingKeyError

VOCAB = 100
D_MODEL = 32
HEADS = 4
D_MLP = 64
_IDS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}

#: family -> (config class, model class, config arguments; "{L}" marks the layer count)
_FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "gpt2": (
        "GPT2Config",
        "GPT2LMHeadModel",
        {"n_embd": D_MODEL, "n_head": HEADS, "n_positions": 64, "n_layer": "{L}"},
    ),
    "llama": (
        "LlamaConfig",
        "LlamaForCausalLM",
        {
            "hidden_size": D_MODEL,
            "intermediate_size": D_MLP,
            "num_attention_heads": HEADS,
            "num_key_value_heads": 2,
            "num_hidden_layers": "{L}",
        },
    ),
    "mistral": (
        "MistralConfig",
        "MistralForCausalLM",
        {
            "hidden_size": D_MODEL,
            "intermediate_size": D_MLP,
            "num_attention_heads": HEADS,
            "num_key_value_heads": 2,
            "num_hidden_layers": "{L}",
        },
    ),
    "qwen2": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        {
            "hidden_size": D_MODEL,
            "intermediate_size": D_MLP,
            "num_attention_heads": HEADS,
            "num_key_value_heads": 2,
            "num_hidden_layers": "{L}",
        },
    ),
    "qwen3": (
        "Qwen3Config",
        "Qwen3ForCausalLM",
        {
            "hidden_size": D_MODEL,
            "intermediate_size": D_MLP,
            "num_attention_heads": HEADS,
            "num_key_value_heads": 2,
            "head_dim": 8,
            "num_hidden_layers": "{L}",
        },
    ),
    "gpt_neox": (
        "GPTNeoXConfig",
        "GPTNeoXForCausalLM",
        {
            "hidden_size": D_MODEL,
            "intermediate_size": D_MLP,
            "num_attention_heads": HEADS,
            "num_hidden_layers": "{L}",
        },
    ),
    "gptj": (
        "GPTJConfig",
        "GPTJForCausalLM",
        {"n_embd": D_MODEL, "n_head": HEADS, "rotary_dim": 4, "n_positions": 64, "n_layer": "{L}"},
    ),
    "gpt_neo": (
        "GPTNeoConfig",
        "GPTNeoForCausalLM",
        {
            "hidden_size": D_MODEL,
            "num_heads": HEADS,
            "max_position_embeddings": 64,
            "window_size": 4,
            "num_layers": "{L}",
            "attention_types": "{GPT_NEO}",
        },
    ),
    "opt": (
        "OPTConfig",
        "OPTForCausalLM",
        {
            "hidden_size": D_MODEL,
            "ffn_dim": D_MLP,
            "num_attention_heads": HEADS,
            "max_position_embeddings": 64,
            "word_embed_proj_dim": D_MODEL,
            "num_hidden_layers": "{L}",
        },
    ),
    "bloom": (
        "BloomConfig",
        "BloomForCausalLM",
        {"hidden_size": D_MODEL, "n_head": HEADS, "n_layer": "{L}"},
    ),
    "falcon": (
        "FalconConfig",
        "FalconForCausalLM",
        {"hidden_size": D_MODEL, "num_attention_heads": HEADS, "num_hidden_layers": "{L}"},
    ),
    "mpt": (
        "MptConfig",
        "MptForCausalLM",
        {"d_model": D_MODEL, "n_heads": HEADS, "max_seq_len": 64, "n_layers": "{L}"},
    ),
    "phi": (
        "PhiConfig",
        "PhiForCausalLM",
        {
            "hidden_size": D_MODEL,
            "intermediate_size": D_MLP,
            "num_attention_heads": HEADS,
            "num_hidden_layers": "{L}",
        },
    ),
    "phi3": (
        "Phi3Config",
        "Phi3ForCausalLM",
        {
            "hidden_size": D_MODEL,
            "intermediate_size": D_MLP,
            "num_attention_heads": HEADS,
            "num_hidden_layers": "{L}",
        },
    ),
    "gemma": (
        "GemmaConfig",
        "GemmaForCausalLM",
        {
            "hidden_size": D_MODEL,
            "intermediate_size": D_MLP,
            "num_attention_heads": HEADS,
            "num_key_value_heads": 1,
            "head_dim": 8,
            "num_hidden_layers": "{L}",
        },
    ),
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        {
            "hidden_size": D_MODEL,
            "intermediate_size": D_MLP,
            "num_attention_heads": HEADS,
            "num_key_value_heads": 2,
            "head_dim": 8,
            "sliding_window": 4,
            "final_logit_softcapping": 5.0,
            "num_hidden_layers": "{L}",
        },
    ),
    "starcoder2": (
        "Starcoder2Config",
        "Starcoder2ForCausalLM",
        {
            "hidden_size": D_MODEL,
            "intermediate_size": D_MLP,
            "num_attention_heads": HEADS,
            "num_key_value_heads": 2,
            "num_hidden_layers": "{L}",
        },
    ),
    "olmo": (
        "OlmoConfig",
        "OlmoForCausalLM",
        {
            "hidden_size": D_MODEL,
            "intermediate_size": D_MLP,
            "num_attention_heads": HEADS,
            "num_hidden_layers": "{L}",
        },
    ),
}

FAMILY_NAMES: tuple[str, ...] = tuple(_FAMILIES)


def tiny_config(family: str, n_layers: int = 3, **overrides: Any) -> Any:
    """The config of a tiny ``family`` model (a transformers config object)."""
    import transformers

    if family not in _FAMILIES:
        raise MissingKeyError(f"unknown family {family!r}; known: {', '.join(_FAMILIES)}")
    config_cls, _, arguments = _FAMILIES[family]
    values: dict[str, Any] = {"vocab_size": VOCAB, **_IDS}
    for key, value in arguments.items():
        if value == "{L}":
            value = n_layers
        elif value == "{GPT_NEO}":  # alternate global and local attention
            value = [[["global", "local"], n_layers // 2], [["global"], n_layers % 2]]
            value = [v for v in value if v[1]]
        values[key] = value
    values.update(overrides)
    return getattr(transformers, config_cls)(**values)


def tiny_model(family: str, n_layers: int = 3, seed: int = 0, **overrides: Any) -> Any:
    """A seeded random-weight ``family`` causal LM in eval mode (float32, CPU)."""
    import torch
    import transformers

    config = tiny_config(family, n_layers, **overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, _FAMILIES[family][1])(config)
    return model.eval()


TINY_FAMILIES: dict[str, Callable[[], Any]] = {
    name: partial(tiny_model, name) for name in _FAMILIES
}


def tiny_tokenizer(words: list[str] | None = None) -> Any:
    """An offline word-level tokenizer (a `PreTrainedTokenizerFast`) over ``VOCAB`` ids:
    ``<pad>``, ``<s>``, ``</s>``, ``<unk>``, then ``words`` (default ``w4`` ... ``w99``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    words = words if words is not None else [f"w{i}" for i in range(len(specials), VOCAB)]
    vocab = {token: i for i, token in enumerate([*specials, *words])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
