"""mLSTM (xLSTM) write sites and effective attention, and RWKV-4's WKV effective attention,
checked against a step-by-step unroll of each layer's recurrence written here from the layer's
own projections (the mixer's input is read with a plain forward hook, not through archscope)."""

from __future__ import annotations

import functools
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from archscope import Edit, SiteError
from archscope.backends import BackendError
from archscope_recurrent.hf import RWKVBackend, XLSTMBackend
from archscope_recurrent.testing import tiny_rwkv, tiny_xlstm, token_batch

TOL = 1e-4
LAYER = 1


@functools.cache
def _xlstm() -> Any:
    return tiny_xlstm()


@functools.cache
def _rwkv() -> Any:
    return tiny_rwkv()


def _mixer_io(model: Any, mixer: Any, **inputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The mixer's input and output in a plain forward pass (plain hooks, removed after)."""
    seen: dict[str, torch.Tensor] = {}

    def hook(_m: Any, args: Any, kwargs: Any, out: Any) -> None:
        seen["input"] = (args[0] if args else kwargs["hidden"]).detach().clone()
        seen["output"] = (out[0] if isinstance(out, tuple) else out).detach().clone()

    handle = mixer.register_forward_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    return seen["input"], seen["output"]


# -- mLSTM ---------------------------------------------------------------------------------------
def _mlstm(layer: int = LAYER) -> Any:
    return _xlstm().backbone.blocks[layer].mlstm_layer


def _soft_cap(x: torch.Tensor, cap: float) -> torch.Tensor:
    return cap * torch.tanh(x / cap)


def _mlstm_unroll(x: torch.Tensor, drop: int | None = None) -> dict[str, torch.Tensor]:
    """The mLSTM step by step from the layer's own projections: the stabilised recurrence of
    the xLSTM paper. ``drop``: a position whose write into C is removed (n and m kept)."""
    m = _mlstm()
    c = _xlstm().config
    nh = c.num_heads
    with torch.no_grad():
        b, t, _ = x.shape
        q = m.q(x).reshape(b, t, nh, -1)
        k = m.k(x).reshape(b, t, nh, -1)
        v = m.v(x).reshape(b, t, nh, -1)
        o = torch.sigmoid(m.ogate_preact(x))
        i_pre = _soft_cap(m.igate_preact(x), c.gate_soft_cap)  # (b, t, nh)
        f_pre = _soft_cap(m.fgate_preact(x), c.gate_soft_cap)
        d = q.shape[-1]
        C = torch.zeros(b, nh, d, v.shape[-1])
        n = torch.zeros(b, nh, d)
        mm = torch.zeros(b, nh)
        out: dict[str, list[torch.Tensor]] = {
            k_: [] for k_ in ("write", "value", "key", "decay", "states", "h", "den")
        }
        for s in range(t):
            log_f = F.logsigmoid(f_pre[:, s])
            m_new = torch.maximum(log_f + mm, i_pre[:, s])
            decay = torch.exp(log_f + mm - m_new)
            gate = torch.exp(i_pre[:, s] - m_new)
            value = gate[..., None] * v[:, s]
            write = k[:, s, :, :, None] * value[:, :, None, :]
            n = decay[..., None] * n + gate[..., None] * k[:, s]
            C = decay[..., None, None] * C + (torch.zeros_like(write) if s == drop else write)
            qs = q[:, s] / math.sqrt(d)
            den = torch.maximum((qs * n).sum(-1).abs(), torch.exp(-m_new)) + c.eps
            h = torch.einsum("bhd,bhdv->bhv", qs, C) / den[..., None]
            mm = m_new
            for key_, val in zip(out, (write, value, k[:, s], decay, C, h, den), strict=True):
                out[key_].append(val)
        res = {k_: torch.stack(v_, 1) for k_, v_ in out.items()}
        res["mixer"] = m.out_proj(o * m.multihead_norm(res["h"]).reshape(b, t, -1))
        res.update(q=q, k=k, v=v, o=o)
        return res


WRITE_SITES = ("state_write", "write_value", "write_key", "write_decay", "ssm_states")


@pytest.mark.parametrize("seq", [7, 70])  # 70: the chunkwise kernel (64) and the step loop
def test_mlstm_writes_and_states_equal_a_hand_written_unroll(seq):
    model = _xlstm()
    ids = token_batch(2, seq)["input_ids"]
    x, mixer_out = _mixer_io(model, _mlstm(), input_ids=ids)
    ref = _mlstm_unroll(x)
    torch.testing.assert_close(ref["mixer"], mixer_out, atol=TOL, rtol=0)  # the unroll is right
    backend = XLSTMBackend(model)
    names = [f"layer_{LAYER}.{r}" for r in WRITE_SITES]
    result = backend.run(ids, capture=[*names, f"layer_{LAYER}.c_state", "logits"])
    for role, key in zip(WRITE_SITES, ("write", "value", "key", "decay", "states"), strict=True):
        torch.testing.assert_close(
            result[f"layer_{LAYER}.{role}"], ref[key], atol=TOL, rtol=TOL, msg=role
        )
    # the last per-position state is the model's own cache
    torch.testing.assert_close(
        result[f"layer_{LAYER}.ssm_states"][:, -1],
        result[f"layer_{LAYER}.c_state"],
        atol=TOL,
        rtol=TOL,
    )
    shapes = {n: backend.site_info(n).shape for n in names}
    assert shapes[f"layer_{LAYER}.state_write"] == ("batch", "seq", "heads", "d_qk", "d_v")
    assert result[f"layer_{LAYER}.write_decay"].shape == (2, seq, 4)


@pytest.mark.parametrize("seq", [7, 70])
def test_mlstm_effective_attention_reproduces_the_mixer(seq):
    model = _xlstm()
    ids = token_batch(2, seq)["input_ids"]
    x, mixer_out = _mixer_io(model, _mlstm(), input_ids=ids)
    ref = _mlstm_unroll(x)
    site = f"layer_{LAYER}.effective_attention"
    A = XLSTMBackend(model).run(ids, capture=[site])[site]
    assert A.shape == (2, 4, seq, seq)
    assert bool((A.triu(1) == 0).all())  # causal
    v = ref["v"].transpose(1, 2)  # (b, h, t, d_v)
    h = torch.einsum("bhts,bhsv->bthv", A, v)
    torch.testing.assert_close(h, ref["h"], atol=TOL, rtol=TOL)
    m = _mlstm()
    b, t = ids.shape
    with torch.no_grad():
        mixer = m.out_proj(ref["o"] * m.multihead_norm(h).reshape(b, t, -1))
    torch.testing.assert_close(mixer, mixer_out, atol=TOL, rtol=0)
    # rows sum to q·n / den: ±1 where |q·n| dominates exp(-m)
    qn = torch.einsum("bhts->bht", A).abs()
    assert bool((qn <= 1 + 1e-4).all())


def test_mlstm_identity_edit_changes_nothing_and_deleting_a_write_changes_only_later_positions():
    model = _xlstm()
    ids = token_batch(2, 9)["input_ids"]
    backend = XLSTMBackend(model)
    name = f"layer_{LAYER}.state_write"
    clean = backend.run(ids, capture=["logits", name], return_state=True)
    for role in ("state_write", "write_value", "write_key"):
        site = f"layer_{LAYER}.{role}"
        own = backend.run(ids, capture=[site])[site]
        same = backend.run(ids, capture=["logits"], edits=[Edit.replace(site, own)])
        torch.testing.assert_close(same.logits, clean.logits, atol=0, rtol=0, msg=role)
    drop = 4
    x, _ = _mixer_io(model, _mlstm(), input_ids=ids)
    ref = _mlstm_unroll(x, drop=drop)
    deleted = backend.run(
        ids,
        capture=["logits", f"layer_{LAYER}.mixer"],
        edits=[Edit.scale(name, 0.0, positions=[drop])],
        return_state=True,
    )
    torch.testing.assert_close(deleted[f"layer_{LAYER}.mixer"], ref["mixer"], atol=TOL, rtol=0)
    torch.testing.assert_close(
        deleted.logits[:, :drop], clean.logits[:, :drop], atol=0, rtol=0
    )  # earlier positions bit for bit
    assert (deleted.logits[:, drop:] - clean.logits[:, drop:]).abs().amax(-1).min() > 1e-6
    # the state after the last token carries the edit; a run continued from it sees it
    assert deleted.state is not None and clean.state is not None
    torch.testing.assert_close(
        deleted.state[f"layer_{LAYER}.c_state"], ref["states"][:, -1], atol=TOL, rtol=TOL
    )
    assert not torch.allclose(
        deleted.state[f"layer_{LAYER}.c_state"], clean.state[f"layer_{LAYER}.c_state"]
    )


def test_mlstm_writes_continue_from_an_initial_state():
    model = _xlstm()
    ids = token_batch(2, 10)["input_ids"]
    backend = XLSTMBackend(model)
    name = f"layer_{LAYER}.ssm_states"
    full = backend.run(ids, capture=[name, f"layer_{LAYER}.write_decay"])
    prefix = backend.run(ids[:, :6], capture=["logits"], return_state=True)
    assert prefix.state is not None
    rest = backend.run(
        ids[:, 6:], capture=[name, f"layer_{LAYER}.write_decay"], initial_state=prefix.state
    )
    torch.testing.assert_close(rest[name], full[name][:, 6:], atol=TOL, rtol=TOL)
    torch.testing.assert_close(
        rest[f"layer_{LAYER}.write_decay"],
        full[f"layer_{LAYER}.write_decay"][:, 6:],
        atol=TOL,
        rtol=TOL,
    )


def test_mlstm_write_sites_are_declared_and_read_only_ones_refuse_edits():
    backend = XLSTMBackend(_xlstm())
    info = backend.sites()
    for layer in range(2):
        for role in (*WRITE_SITES, "effective_attention"):
            assert f"layer_{layer}.{role}" in info
    assert info["layer_0.state_write"].writable
    assert not info["layer_0.effective_attention"].writable
    ids = token_batch(1, 5)["input_ids"]
    with pytest.raises((SiteError, BackendError)):
        backend.run(ids, edits=[Edit.scale("layer_0.write_decay", 0.5)])
    with pytest.raises(SiteError):
        backend.run(ids, edits=[Edit.replace("layer_0.state_write", torch.ones(3))])
    # nothing left attached
    for block in _xlstm().backbone.blocks:
        assert not block.mlstm_layer.mlstm_backend._forward_hooks


# -- RWKV-4 --------------------------------------------------------------------------------------
def _time_mix(layer: int = LAYER) -> Any:
    return _rwkv().rwkv.blocks[layer].attention


def _wkv_unroll(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """RWKV-4's time mix from the layer's own weights, without stabilisation, in float64: the
    per-channel attention weights by their definition and the WKV output by the recurrence."""
    a = _time_mix()
    with torch.no_grad():
        shifted = F.pad(x, (0, 0, 1, -1))
        k = a.key(x * a.time_mix_key + shifted * (1 - a.time_mix_key)).double()
        v = a.value(x * a.time_mix_value + shifted * (1 - a.time_mix_value)).double()
        r = torch.sigmoid(
            a.receptance(x * a.time_mix_receptance + shifted * (1 - a.time_mix_receptance))
        )
        w = torch.exp(a.time_decay.double())
        u = a.time_first.double()
        b, t, c = k.shape
        num = torch.zeros(b, c, dtype=torch.float64)
        den = torch.zeros(b, c, dtype=torch.float64)
        wkv = []
        for s in range(t):
            e = torch.exp(u + k[:, s])
            wkv.append((num + e * v[:, s]) / (den + e))
            num = torch.exp(-w) * num + torch.exp(k[:, s]) * v[:, s]
            den = torch.exp(-w) * den + torch.exp(k[:, s])
        weights = torch.zeros(b, c, t, t, dtype=torch.float64)
        for ti in range(t):
            for s in range(ti + 1):
                weights[:, :, ti, s] = torch.exp(
                    u + k[:, s] if s == ti else k[:, s] - (ti - 1 - s) * w
                )
        weights = weights / weights.sum(-1, keepdim=True)
        wkv_t = torch.stack(wkv, 1)
        return {
            "wkv": wkv_t,
            "weights": weights,
            "v": v,
            "mixer": a.output((r.double() * wkv_t).to(x.dtype)),
        }


def test_rwkv_effective_attention_reproduces_the_time_mix():
    model = _rwkv()
    ids = token_batch(2, 8)["input_ids"]
    backend = RWKVBackend(model)
    site = f"layer_{LAYER}.effective_attention"
    result = backend.run(ids, capture=[site, f"layer_{LAYER}.mixer"])
    x, _ = _mixer_io(model, _time_mix(), input_ids=ids)  # (model's own rescaling: layer 1 < 6)
    ref = _wkv_unroll(x)
    torch.testing.assert_close(ref["mixer"], result[f"layer_{LAYER}.mixer"], atol=TOL, rtol=0)
    # per channel: Σ_s A[t, s] v_s is the WKV output (the per-channel function)
    from archscope_recurrent.writes import wkv_attention

    a = _time_mix()
    with torch.no_grad():
        shifted = F.pad(x, (0, 0, 1, -1))
        k = a.key(x * a.time_mix_key + shifted * (1 - a.time_mix_key))
    per_channel, _ = wkv_attention(k, a.time_decay, a.time_first)
    torch.testing.assert_close(per_channel.double(), ref["weights"], atol=TOL, rtol=0)
    wkv = torch.einsum("bcts,bsc->btc", per_channel.double(), ref["v"])
    torch.testing.assert_close(wkv, ref["wkv"], atol=TOL, rtol=TOL)
    # the site: the channel mean over 8 equal groups; rows sum to one
    A = result[site]
    assert A.shape == (2, 8, 8, 8)
    b, c, t, _ = ref["weights"].shape
    grouped = ref["weights"].reshape(b, 8, c // 8, t, t).mean(2)
    torch.testing.assert_close(A.double(), grouped, atol=TOL, rtol=0)
    torch.testing.assert_close(A.sum(-1), torch.ones(2, 8, 8), atol=TOL, rtol=0)


def test_rwkv_effective_attention_with_an_initial_state_and_no_write_sites():
    model = _rwkv()
    ids = token_batch(1, 9)["input_ids"]
    backend = RWKVBackend(model)
    assert "layer_0.state_write" not in backend.sites()
    site = f"layer_{LAYER}.effective_attention"
    prefix = backend.run(ids[:, :5], capture=["logits"], return_state=True)
    rest = backend.run(ids[:, 5:], capture=[site], initial_state=prefix.state)
    A = rest[site]
    assert A.shape == (1, 8, 4, 4)
    # the initial state takes the rest of each row's weight: rows sum to less than one
    sums = A.sum(-1)
    assert bool((sums < 1).all()) and bool((sums > 0).all())
    for block in model.rwkv.blocks:
        assert not block.attention._forward_hooks and not block.attention._forward_pre_hooks


def test_mlstm_write_sites_on_a_right_padded_batch_of_unequal_lengths():
    model = _xlstm()
    batch = token_batch(2, 9, lengths=[9, 6])
    backend = XLSTMBackend(model)
    names = [f"layer_{LAYER}.state_write", f"layer_{LAYER}.effective_attention"]
    padded = backend.run(batch, capture=[*names, f"layer_{LAYER}.c_state"])
    alone = backend.run(batch["input_ids"][1:, :6], capture=[*names, f"layer_{LAYER}.ssm_states"])
    # the short row's real positions are those of the row run alone (causal: pads come after)
    torch.testing.assert_close(padded[names[0]][1, :6], alone[names[0]][0], atol=TOL, rtol=TOL)
    torch.testing.assert_close(
        padded[names[1]][1, :, :6, :6], alone[names[1]][0], atol=TOL, rtol=TOL
    )
    # its state is taken after its own last real token
    torch.testing.assert_close(
        padded[f"layer_{LAYER}.c_state"][1],
        alone[f"layer_{LAYER}.ssm_states"][0, -1],
        atol=TOL,
        rtol=TOL,
    )
    with pytest.raises(BackendError, match="row lengths"):
        backend.run(
            batch,
            capture=[f"layer_{LAYER}.c_state"],
            edits=[Edit.scale(names[0], 0.0, positions=[1])],
        )


@pytest.mark.parametrize("seq", [1, 5, 16, 37])
def test_the_chunked_head_scan_equals_a_step_by_step_scan(seq):
    from archscope_recurrent.writes import head_decay_scan

    g = torch.Generator().manual_seed(seq)
    log_decay = -torch.rand(2, seq, 3, generator=g) * 3
    write = torch.randn(2, seq, 3, 4, 5, generator=g)
    initial = torch.randn(2, 3, 4, 5, generator=g)
    state = initial.clone()
    expected = []
    for t in range(seq):
        state = torch.exp(log_decay[:, t])[..., None, None] * state + write[:, t]
        expected.append(state)
    got = head_decay_scan(log_decay, write, initial, chunk=8)
    torch.testing.assert_close(got, torch.stack(expected, 1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("with_initial", [False, True])
def test_the_stabiliser_in_closed_form_is_the_running_max(with_initial):
    """m_t = max(logσ(f_t) + m_{t-1}, i_t), stepped here, equals `MLSTMParts.m` (a running max
    over positions, no seq × seq matrix) on a long sequence with strong and weak forget gates."""
    from archscope_recurrent.writes import MLSTMParts

    g = torch.Generator().manual_seed(3)
    b, h, t, d = 2, 3, 300, 4
    igate = torch.randn(b, h, t, generator=g) * 4
    fgate = torch.randn(b, h, t, generator=g) * 3
    m0 = torch.randn(b, h, 1, generator=g) if with_initial else None
    qkv = torch.randn(3, b, h, t, d, generator=g)
    parts = MLSTMParts(qkv[0], qkv[1], qkv[2], igate, fgate, m0=m0)
    m = torch.zeros(b, h) if m0 is None else m0[..., 0]
    expected = []
    for step in range(t):
        m = torch.maximum(F.logsigmoid(fgate[..., step]) + m, igate[..., step])
        expected.append(m)
    torch.testing.assert_close(parts.m, torch.stack(expected, -1), atol=1e-4, rtol=1e-5)
    # the seq × seq weights (effective attention's) peak at m where no initial state weighs more
    peak = parts.log_weights.amax(-1)
    if m0 is None:
        torch.testing.assert_close(parts.m, torch.maximum(peak, parts.cum), atol=1e-4, rtol=1e-5)
