"""State writes, per-position states and effective attention of Mamba and Mamba-2 layers, checked
against a hand-written unroll of each layer's recurrence from the layer's own weights (the
mixer's input is read with a plain forward hook, not through archscope)."""

from __future__ import annotations

import functools
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from archscope import Backend, BackendError, Edit, SiteError
from archscope.testing import hook_ids, padded_batch
from archscope_mamba.backend import MambaBackend
from archscope_mamba.testing import make_model, random_ids
from archscope_mamba.writes import channel_decay_attention

warnings.filterwarnings("ignore", message=".*falling back to its reference PyTorch.*")
FAMILIES = ("mamba", "mamba2")
LAYER = 1
TOL = 1e-4


@functools.cache
def _model(family: str) -> Any:
    return make_model(family)


def _backend(family: str) -> MambaBackend:
    backend = Backend.for_model(_model(family))
    assert isinstance(backend, MambaBackend)
    return backend


def _mixer(family: str, layer: int = LAYER) -> Any:
    return _model(family).backbone.layers[layer].mixer


def _mixer_io(family: str, ids: torch.Tensor, mask: torch.Tensor | None = None) -> Any:
    """The mixer's input and output in a plain forward pass (plain hooks, removed after)."""
    seen: dict[str, torch.Tensor] = {}
    mixer = _mixer(family)

    def hook(_m: Any, args: Any, kwargs: Any, out: Any) -> None:
        seen["input"] = (args[0] if args else kwargs["hidden_states"]).detach()
        seen["output"] = out.detach()

    handle = mixer.register_forward_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            _model(family)(ids, attention_mask=mask)
    finally:
        handle.remove()
    return seen["input"], seen["output"]


def _unroll(
    family: str, hidden: torch.Tensor, mask: torch.Tensor | None = None, drop: int | None = None
) -> dict[str, torch.Tensor]:
    """The layer's recurrence step by step from its own weights: writes, factors, decays, the
    state after each position and the mixer output. ``drop``: a position whose write is
    removed (the state still decays there)."""
    m = _mixer(family)
    with torch.no_grad():
        if mask is not None:
            hidden = hidden * mask[:, :, None]
        proj = m.in_proj(hidden)
        b, t, _ = hidden.shape
        if family == "mamba":
            d, n, r = m.intermediate_size, m.ssm_state_size, m.time_step_rank
            xs, gate = proj[..., :d], proj[..., d:]
            conv = F.conv1d(
                F.pad(xs.transpose(1, 2), (m.conv1d.kernel_size[0] - 1, 0)),
                m.conv1d.weight,
                m.conv1d.bias,
                groups=d,
            )
            x = F.silu(conv).transpose(1, 2)
            if mask is not None:
                x = x * mask[:, :, None]
            params = x @ m.x_proj.weight.T
            ts, Bm, Cm = params[..., :r], params[..., r : r + n], params[..., r + n :]
            dt = F.softplus(ts @ m.dt_proj.weight.T + m.dt_proj.bias)  # (b, t, d)
            A = -torch.exp(m.A_log)  # (d, n)
            state = torch.zeros(b, d, n)
            out = {"write": [], "value": [], "key": [], "decay": [], "states": [], "y": []}
            for s in range(t):
                decay = torch.exp(dt[:, s, :, None] * A)
                value = dt[:, s] * x[:, s]
                write = value[:, :, None] * Bm[:, s, None, :]
                if s == drop:
                    write = torch.zeros_like(write)
                state = decay * state + write
                y = (state * Cm[:, s, None, :]).sum(-1) + m.D * x[:, s]
                for k, v in zip(out, (write, value, Bm[:, s], decay, state, y), strict=True):
                    out[k].append(v)
            res = {k: torch.stack(v, 1) for k, v in out.items()}
            res["mixer"] = m.out_proj(res["y"] * F.silu(gate))
            res.update(x=x, dt=dt, A=A, B=Bm, C=Cm, gate=gate)
            return res
        inner, h, p = m.intermediate_size, m.num_heads, m.head_dim
        n, g = m.ssm_state_size, m.n_groups
        gate = proj[..., :inner]
        xbc = proj[..., inner : inner + m.conv_dim]
        dt_raw = proj[..., inner + m.conv_dim :]
        conv = F.conv1d(
            F.pad(xbc.transpose(1, 2), (m.conv1d.kernel_size[0] - 1, 0)),
            m.conv1d.weight,
            m.conv1d.bias,
            groups=m.conv_dim,
        )
        xbc = F.silu(conv).transpose(1, 2)
        if mask is not None:
            xbc = xbc * mask[:, :, None]
        x = xbc[..., :inner].reshape(b, t, h, p)
        Bm = xbc[..., inner : inner + g * n].reshape(b, t, g, n)
        Cm = xbc[..., inner + g * n :].reshape(b, t, g, n)
        head_group = torch.arange(h) // (h // g)
        Bh, Ch = Bm[:, :, head_group], Cm[:, :, head_group]  # (b, t, h, n)
        dt = F.softplus(dt_raw + m.dt_bias)  # (b, t, h); the default limits do not clip
        A = -torch.exp(m.A_log)  # (h,)
        state = torch.zeros(b, h, p, n)
        out = {"write": [], "value": [], "key": [], "decay": [], "states": [], "y": []}
        for s in range(t):
            decay = torch.exp(dt[:, s] * A)  # (b, h)
            value = dt[:, s, :, None] * x[:, s]
            write = value[..., None] * Bh[:, s, :, None, :]
            if s == drop:
                write = torch.zeros_like(write)
            state = decay[..., None, None] * state + write
            y = (state * Ch[:, s, :, None, :]).sum(-1) + m.D[:, None] * x[:, s]
            for k, v in zip(out, (write, value, Bh[:, s], decay, state, y), strict=True):
                out[k].append(v)
        res = {k: torch.stack(v, 1) for k, v in out.items()}
        res["mixer"] = m.out_proj(m.norm(res["y"].reshape(b, t, inner), gate))
        res.update(x=x, dt=dt, A=A, B=Bh, C=Ch, gate=gate)
        return res


