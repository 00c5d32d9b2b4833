"""Freezing a torch RNN/GRU/LSTM language model at one prompt's values (`archscope.freeze`).

Inside `frozen_run` each recurrent layer is stepped by hand with its nonlinear factors held:

- LSTM: ``c_t = f·c_{t-1} + i·g``, ``h_t = o·tanh(c_t)`` with the gates ``i, f, o`` held and
  ``g = tanh(u)``, ``tanh(c_t)`` held at their slopes (``u·(tanh(u)/u)``);
- GRU: ``h_t = (1 − z)·n + z·h_{t-1}``, ``n = tanh(W_in x + b_in + r·(W_hn h + b_hn))`` with
  ``r, z`` held and the tanh at its slope;
- RNN: the tanh / ReLU at its slope;

and the final norm's scale is held. What is left is linear in the layer inputs and the
recurrent state, so an effect reaches a later position through the held recurrence. Not
frozen: bidirectional layers (they read the future) and packed (padded) batches: a frozen run
takes one prompt, unpadded.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from archscope.freeze import FreezeError, FrozenValues, frozen_activation, frozen_norm

if TYPE_CHECKING:
    import torch

FREEZES = frozenset({"gate", "activation_slope", "norm_scale"})
CANNOT_FREEZE = {
    "bidirectional": "bidirectional layers are not frozen (their backward direction reads "
    "later positions)",
    "padding": "padded (packed) batches are not frozen: a frozen run takes one unpadded prompt",
}


def _weights(layer: Any) -> tuple[Any, Any, Any, Any]:
    bias = layer.bias
    return (
        layer.weight_ih_l0,
        layer.weight_hh_l0,
        layer.bias_ih_l0 if bias else None,
        layer.bias_hh_l0 if bias else None,
    )


def _affine(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    out = x @ w.T
    return out + b if b is not None else out


def frozen_layer(
    layer: Any, x: torch.Tensor, hx: Any, values: FrozenValues, key: Any
) -> tuple[torch.Tensor, Any]:
    """One single-layer, unidirectional, batch-first ``layer`` (nn.LSTM / nn.GRU / nn.RNN)
    over ``x`` (batch, seq, input) from ``hx``, stepped with its nonlinear factors held;
    returns what the layer returns: (outputs, h_n) or (outputs, (h_n, c_n))."""
    import torch
    from torch import nn

    b, seq = x.shape[:2]
    w_ih, w_hh, b_ih, b_hh = _weights(layer)
    n = layer.hidden_size
    lstm = isinstance(layer, nn.LSTM)
    proj = getattr(layer, "proj_size", 0) or 0
    h_size = proj or n
    if hx is None:
        h = x.new_zeros(b, h_size)
        c = x.new_zeros(b, n) if lstm else None
    elif lstm:
        h, c = hx[0][0], hx[1][0]
    else:
        h, c = hx[0], None
    outs = []
    for t in range(seq):
        xt = x[:, t]
        gi = _affine(xt, w_ih, b_ih)
        gh = _affine(h, w_hh, b_hh)
        if lstm:
            u = gi + gh
            i_g, f_g, g_u, o_g = u.split(n, -1)
            i_h = values.hold((key, "i"), torch.sigmoid(i_g))
            f_h = values.hold((key, "f"), torch.sigmoid(f_g))
            o_h = values.hold((key, "o"), torch.sigmoid(o_g))
            g = frozen_activation(g_u, torch.tanh(g_u), values, (key, "g"))
            assert c is not None
            c = f_h * c + i_h * g
            h = o_h * frozen_activation(c, torch.tanh(c), values, (key, "tanh_c"))
            if proj:
                h = h @ layer.weight_hr_l0.T
        elif isinstance(layer, nn.GRU):
            r_i, z_i, n_i = gi.split(n, -1)
            r_h, z_h, n_h = gh.split(n, -1)
            r = values.hold((key, "r"), torch.sigmoid(r_i + r_h))
            z = values.hold((key, "z"), torch.sigmoid(z_i + z_h))
            u = n_i + r * n_h
            cand = frozen_activation(u, torch.tanh(u), values, (key, "n"))
            h = (1 - z) * cand + z * h
        else:
            u = gi + gh
            act = torch.tanh(u) if layer.nonlinearity == "tanh" else torch.relu(u)
            h = frozen_activation(u, act, values, (key, "act"))
        outs.append(h)
    out = torch.stack(outs, 1)
    h_n = h[None]
    if lstm:
        assert c is not None
        return out, (h_n, c[None])
    return out, h_n


def _layer_hook(values: FrozenValues, i: int) -> Any:
    def hook(module: Any, args: Any, kwargs: Any, output: Any) -> Any:
        from torch.nn.utils.rnn import PackedSequence

        x = args[0] if args else kwargs.get("input")
        hx = args[1] if len(args) > 1 else kwargs.get("hx")
        if isinstance(x, PackedSequence):
            raise FreezeError(f"cannot freeze layer {i}: {CANNOT_FREEZE['padding']}")
        if module.bidirectional or module.num_layers != 1 or not module.batch_first:
            raise FreezeError(f"cannot freeze layer {i}: {CANNOT_FREEZE['bidirectional']}")
        return frozen_layer(module, x, hx, values, ("rnn", i))

    return hook


@contextlib.contextmanager
def frozen_run(backend: Any, values: FrozenValues) -> Iterator[None]:
    """Hooks that step each layer with held gates and hold the final norm's scale."""
    if backend.num_dirs != 1:
        raise FreezeError(
            f"cannot freeze {type(backend.model).__name__}: {CANNOT_FREEZE['bidirectional']}"
        )
    parts = backend.parts
    handles: list[Any] = []
    backend._freezing = True  # edited layers are stepped at once (RNNBackend._run_layer)
    try:
        handles.append(parts.embed.register_forward_pre_hook(lambda *_: values.start_run()))
        for i in range(parts.rnn.num_layers):
            layer = backend._layer(i)
            handles.append(layer.register_forward_hook(_layer_hook(values, i), with_kwargs=True))
        if parts.norm is not None:

            def norm_hook(module: Any, args: Any, output: Any) -> Any:
                return frozen_norm(module, args[0], output, values, ("norm",))

            handles.append(parts.norm.register_forward_hook(norm_hook))
        yield
    finally:
        backend._freezing = False
        for handle in handles:
            handle.remove()
