"""Freezing the hybrids (gated delta nets, KDA, short convolutions, lightning attention) at one
prompt's values (`archscope.freeze`).

Inside `frozen_run` every gated delta net is recomputed by a plain, self-contained version of
its forward pass in which the nonlinear factors are held. Three layouts of its projections are
known: Qwen3.5's (separate ``in_proj_qkv``, ``in_proj_z``, ``in_proj_b``, ``in_proj_a``),
Qwen3-Next's (fused ``in_proj_qkvz`` and ``in_proj_ba``, split by the layer's own
``fix_query_key_value_ordering``) and OLMo-hybrid's (``q_proj``, ``k_proj``, ``v_proj``,
``g_proj``, ``b_proj``, ``a_proj``, an ``o_norm``; β doubled where the layer allows negative
eigenvalues). Held:

- the queries and keys (after the causal convolution and its SiLU), hence their L2
  normalisation, and the decay ``g`` and the write strength ``β``;
- the SiLU of the values at its slope, and the gated norm's scale and its gate ``SiLU(z)``.

Per head the delta rule ``S_t = g_t·S_{t-1} + k_t ⊗ β_t (v_t − S_{t-1}ᵀ k_t · g_t)``, read as
``o_t = S_tᵀ q_t``, is then linear in the values and the state, so an effect reaches later
positions through the held recurrence. The recomputation is checked against the layer's own
output on the prompt. The attention layers are held as in the transformer backend (query and
key projections, which in Qwen3.5 also carry the output gate), the MLPs' gates and every
RMSNorm's scale likewise.

Write sites (`archscope_hybrid.writes`) in a frozen run: the recomputation scans the
``state_write`` site's value, ``k_t ⊗ β_t v_t`` with the keys and β held and the values live,
after the run's edits of ``write_value``, ``write_key`` and ``state_write``, and captures them
from there (`writes.frozen_write_sites`); the held transitions (decay, erase along the held
keys) carry it, so an edited write changes the states exactly as the same edit changes the
real model's, and gradients flow between the write, the logits and the layer's input.

Mixture-of-experts MLPs laid out as Qwen3-Next's sparse block (a router ``gate``; ``experts``
holding ``gate_up_proj`` / ``down_proj`` per expert, called as ``experts(tokens, index,
weights)``; optionally a ``shared_expert`` (or ``shared_experts``) and a sigmoid
``shared_expert_gate``) are held too: the routing as the block hands it to its experts (which
experts, with which weights, whether the router returns them or the block computes them from
the router's logits), each routed expert's gate ``act(x W_gate)`` (the experts are recomputed,
checked against the module's output), the shared expert's gate and its sigmoid gate. Each token's MLP output is then linear in its input.

Gated short convolutions (LFM2, LFM2-MoE, LFM3: ``in_proj`` → B, C, x; ``y = C ⊙ conv(B ⊙
x)``; ``out_proj``) are recomputed with the gates B and C held and the depthwise causal
convolution live, so the output is linear in the layer's input and an effect reaches the next
``kernel − 1`` positions through the convolution. LFM2's MLPs call their SiLU as a function
(``w2(SiLU(w1 x) ⊙ w3 x)``): they are recomputed with ``SiLU(w1 x)`` held. LFM3's attention
output gate ``sigmoid(g_proj x)`` is held with its input, as the queries and keys are.

MiniMax's lightning attention is recomputed with the queries and keys (after the activation on
``qkv_proj``) held, the values' activation at its slope, the RMSNorm's scale and the output
gate ``sigmoid(output_gate x)`` held; its decays ``exp(−slope)`` are fixed per head. Its scan
(``S_t = λ S_{t-1} + k_t ⊗ v_t``, no erase) takes the ``state_write`` site's value as the delta
nets' does. MiniMax's sparse MoE blocks have Qwen3-Next's layout and are held as above.

Kimi-Linear's KDA is recomputed like a gated delta net, with the queries and keys (after the
convolution and its activation; L2-normalised by division, as its kernel does), the decay per
key channel from its forget gate, β, the values' activation at its slope, and its gated norm's
scale and gate ``sigmoid(g_b_proj g_a_proj x)`` held; the delta rule with a per-channel decay
(`archscope.recurrence.delta_rule_scan`) scans the ``state_write`` site's value. Its multi-head
latent attention is held through the query projection, the rotary key part of the latent
``kv_a_proj_with_mqa`` and the key part of each head of ``kv_b_proj`` (the values stay live);
its shared experts' gate is held with the routed experts'.

Not frozen: other mixer layouts and other expert layouts; `frozen_run` names them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from archscope.freeze import FreezeError, FrozenValues, frozen_activation, frozen_norm
from archscope.recurrence import delta_rule_scan

from .structure import is_short_conv
from .writes import (
    GATED_DELTA,
    KDA,
    LIGHTNING,
    DeltaParts,
    convolved,
    delta_projections,
    variant_of,
    write_strength,
)

if TYPE_CHECKING:
    import torch

FREEZES = frozenset(
    {"delta_rule", "gate", "activation_slope", "norm_scale", "attention_pattern", "mlp"}
)
CANNOT_FREEZE = {
    "other_mixers": "recurrent mixers are frozen when laid out as gated delta nets (Qwen3.5, "
    "Qwen3-Next, OLMo-hybrid), KDA (Kimi-Linear), gated short convolutions (LFM2) or "
    "lightning attention (MiniMax), softmax attention when it has q_proj / k_proj or "
    "Kimi-Linear's latent projections; other layouts are not",
    "router": "only mixture-of-experts blocks laid out as Qwen3-Next's sparse block (router "
    "'gate', 'experts' with gate_up_proj / down_proj; LFM2-MoE, MiniMax and Kimi-Linear share "
    "it) are held, not other expert layouts",
}

#: what the recomputation reads beyond what `variant_of` checks
_NEEDS = ("conv1d", "dt_bias")
_KDA_NEEDS = ("conv1d", "activation", "g_a_proj", "g_b_proj", "o_proj", "num_heads", "head_dim")


def _variant(module: Any) -> str | None:
    """The variant of a gated delta net this module recomputes (None: not one)."""
    variant = variant_of(module)
    if variant not in GATED_DELTA:
        return None
    return variant if all(hasattr(module, n) for n in (*_NEEDS, *GATED_DELTA[variant])) else None


def frozen_gated_delta(
    layer: Any, x: torch.Tensor, values: FrozenValues, key: Any, writes: Any = None
) -> torch.Tensor:
    """The gated delta net ``layer`` on ``x`` (batch, seq, d_model) with its nonlinear
    factors held (see the module's docstring). ``writes``: the run's write sites of this layer
    (`archscope_hybrid.writes.frozen_write_sites`), or None."""
    import torch
    import torch.nn.functional as F

    b, seq, _ = x.shape
    kd, vd = layer.head_k_dim, layer.head_v_dim
    variant = _variant(layer)
    assert variant is not None
    mixed, z_raw, b_raw, a_raw = delta_projections(
        variant, layer, lambda name: getattr(layer, name)(x), gate=True
    )
    _, norm_name, out_name = GATED_DELTA[variant]
    norm, out_proj = getattr(layer, norm_name), getattr(layer, out_name)
    mixed = mixed.transpose(1, 2)
    conv = layer.conv1d
    pre = F.conv1d(
        mixed, conv.weight, conv.bias, padding=conv.kernel_size[0] - 1, groups=mixed.shape[1]
    )[..., :seq].transpose(1, 2)
    q_pre, k_pre, v_pre = torch.split(pre, [layer.key_dim, layer.key_dim, layer.value_dim], -1)
    q = values.hold((key, "q"), F.silu(q_pre)).reshape(b, seq, -1, kd)
    k = values.hold((key, "k"), F.silu(k_pre)).reshape(b, seq, -1, kd)
    v = frozen_activation(v_pre, F.silu(v_pre), values, (key, "v")).reshape(b, seq, -1, vd)
    beta = values.hold((key, "beta"), write_strength(variant, layer, b_raw)).float()
    g = values.hold(
        (key, "g"), -layer.A_log.float().exp() * F.softplus(a_raw.float() + layer.dt_bias)
    ).float()
    heads = v.shape[2]
    if q.shape[2] != heads:
        q = q.repeat_interleave(heads // q.shape[2], dim=2)
        k = k.repeat_interleave(heads // k.shape[2], dim=2)
    q, k, v = (t.float() for t in (q, k, v))  # (b, seq, heads, dim)
    q = q * torch.rsqrt((q * q).sum(-1, keepdim=True) + 1e-6) / kd**0.5
    k = k * torch.rsqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    if writes is None:
        _, core = delta_rule_scan(q, k, beta, g, DeltaParts.write_of(beta[..., None] * v, k))
    else:  # the run's write sites of this layer: the scan takes the state_write site's value
        core = writes.scan(q, k, beta, g, v)  # (b, seq, heads, vd)
    z = z_raw.reshape(b, seq, -1, vd)
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
    scale = values.hold((key, "norm"), torch.rsqrt(core.pow(2).mean(-1, keepdim=True) + eps))
    gate = values.hold((key, "gate"), F.silu(z.float()))
    y = (norm.weight * (core * scale).to(x.dtype)).float() * gate
    return out_proj(y.to(x.dtype).reshape(b, seq, -1))  # type: ignore[no-any-return]


def frozen_short_conv(
    layer: Any, x: torch.Tensor, values: FrozenValues, key: Any, writes: Any = None
) -> torch.Tensor:
    """The gated short convolution ``layer`` (LFM2: ``in_proj`` → B, C, x; ``y = C ⊙
    conv(B ⊙ x)``; ``out_proj``) on ``x`` (batch, seq, d_model) with its gates B and C held:
    the depthwise causal convolution stays live, so the output is linear in ``x``."""
    import torch.nn.functional as F

    seq = x.shape[1]
    b_gate, c_gate, u = layer.in_proj(x).chunk(3, dim=-1)
    b_gate = values.hold((key, "B"), b_gate)
    c_gate = values.hold((key, "C"), c_gate)
    conv = layer.conv
    mixed = F.conv1d(
        (b_gate * u).transpose(1, 2),
        conv.weight,
        conv.bias,
        padding=int(conv.kernel_size[0]) - 1,
        groups=int(conv.groups),
    )[..., :seq].transpose(1, 2)
    return layer.out_proj(c_gate * mixed)  # type: ignore[no-any-return]


def frozen_kda(
    layer: Any, x: torch.Tensor, values: FrozenValues, key: Any, writes: Any = None
) -> torch.Tensor:
    """Kimi delta attention ``layer`` on ``x`` (batch, seq, d_model) with its nonlinear factors
    held: the queries and keys after the causal convolution and its activation (hence their L2
    normalisation), the per-channel decay from the forget gate, β, the values' activation at
    its slope, and the gated norm's scale and gate ``sigmoid(g_b_proj g_a_proj x)``. Per head,
    ``S_t = (I − β_t k_t k_tᵀ) diag(α_t) S_{t-1} + k_t ⊗ β_t v_t``: linear in the values and the
    state."""
    import torch

    b, seq, _ = x.shape
    heads, dim = int(layer.num_heads), int(layer.head_dim)

    def projection(name: str) -> Any:
        module = getattr(layer, name, None)
        return None if module is None else module(x)

    mixed, _, b_raw, _ = delta_projections(KDA, layer, projection)
    pre = convolved(layer, mixed, activation=False)
    act = convolved(layer, mixed)
    pre, act = (t.reshape(b, seq, 3, heads, dim) for t in (pre, act))
    q = values.hold((key, "q"), act[:, :, 0]).float()
    k = values.hold((key, "k"), act[:, :, 1]).float()
    v = frozen_activation(pre[:, :, 2], act[:, :, 2], values, (key, "v")).float()
    beta = values.hold((key, "beta"), write_strength(KDA, layer, b_raw)).float()
    g = values.hold((key, "g"), layer.forget_gate(x)).float()  # (b, seq, heads, dim)
    q = q / torch.sqrt((q * q).sum(-1, keepdim=True) + 1e-6) / dim**0.5
    k = k / torch.sqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    if writes is None:
        _, core = delta_rule_scan(q, k, beta, g, DeltaParts.write_of(beta[..., None] * v, k))
    else:  # the run's write sites of this layer: the scan takes the state_write site's value
        core = writes.scan(q, k, beta, g, v)
    norm = layer.o_norm
    scale = values.hold(
        (key, "norm"), torch.rsqrt(core.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    )
    z = layer.g_b_proj(layer.g_a_proj(x)).reshape(b, seq, heads, dim)
    gate = values.hold((key, "gate"), torch.sigmoid(z.float()))
    y = norm.weight.float() * core * scale * gate
    return layer.o_proj(y.to(x.dtype).reshape(b, seq, -1))  # type: ignore[no-any-return]


def frozen_lightning(
    layer: Any, x: torch.Tensor, values: FrozenValues, key: Any, writes: Any = None
) -> torch.Tensor:
    """MiniMax's lightning attention ``layer`` on ``x`` (batch, seq, d_model) with its
    nonlinear factors held: the queries and keys (after the activation on ``qkv_proj``), the
    values' activation at its slope, the RMSNorm's scale and the output gate
    ``sigmoid(output_gate x)``. Per head, ``S_t = λ S_{t-1} + k_t ⊗ v_t`` with the fixed decay
    ``λ = exp(−slope)`` and ``o_t = S_tᵀ q_t``: linear in the values and the state."""
    import torch

    b, seq, _ = x.shape
    heads, dim = int(layer.num_attention_heads), int(layer.head_dim)
    pre = layer.qkv_proj(x)
    act = layer.act_fn(pre)
    pre, act = (t.reshape(b, seq, heads, 3 * dim) for t in (pre, act))
    q = values.hold((key, "q"), act[..., :dim]).float()
    k = values.hold((key, "k"), act[..., dim : 2 * dim]).float()
    v_pre = pre[..., 2 * dim :]
    v = frozen_activation(v_pre, act[..., 2 * dim :], values, (key, "v")).float()
    log_decay = -layer.slope_rate.float().reshape(1, 1, heads).expand(b, seq, heads)
    beta = torch.ones_like(log_decay)
    if writes is None:
        _, core = delta_rule_scan(q, k, beta, log_decay, DeltaParts.write_of(v, k), erase=False)
    else:  # the run's write sites of this layer: the scan takes the state_write site's value
        core = writes.scan(q, k, beta, log_decay, v, erase=False)
    core = core.reshape(b, seq, heads * dim)
    norm = layer.norm
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
    scale = values.hold((key, "norm"), torch.rsqrt(core.pow(2).mean(-1, keepdim=True) + eps))
    y = norm.weight * (core * scale).to(x.dtype)
    gate = values.hold((key, "gate"), torch.sigmoid(layer.output_gate(x)))
    return layer.out_proj(gate * y)  # type: ignore[no-any-return]


def _mixer_hook(values: FrozenValues, i: int, writes: dict[int, Any], kind: str) -> Any:
    recompute, what = _MIXERS[kind]

    def hook(module: Any, args: Any, kwargs: Any, output: Any) -> Any:
        x = args[0] if args else kwargs["hidden_states"]
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 2 and not bool(mask.all()):
            raise FreezeError(f"cannot freeze layer {i}: a frozen run takes one unpadded prompt")
        out = recompute(module, x, values, (kind, i), writes.get(i))
        real = output[0] if isinstance(output, tuple) else output
        tol = 1e-3 * (1.0 + float(real.detach().abs().max()))
        if values.recording and float((out.detach() - real.detach()).abs().max()) > tol:
            raise FreezeError(
                f"cannot freeze layer {i} ({type(module).__name__}): the frozen recomputation "
                f"of the {what} does not reproduce its output"
            )
        return (out, *output[1:]) if isinstance(output, tuple) else out

    return hook


#: The recurrent mixers recomputed with their factors held: kind -> (recomputation, name).
_MIXERS: dict[str, tuple[Any, str]] = {
    "gdn": (frozen_gated_delta, "gated delta net"),
    "short_conv": (frozen_short_conv, "short convolution"),
    "lightning": (frozen_lightning, "lightning attention"),
    "kda": (frozen_kda, "Kimi delta attention"),
}


def _mixer_of(block: Any) -> tuple[Any, str] | None:
    """(the module, its kind in `_MIXERS`) of a block's frozen recurrent mixer, or None."""
    for module in block.modules():
        if _variant(module) is not None:
            return module, "gdn"
        if is_short_conv(module) and _is_gated_conv(module):
            return module, "short_conv"
        if variant_of(module) == LIGHTNING and hasattr(module, "out_proj"):
            return module, "lightning"
        if variant_of(module) == KDA and all(hasattr(module, n) for n in _KDA_NEEDS):
            return module, "kda"
    return None


def _is_gated_conv(module: Any) -> bool:
    """A short convolution whose ``in_proj`` gives B, C and x of the convolution's width."""
    conv, proj = module.conv, module.in_proj
    width = int(conv.in_channels)
    return (
        int(conv.groups) == width
        and int(getattr(proj, "out_features", -1)) == 3 * width
        and int(getattr(module.out_proj, "in_features", -1)) == width
    )


def _hold_output(values: FrozenValues, key: Any) -> Any:
    def hook(module: Any, args: Any, output: torch.Tensor) -> torch.Tensor:
        return values.hold(key, output)

    return hook


def _norm_hook(values: FrozenValues, key: Any) -> Any:
    def hook(module: Any, args: Any, output: Any) -> Any:
        return frozen_norm(module, args[0], output, values, key)

    return hook


def _is_sparse_moe(mlp: Any) -> bool:
    """A mixture-of-experts block laid out as Qwen3-Next's (see the module's docstring)."""
    experts = getattr(mlp, "experts", None)
    return (
        callable(getattr(mlp, "gate", None))
        and experts is not None
        and all(hasattr(experts, n) for n in ("gate_up_proj", "down_proj", "act_fn"))
    )


#: Multi-head latent attention (Kimi-Linear): the query projection (``q_proj``, or ``q_b_proj``
#: after a low-rank ``q_a_proj``), the latent ``kv_a_proj_with_mqa`` ([kv latent | rotary key])
#: and ``kv_b_proj`` (per head [key | value]).
_MLA = ("kv_a_proj_with_mqa", "kv_b_proj", "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim")


def _holds_attention(attention: Any) -> bool:
    """Whether the queries and keys of this softmax attention can be held (so its pattern)."""
    if attention is None:
        return False
    if all(getattr(attention, n, None) is not None for n in ("q_proj", "k_proj")):
        return True
    query = getattr(attention, "q_proj", None) or getattr(attention, "q_b_proj", None)
    return query is not None and all(hasattr(attention, n) for n in _MLA)


def _hold_columns(values: FrozenValues, key: Any, width: int, start: int, stop: int) -> Any:
    """A hook holding columns ``start:stop`` of each ``width``-wide group of the output's last
    axis (the rest stays live)."""

    def hook(module: Any, args: Any, output: torch.Tensor) -> torch.Tensor:
        import torch

        grouped = output.reshape(*output.shape[:-1], -1, width)
        held = values.hold(key, grouped[..., start:stop])
        parts = [grouped[..., :start], held, grouped[..., stop:]]
        return torch.cat(parts, dim=-1).reshape(output.shape)

    return hook


def _attention_hooks(attention: Any, values: FrozenValues, i: int) -> list[Any]:
    """Hooks holding the queries and keys of a softmax attention layer (so its pattern), and
    LFM3's output gate ``sigmoid(g_proj x)`` with its input; on multi-head latent attention
    the query projection, the rotary key part of the latent and the key part of each head of
    ``kv_b_proj`` (the values stay live)."""
    handles = []
    if getattr(attention, "k_proj", None) is not None:
        for name in ("q_proj", "k_proj", "g_proj"):
            proj = getattr(attention, name, None)
            if proj is not None:
                handles.append(proj.register_forward_hook(_hold_output(values, (i, name[0]))))
        return handles
    query = getattr(attention, "q_proj", None) or attention.q_b_proj
    handles.append(query.register_forward_hook(_hold_output(values, (i, "q"))))
    latent, rope = int(attention.kv_lora_rank), int(attention.qk_rope_head_dim)
    nope = int(attention.qk_nope_head_dim)
    per_head = int(attention.kv_b_proj.out_features) // int(attention.num_heads)
    hook = _hold_columns(values, (i, "k_rope"), latent + rope, latent, latent + rope)
    handles.append(attention.kv_a_proj_with_mqa.register_forward_hook(hook))
    hook = _hold_columns(values, (i, "k_nope"), per_head, 0, nope)
    handles.append(attention.kv_b_proj.register_forward_hook(hook))
    return handles


def _mlp_of(block: Any) -> Any:
    return getattr(block, "mlp", None) or getattr(block, "feed_forward", None)


def _swiglu_hook(values: FrozenValues, i: int) -> Any:
    """An MLP ``w2(SiLU(w1 x) ⊙ w3 x)`` that calls its SiLU as a function (LFM2): recomputed
    with the gate ``SiLU(w1 x)`` held, checked against the module's output."""

    def hook(module: Any, args: Any, output: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        x = args[0]
        gate = values.hold((i, "mlp_gate"), F.silu(module.w1(x)))
        out = module.w2(gate * module.w3(x))
        tol = 1e-3 * (1.0 + float(output.detach().abs().max()))
        if values.recording and float((out.detach() - output.detach()).abs().max()) > tol:
            raise FreezeError(
                f"cannot freeze layer {i} ({type(module).__name__}): w2(SiLU(w1 x)·w3 x) does "
                "not reproduce the MLP's output"
            )
        return out  # type: ignore[no-any-return]

    return hook


def unfreezable(backend: Any) -> str | None:
    """Why ``backend``'s model cannot be frozen (None: it can)."""
    for i in range(len(backend.layers)):
        block = _block(backend, i)
        attention = getattr(block, "self_attn", None)
        if _mixer_of(block) is None and not _holds_attention(attention):
            return f"layer {i} ({type(block).__name__}): {CANNOT_FREEZE['other_mixers']}"
        mlp = _mlp_of(block)
        routed = mlp is not None and (hasattr(mlp, "gate") or hasattr(mlp, "experts"))
        if routed and not _is_sparse_moe(mlp):
            return f"layer {i} ({type(mlp).__name__}): {CANNOT_FREEZE['router']}"
    return None


def frozen_experts(
    experts: Any,
    x: torch.Tensor,
    index: torch.Tensor,
    weights: torch.Tensor,
    values: FrozenValues,
    key: Any,
) -> torch.Tensor:
    """The routed experts on tokens ``x`` (tokens, d) with the routing (``index``, ``weights``:
    (tokens, top_k)) given and each expert's gate ``act(x W_gate)`` held: linear in ``x``."""
    import torch

    valid = index < experts.gate_up_proj.shape[0]  # some layouts route to a "no expert" slot
    safe = torch.where(valid, index, torch.zeros_like(index))
    gate_up = torch.einsum("td,tkfd->tkf", x, experts.gate_up_proj[safe])
    gate, up = gate_up.chunk(2, dim=-1)
    act = values.hold((key, "experts_gate"), experts.act_fn(gate))
    hidden = act * up
    out = torch.einsum("tkf,tkdf->tkd", hidden, experts.down_proj[safe])
    scale = (weights * valid).to(out.dtype)[..., None]
    return (out * scale).sum(1)  # type: ignore[no-any-return]


def _moe_hooks(mlp: Any, values: FrozenValues, i: int) -> list[Any]:
    """Hooks that hold a sparse MoE block's routing and gates and recompute its experts."""
    handles = []

    def experts(module: Any, args: Any, output: Any) -> Any:
        if len(args) < 3:
            raise FreezeError(
                f"cannot freeze layer {i} ({type(module).__name__}): the experts are not called "
                "as experts(tokens, index, weights)"
            )
        # the routing as the block hands it to its experts (whether its router returns it or
        # the block computes it from the router's logits)
        index = values.hold((i, "router", "index"), args[1])
        weights = values.hold((i, "router", "weights"), args[2])
        out = frozen_experts(module, args[0], index, weights, values, (i, "moe"))
        tol = 1e-3 * (1.0 + float(output.detach().abs().max()))
        if values.recording and float((out.detach() - output.detach()).abs().max()) > tol:
            raise FreezeError(
                f"cannot freeze layer {i} ({type(module).__name__}): the recomputed experts "
                "do not reproduce the module's output (an expert layout this backend's "
                "freezing does not know)"
            )
        return out.to(output.dtype)

    handles.append(mlp.experts.register_forward_hook(experts))
    shared = getattr(mlp, "shared_expert", None) or getattr(mlp, "shared_experts", None)
    act = getattr(shared, "act_fn", None) if shared is not None else None
    if act is not None:
        handles.append(act.register_forward_hook(_hold_output(values, (i, "shared_gate"))))
    gate = getattr(mlp, "shared_expert_gate", None)
    if gate is not None:
        handles.append(gate.register_forward_hook(_hold_output(values, (i, "shared_sigmoid"))))
    return handles


@contextlib.contextmanager
def frozen_run(backend: Any, values: FrozenValues) -> Iterator[None]:
    """Hooks that hold the hybrid's nonlinearities through ``values`` (removed on exit)."""
    why = unfreezable(backend)
    if why:
        raise FreezeError(f"cannot freeze {type(backend.model).__name__}: {why}")
    model = backend.model
    handles: list[Any] = []
    writes: dict[int, Any] = {}  # the write sites of the run under way, per layer
    before = backend.frozen_writes
    try:
        backend.frozen_writes = writes
        handles.append(model.register_forward_pre_hook(lambda *_: values.start_run()))
        for i in range(len(backend.layers)):
            block = _block(backend, i)
            mixer = _mixer_of(block)
            attention = getattr(block, "self_attn", None)
            if mixer is not None:
                module, kind = mixer
                hook = _mixer_hook(values, i, writes, kind)
                handles.append(module.register_forward_hook(hook, with_kwargs=True))
            elif _holds_attention(attention):
                handles += _attention_hooks(attention, values, i)
            else:
                raise FreezeError(
                    f"cannot freeze layer {i} ({type(block).__name__}): "
                    f"{CANNOT_FREEZE['other_mixers']}"
                )
            _add_mlp_hooks(_mlp_of(block), values, i, handles)
        norms = [
            m
            for m in model.modules()
            if "Norm" in type(m).__name__
            and "Gated" not in type(m).__name__
            and getattr(m, "weight", None) is not None
            and not list(m.children())
        ]
        for n, norm in enumerate(norms):
            handles.append(norm.register_forward_hook(_norm_hook(values, ("norm", n))))
        yield
    finally:
        backend.frozen_writes = before
        for handle in handles:
            handle.remove()


def _add_mlp_hooks(mlp: Any, values: FrozenValues, i: int, handles: list[Any]) -> None:
    """Hooks (appended to ``handles``) holding layer ``i``'s MLP gates or its routing."""
    import torch

    if mlp is None:
        return
    if hasattr(mlp, "gate") or hasattr(mlp, "experts"):
        if not _is_sparse_moe(mlp):
            raise FreezeError(f"cannot freeze layer {i}: {CANNOT_FREEZE['router']}")
        handles += _moe_hooks(mlp, values, i)
        return
    act = getattr(mlp, "act_fn", None)
    if isinstance(act, torch.nn.Module):
        handles.append(act.register_forward_hook(_hold_output(values, (i, "mlp_gate"))))
    elif all(hasattr(mlp, n) for n in ("w1", "w2", "w3")):
        handles.append(mlp.register_forward_hook(_swiglu_hook(values, i)))


def _block(backend: Any, i: int) -> Any:
    return backend.layers[i].block
