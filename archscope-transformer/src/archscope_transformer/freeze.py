"""Freezing a transformer's nonlinearities at one prompt's values (`archscope.freeze`).

Held: every attention pattern (the queries' and keys' projections are held, so the softmax
sees the prompt's scores while the values stay live; frozen runs use eager attention, where
the pattern is a separate softmax of those held scores, a constant, so a backward pass only
multiplies by it: a fused attention kernel would also compute the held queries' and keys'
gradients, for nothing), every LayerNorm / RMSNorm scale, and the
MLPs' nonlinearities (a gated MLP's gate ``act(gate_proj(x))`` is held whole, a plain MLP's
activation at its slope ``f(u)/u``). What is left is affine in the residual stream.

Not held: final logit soft-capping (a tanh on the logits: attribute to the pre-cap logits
instead), mixture-of-experts routing and the experts' own activations (replace such MLPs with
transcoders), and attention whose queries and keys come out of a projection laid out in a way
listed nowhere below (a `FreezeError` names the module).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from archscope.freeze import FreezeError, FrozenValues, frozen_activation, frozen_norm

if TYPE_CHECKING:
    import torch

#: What the transformer backend holds (names from `archscope.freeze.NONLINEARITIES`).
FREEZES = frozenset({"attention_pattern", "norm_scale", "mlp", "gate", "activation_slope"})
#: What it cannot hold, and why.
CANNOT_FREEZE = {
    "logit_softcap": "final logit soft-capping (tanh) is not held: attribute to the pre-cap logits",
    "router": "mixture-of-experts routing is not held: replace such MLPs with transcoders",
    "attention_layout": "attention whose queries and keys come from a projection laid out "
    "otherwise than separate q/k projections or a fused [q|k|v] one (e.g. per-head "
    "interleaved query_key_value) is not held",
}

#: Separate query / key projections inside an attention module.
_SEPARATE = (("q_proj", "k_proj"), ("query", "key"), ("q", "k"), ("wq", "wk"))
#: Fused projections whose output is [queries | keys | values] along the last axis.
_FUSED = ("c_attn", "qkv_proj", "Wqkv", "qkv")
#: Activation modules inside an MLP.
_ACTIVATIONS = ("act_fn", "act", "activation_fn", "activation")
#: Projections that make an MLP gated (``act(gate(x)) * up(x)``): its activation's output is
#: held whole; a plain MLP (``down(act(up(x)))``, even with a projection named ``up_proj``)
#: holds its activation at the slope ``f(u)/u``.
_GATES = ("gate_proj", "w3", "gate_up_proj")


def unfreezable(structure: Any) -> str | None:
    """Why a model with this structure cannot be frozen (None: it can)."""
    if structure.softcap:
        return CANNOT_FREEZE["logit_softcap"]
    if not all(p.mlp_hidden for p in structure.parts):
        return CANNOT_FREEZE["router"]
    for i, parts in enumerate(structure.parts):
        attention = parts.attention
        separate = any(
            getattr(attention, q, None) is not None and getattr(attention, k, None) is not None
            for q, k in _SEPARATE
        )
        if not separate and not any(getattr(attention, n, None) is not None for n in _FUSED):
            return f"layer {i} ({type(attention).__name__}): {CANNOT_FREEZE['attention_layout']}"
    return None


def _norms(model: Any) -> list[Any]:
    return [
        m
        for m in model.modules()
        if "Norm" in type(m).__name__ and "Group" not in type(m).__name__ and not list(m.children())
    ]


def _query_key_hooks(backend: Any, values: FrozenValues) -> list[Any]:
    """Hooks that hold each attention's queries and keys (their projections' outputs)."""
    s = backend.structure
    handles = []
    for i, parts in enumerate(s.parts):
        attention = parts.attention
        found = False
        for q_name, k_name in _SEPARATE:
            q, k = getattr(attention, q_name, None), getattr(attention, k_name, None)
            if q is not None and k is not None:
                handles.append(q.register_forward_hook(_hold_output(values, (i, "query"))))
                handles.append(k.register_forward_hook(_hold_output(values, (i, "key"))))
                found = True
                break
        if not found:
            for name in _FUSED:
                proj = getattr(attention, name, None)
                if proj is not None:
                    qk = _fused_query_key_width(backend, attention, proj)
                    handles.append(proj.register_forward_hook(_hold_columns(values, i, qk)))
                    found = True
                    break
        if not found:
            for h in handles:
                h.remove()
            children = ", ".join(n for n, _ in attention.named_children())
            raise FreezeError(
                f"cannot freeze the attention pattern of layer {i} ({type(attention).__name__}): "
                f"no separate query/key projections ({', '.join(q for q, _ in _SEPARATE)}) and "
                f"no fused [q|k|v] projection ({', '.join(_FUSED)}); its children: {children}"
            )
    return handles


def _fused_query_key_width(backend: Any, attention: Any, proj: Any) -> int:
    config = backend.model.config
    d = backend.structure.d_model
    heads = getattr(config, "num_attention_heads", None) or backend.structure.n_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or (d // heads if heads else None)
    if heads and head_dim:
        return int((heads + kv) * head_dim)
    return int(2 * d)


def _hold_output(values: FrozenValues, key: Any) -> Any:
    def hook(module: Any, args: Any, output: torch.Tensor) -> torch.Tensor:
        return values.hold(key, output)

    return hook


def _hold_columns(values: FrozenValues, layer: int, width: int) -> Any:
    def hook(module: Any, args: Any, output: torch.Tensor) -> torch.Tensor:
        import torch

        held = values.hold((layer, "query_key"), output[..., :width])
        return torch.cat([held, output[..., width:]], dim=-1)

    return hook


def _norm_hook(values: FrozenValues, key: Any) -> Any:
    def hook(module: Any, args: Any, kwargs: Any, output: Any) -> Any:
        x = args[0] if args else next(iter(kwargs.values()))
        return frozen_norm(module, x, output, values, key)

    return hook


def _mlp_hooks(backend: Any, values: FrozenValues) -> list[Any]:
    handles = []
    for i in range(len(backend.structure.parts)):
        found = _mlp_activation(backend, i)
        if found is None:
            continue
        owner, act = found
        gated = any(hasattr(owner, n) for n in _GATES)
        key = (i, "mlp_gate" if gated else "mlp_slope")
        if gated:
            handles.append(act.register_forward_hook(_hold_output(values, key)))
        else:

            def slope(module: Any, args: Any, output: torch.Tensor, key: Any = key) -> Any:
                return frozen_activation(args[0], output, values, key)

            handles.append(act.register_forward_hook(slope))
    return handles


def _mlp_activation(backend: Any, i: int) -> tuple[Any, Any] | None:
    """(the module that owns layer ``i``'s MLP activation, the activation module), found from
    the MLP's port upwards to the layer's block (OPT keeps its activation on the decoder layer,
    MPT on the MLP around its ``down_proj`` port); None for a layer without an MLP port."""
    from archscope.modules import get_module

    parts = backend.structure.parts[i]
    port = parts.mlp_in or parts.mlp
    path = port.module if port is not None and isinstance(port.module, str) else None
    if path is None:
        return None
    block = parts.block
    names = path.split(".")
    for end in range(len(names), 0, -1):
        prefix = ".".join(names[:end])
        try:
            owner = get_module(backend.model, prefix)
        except Exception:
            continue
        act = next(
            (getattr(owner, n) for n in _ACTIVATIONS if getattr(owner, n, None) is not None), None
        )
        if act is not None and hasattr(act, "register_forward_hook"):
            return owner, act
        if owner is block:
            break
    raise FreezeError(
        f"cannot freeze {type(backend.model).__name__}: no activation module "
        f"({', '.join(_ACTIVATIONS)}) found from layer {i}'s MLP port {path} up to its block, "
        "so its MLP nonlinearity would not be held"
    )


@contextlib.contextmanager
def frozen_run(backend: Any, values: FrozenValues) -> Iterator[None]:
    """Hooks that hold the model's nonlinearities through ``values`` (removed on exit), in
    eager attention (restored on exit)."""
    why = unfreezable(backend.structure)
    if why:
        raise FreezeError(f"cannot freeze {type(backend.model).__name__}: {why}")
    model = backend.model
    eager = getattr(backend, "_eager_attention", None)
    handles: list[Any] = []
    with eager() if callable(eager) else contextlib.nullcontext():
        try:
            handles.append(model.register_forward_pre_hook(lambda *_: values.start_run()))
            handles += _query_key_hooks(backend, values)
            for n, norm in enumerate(_norms(model)):
                handles.append(
                    norm.register_forward_hook(_norm_hook(values, ("norm", n)), with_kwargs=True)
                )
            handles += _mlp_hooks(backend, values)
            yield
        finally:
            for handle in handles:
                handle.remove()
