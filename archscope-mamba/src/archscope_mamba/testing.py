"""Tiny random-weight models of every family the `mamba` backend serves, for tests.

`make_model(family)` builds one (float32, eval mode, seeded). `HF_FAMILIES` lists the Hugging
Face families; `"native"` builds `NativeStandIn`, a small pure-PyTorch model that follows the
structure and cache protocol of ``mamba_ssm``'s ``MambaLMHeadModel`` (blocks return
``(hidden_states, residual)``, states in ``inference_params.key_value_memory_dict``), so the
native mapping can be tested where ``mamba_ssm`` cannot be installed.
"""

from __future__ import annotations

import math
from collections import namedtuple
from typing import Any, cast

from archscope.errors import ParameterError

VOCAB = 100
D_MODEL = 32

#: family -> (config class, model class, config kwargs); pure SSM families first.
_HF_SPECS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "mamba": (
        "MambaConfig",
        "MambaForCausalLM",
        dict(num_hidden_layers=3, state_size=8, expand=2, conv_kernel=4),
    ),
    "mamba2": (
        "Mamba2Config",
        "Mamba2ForCausalLM",
        dict(
            num_hidden_layers=3,
            state_size=8,
            expand=2,
            num_heads=4,
            head_dim=16,
            n_groups=1,
            conv_kernel=4,
            chunk_size=8,
        ),
    ),
    "falcon_mamba": (
        "FalconMambaConfig",
        "FalconMambaForCausalLM",
        dict(num_hidden_layers=2, state_size=8, expand=2, conv_kernel=4),
    ),
    "jamba": (
        "JambaConfig",
        "JambaForCausalLM",
        dict(
            intermediate_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_hidden_layers=4,
            attn_layer_period=2,
            attn_layer_offset=1,
            expert_layer_period=2,
            expert_layer_offset=1,
            num_experts=2,
            num_experts_per_tok=1,
            mamba_d_state=8,
            mamba_d_conv=4,
            mamba_expand=2,
        ),
    ),
    "bamba": (
        "BambaConfig",
        "BambaForCausalLM",
        dict(
            intermediate_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_hidden_layers=3,
            attn_layer_indices=[1],
            mamba_n_heads=4,
            mamba_d_head=16,
            mamba_n_groups=1,
            mamba_d_state=8,
            mamba_chunk_size=8,
        ),
    ),
    "zamba2": (
        "Zamba2Config",
        "Zamba2ForCausalLM",
        dict(
            intermediate_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_hidden_layers=4,
            layers_block_type=["mamba", "hybrid", "mamba", "hybrid"],
            mamba_d_state=8,
            n_mamba_heads=4,
            mamba_ngroups=1,
            chunk_size=8,
            num_mem_blocks=1,
        ),
    ),
    "falcon_h1": (
        "FalconH1Config",
        "FalconH1ForCausalLM",
        dict(
            intermediate_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_hidden_layers=2,
            mamba_d_ssm=64,
            mamba_n_heads=4,
            mamba_d_head=16,
            mamba_n_groups=1,
            mamba_d_state=8,
            mamba_chunk_size=8,
            head_dim=8,
        ),
    ),
    "granitemoehybrid": (
        "GraniteMoeHybridConfig",
        "GraniteMoeHybridForCausalLM",
        dict(
            intermediate_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_hidden_layers=3,
            layer_types=["mamba", "attention", "mamba"],
            num_local_experts=2,
            num_experts_per_tok=1,
            shared_intermediate_size=32,
            mamba_n_heads=4,
            mamba_d_head=16,
            mamba_d_state=8,
            mamba_chunk_size=8,
        ),
    ),
    "nemotron_h": (
        "NemotronHConfig",
        "NemotronHForCausalLM",
        dict(
            intermediate_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            layers_block_type=["mamba", "attention", "mlp", "mamba"],
            ssm_state_size=8,
            mamba_num_heads=4,
            mamba_head_dim=16,
            n_groups=1,
            chunk_size=8,
        ),
    ),
}

