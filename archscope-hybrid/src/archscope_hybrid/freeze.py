"""Freezing gated-delta-net hybrids at one prompt's values (`archscope.freeze`).

Inside `frozen_run` every gated delta net laid out as in Qwen3.5 (separate ``in_proj_qkv``,
``in_proj_z``, ``in_proj_b``, ``in_proj_a``) is recomputed by a plain, self-contained version
of its forward pass in which the nonlinear factors are held:

- the queries and keys (after the causal convolution and its SiLU), hence their L2
  normalisation, and the decay ``g`` and the write strength ``β``;
- the SiLU of the values at its slope, and the gated norm's scale and its gate ``SiLU(z)``.

Per head the delta rule ``S_t = g_t·S_{t-1} + k_t ⊗ β_t (v_t − S_{t-1}ᵀ k_t · g_t)``, read as
``o_t = S_tᵀ q_t``, is then linear in the values and the state, so an effect reaches later
positions through the held recurrence. The recomputation is checked against the layer's own
output on the prompt. The attention layers are held as in the transformer backend (query and
key projections, which in Qwen3.5 also carry the output gate), the MLPs' gates and every
RMSNorm's scale likewise.

Not frozen: other recurrent mixers (Qwen3-Next's fused projections, Kimi's KDA, short
convolutions, lightning attention) and mixture-of-experts routing; `frozen_run` names them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from archscope.freeze import FreezeError, FrozenValues, frozen_activation, frozen_norm

if TYPE_CHECKING:
    import torch

FREEZES = frozenset(
    {"delta_rule", "gate", "activation_slope", "norm_scale", "attention_pattern", "mlp"}
)
CANNOT_FREEZE = {
    "other_mixers": "only Qwen3.5-layout gated delta nets are frozen (not fused Qwen3-Next "
    "projections, KDA, short convolutions or lightning attention)",
    "router": "mixture-of-experts routing is not held: replace such MLPs with transcoders",
}

_GDN = ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "conv1d", "A_log", "dt_bias")


def frozen_gated_delta(layer: Any, x: torch.Tensor, values: FrozenValues, key: Any) -> torch.Tensor:
    """The gated delta net ``layer`` on ``x`` (batch, seq, d_model) with its nonlinear
    factors held (see the module's docstring)."""
    import torch
    import torch.nn.functional as F

    b, seq, _ = x.shape
    kd, vd = layer.head_k_dim, layer.head_v_dim
    mixed = layer.in_proj_qkv(x).transpose(1, 2)
    conv = layer.conv1d
    pre = F.conv1d(
        mixed, conv.weight, conv.bias, padding=conv.kernel_size[0] - 1, groups=mixed.shape[1]
    )[..., :seq].transpose(1, 2)
    q_pre, k_pre, v_pre = torch.split(pre, [layer.key_dim, layer.key_dim, layer.value_dim], -1)
    q = values.hold((key, "q"), F.silu(q_pre)).reshape(b, seq, -1, kd)
    k = values.hold((key, "k"), F.silu(k_pre)).reshape(b, seq, -1, kd)
    v = frozen_activation(v_pre, F.silu(v_pre), values, (key, "v")).reshape(b, seq, -1, vd)
    beta = values.hold((key, "beta"), layer.in_proj_b(x).sigmoid()).float()
    g = values.hold(
        (key, "g"),
        -layer.A_log.float().exp() * F.softplus(layer.in_proj_a(x).float() + layer.dt_bias),
    ).float()
    heads = v.shape[2]
    if q.shape[2] != heads:
        q = q.repeat_interleave(heads // q.shape[2], dim=2)
        k = k.repeat_interleave(heads // k.shape[2], dim=2)
    q, k, v = (t.transpose(1, 2).float() for t in (q, k, v))  # (b, heads, seq, dim)
    q = q * torch.rsqrt((q * q).sum(-1, keepdim=True) + 1e-6) / kd**0.5
    k = k * torch.rsqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    beta, g = beta.transpose(1, 2), g.transpose(1, 2)  # (b, heads, seq)
    state = v.new_zeros(b, heads, kd, vd)
    outs = []
    for t in range(seq):
        state = state * g[:, :, t].exp()[..., None, None]
        memory = (state * k[:, :, t, :, None]).sum(-2)
        delta = (v[:, :, t] - memory) * beta[:, :, t, None]
        state = state + k[:, :, t, :, None] * delta[:, :, None, :]
        outs.append((state * q[:, :, t, :, None]).sum(-2))
    core = torch.stack(outs, 2).transpose(1, 2)  # (b, seq, heads, vd)
    z = layer.in_proj_z(x).reshape(b, seq, -1, vd)
    norm = layer.norm
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
    scale = values.hold((key, "norm"), torch.rsqrt(core.pow(2).mean(-1, keepdim=True) + eps))
    gate = values.hold((key, "gate"), F.silu(z.float()))
    y = (norm.weight * (core * scale).to(x.dtype)).float() * gate
    return layer.out_proj(y.to(x.dtype).reshape(b, seq, -1))  # type: ignore[no-any-return]


def _mixer_hook(values: FrozenValues, i: int) -> Any:
    def hook(module: Any, args: Any, kwargs: Any, output: Any) -> Any:
        x = args[0] if args else kwargs["hidden_states"]
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 2 and not bool(mask.all()):
            raise FreezeError(f"cannot freeze layer {i}: a frozen run takes one unpadded prompt")
        out = frozen_gated_delta(module, x, values, ("gdn", i))
        real = output[0] if isinstance(output, tuple) else output
        tol = 1e-3 * (1.0 + float(real.detach().abs().max()))
        if values.recording and float((out.detach() - real.detach()).abs().max()) > tol:
            raise FreezeError(
                f"cannot freeze layer {i} ({type(module).__name__}): the frozen recomputation "
                "of the gated delta net does not reproduce its output"
            )
        return (out, *output[1:]) if isinstance(output, tuple) else out

    return hook


def _hold_output(values: FrozenValues, key: Any) -> Any:
    def hook(module: Any, args: Any, output: torch.Tensor) -> torch.Tensor:
        return values.hold(key, output)

    return hook


def _norm_hook(values: FrozenValues, key: Any) -> Any:
    def hook(module: Any, args: Any, output: Any) -> Any:
        return frozen_norm(module, args[0], output, values, key)

    return hook


def unfreezable(backend: Any) -> str | None:
    """Why ``backend``'s model cannot be frozen (None: it can)."""
    for i in range(len(backend.layers)):
        block = _block(backend, i)
        gdn = any(all(hasattr(m, n) for n in _GDN) for m in block.modules())
        attention = getattr(block, "self_attn", None)
        held = attention is not None and all(hasattr(attention, n) for n in ("q_proj", "k_proj"))
        if not gdn and not held:
            return f"layer {i} ({type(block).__name__}): {CANNOT_FREEZE['other_mixers']}"
        mlp = getattr(block, "mlp", None) or getattr(block, "feed_forward", None)
        if mlp is not None and (hasattr(mlp, "gate") or hasattr(mlp, "experts")):
            return f"layer {i}: {CANNOT_FREEZE['router']}"
    return None


@contextlib.contextmanager
def frozen_run(backend: Any, values: FrozenValues) -> Iterator[None]:
    """Hooks that hold the hybrid's nonlinearities through ``values`` (removed on exit)."""
    why = unfreezable(backend)
    if why:
        raise FreezeError(f"cannot freeze {type(backend.model).__name__}: {why}")
    model = backend.model
    handles: list[Any] = []
    try:
        handles.append(model.register_forward_pre_hook(lambda *_: values.start_run()))
        for i in range(len(backend.layers)):
            block = _block(backend, i)
            mixer = next((m for m in block.modules() if all(hasattr(m, n) for n in _GDN)), None)
            attention = getattr(block, "self_attn", None)
            if mixer is not None:
                handles.append(
                    mixer.register_forward_hook(_mixer_hook(values, i), with_kwargs=True)
                )
            elif attention is not None and hasattr(attention, "q_proj"):
                handles.append(
                    attention.q_proj.register_forward_hook(_hold_output(values, (i, "q")))
                )
                handles.append(
                    attention.k_proj.register_forward_hook(_hold_output(values, (i, "k")))
                )
            else:
                raise FreezeError(
                    f"cannot freeze layer {i} ({type(block).__name__}): "
                    f"{CANNOT_FREEZE['other_mixers']}"
                )
            mlp = getattr(block, "mlp", None)
            if mlp is not None and (hasattr(mlp, "gate") or hasattr(mlp, "experts")):
                raise FreezeError(f"cannot freeze layer {i}: {CANNOT_FREEZE['router']}")
            act = getattr(mlp, "act_fn", None) if mlp is not None else None
            if act is not None:
                handles.append(act.register_forward_hook(_hold_output(values, (i, "mlp_gate"))))
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
        for handle in handles:
            handle.remove()


def _block(backend: Any, i: int) -> Any:
    return backend.layers[i].block