def _sites(*roles: str) -> list[str]:
    return [f"layer_{LAYER}.{r}" for r in roles]


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> None:
    assert a.shape == b.shape, (a.shape, b.shape)
    assert (a - b).abs().max().item() <= tol, (a - b).abs().max().item()


ROLES = ("state_write", "write_value", "write_key", "write_decay", "ssm_states")


@pytest.mark.parametrize("family", FAMILIES)
def test_writes_and_states_equal_a_hand_written_unroll(family: str) -> None:
    ids = random_ids(2, 7)
    backend = _backend(family)
    result = backend.run(ids, capture=[*_sites(*ROLES, "mixer", "ssm_state"), "logits"])
    hidden, model_mixer = _mixer_io(family, ids)
    ref = _unroll(family, hidden)
    _close(ref["mixer"], model_mixer)  # the reference is the layer
    name = f"layer_{LAYER}."
    _close(result[name + "state_write"], ref["write"])
    _close(result[name + "write_value"], ref["value"])
    _close(result[name + "write_key"], ref["key"])  # Mamba: one key for every channel
    _close(result[name + "write_decay"], ref["decay"])
    _close(result[name + "ssm_states"], ref["states"])
    # the state after the last token is the model's own cache
    _close(result[name + "ssm_states"][:, -1], result[name + "ssm_state"])
    # the write is the outer product of its factors
    value, key = result[name + "write_value"], result[name + "write_key"]
    outer = (
        value[..., None] * key[:, :, None, :]
        if family == "mamba"
        else value[..., None] * key[..., None, :]
    )
    _close(result[name + "state_write"], outer, 1e-6)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_rows_give_the_unpadded_writes_and_the_cached_state(family: str, side: str) -> None:
    backend = _backend(family)
    ids = random_ids(2, 7, seed=3)
    batch = padded_batch(ids, [7, 4], side)
    sites = _sites("state_write", "ssm_states", "ssm_state", "effective_attention")
    padded = backend.run(batch, capture=sites)
    real_mask = batch["attention_mask"][1].bool()
    short = backend.run(batch["input_ids"][1:, real_mask], capture=sites)
    real = slice(0, 4) if side == "right" else slice(3, 7)
    for role in ("state_write", "ssm_states"):
        _close(padded[f"layer_{LAYER}.{role}"][1, real], short[f"layer_{LAYER}.{role}"][0])
    attn = padded[f"layer_{LAYER}.effective_attention"][1][:, real, real]
    _close(attn, short[f"layer_{LAYER}.effective_attention"][0])
    last = 3 if side == "right" else 6
    _close(padded[f"layer_{LAYER}.ssm_states"][1, last], padded[f"layer_{LAYER}.ssm_state"][1])
    _close(padded[f"layer_{LAYER}.ssm_state"][1], short[f"layer_{LAYER}.ssm_state"][0])


