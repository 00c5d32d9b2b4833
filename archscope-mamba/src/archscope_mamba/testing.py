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
from typing import Any

VOCAB = 100
D_MODEL = 32

#: family -> (config class, model class, config kwargs); pure SSM families first.
_HF_SPECS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "mamba": ("MambaConfig", "MambaForCausalLM", dict(
        num_hidden_layers=3, state_size=8, expand=2, conv_kernel=4)),
    "mamba2": ("Mamba2Config", "Mamba2ForCausalLM", dict(
        num_hidden_layers=3, state_size=8, expand=2, num_heads=4, head_dim=16, n_groups=1,
        conv_kernel=4, chunk_size=8)),
    "falcon_mamba": ("FalconMambaConfig", "FalconMambaForCausalLM", dict(
        num_hidden_layers=2, state_size=8, expand=2, conv_kernel=4)),
    "jamba": ("JambaConfig", "JambaForCausalLM", dict(
        intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=4,
        attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,
        num_experts=2, num_experts_per_tok=1, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2)),
    "bamba": ("BambaConfig", "BambaForCausalLM", dict(
        intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3,
        attn_layer_indices=[1], mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=1,
        mamba_d_state=8, mamba_chunk_size=8)),
    "zamba2": ("Zamba2Config", "Zamba2ForCausalLM", dict(
        intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=4,
        layers_block_type=["mamba", "hybrid", "mamba", "hybrid"], mamba_d_state=8,
        n_mamba_heads=4, mamba_ngroups=1, chunk_size=8, num_mem_blocks=1)),
    "falcon_h1": ("FalconH1Config", "FalconH1ForCausalLM", dict(
        intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
        mamba_d_ssm=64, mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=1, mamba_d_state=8,
        mamba_chunk_size=8, head_dim=8)),
    "granitemoehybrid": ("GraniteMoeHybridConfig", "GraniteMoeHybridForCausalLM", dict(
        intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3,
        layer_types=["mamba", "attention", "mamba"], num_local_experts=2, num_experts_per_tok=1,
        shared_intermediate_size=32, mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8,
        mamba_chunk_size=8)),
    "nemotron_h": ("NemotronHConfig", "NemotronHForCausalLM", dict(
        intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        layers_block_type=["mamba", "attention", "mlp", "mamba"], ssm_state_size=8,
        mamba_num_heads=4, mamba_head_dim=16, n_groups=1, chunk_size=8)),
}

HF_FAMILIES: tuple[str, ...] = tuple(_HF_SPECS)
#: Families made of SSM layers only (state patching applies to them).
PURE_SSM_FAMILIES: tuple[str, ...] = ("mamba", "mamba2", "falcon_mamba")
HYBRID_FAMILIES: tuple[str, ...] = tuple(f for f in HF_FAMILIES if f not in PURE_SSM_FAMILIES)


def make_model(family: str, seed: int = 0) -> Any:
    """A tiny float32 model of ``family`` (one of `HF_FAMILIES` or ``"native"``), eval mode."""
    import torch

    torch.manual_seed(seed)
    if family == "native":
        return __getattr__("NativeStandIn")().eval()
    if family not in _HF_SPECS:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(HF_FAMILIES)}, native")
    import transformers

    config_name, model_name, kwargs = _HF_SPECS[family]
    config = getattr(transformers, config_name)(vocab_size=VOCAB, hidden_size=D_MODEL, **kwargs)
    return getattr(transformers, model_name)(config).eval()


def random_ids(batch: int, seq: int, seed: int = 1) -> Any:
    """Token ids in [3, VOCAB) (avoids the pad/bos/eos ids of the configs)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, seq), generator=gen)


# -- a stand-in for mamba_ssm's MambaLMHeadModel ------------------------------------------------
def _torch_modules() -> Any:
    import torch
    import torch.nn.functional as F
    from torch import nn

    class StandInMixer(nn.Module):
        """Mamba-1 selective SSM in plain PyTorch with the native cache protocol."""

        def __init__(self, d_model: int, layer_idx: int, d_state: int = 8, d_conv: int = 4,
                     expand: int = 2) -> None:
            super().__init__()
            self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
            self.d_inner = expand * d_model
            self.dt_rank = math.ceil(d_model / 16)
            self.layer_idx = layer_idx
            self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)
            self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner,
                                    padding=d_conv - 1)
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
                        hidden_states.new_zeros(batch, self.d_inner, self.d_state))
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
                h = torch.exp(dt[:, t, :, None] * a) * h + (dt[:, t] * x[:, t])[..., None] * b[:, t, None]
                ys.append((h * c[:, t, None]).sum(-1))
            if ssm_state is not None:
                ssm_state.copy_(h)
            y = torch.stack(ys, dim=1) + x * self.D
            return self.out_proj(y * F.silu(z))

        def _step(self, hidden_states: torch.Tensor, conv_state: torch.Tensor,
                  ssm_state: torch.Tensor) -> torch.Tensor:
            x, z = self.in_proj(hidden_states[:, 0]).chunk(2, dim=-1)
            conv_state.copy_(torch.roll(conv_state, shifts=-1, dims=-1))
            conv_state[:, :, -1] = x
            x = (conv_state * self.conv1d.weight[:, 0]).sum(-1) + self.conv1d.bias
            x = F.silu(x)
            dt, b, c = self._ssm_inputs(x)
            a = -torch.exp(self.A_log)
            ssm_state.copy_(torch.exp(dt[..., None] * a) * ssm_state + (dt * x)[..., None] * b[:, None])
            y = (ssm_state * c[:, None]).sum(-1) + x * self.D
            return self.out_proj(y * F.silu(z))[:, None]

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

        def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor | None = None,
                    inference_params: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
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
                hidden_states, residual = layer(hidden_states, residual,
                                                inference_params=inference_params)
            residual = hidden_states + residual if residual is not None else hidden_states
            return self.norm_f(residual)

    class NativeStandIn(nn.Module):
        """Same structure and calling convention as mamba_ssm's MambaLMHeadModel."""

        def __init__(self, d_model: int = D_MODEL, n_layer: int = 3, vocab: int = VOCAB) -> None:
            super().__init__()
            self.backbone = StandInMixerModel(d_model, n_layer, vocab)
            self.lm_head = nn.Linear(d_model, vocab, bias=False)
            self.lm_head.weight = self.backbone.embedding.weight

        def forward(self, input_ids: torch.Tensor, position_ids: Any = None,
                    inference_params: Any = None, num_last_tokens: int = 0) -> Any:
            hidden_states = self.backbone(input_ids, inference_params=inference_params)
            if num_last_tokens > 0:
                hidden_states = hidden_states[:, -num_last_tokens:]
            return namedtuple("CausalLMOutput", ["logits"])(logits=self.lm_head(hidden_states))

    return NativeStandIn


def __getattr__(name: str) -> Any:
    if name == "NativeStandIn":  # built on first use: importing this module stays light
        cls = _torch_modules()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module 'archscope_mamba.testing' has no attribute {name!r}")