HF_FAMILIES: tuple[str, ...] = tuple(_HF_SPECS)
#: Families made of SSM layers only (state patching applies to them).
PURE_SSM_FAMILIES: tuple[str, ...] = ("mamba", "mamba2", "falcon_mamba")
HYBRID_FAMILIES: tuple[str, ...] = tuple(f for f in HF_FAMILIES if f not in PURE_SSM_FAMILIES)


#: Larger (still small) Mamba / Mamba-2 configurations for timings and the GPU check.
_BENCH_SPECS: dict[str, dict[str, Any]] = {
    "mamba": dict(
        vocab_size=256, hidden_size=128, num_hidden_layers=4, state_size=16, expand=2, conv_kernel=4
    ),
    "mamba2": dict(
        vocab_size=256,
        hidden_size=128,
        num_hidden_layers=4,
        state_size=16,
        expand=2,
        num_heads=8,
        head_dim=32,
        n_groups=1,
        conv_kernel=4,
        chunk_size=64,
    ),
}


def make_model(family: str, seed: int = 0, size: str = "tiny") -> Any:
    """A float32 model of ``family`` (one of `HF_FAMILIES` or ``"native"``), eval mode.
    ``size="bench"`` gives the larger Mamba / Mamba-2 used for timings."""
    import torch

    torch.manual_seed(seed)
    if family == "native":
        return __getattr__("NativeStandIn")().eval()
    if family not in _HF_SPECS:
        raise ParameterError(f"unknown family {family!r}; known: {', '.join(HF_FAMILIES)}, native")
    import transformers

    config_name, model_name, kwargs = _HF_SPECS[family]
    if size == "bench":
        if family not in _BENCH_SPECS:
            raise ParameterError(
                f"size='bench' exists for {', '.join(_BENCH_SPECS)}, not {family!r}"
            )
        config = getattr(transformers, config_name)(**_BENCH_SPECS[family])
    elif size == "tiny":
        config = getattr(transformers, config_name)(vocab_size=VOCAB, hidden_size=D_MODEL, **kwargs)
    else:
        raise ParameterError(f"size must be 'tiny' or 'bench', got {size!r}")
    return getattr(transformers, model_name)(config).eval()


def make_native_model(
    layer: str = "Mamba1",
    n_layer: int = 2,
    vocab_size: int = 128,
    device: str = "cuda",
    seed: int = 0,
) -> Any:
    """A real ``mamba_ssm`` MambaLMHeadModel (needs the ``[cuda]`` extra and a GPU), float32."""
    import torch
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    torch.manual_seed(seed)
    ssm_cfg: dict[str, Any] = {"layer": layer}
    if layer == "Mamba2":
        ssm_cfg.update(headdim=32, d_state=64, chunk_size=64)
    config = MambaConfig(d_model=128, n_layer=n_layer, vocab_size=vocab_size, ssm_cfg=ssm_cfg)
    return MambaLMHeadModel(config, device=device, dtype=torch.float32).eval()


