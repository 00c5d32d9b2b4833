"""Freezing the hybrids' other recurrent mixers (`archscope.freeze`): LFM2's gated short
convolutions (LFM2, LFM2-MoE, LFM3, a stack of convolutions only), MiniMax's lightning
attention and Kimi-Linear's KDA (with its latent attention and its experts). A frozen run is the model on
the prompt, affine in the embeddings around it (the model is not), its gradients are the finite
differences of the frozen model, what is held is what the docs say (checked against a
recomputation written out here), and nothing is left behind."""

from __future__ import annotations

import copy
import functools
from typing import Any

import pytest
import torch

from archscope import Backend, Edit
from archscope.freeze import freeze
from archscope.testing import check_frozen
from archscope_hybrid.testing import make_model, missing, random_ids

SHORT_CONV = ("lfm2", "lfm2_moe", "lfm3", "lfm2_conv")
#: "kimi_linear_moe": Kimi-Linear with its mixture-of-experts MLPs (and shared experts) on
#: every second layer
FAMILIES = (*SHORT_CONV, "minimax", "kimi_linear", "kimi_linear_moe")
SEQ = 9


@functools.cache
def _built(family: str) -> Any:
    if family != "kimi_linear_moe":
        return Backend.for_model(make_model(family))
    config = copy.deepcopy(make_model("kimi_linear").config)
    config.mlp_layer_types = ["dense", "sparse"] * (config.num_hidden_layers // 2)
    config.num_experts, config.num_experts_per_tok, config.moe_intermediate_size = 4, 2, 16
    torch.manual_seed(0)
    model = type(make_model("kimi_linear"))(config).eval()
    return Backend.for_model(model)


@pytest.fixture(params=FAMILIES)
def family(request: Any) -> tuple[str, Any]:
    reason = missing(request.param.removesuffix("_moe"))
    if reason is not None:  # the oldest transformers the packages allow lacks the family
        pytest.skip(reason)
    return request.param, _built(request.param)


def _ids() -> torch.Tensor:
    return random_ids(1, SEQ, seed=3)


def _recurrent(backend: Any) -> list[int]:
    return [layer.index for layer in backend.layers if layer.recurrent]


def test_a_frozen_run_is_the_model_and_affine_with_exact_slopes(family: tuple[str, Any]) -> None:
    """`check_frozen` with the first recurrent layer's mixer output: the model at the prompt,
    affine in the embeddings around it (the model itself is not), exact slopes, earlier
    positions reaching the last logit through the mixers, nothing left behind; and the
    convolution state a frozen run of the prompt leaves is the model's."""
    _, backend = family
    ids = _ids()
    layer = _recurrent(backend)[0]
    check_frozen(backend, ids, [f"layer_{layer}.mixer"])
    conv = [s for s in (f"layer_{layer}.conv_state",) if s in backend.table]
    if conv:
        real = backend.run(ids, capture=conv)
        with freeze(backend, ids):
            frozen = backend.run(ids, capture=conv)
        torch.testing.assert_close(frozen[conv[0]], real[conv[0]], atol=1e-5, rtol=1e-4)


def _conv_inputs(backend: Any, layer: int, ids: torch.Tensor, edits: list[Any]) -> Any:
    """The input and output of layer ``layer``'s mixer in one run (hooks of the test's own:
    the ``mixer`` site of LFM3 is after its post-mixer norm)."""
    mixer = backend.layers[layer].block.get_submodule(backend.layers[layer].mixer)
    seen: dict[str, torch.Tensor] = {}

    def keep(_m: Any, args: Any, kwargs: Any) -> None:
        seen["x"] = (args[0] if args else kwargs["hidden_states"]).detach()

    def keep_out(_m: Any, _a: Any, out: Any) -> None:
        seen["out"] = (out[0] if isinstance(out, tuple) else out).detach()

    handles = [
        mixer.register_forward_pre_hook(keep, with_kwargs=True),
        mixer.register_forward_hook(keep_out),
    ]
    try:
        backend.run(ids, capture=["logits"], edits=edits)
    finally:
        for handle in handles:
            handle.remove()
    return mixer, seen["x"], seen["out"]


def _frozen_on_other_input(backend: Any) -> tuple[Any, Any, Any, Any]:
    """The last recurrent layer's mixer, its input on the prompt, and its input and output in
    a run frozen at the prompt on other embeddings (the prompt's plus noise)."""
    ids = _ids()
    layer = _recurrent(backend)[-1]
    embed = backend.run(ids, capture=["embed"])["embed"]
    other = embed + torch.randn(embed.shape, generator=torch.Generator().manual_seed(5))
    mixer, prompt_x, _ = _conv_inputs(backend, layer, ids, [])
    with freeze(backend, ids):
        _, x, out = _conv_inputs(backend, layer, ids, [Edit.replace("embed", other)])
    return mixer, prompt_x, x, out


@pytest.mark.parametrize("family", SHORT_CONV, indirect=True)
def test_a_frozen_short_convolution_holds_b_and_c_and_keeps_the_convolution(
    family: tuple[str, Any],
) -> None:
    _, backend = family
    mixer, prompt_x, x, out = _frozen_on_other_input(backend)
    d = x.shape[-1]
    w_in = mixer.in_proj.weight
    gates = prompt_x @ w_in.T  # B and C from the prompt, x from this run
    b_gate, c_gate = gates[..., :d], gates[..., d : 2 * d]
    u = b_gate * (x @ w_in[2 * d :].T)
    kernel = mixer.conv.weight[:, 0]  # (channels, taps): y_t = Σ_j w_j u_{t−(taps−1)+j}
    taps = kernel.shape[1]
    y = torch.zeros_like(u)
    for t in range(u.shape[1]):
        for j in range(taps):
            s = t - (taps - 1) + j
            if s >= 0:
                y[:, t] += kernel[:, j] * u[:, s]
    expected = (c_gate * y) @ mixer.out_proj.weight.T
    assert float((x - prompt_x).abs().max()) > 1e-2  # the input did change
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["minimax"], indirect=True)
def test_a_frozen_lightning_attention_holds_queries_keys_gates_and_scales(
    family: tuple[str, Any],
) -> None:
    """Against the attention form written out here: ``o_t = Σ_{s≤t} λ^{t−s} (q_t·k_s) v_s``
    with q, k, the values' slope, the norm's scale and the output gate from the prompt."""
    _, backend = family
    mixer, prompt_x, x, out = _frozen_on_other_input(backend)
    heads, dim = mixer.num_attention_heads, mixer.head_dim
    b, seq, _ = x.shape

    def split(h: torch.Tensor) -> list[torch.Tensor]:
        return list((h @ mixer.qkv_proj.weight.T).reshape(b, seq, heads, 3, dim).unbind(3))

    q, k, v_prompt = (torch.nn.functional.silu(t) for t in split(prompt_x))
    slope = v_prompt / split(prompt_x)[2]
    v = split(x)[2] * slope
    decay = torch.exp(-mixer.slope_rate.reshape(heads))
    o = torch.zeros_like(v)
    o_prompt = torch.zeros_like(v)
    for t in range(seq):
        for s in range(t + 1):
            weight = (q[:, t] * k[:, s]).sum(-1) * decay ** (t - s)  # (b, heads)
            o[:, t] += weight[..., None] * v[:, s]
            o_prompt[:, t] += weight[..., None] * v_prompt[:, s]
    o, o_prompt = o.reshape(b, seq, -1), o_prompt.reshape(b, seq, -1)
    eps = mixer.norm.variance_epsilon
    scale = torch.rsqrt(o_prompt.pow(2).mean(-1, keepdim=True) + eps)
    gate = torch.sigmoid(prompt_x @ mixer.output_gate.weight.T)
    expected = (gate * mixer.norm.weight * o * scale) @ mixer.out_proj.weight.T
    assert float((x - prompt_x).abs().max()) > 1e-2  # the input did change
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


