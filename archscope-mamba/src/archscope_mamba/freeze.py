"""Freezing a selective state-space model at one prompt's values (`archscope.freeze`).

Inside `frozen_run` every Mamba-1 mixer is recomputed by a plain, self-contained version of
its forward pass in which the nonlinear factors are held:

- Δ (after its projection and softplus), B and C (the ``x_proj`` output), hence the decay
  ``exp(Δ·A)`` and the write ``Δ·B``;
- the output gate ``SiLU(z)``;
- the SiLU after the causal convolution, at its slope (``u·(SiLU(u)/u)``);

and every RMSNorm's scale is held. What is left is linear in the mixer's input: ``y_t =
C_t·Σ_{s≤t}(Π decays)·Δ_s B_s u_s + D·u_t``, gated, so an effect reaches later positions
through the held recurrence. The recomputed output is checked against the layer's own output
(a layer the plain version does not reproduce raises a `FreezeError`).

Mamba-2 mixers (Hugging Face's ``Mamba2Mixer``) are recomputed the same way, with their own
factors held: Δ per head (``softplus(dt + dt_bias)``, clamped to the time-step limit), hence
the scalar decay ``exp(Δ·A)`` of each head; B and C (after the convolution and its SiLU); the
SiLU of the convolved values at its slope; the gated RMSNorm's gate ``SiLU(z)`` and its scale
(per group). The recurrence ``S_t = exp(Δ_t A)·S_{t-1} + Δ_t x_t ⊗ B_t``, ``y_t = S_t C_t +
D·x_t`` is then linear in the values.

Write sites (`archscope_mamba.writes`) in a frozen run: the recomputation scans the
``state_write`` site's value, ``(Δ·x_t) ⊗ B_t`` with Δ and B held and the values live, after the
run's edits of ``write_value``, ``write_key`` and ``state_write`` (`writes.frozen_scan`), and
captures them from there; so a captured write is affine in the embeddings like the rest of a
frozen run, an edited write is the recurrence's input (with the held decay and read-out it
changes the layer exactly as the same edit changes the real model's states), and gradients
flow from the logits to the write and from the write back to the layer's input.

Not frozen: native ``mamba_ssm`` models, Falcon-Mamba's mixers (B, C and Δ normalised inside),
and attention layers of SSM hybrids; `frozen_run` refuses them with a `FreezeError` naming the
layer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from archscope.freeze import FreezeError, FrozenValues, frozen_activation, frozen_norm

from .writes import (
    ScanParts,
    frozen_scan,
    mamba2_convolution,
    mamba2_parts,
    mamba2_projection,
    mamba2_time_step,
)

if TYPE_CHECKING:
    import torch

FREEZES = frozenset({"ssm_parameters", "gate", "activation_slope", "norm_scale"})
CANNOT_FREEZE = {
    "attention_pattern": "the attention layers of hybrid SSM/attention stacks are not frozen yet",
    "other_mixers": "only Mamba-1 and Mamba-2 mixers are recomputed (not Falcon-Mamba's, which "
    "normalise B, C and Δ inside, nor native mamba_ssm layers)",
}

_MAMBA2 = ("in_proj", "conv1d", "dt_bias", "A_log", "D", "norm", "out_proj")


def _is_mamba1(mixer: Any) -> bool:
    """A plain Mamba-1 mixer (not Falcon-Mamba's, which normalises B, C and Δ inside)."""
    return type(mixer).__name__ == "MambaMixer" and all(
        hasattr(mixer, n) for n in ("in_proj", "conv1d", "x_proj", "dt_proj", "A_log")
    )


def _is_mamba2(mixer: Any) -> bool:
    """Hugging Face's Mamba-2 mixer (scalar decay per head, gated RMSNorm)."""
    return type(mixer).__name__ == "Mamba2Mixer" and all(hasattr(mixer, n) for n in _MAMBA2)


def frozen_mamba1(
    mixer: Any, x: torch.Tensor, values: FrozenValues, key: Any, writes: Any = None
) -> torch.Tensor:
    """The Mamba-1 mixer ``mixer`` on ``x`` (batch, seq, d_model) with Δ, B, C, the gate and
    the convolution's SiLU held (see the module's docstring). ``writes``: the run's write
    sites of this layer (`archscope_mamba.writes.frozen_scan`), or None."""
    import torch
    import torch.nn.functional as F

    seq = x.shape[1]
    proj = mixer.in_proj(x).transpose(1, 2)  # (b, 2·d_inner, seq)
    xs, z = proj.chunk(2, dim=1)
    d_inner = xs.shape[1]
    conv = mixer.conv1d
    pre = F.conv1d(xs, conv.weight, conv.bias, padding=conv.kernel_size[0] - 1, groups=d_inner)[
        ..., :seq
    ]
    u = frozen_activation(pre, F.silu(pre), values, (key, "conv_act"))  # (b, d_inner, seq)
    params = values.hold((key, "x_proj"), mixer.x_proj(u.transpose(1, 2)))
    rank, n = mixer.time_step_rank, mixer.ssm_state_size
    dt_raw, B, C = torch.split(params, [rank, n, n], dim=-1)
    dt = F.softplus(
        (dt_raw @ mixer.dt_proj.weight.T).float() + mixer.dt_proj.bias.float()
    ).detach()  # (b, seq, d_inner)
    uf = u.float().transpose(1, 2)  # (b, seq, d_inner)
    per_channel = (-1, -1, d_inner, -1)  # Mamba-1 is the per-head layout with one-wide heads
    parts = ScanParts(
        x=uf[..., None],
        dt=dt,
        A=-torch.exp(mixer.A_log.float()).detach(),  # (d_inner, n)
        B=B.float()[:, :, None, :].expand(per_channel),
        C=C.float()[:, :, None, :].expand(per_channel),
    )
    states = frozen_scan(parts, writes)  # (b, seq, d_inner, 1, n)
    y = parts.read(states)[..., 0] + uf * mixer.D.float()
    gate = values.hold((key, "gate"), F.silu(z.float()))
    y = (y.transpose(1, 2) * gate).to(x.dtype)
    return mixer.out_proj(y.transpose(1, 2))  # type: ignore[no-any-return]


def frozen_mamba2(
    mixer: Any, x: torch.Tensor, values: FrozenValues, key: Any, writes: Any = None
) -> torch.Tensor:
    """The Mamba-2 mixer ``mixer`` on ``x`` (batch, seq, d_model) with Δ, B, C, the gate, the
    gated norm's scale and the convolution's SiLU held (see the module's docstring).
    ``writes``: the run's write sites of this layer (`archscope_mamba.writes.frozen_scan`), or
    None."""
    import torch
    import torch.nn.functional as F

    b, seq, _ = x.shape
    inner, n, groups = mixer.intermediate_size, mixer.ssm_state_size, mixer.n_groups
    z, xbc, dt_raw = mamba2_projection(mixer, mixer.in_proj(x))
    x_pre, bc_pre = mamba2_convolution(mixer, xbc).split([inner, 2 * groups * n], dim=-1)
    u = frozen_activation(x_pre, mixer.act(x_pre), values, (key, "conv_act"))
    bc = values.hold((key, "bc"), mixer.act(bc_pre)).float()
    B, C = bc.split([groups * n, groups * n], dim=-1)
    dt = values.hold((key, "dt"), mamba2_time_step(mixer, dt_raw)).float()  # (b, seq, heads)
    parts = mamba2_parts(mixer, u, B, C, dt)
    states = frozen_scan(parts, writes)
    y = parts.read(states) + parts.x * mixer.D.float()[None, None, :, None]
    y = y.reshape(b, seq, inner)
    norm = mixer.norm
    gated = y * values.hold((key, "gate"), F.silu(z.float()))
    grouped = gated.reshape(b, seq, -1, getattr(norm, "group_size", inner))  # older: one group
    scale = values.hold(
        (key, "norm"),
        torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon),
    )
    normed = (grouped * scale).reshape(b, seq, inner)
    out = norm.weight * normed.to(x.dtype)
    return mixer.out_proj(out.to(x.dtype))  # type: ignore[no-any-return]