def random_ids(batch: int, seq: int, seed: int = 1) -> Any:
    """Token ids in [3, VOCAB) (avoids the pad/bos/eos ids of the configs)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, seq), generator=gen)


def make_foreign_models() -> dict[str, Any]:
    """Tiny models the `mamba` backend must not claim: transformers, RWKV, xLSTM, torch RNNs."""
    import torch
    import transformers
    from torch import nn

    torch.manual_seed(0)
    small: dict[str, Any] = dict(vocab_size=VOCAB, hidden_size=D_MODEL, num_hidden_layers=2)
    models: dict[str, Any] = {
        "gpt2": transformers.GPT2LMHeadModel(
            transformers.GPT2Config(vocab_size=VOCAB, n_embd=D_MODEL, n_layer=2, n_head=4)
        ),
        "llama": transformers.LlamaForCausalLM(
            transformers.LlamaConfig(
                **small, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2
            )
        ),
        "rwkv": transformers.RwkvForCausalLM(
            transformers.RwkvConfig(
                vocab_size=VOCAB,
                hidden_size=D_MODEL,
                num_hidden_layers=2,
                attention_hidden_size=D_MODEL,
                intermediate_size=64,
                context_length=64,
            )
        ),
        "xlstm": transformers.xLSTMForCausalLM(
            transformers.xLSTMConfig(
                vocab_size=VOCAB,
                hidden_size=D_MODEL,
                embedding_dim=D_MODEL,
                num_hidden_layers=2,
                num_blocks=2,
                num_heads=2,
                qk_dim_factor=1.0,
                v_dim_factor=1.0,
            )
        ),
        "lstm": nn.LSTM(8, 8, num_layers=2, batch_first=True),
    }

    class LstmLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(VOCAB, 16)
            self.layers = nn.ModuleList([nn.LSTM(16, 16, batch_first=True) for _ in range(2)])
            self.head = nn.Linear(16, VOCAB)

    models["lstm_lm"] = LstmLM()
    return {name: model.eval() for name, model in models.items()}


# -- independent references: hand-written module paths per family, the models' own outputs --
#: family -> (block list, final norm, embedding or None (= input of block 0), sub-layer paths
#: by role). Written out per family on purpose: the backend finds the same by structure.
REFERENCE_PATHS: dict[str, tuple[str, str | None, str | None, dict[str, tuple[str, ...]]]] = {
    "mamba": ("backbone.layers", "backbone.norm_f", "backbone.embeddings", {"mixer": ("mixer",)}),
    "mamba2": ("backbone.layers", "backbone.norm_f", "backbone.embeddings", {"mixer": ("mixer",)}),
    "falcon_mamba": (
        "backbone.layers",
        "backbone.norm_f",
        "backbone.embeddings",
        {"mixer": ("mixer",)},
    ),
    "jamba": (
        "model.layers",
        "model.final_layernorm",
        "model.embed_tokens",
        {"mixer": ("mamba",), "attn": ("self_attn",), "mlp": ("feed_forward",)},
    ),
    "bamba": (
        "model.layers",
        "model.final_layernorm",
        "model.embed_tokens",
        {"mixer": ("mamba",), "attn": ("self_attn",), "mlp": ("feed_forward",)},
    ),
    "zamba2": (
        "model.layers",
        "model.final_layernorm",
        "model.embed_tokens",
        {"mixer": ("mamba", "mamba_decoder.mamba"), "attn": ("linear",)},
    ),
    "falcon_h1": (
        "model.layers",
        "model.final_layernorm",
        None,
        {"mixer": ("mamba",), "attn": ("self_attn",), "mlp": ("feed_forward",)},
    ),
    "granitemoehybrid": (
        "model.layers",
        "model.norm",
        None,
        {"mixer": ("mamba",), "attn": ("self_attn",)},
    ),
    "nemotron_h": ("model.layers", "model.norm_f", "model.embeddings", {}),
    "native": ("backbone.layers", None, "backbone.embedding", {"mixer": ("mixer",)}),
}
_NEMOTRON_ROLES = {
    "mamba": "mixer",
    "linear_attention": "mixer",
    "attention": "attn",
    "full_attention": "attn",
    "mlp": "mlp",
    "moe": "mlp",
}


def _path(root: Any, path: str) -> Any:
    for part in path.split("."):
        root = getattr(root, part, None)
        if root is None:
            return None
    return root


def reference_activations(model: Any, family: str, input_ids: Any) -> dict[str, Any]:
    """Sites computed without archscope for an unpadded batch: forward hooks on hand-picked
    modules, the model's own logits, and recurrent states reached by feeding the tokens one at
    a time through the model's own cache."""
    import torch

    blocks_path, norm_path, embed_path, parts = REFERENCE_PATHS[family]
    blocks = _path(model, blocks_path)
    out: dict[str, Any] = {}
    handles = []

    def keep(name: str, pick: Any = lambda o: o[0] if isinstance(o, tuple) else o) -> Any:
        def hook(module: Any, args: Any, output: Any) -> None:
            out[name] = pick(output).detach().clone()

        return hook

    if embed_path is not None:
        handles.append(_path(model, embed_path).register_forward_hook(keep("embed")))
    else:
        handles.append(
            blocks[0].register_forward_pre_hook(
                lambda m, args: out.__setitem__("embed", args[0].detach().clone())
            )
        )
    for i, block in enumerate(blocks):
        if family == "native":
            handles.append(
                block.register_forward_hook(keep(f"layer_{i}.residual", lambda o: o[0] + o[1]))
            )
        else:
            handles.append(block.register_forward_hook(keep(f"layer_{i}.residual")))
        roles = dict(parts)
        if family == "nemotron_h":
            roles = {_NEMOTRON_ROLES[block.block_type]: ("mixer",)}
        for role, paths in roles.items():
            module = next((m for m in (_path(block, p) for p in paths) if m is not None), None)
            if module is not None:
                handles.append(module.register_forward_hook(keep(f"layer_{i}.{role}")))
    if norm_path is not None:
        handles.append(_path(model, norm_path).register_forward_hook(keep("final_norm")))
    else:
        handles.append(
            model.lm_head.register_forward_pre_hook(
                lambda m, args: out.__setitem__("final_norm", args[0].detach().clone())
            )
        )
    try:
        with torch.no_grad():
            out["logits"] = model(input_ids).logits.detach().clone()
    finally:
        for handle in handles:
            handle.remove()
    out.update(stepped_states(model, family, input_ids))
    return out