def _causal_conv(kernel: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """A depthwise causal convolution written out: ``y_t = Σ_j w_j u_{t−(taps−1)+j}``;
    ``kernel`` (channels, taps), ``u`` (batch, seq, channels)."""
    taps = kernel.shape[1]
    y = torch.zeros_like(u)
    for t in range(u.shape[1]):
        for j in range(taps):
            s = t - (taps - 1) + j
            if s >= 0:
                y[:, t] += kernel[:, j] * u[:, s]
    return y


@pytest.mark.parametrize("family", ["kimi_linear"], indirect=True)
def test_a_frozen_kda_holds_its_per_channel_decays_keys_and_gates(
    family: tuple[str, Any],
) -> None:
    """Against KDA written out here, one position at a time: ``S_t = (I − β_t k_t k_tᵀ)
    diag(α_t) S_{t−1} + k_t ⊗ β_t v_t``, ``o_t = S_tᵀ q_t``, with q, k (L2-normalised by
    division), the per-channel α, β, the values' slope, the norm's scale and its gate from the
    prompt and the values' pre-activation from this run."""
    _, backend = family
    mixer, prompt_x, x, out = _frozen_on_other_input(backend)
    heads, dim = mixer.num_heads, mixer.head_dim
    b, seq, _ = x.shape
    kernel = mixer.conv1d.weight[:, 0]
    silu = torch.nn.functional.silu

    def convolved(h: torch.Tensor) -> list[torch.Tensor]:
        mixed = torch.cat([h @ p.weight.T for p in (mixer.q_proj, mixer.k_proj, mixer.v_proj)], -1)
        return list(_causal_conv(kernel, mixed).reshape(b, seq, 3, heads, dim).unbind(2))

    q_pre, k_pre, v_pre = convolved(prompt_x)
    q, k = silu(q_pre), silu(k_pre)
    q = q / torch.sqrt((q * q).sum(-1, keepdim=True) + 1e-6) * dim**-0.5
    k = k / torch.sqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    v = convolved(x)[2] * (silu(v_pre) / v_pre)
    gate = mixer.forget_gate
    f = prompt_x @ gate.f_a_proj.weight.T @ gate.f_b_proj.weight.T + gate.dt_bias
    alpha = torch.exp(
        -gate.A_log.exp() * torch.nn.functional.softplus(f.reshape(b, seq, heads, dim))
    )
    beta = torch.sigmoid(prompt_x @ mixer.b_proj.weight.T)  # (b, seq, heads)

    def read(values: torch.Tensor) -> torch.Tensor:
        state = torch.zeros(b, heads, dim, dim)
        outs = []
        for t in range(seq):
            state = alpha[:, t, :, :, None] * state
            kt, bt = k[:, t], beta[:, t, :, None, None]
            erase = torch.eye(dim) - bt * kt[..., :, None] * kt[..., None, :]
            state = erase @ state + bt * kt[..., :, None] * values[:, t, :, None, :]
            outs.append((state * q[:, t, :, :, None]).sum(-2))
        return torch.stack(outs, 1)  # (b, seq, heads, dim)

    o, o_prompt = read(v), read(silu(v_pre))
    scale = torch.rsqrt(o_prompt.pow(2).mean(-1, keepdim=True) + mixer.o_norm.variance_epsilon)
    z = prompt_x @ mixer.g_a_proj.weight.T @ mixer.g_b_proj.weight.T
    y = mixer.o_norm.weight * o * scale * torch.sigmoid(z.reshape(b, seq, heads, dim))
    expected = y.reshape(b, seq, -1) @ mixer.o_proj.weight.T
    assert float((x - prompt_x).abs().max()) > 1e-2  # the input did change
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