def test_mamba2_effective_attention_reproduces_the_mixer() -> None:
    family = "mamba2"
    ids = random_ids(2, 9)
    result = _backend(family).run(ids, capture=_sites("effective_attention", "mixer"))
    attn = result[f"layer_{LAYER}.effective_attention"]  # (b, h, t, s)
    hidden, _ = _mixer_io(family, ids)
    ref = _unroll(family, hidden)
    m = _mixer(family)
    b, t = ids.shape
    assert attn.shape == (b, m.num_heads, t, t)
    assert bool((attn.triu(1) == 0).all())  # causal
    with torch.no_grad():
        y = torch.einsum("bhts,bshp->bthp", attn, ref["x"]) + m.D[:, None] * ref["x"]
        out = m.out_proj(m.norm(y.reshape(b, t, -1), ref["gate"]))
    _close(out, result[f"layer_{LAYER}.mixer"])


def _channel_attention(ref: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-channel effective attention of a Mamba layer, from the products of its decays."""
    dt, A, Bm, Cm = ref["dt"], ref["A"], ref["B"], ref["C"]
    b, t, d = dt.shape
    out = torch.zeros(b, d, t, t)
    for i in range(t):
        carried = torch.ones(b, d, A.shape[1])  # Π decays s+1..i
        for s in range(i, -1, -1):
            out[:, :, i, s] = (Cm[:, i, None, :] * carried * Bm[:, s, None, :]).sum(-1) * dt[:, s]
            carried = carried * torch.exp(dt[:, s, :, None] * A)
    return out


def test_mamba_effective_attention_is_the_channel_mean_and_reproduces_the_mixer() -> None:
    family = "mamba"
    ids = random_ids(2, 6)
    result = _backend(family).run(ids, capture=_sites("effective_attention", "mixer"))
    hidden, _ = _mixer_io(family, ids)
    ref = _unroll(family, hidden)
    m = _mixer(family)
    per_channel = _channel_attention(ref)  # (b, d, t, s)
    with torch.no_grad():  # per channel, the attention reproduces the mixer
        y = torch.einsum("bdts,bsd->btd", per_channel, ref["x"]) + m.D * ref["x"]
        _close(m.out_proj(y * F.silu(ref["gate"])), result[f"layer_{LAYER}.mixer"])
    site = result[f"layer_{LAYER}.effective_attention"]
    groups = site.shape[1]
    assert groups == 8 and m.intermediate_size % groups == 0
    expected = per_channel.reshape(2, groups, -1, 6, 6).mean(2)
    _close(site, expected)
    # the public helper with one group per channel gives the per-channel matrices
    helper = channel_decay_attention(ref["C"], ref["B"], ref["dt"], ref["A"], m.intermediate_size)
    _close(helper, per_channel)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("role", ["state_write", "write_value", "write_key"])
def test_editing_a_write_to_its_own_value_changes_nothing(family: str, role: str) -> None:
    backend = _backend(family)
    ids = random_ids(2, 7)
    name = f"layer_{LAYER}.{role}"
    clean = backend.run(ids, capture=[name, "logits", "layer_2.residual"])
    edit = Edit.replace(name, clean[name][:, [3]], positions=[3])
    edited = backend.run(ids, capture=["logits", "layer_2.residual"], edits=[edit])
    assert (edited.logits - clean.logits).abs().max().item() == 0.0
    assert torch.equal(edited["layer_2.residual"], clean["layer_2.residual"])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("role", ["state_write", "write_value", "write_key"])
def test_an_identity_edit_reports_the_unedited_run_bit_for_bit(
    family: str, side: str, role: str
) -> None:
    """On a padded batch, an edit that returns its input (a clone, or a scale by 1) of any
    writable role leaves every write site's capture, the per-position states and the logits
    equal to the unedited run's, bit for bit."""
    backend = _backend(family)
    batch = padded_batch(random_ids(2, 9, seed=3), [9, 6], side)
    sites = [*_sites(*ROLES), "logits"]
    clean = backend.run(batch, capture=sites)
    name = f"layer_{LAYER}.{role}"
    for edit in (Edit.apply(name, lambda t: t.clone()), Edit.scale(name, 1.0)):
        edited = backend.run(batch, capture=sites, edits=[edit])
        for site in sites:
            assert edited[site].shape == clean[site].shape, (edit, site)
            assert torch.equal(edited[site], clean[site]), (edit, site)


@pytest.mark.parametrize("family", FAMILIES)
def test_deleting_a_write_changes_only_later_positions_as_the_unroll_says(family: str) -> None:
    backend = _backend(family)
    ids = random_ids(2, 7)
    name, drop = f"layer_{LAYER}.state_write", 3
    sites = [f"layer_{LAYER}.mixer", f"layer_{LAYER}.ssm_state", "logits"]
    clean = backend.run(ids, capture=sites)
    deleted = backend.run(ids, capture=sites, edits=[Edit.scale(name, 0.0, positions=[drop])])
    assert torch.equal(deleted.logits[:, :drop], clean.logits[:, :drop])
    assert (deleted.logits[:, drop:] - clean.logits[:, drop:]).abs().amax(-1).min() > 1e-6
    hidden, _ = _mixer_io(family, ids)
    ref = _unroll(family, hidden, drop=drop)  # the rest of the recurrence, recomputed by hand
    _close(deleted[f"layer_{LAYER}.mixer"], ref["mixer"])
    _close(deleted[f"layer_{LAYER}.ssm_state"], ref["states"][:, -1])
    # with return_state, the edited run's state is the one its continuation starts from
    edited_state = backend.run(
        ids, edits=[Edit.scale(name, 0.0, positions=[drop])], return_state=True
    ).state
    assert edited_state is not None
    _close(edited_state[f"layer_{LAYER}.ssm_state"], ref["states"][:, -1])


@pytest.mark.parametrize("family", FAMILIES)
def test_continuing_from_a_captured_state_reproduces_the_full_run(family: str) -> None:
    backend = _backend(family)
    ids = random_ids(2, 8)
    full = backend.run(ids, capture=["logits", f"layer_{LAYER}.ssm_states"])
    prefix = backend.run(ids[:, :5], return_state=True)
    assert prefix.state is not None
    _close(full[f"layer_{LAYER}.ssm_states"][:, 4], prefix.state[f"layer_{LAYER}.ssm_state"])
    rest = backend.run(ids[:, 5:], capture=["logits"], initial_state=prefix.state)
    _close(rest.logits, full.logits[:, 5:], 1e-5)


def test_write_sites_are_refused_where_they_cannot_be_computed() -> None:
    backend = _backend("mamba2")
    ids = random_ids(1, 6)
    state = backend.run(ids[:, :3], return_state=True).state
    with pytest.raises(BackendError, match="continued from initial_state"):
        backend.run(ids[:, 3:], capture=_sites("state_write"), initial_state=state)
    with pytest.raises((SiteError, BackendError), match="read-only"):
        backend.run(ids, edits=[Edit.scale(f"layer_{LAYER}.write_decay", 0.5)])
    with pytest.raises(SiteError, match="shape"):
        backend.run(ids, edits=[Edit.replace(f"layer_{LAYER}.state_write", torch.ones(3))])


def test_no_hook_stays_and_only_the_hf_mamba_mixers_declare_write_sites() -> None:
    backend = _backend("mamba")
    model = _model("mamba")
    before = hook_ids(model)
    backend.run(
        random_ids(1, 5),
        capture=_sites("state_write", "effective_attention"),
        edits=[Edit.scale(f"layer_{LAYER}.write_value", 2.0, positions=[1])],
    )
    assert hook_ids(model) == before
    info = backend.sites()[f"layer_{LAYER}.state_write"]
    assert info.kind == "token" and info.writable
    assert info.shape == ("batch", "seq", "d_inner", "d_state")
    assert not backend.sites()[f"layer_{LAYER}.effective_attention"].writable
    falcon = Backend.for_model(make_model("falcon_mamba"))  # norms on B, C and Δ: not covered
    assert not any(n.endswith(".state_write") for n in falcon.sites())


def test_the_public_helpers_agree_with_each_other_on_any_scalar_decay_recurrence() -> None:
    """What another backend (e.g. a gated linear-attention layer) would reuse: the effective
    attention of a recurrence with one decay per head, applied to the values, equals reading
    the states that `linear_scan` builds from the same writes."""
    from archscope_mamba.writes import linear_scan, scalar_decay_attention

    gen = torch.Generator().manual_seed(0)
    b, t, h, dk, dv = 2, 9, 3, 4, 5
    q, k = torch.randn(b, t, h, dk, generator=gen), torch.randn(b, t, h, dk, generator=gen)
    v = torch.randn(b, t, h, dv, generator=gen)
    log_decay = -torch.rand(b, t, h, generator=gen)
    scale = torch.rand(b, t, h, generator=gen)
    writes = (scale[..., None] * v)[..., :, None] * k[..., None, :]  # (b, t, h, dv, dk)
    states = linear_scan(torch.exp(log_decay)[..., None, None], writes)
    read = (states * q[..., None, :]).sum(-1)
    attention = scalar_decay_attention(q, k, log_decay, scale)
    _close(torch.einsum("bhts,bshv->bthv", attention, v), read, 1e-5)
    # continuing the scan from a state in the middle gives the same later states
    later = linear_scan(torch.exp(log_decay)[:, 5:, :, None, None], writes[:, 5:], states[:, 4])
    _close(later, states[:, 5:], 1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_write_sites_carry_gradients(family: str) -> None:
    backend = _backend(family)
    sites = _sites("state_write", "effective_attention", "ssm_states")
    result = backend.run(random_ids(1, 5), capture=sites, grad=True)
    total = sum(result[n].sum() for n in sites)
    total.backward()  # through the mixer's own projections
    mixer = _mixer(family)
    assert mixer.in_proj.weight.grad is not None and mixer.in_proj.weight.grad.abs().sum() > 0
    _model(family).zero_grad(set_to_none=True)


@pytest.mark.parametrize("side", ["left", "right"])
def test_mamba2_reads_the_scan_inputs_the_model_computed(side: str, monkeypatch: Any) -> None:
    """Mamba-2's write sites come from the arguments the mixer hands its scan module (the
    convolution not run again) and equal the sites recomputed from ``in_proj``'s output; the
    scan module, shared by every model, keeps no hook."""
    from archscope_mamba import writes

    scan = writes.mamba2_scan_module(_mixer("mamba2"))
    if scan is None:
        pytest.skip("this transformers calls Mamba-2's scan as a plain function")
    backend = _backend("mamba2")
    batch = padded_batch(random_ids(2, 9, seed=5), [9, 6], side)
    sites = _sites("write_value", "write_key", "write_decay", "state_write", "mixer")
    convs = []
    real_conv1d = F.conv1d

    def counted(*args: Any, **kwargs: Any) -> torch.Tensor:
        convs.append(1)
        return real_conv1d(*args, **kwargs)

    monkeypatch.setattr(F, "conv1d", counted)
    read = backend.run(batch, capture=sites)
    from_scan = len(convs)
    assert not scan._forward_pre_hooks and not scan._forward_hooks
    monkeypatch.setattr(writes, "mamba2_scan_module", lambda _mixer: None)
    convs.clear()
    again = backend.run(batch, capture=sites)
    # the model convolves once per layer; recomputing adds one per layer with write sites
    assert len(convs) == from_scan + 1
    for name in sites:
        torch.testing.assert_close(read[name], again[name], rtol=0, atol=1e-6)
    assert read[f"layer_{LAYER}.write_key"].is_contiguous()