def stepped_states(model: Any, family: str, input_ids: Any) -> dict[str, Any]:
    """``layer_i.ssm_state`` / ``layer_i.conv_state`` after feeding ``input_ids`` one token at a
    time through the model's own cache (HF ``Cache`` or the native ``inference_params``)."""
    import inspect

    import torch

    blocks = _path(model, REFERENCE_PATHS[family][0])
    steps = input_ids.shape[1]
    states: dict[str, Any] = {}
    with torch.no_grad():
        if family == "native":
            params = _inference_params(steps, input_ids.shape[0])
            for t in range(steps):
                model(input_ids[:, t : t + 1], inference_params=params)
                params.seqlen_offset += 1
            for i, (conv, ssm) in sorted(params.key_value_memory_dict.items()):
                states[f"layer_{i}.conv_state"], states[f"layer_{i}.ssm_state"] = conv, ssm
            return states
        cache: Any = None
        hybrid = family not in PURE_SSM_FAMILIES
        # The cache keyword and output field were renamed within transformers 5.x.
        known = inspect.signature(model.forward).parameters
        keyword = next(k for k in ("cache", "cache_params", "past_key_values") if k in known)
        full_logits = model(input_ids=input_ids).logits
        for t in range(steps):
            # Some hybrids derive positions from the input length alone: pass them explicitly.
            extra = {"position_ids": torch.full((input_ids.shape[0], 1), t)} if hybrid else {}
            out = model(
                input_ids=input_ids[:, t : t + 1], use_cache=True, **{keyword: cache}, **extra
            )
            cache = next(
                getattr(out, f)
                for f in ("cache", "cache_params", "past_key_values")
                if getattr(out, f, None) is not None
            )
            # A cache the model silently ignored would restart every step: check the stepping.
            if not torch.allclose(out.logits[:, 0], full_logits[:, t], atol=1e-4, rtol=0):
                raise AssertionError(
                    f"{family}: stepping through the cache diverges from the "
                    f"full forward at step {t}"
                )
        for i, block in enumerate(blocks):
            has_ssm = any(hasattr(m, "conv1d") for m in block.modules())
            # The layer's own holders (per-state-index dicts), present across 5.x releases; some
            # releases give non-SSM blocks (attention, MLP) an empty linear-attention layer too.
            layer = cache.layers[i]
            ssm, conv = (getattr(layer, f, None) for f in ("recurrent_states", "conv_states"))
            ssm, conv = (h.get(0) if isinstance(h, dict) else h for h in (ssm, conv))
            if has_ssm != (ssm is not None and conv is not None):
                raise AssertionError(
                    f"{family}: block {i} has_ssm={has_ssm} but its cache "
                    f"layer holds ssm={ssm is not None}, conv={conv is not None}"
                )
            if has_ssm:
                assert ssm is not None and conv is not None
                states[f"layer_{i}.ssm_state"] = ssm.clone()
                states[f"layer_{i}.conv_state"] = conv.clone()
    return states