def _mixer_hook(values: FrozenValues, i: int, writes: dict[int, Any]) -> Any:
    def hook(module: Any, args: Any, kwargs: Any, output: Any) -> Any:
        x = args[0] if args else kwargs["hidden_states"]
        if kwargs.get("attention_mask") is not None and not bool(kwargs["attention_mask"].all()):
            raise FreezeError(
                f"cannot freeze layer {i}: a frozen run takes one unpadded prompt "
                "(the attention mask has padding)"
            )
        recompute = frozen_mamba2 if _is_mamba2(module) else frozen_mamba1
        out = recompute(module, x, values, ("mamba", i), writes.get(i))
        real = output[0] if isinstance(output, tuple) else output
        tol = 1e-3 * (1.0 + float(real.detach().abs().max()))
        # checked on the prompt's own run (later runs may feed other inputs to held factors)
        if values.recording and float((out.detach() - real.detach()).abs().max()) > tol:
            raise FreezeError(
                f"cannot freeze layer {i} ({type(module).__name__}): the frozen recomputation "
                "of the mixer does not reproduce its output (a variant of Mamba-1 or Mamba-2 "
                "this backend's freezing does not know)"
            )
        return (out, *output[1:]) if isinstance(output, tuple) else out

    return hook


def unfreezable(backend: Any) -> str | None:
    """Why ``backend``'s model cannot be frozen (None: it can)."""
    if backend.native:
        return "native mamba_ssm models are not frozen (HF Mamba models are)"
    for i, block in enumerate(backend.blocks):
        mixer = getattr(block, "mixer", None)
        if mixer is None or not (_is_mamba1(mixer) or _is_mamba2(mixer)):
            kind = type(mixer).__name__ if mixer is not None else type(block).__name__
            return (
                f"layer {i} ({kind}): {CANNOT_FREEZE['other_mixers']}; "
                f"{CANNOT_FREEZE['attention_pattern']}"
            )
    return None


@contextlib.contextmanager
def frozen_run(backend: Any, values: FrozenValues) -> Iterator[None]:
    """Hooks that recompute each Mamba-1 / Mamba-2 mixer with held parameters and hold norm
    scales."""
    why = unfreezable(backend)
    if why:
        raise FreezeError(f"cannot freeze {type(backend.model).__name__}: {why}")
    mixers = [block.mixer for block in backend.blocks]
    model = backend.model
    handles: list[Any] = []
    writes: dict[int, Any] = {}  # the write sites of the run under way, per layer
    before = backend.frozen_writes
    try:
        backend.frozen_writes = writes
        handles.append(model.register_forward_pre_hook(lambda *_: values.start_run()))
        for i, mixer in enumerate(mixers):
            handles.append(
                mixer.register_forward_hook(_mixer_hook(values, i, writes), with_kwargs=True)
            )
        norms = [
            m
            for m in model.modules()
            if "Norm" in type(m).__name__
            and "Gated" not in type(m).__name__
            and getattr(m, "weight", None) is not None
            and not list(m.children())
        ]
        for n, norm in enumerate(norms):

            def norm_hook(module: Any, args: Any, output: Any, n: int = n) -> Any:
                return frozen_norm(module, args[0], output, values, ("norm", n))

            handles.append(norm.register_forward_hook(norm_hook))
        yield
    finally:
        backend.frozen_writes = before
        for handle in handles:
            handle.remove()