# -- a stand-in for mamba_ssm's MambaLMHeadModel ------------------------------------------------
_CausalLMOutput = namedtuple("_CausalLMOutput", ["logits"])  # what MambaLMHeadModel returns


def _inference_params(max_seqlen: int, max_batch_size: int) -> Any:
    """mamba_ssm's own InferenceParams where it is installed, else an object with its fields
    (what `NativeStandIn` reads)."""
    import types

    try:
        from mamba_ssm.utils.generation import InferenceParams
    except ImportError:
        return types.SimpleNamespace(
            max_seqlen=max_seqlen,
            max_batch_size=max_batch_size,
            seqlen_offset=0,
            batch_size_offset=0,
            key_value_memory_dict={},
            lengths_per_sample=None,
        )
    return InferenceParams(max_seqlen=max_seqlen, max_batch_size=max_batch_size)


def _torch_modules() -> Any:  # noqa: C901 - the reference model classes are defined in one function so torch is imported only when a model is built
    import torch
    import torch.nn.functional as F
    from torch import nn

    class StandInMixer(nn.Module):
        """Mamba-1 selective SSM in plain PyTorch with the native cache protocol."""

        def __init__(
            self, d_model: int, layer_idx: int, d_state: int = 8, d_conv: int = 4, expand: int = 2
        ) -> None:
            super().__init__()
            self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
            self.d_inner = expand * d_model
            self.dt_rank = math.ceil(d_model / 16)
            self.layer_idx = layer_idx
            self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)
            self.conv1d = nn.Conv1d(
                self.d_inner, self.d_inner, d_conv, groups=self.d_inner, padding=d_conv - 1
            )
            self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
            self.dt_proj = nn.Linear(self.dt_rank, self.d_inner)
            a = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
            self.A_log = nn.Parameter(torch.log(a))
            self.D = nn.Parameter(torch.ones(self.d_inner))
            self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)

        def _ssm_inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            dt, b, c = torch.split(self.x_proj(x), [self.dt_rank, self.d_state, self.d_state], -1)
            return F.softplus(self.dt_proj(dt)), b, c

        def forward(self, hidden_states: torch.Tensor, inference_params: Any = None) -> Any:
            batch, seqlen, _ = hidden_states.shape
            conv_state = ssm_state = None
            if inference_params is not None:
                cache = inference_params.key_value_memory_dict
                if self.layer_idx not in cache:
                    cache[self.layer_idx] = (
                        hidden_states.new_zeros(batch, self.d_inner, self.d_conv),
                        hidden_states.new_zeros(batch, self.d_inner, self.d_state),
                    )
                conv_state, ssm_state = cache[self.layer_idx]
                if inference_params.seqlen_offset > 0:
                    return self._step(hidden_states, conv_state, ssm_state)
            x, z = self.in_proj(hidden_states).chunk(2, dim=-1)
            x = x.transpose(1, 2)
            if conv_state is not None:
                conv_state.copy_(F.pad(x, (self.d_conv - x.shape[-1], 0)))
            x = F.silu(self.conv1d(x)[..., :seqlen]).transpose(1, 2)
            dt, b, c = self._ssm_inputs(x)
            a = -torch.exp(self.A_log)
            h = x.new_zeros(batch, self.d_inner, self.d_state)
            ys = []
            for t in range(seqlen):
                h = (
                    torch.exp(dt[:, t, :, None] * a) * h
                    + (dt[:, t] * x[:, t])[..., None] * b[:, t, None]
                )
                ys.append((h * c[:, t, None]).sum(-1))
            if ssm_state is not None:
                ssm_state.copy_(h)
            y = torch.stack(ys, dim=1) + x * self.D
            return self.out_proj(y * F.silu(z))

        def _step(
            self, hidden_states: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor
        ) -> torch.Tensor:
            x, z = self.in_proj(hidden_states[:, 0]).chunk(2, dim=-1)
            conv_state.copy_(torch.roll(conv_state, shifts=-1, dims=-1))
            conv_state[:, :, -1] = x
            x = (conv_state * self.conv1d.weight[:, 0]).sum(-1) + self.conv1d.bias  # type: ignore[operator]
            x = F.silu(x)
            dt, b, c = self._ssm_inputs(x)
            a = -torch.exp(self.A_log)
            ssm_state.copy_(
                torch.exp(dt[..., None] * a) * ssm_state + (dt * x)[..., None] * b[:, None]
            )
            y = (ssm_state * c[:, None]).sum(-1) + x * self.D
            return cast("torch.Tensor", self.out_proj(y * F.silu(z))[:, None])

    class StandInBlock(nn.Module):
        """Add -> norm -> mixer, returning ``(mixer output, residual)`` like mamba_ssm's Block."""

        def __init__(self, d_model: int, layer_idx: int) -> None:
            super().__init__()
            self.residual_in_fp32 = False
            self.fused_add_norm = False
            self.norm = nn.LayerNorm(d_model)
            self.mixer = StandInMixer(d_model, layer_idx)
            self.mlp = None
            self.layer_idx = layer_idx

        def forward(
            self,
            hidden_states: torch.Tensor,
            residual: torch.Tensor | None = None,
            inference_params: Any = None,
        ) -> tuple[torch.Tensor, torch.Tensor]:
            residual = hidden_states + residual if residual is not None else hidden_states
            hidden_states = self.norm(residual)
            return self.mixer(hidden_states, inference_params=inference_params), residual

    class StandInMixerModel(nn.Module):
        def __init__(self, d_model: int, n_layer: int, vocab: int) -> None:
            super().__init__()
            self.embedding = nn.Embedding(vocab, d_model)
            self.fused_add_norm = False
            self.layers = nn.ModuleList(StandInBlock(d_model, i) for i in range(n_layer))
            self.norm_f = nn.LayerNorm(d_model)

        def forward(self, input_ids: torch.Tensor, inference_params: Any = None) -> torch.Tensor:
            hidden_states, residual = self.embedding(input_ids), None
            for layer in self.layers:
                hidden_states, residual = layer(
                    hidden_states, residual, inference_params=inference_params
                )
            stream = hidden_states + residual if residual is not None else hidden_states
            return cast("torch.Tensor", self.norm_f(stream))

    class NativeStandIn(nn.Module):
        """Same structure and calling convention as mamba_ssm's MambaLMHeadModel."""

        def __init__(self, d_model: int = D_MODEL, n_layer: int = 3, vocab: int = VOCAB) -> None:
            super().__init__()
            self.backbone = StandInMixerModel(d_model, n_layer, vocab)
            self.lm_head = nn.Linear(d_model, vocab, bias=False)
            self.lm_head.weight = self.backbone.embedding.weight

        def forward(
            self,
            input_ids: torch.Tensor,
            position_ids: Any = None,
            inference_params: Any = None,
            num_last_tokens: int = 0,
        ) -> Any:
            hidden_states = self.backbone(input_ids, inference_params=inference_params)
            if num_last_tokens > 0:
                hidden_states = hidden_states[:, -num_last_tokens:]
            return _CausalLMOutput(logits=self.lm_head(hidden_states))

    return NativeStandIn


def __getattr__(name: str) -> Any:
    if name == "NativeStandIn":  # built on first use: importing this module stays light
        cls = _torch_modules()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module 'archscope_mamba.testing' has no attribute {name!r}")
