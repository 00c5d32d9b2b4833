"""State writes, per-position states and effective attention of the hybrids' matrix-state
mixers (gated delta nets, KDA, lightning attention), checked against a hand-written unroll of
each layer's recurrence from the layer's own projections: the mixer's input, its padding mask
and its norm's arguments are read with plain forward hooks, not through archscope."""

from __future__ import annotations

import functools
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from archscope import Backend, BackendError, Edit, ParameterError, SiteError
from archscope.compat import transformers_release
from archscope.recurrence import (
    decayed_scores,
    delta_rule_attention,
    delta_rule_scan,
    delta_rule_states,
)
from archscope.testing import hook_ids, padded_batch
from archscope_hybrid.backend import HybridBackend
from archscope_hybrid.testing import language_model, make_model, missing, random_ids

warnings.filterwarnings("ignore", message=".*falling back to its reference PyTorch.*")
#: Every family with a matrix-state mixer (the LFM families have short convolutions only).
FAMILIES = (
    "qwen3_next",
    "qwen3_5_text",
    "qwen3_5",
    "olmo_hybrid",
    "kimi_linear",
    "minimax",
    "qwen3_5_linear",
)
LAYER = 0
TOL = 1e-4
ROLES = ("state_write", "write_value", "write_key", "write_decay", "ssm_states")


def _families(names: tuple[str, ...] = FAMILIES) -> list[Any]:
    return [
        pytest.param(f, marks=pytest.mark.skip(reason=missing(f))) if missing(f) else f
        for f in names
    ]


@functools.cache
def _model(family: str) -> Any:
    return make_model(family)


def _backend(family: str) -> HybridBackend:
    backend = Backend.for_model(_model(family))
    assert isinstance(backend, HybridBackend)
    return backend


def _sites(*roles: str) -> list[str]:
    return [f"layer_{LAYER}.{r}" for r in roles]


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> None:
    """Equal to ``tol`` relative to the reference's largest entry (the tiny models' states and
    read-outs are of order 1e-3, where an absolute 1e-4 would say little)."""
    assert a.shape == b.shape, (a.shape, b.shape)
    err = (a.float() - b.float()).abs().max().item()
    scale = max(b.float().abs().max().item(), 1e-6)
    assert err <= tol * scale, (err, scale)


def _mixer(family: str) -> Any:
    block = language_model(_model(family)).layers[LAYER]
    return block.linear_attn if hasattr(block, "linear_attn") else block.self_attn


def _norm(mixer: Any) -> Any:
    return mixer.o_norm if hasattr(mixer, "o_norm") else mixer.norm


def _mask_kwargs(model: Any, mask: Any) -> dict[str, Any]:
    config = getattr(model.config, "text_config", model.config)
    types = set(config.layer_types)
    if "full_attention" in types:
        return {"attention_mask": mask}
    return {"attention_mask": {t: mask for t in types}}


def _mixer_io(family: str, ids: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, Any]:
    """The mixer's input, padding mask and output, and its norm's arguments (the read-out and
    the gate), in a plain forward pass (plain hooks, removed after)."""
    seen: dict[str, Any] = {}
    mixer = _mixer(family)

    def take_io(_m: Any, args: Any, kwargs: Any, out: Any) -> None:
        seen["input"] = (args[0] if args else kwargs["hidden_states"]).detach()
        given = kwargs.get("attention_mask")
        seen["mask"] = given if isinstance(given, torch.Tensor) and given.dim() == 2 else None
        seen["output"] = (out[0] if isinstance(out, tuple) else out).detach()

    def take_norm(_m: Any, args: Any) -> None:
        seen["norm_args"] = tuple(a.detach() for a in args)

    handles = [
        mixer.register_forward_hook(take_io, with_kwargs=True),
        _norm(mixer).register_forward_pre_hook(take_norm),
    ]
    try:
        with torch.no_grad():
            _model(family)(ids, **_mask_kwargs(_model(family), mask))
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _unit(x: torch.Tensor) -> torch.Tensor:
    """The kernels' L2 normalisation: 1e-6 is added under the root (it matters for the small
    keys of a random-weight model)."""
    return x / ((x * x).sum(-1, keepdim=True) + 1e-6).sqrt()


def _inputs(family: str, hidden: torch.Tensor, mask: torch.Tensor | None) -> dict[str, Any]:
    """q (normalised and scaled), k (normalised), v per value head, β and the log decay, from
    the layer's own projections, written out per family."""
    m = _mixer(family)
    b, t, _ = hidden.shape
    keep = torch.ones(b, t) if mask is None else mask.float()
    if family == "minimax":
        qkv = F.silu(m.qkv_proj(hidden)) * keep[..., None]
        heads, dim = m.num_attention_heads, m.head_dim
        q, k, v = qkv.reshape(b, t, heads, 3, dim).unbind(3)
        slope = m.slope_rate.reshape(heads)
        return dict(
            q=q, k=k, v=v, beta=torch.ones(b, t, heads), g=-slope.expand(b, t, heads), erase=False
        )
    h = hidden * keep[..., None]
    if family == "kimi_linear":
        nk = nv = m.num_heads
        dk = dv = m.head_dim
        mixed = torch.cat([m.q_proj(h), m.k_proj(h), m.v_proj(h)], -1)
        beta = torch.sigmoid(m.b_proj(h))
        gate = m.forget_gate
        raw = gate.f_b_proj(gate.f_a_proj(h)) + gate.dt_bias
        g = -gate.A_log.reshape(1, 1, nv, 1).exp() * F.softplus(raw.reshape(b, t, nv, dk))
    else:
        nk, nv, dk, dv = m.num_k_heads, m.num_v_heads, m.head_k_dim, m.head_v_dim
        if family == "qwen3_next":  # per key head: q, k, then its value heads' v and z
            per = nv // nk
            qkvz = m.in_proj_qkvz(h).reshape(b, t, nk, 2 * dk + 2 * per * dv)
            q, k, v, _ = qkvz.split([dk, dk, per * dv, per * dv], dim=-1)
            mixed = torch.cat([x.reshape(b, t, -1) for x in (q, k, v)], -1)
            beta_raw, a = m.in_proj_ba(h).reshape(b, t, nk, 2 * per).split([per, per], -1)
            beta_raw, a = beta_raw.reshape(b, t, nv), a.reshape(b, t, nv)
        elif family == "olmo_hybrid":
            mixed = torch.cat([m.q_proj(h), m.k_proj(h), m.v_proj(h)], -1)
            beta_raw, a = m.b_proj(h), m.a_proj(h)
        else:  # Qwen3.5
            mixed, beta_raw, a = m.in_proj_qkv(h), m.in_proj_b(h), m.in_proj_a(h)
        beta = torch.sigmoid(beta_raw) * (2.0 if getattr(m, "allow_neg_eigval", False) else 1.0)
        g = -m.A_log.exp() * F.softplus(a + m.dt_bias)
    conv = F.silu(m.conv1d(mixed.transpose(1, 2))[..., :t]).transpose(1, 2)
    q, k, v = conv.split([nk * dk, nk * dk, nv * dv], -1)
    q = q.reshape(b, t, nk, dk).repeat_interleave(nv // nk, 2)
    k = k.reshape(b, t, nk, dk).repeat_interleave(nv // nk, 2)
    return dict(
        q=_unit(q) / dk**0.5, k=_unit(k), v=v.reshape(b, t, nv, dv), beta=beta, g=g, erase=True
    )


def _unroll(
    family: str, hidden: torch.Tensor, mask: torch.Tensor | None = None, drop: int | None = None
) -> dict[str, torch.Tensor]:
    """The layer's recurrence token by token (the write at ``drop`` left out)."""
    with torch.no_grad():
        x = _inputs(family, hidden, mask)
        q, k, v, beta, g = x["q"], x["k"], x["v"], x["beta"], x["g"]
        b, t, heads, dk = k.shape
        state = torch.zeros(b, heads, dk, v.shape[-1])
        states, writes, reads = [], [], []
        for i in range(t):
            decay = g[:, i].exp()
            state = state * (decay[..., None] if decay.dim() == 3 else decay[..., None, None])
            write = k[:, i, :, :, None] * (beta[:, i, :, None] * v[:, i])[:, :, None, :]
            if x["erase"]:  # S ← S − β k (kᵀ S)
                recalled = torch.einsum("bhk,bhkv->bhv", k[:, i], state)
                state = (
                    state - beta[:, i, :, None, None] * k[:, i, :, :, None] * recalled[:, :, None]
                )
            if i != drop:
                state = state + write
            states.append(state)
            writes.append(write)
            reads.append(torch.einsum("bhkv,bhk->bhv", state, q[:, i]))
    return dict(
        states=torch.stack(states, 1),
        write=torch.stack(writes, 1),
        value=beta[..., None] * v,
        key=k,
        decay=g.exp(),
        read=torch.stack(reads, 1),
        **x,
    )


def _finish(family: str, read: torch.Tensor, io: dict[str, Any]) -> torch.Tensor:
    """The mixer's output from a read-out (batch, seq, heads, value_dim): its norm with the
    run's gate (lightning: its norm and sigmoid output gate) and its output projection."""
    m = _mixer(family)
    like = io["norm_args"][0]
    with torch.no_grad():
        normed = _norm(m)(read.reshape(like.shape), *io["norm_args"][1:])
        normed = normed.reshape(*read.shape[:2], -1)
        if family == "minimax":
            normed = torch.sigmoid(m.output_gate(io["input"])) * normed
        out = m.o_proj if hasattr(m, "o_proj") else m.out_proj
        return out(normed)  # type: ignore[no-any-return]


@pytest.mark.parametrize("family", _families())
def test_writes_and_states_equal_a_hand_written_unroll(family: str) -> None:
    ids = random_ids(2, 9)
    result = _backend(family).run(ids, capture=[*_sites(*ROLES, "mixer", "ssm_state"), "logits"])
    io = _mixer_io(family, ids)
    ref = _unroll(family, io["input"])
    # the reference is the layer: its read-out is the one the model's norm receives, and the
    # last state the model's own cache
    _close(ref["read"].reshape(io["norm_args"][0].shape), io["norm_args"][0])
    _close(_finish(family, ref["read"], io), io["output"])
    name = f"layer_{LAYER}."
    _close(result[name + "ssm_state"], ref["states"][:, -1])
    _close(result[name + "state_write"], ref["write"])
    _close(result[name + "write_value"], ref["value"])
    _close(result[name + "write_key"], ref["key"])
    _close(result[name + "write_decay"], ref["decay"])
    _close(result[name + "ssm_states"], ref["states"])
    # the write is the outer product of its factors, in the cache's (key_dim, value_dim) layout
    value, key = result[name + "write_value"], result[name + "write_key"]
    _close(result[name + "state_write"], key[..., :, None] * value[..., None, :], 1e-6)
    heads, key_dim, value_dim = _backend(family).layers[LAYER].state_shape
    assert result[name + "state_write"].shape == (2, 9, heads, key_dim, value_dim)


def _brute_attention(ref: dict[str, Any]) -> torch.Tensor:
    """A[t, s] = β_s q_tᵀ (Π_{r=s+1..t} M_r) k_s with the transitions as explicit matrices."""
    q, k, beta, g = ref["q"], ref["k"], ref["beta"], ref["g"]
    b, t, heads, dk = k.shape
    eye = torch.eye(dk)
    out = torch.zeros(b, heads, t, t)
    for s in range(t):
        carried = k[:, s, :, :, None] * beta[:, s, :, None, None]  # (b, h, dk, 1)
        for i in range(s, t):
            if i > s:
                decay = g[:, i].exp()
                diag = torch.diag_embed(
                    decay if decay.dim() == 3 else decay[..., None].expand(-1, -1, dk)
                )
                erase = eye - beta[:, i, :, None, None] * k[:, i, :, :, None] * k[:, i, :, None, :]
                step = erase @ diag if ref["erase"] else diag
                carried = step @ carried
            out[:, :, i, s] = (q[:, i, :, :, None] * carried).sum((-2, -1))
    return out


@pytest.mark.parametrize("family", _families())
def test_effective_attention_reproduces_the_mixer(family: str) -> None:
    ids = random_ids(2, 8, seed=5)
    result = _backend(family).run(ids, capture=_sites("effective_attention", "mixer"))
    attn = result[f"layer_{LAYER}.effective_attention"]
    io = _mixer_io(family, ids)
    ref = _unroll(family, io["input"])
    heads = _backend(family).layers[LAYER].state_shape[0]
    assert attn.shape == (2, heads, 8, 8)
    assert bool((attn.triu(1) == 0).all())  # causal
    read = torch.einsum("bhts,bshv->bthv", attn, ref["v"])
    _close(read.reshape(io["norm_args"][0].shape), io["norm_args"][0])  # the model's read-out
    _close(_finish(family, read, io), result[f"layer_{LAYER}.mixer"])
    _close(attn, _brute_attention(ref))  # the products of the transitions, one by one


@pytest.mark.parametrize("family", _families())
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
    name = f"layer_{LAYER}."
    for role in ("state_write", "ssm_states"):
        _close(padded[name + role][1, real], short[name + role][0])
    _close(
        padded[name + "effective_attention"][1][:, real, real],
        short[name + "effective_attention"][0],
    )
    last = 3 if side == "right" else 6
    _close(padded[name + "ssm_states"][1, last], padded[name + "ssm_state"][1])
    _close(padded[name + "ssm_state"][1], short[name + "ssm_state"][0])
    # the hand-written unroll of the padded batch agrees as well (the mask the layer received)
    io = _mixer_io(family, batch["input_ids"], batch["attention_mask"])
    ref = _unroll(family, io["input"], io["mask"])
    _close(padded[name + "ssm_states"][1, real], ref["states"][1, real])


@pytest.mark.parametrize("family", _families())
@pytest.mark.parametrize("role", ["state_write", "write_value", "write_key"])
def test_editing_a_write_to_its_own_value_changes_nothing(family: str, role: str) -> None:
    backend = _backend(family)
    ids = random_ids(2, 7)
    name = f"layer_{LAYER}.{role}"
    last = f"layer_{len(backend.layers) - 1}.residual"
    clean = backend.run(ids, capture=[name, "logits", last])
    edit = Edit.replace(name, clean[name][:, [3]], positions=[3])
    edited = backend.run(ids, capture=["logits", last], edits=[edit])
    assert (edited.logits - clean.logits).abs().max().item() == 0.0
    assert torch.equal(edited[last], clean[last])


@pytest.mark.parametrize("family", _families())
def test_deleting_a_write_changes_only_later_positions_as_the_unroll_says(family: str) -> None:
    backend = _backend(family)
    ids = random_ids(2, 7)
    name, drop = f"layer_{LAYER}.state_write", 3
    sites = [f"layer_{LAYER}.mixer", f"layer_{LAYER}.ssm_state", "logits"]
    clean = backend.run(ids, capture=sites)
    deleted = backend.run(ids, capture=sites, edits=[Edit.scale(name, 0.0, positions=[drop])])
    assert torch.equal(deleted.logits[:, :drop], clean.logits[:, :drop])
    assert (deleted.logits[:, drop:] - clean.logits[:, drop:]).abs().amax(-1).min() > 1e-6
    io = _mixer_io(family, ids)
    ref = _unroll(family, io["input"], drop=drop)  # the rest of the recurrence, by hand
    _close(deleted[f"layer_{LAYER}.mixer"], _finish(family, ref["read"], io))
    _close(deleted[f"layer_{LAYER}.ssm_state"], ref["states"][:, -1])


def test_an_edited_key_is_carried_by_the_runs_transitions() -> None:
    """Replacing one position's key changes its write only: the erase at that position keeps
    the run's key (it is part of the transition)."""
    family = "qwen3_5_text"
    backend = _backend(family)
    ids = random_ids(1, 6)
    io = _mixer_io(family, ids)
    ref = _unroll(family, io["input"])
    new_key = torch.nn.functional.normalize(torch.randn(1, 1, *ref["key"].shape[2:]), dim=-1)
    edit = Edit.replace(f"layer_{LAYER}.write_key", new_key, positions=[2])
    edited = backend.run(ids, capture=_sites("ssm_states", "mixer"), edits=[edit])
    write = ref["write"].clone()
    write[:, 2] = new_key[:, 0, :, :, None] * ref["value"][:, 2, :, None, :]
    states, read = delta_rule_scan(ref["q"], ref["k"], ref["beta"], ref["g"], write)
    _close(edited[f"layer_{LAYER}.ssm_states"], states)
    _close(edited[f"layer_{LAYER}.mixer"], _finish(family, read, io))


def _needs(*families: str) -> None:
    """Skip (with the release each needs) where the installed transformers lacks a family."""
    reasons = [reason for reason in map(missing, families) if reason]
    if reasons:
        pytest.skip("; ".join(reasons))


def test_write_sites_are_refused_where_they_cannot_be_computed() -> None:
    _needs("qwen3_5_linear")
    backend = _backend("qwen3_5_linear")
    ids = random_ids(1, 6)
    state = backend.run(ids[:, :3], return_state=True).state
    with pytest.raises(BackendError, match="continued from initial_state"):
        backend.run(ids[:, 3:], capture=_sites("state_write"), initial_state=state)
    with pytest.raises((SiteError, BackendError), match="read-only"):
        backend.run(ids, edits=[Edit.scale(f"layer_{LAYER}.write_decay", 0.5)])
    with pytest.raises(SiteError, match="shape"):
        backend.run(ids, edits=[Edit.replace(f"layer_{LAYER}.state_write", torch.ones(3))])
    with pytest.raises(SiteError, match="read-only"):  # states are set with initial_state=
        backend.run(ids, edits=[Edit.scale(f"layer_{LAYER}.ssm_state", 0.5)])


def test_no_hook_stays_and_only_matrix_state_mixers_declare_write_sites() -> None:
    family = "qwen3_next"
    _needs(family, "lfm2", "kimi_linear")
    backend = _backend(family)
    model = _model(family)
    before = hook_ids(model)
    backend.run(
        random_ids(1, 5),
        capture=_sites("state_write", "effective_attention"),
        edits=[Edit.scale(f"layer_{LAYER}.write_value", 2.0, positions=[1])],
    )
    assert hook_ids(model) == before
    info = backend.sites()[f"layer_{LAYER}.state_write"]
    assert info.kind == "token" and info.writable
    assert info.shape == ("batch", "seq", "heads", "key_dim", "value_dim")
    assert not backend.sites()[f"layer_{LAYER}.effective_attention"].writable
    assert "layer_1.state_write" not in backend.sites()  # an attention layer
    lfm = Backend.for_model(make_model("lfm2"))  # short convolutions: no matrix state
    assert not any(n.endswith(".state_write") for n in lfm.sites())
    assert _backend("kimi_linear").sites()[f"layer_{LAYER}.write_decay"].shape == (
        "batch",
        "seq",
        "heads",
        "key_dim",
    )


def test_the_public_helpers_agree_with_each_other_and_with_the_products() -> None:
    """`delta_rule_attention` (one decay per head or per key channel, with or without the
    erase) applied to the values equals reading `delta_rule_scan`'s states, and equals the
    products of the transitions; `delta_rule_states` equals `delta_rule_scan`'s states; `decayed_scores` equals its definition, past block edges."""
    gen = torch.Generator().manual_seed(0)
    b, t, h, dk, dv = 2, 11, 3, 4, 5
    q = torch.randn(b, t, h, dk, generator=gen)
    k = F.normalize(torch.randn(b, t, h, dk, generator=gen), dim=-1)
    v = torch.randn(b, t, h, dv, generator=gen)
    beta = torch.rand(b, t, h, generator=gen)
    for g in (-torch.rand(b, t, h, generator=gen), -torch.rand(b, t, h, dk, generator=gen)):
        for erase in (True, False):
            write = k[..., :, None] * (beta[..., None] * v)[..., None, :]
            states, read = delta_rule_scan(q, k, beta, g, write, erase=erase)
            # in chunks (here of 4 positions) as one step at a time
            _close(delta_rule_states(k, v, beta, g, erase=erase, chunk=4), states, 1e-5)
            attention = delta_rule_attention(q, k, beta, g, erase=erase)
            _close(torch.einsum("bhts,bshv->bthv", attention, v), read, 1e-5)
            ref = dict(q=q, k=k, beta=beta, g=g, erase=erase)
            _close(attention, _brute_attention(ref), 1e-5)
    g = -torch.rand(b, t, h, dk, generator=gen)
    cum = torch.cumsum(g, 1).transpose(1, 2)
    qh, kh = q.transpose(1, 2), k.transpose(1, 2)
    explicit = torch.einsum(
        "bhtc,bhsc,bhtsc->bhts", qh, kh, torch.exp(cum[:, :, :, None] - cum[:, :, None])
    ).tril()
    _close(decayed_scores(qh, kh, cum, block=4), explicit, 1e-5)


@pytest.mark.parametrize("family", _families(("qwen3_next", "kimi_linear")))
def test_write_sites_carry_gradients(family: str) -> None:
    backend = _backend(family)
    sites = _sites("state_write", "effective_attention", "ssm_states")
    result = backend.run(random_ids(1, 5), capture=sites, grad=True)
    total = sum(result[n].sum() for n in sites)
    total.backward()  # through the mixer's own projections
    mixer = _mixer(family)
    weight = mixer.in_proj_qkvz.weight if family == "qwen3_next" else mixer.k_proj.weight
    assert weight.grad is not None and weight.grad.abs().sum() > 0
    _model(family).zero_grad(set_to_none=True)


@pytest.mark.parametrize(
    "family", _families(("qwen3_next", "qwen3_5_text", "olmo_hybrid", "kimi_linear", "minimax"))
)
def test_the_kernels_arguments_give_the_recomputed_sites(
    family: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the mixer calls its chunked kernel through a module, the sites are read from the
    kernel's arguments (no convolution recomputed); they equal the sites recomputed from the
    projections, the kernel's hook goes with the run, and the model's output is untouched."""
    from archscope_hybrid import writes

    backend = _backend(family)
    mixer = _mixer(family)
    variant = writes.variant_of(mixer)
    kernel = writes.kernel_of(mixer, variant)
    if family != "minimax" and transformers_release() >= (5, 25):
        assert kernel is not None  # from 5.25 transformers calls these kernels through modules
    hooks = 0 if kernel is None else len(kernel._forward_hooks)
    batch = padded_batch(random_ids(2, 9), [9, 6], "right")
    sites = _sites("write_value", "write_key", "write_decay", "ssm_states", "mixer")
    recomputing = writes._parts
    calls: list[str] = []

    def counted(*args: Any) -> Any:
        calls.append(args[0])
        return recomputing(*args)

    monkeypatch.setattr(writes, "_parts", counted)
    with_kernel = backend.run(batch, capture=[*sites, "logits"])
    assert kernel is None or len(kernel._forward_hooks) == hooks
    assert calls == ([] if kernel is not None else [variant])  # with a kernel: none recomputed
    plain = backend.run(batch, capture=["logits"])
    monkeypatch.setattr(writes, "READ_KERNEL_ARGUMENTS", False)
    recomputed = backend.run(batch, capture=sites)
    for name in sites:
        _close(with_kernel[name], recomputed[name], 1e-6)
    assert torch.equal(with_kernel["logits"], plain["logits"])


@pytest.mark.parametrize("chunk", [1, 5, 16])
@pytest.mark.parametrize("per_channel", [False, True])
def test_the_chunked_states_equal_the_step_by_step_scan_from_a_state(
    chunk: int, per_channel: bool
) -> None:
    """`delta_rule_states` from an initial state, with mild and strong decays (a chunk spanning
    far more than e⁻⁶⁰ takes the explicit per-channel products), with and without the erase,
    equals `delta_rule_scan`; with gradients enabled it is differentiable and equal."""
    gen = torch.Generator().manual_seed(chunk)
    b, t, h, dk, dv = 2, 23, 3, 4, 5
    q = torch.randn(b, t, h, dk, generator=gen)
    k = F.normalize(torch.randn(b, t, h, dk, generator=gen), dim=-1)
    v = torch.randn(b, t, h, dv, generator=gen)
    beta = torch.rand(b, t, h, generator=gen)
    initial = torch.randn(b, h, dk, dv, generator=gen)
    shape = (b, t, h, dk) if per_channel else (b, t, h)
    for strength in (0.5, 40.0):
        g = -torch.rand(shape, generator=gen) * strength
        for erase in (True, False):
            write = k[..., :, None] * (beta[..., None] * v)[..., None, :]
            expected, _ = delta_rule_scan(q, k, beta, g, write, initial=initial, erase=erase)
            got = delta_rule_states(k, v, beta, g, erase=erase, chunk=chunk, initial=initial)
            _close(got, expected, 1e-5)
    tracked = v.clone().requires_grad_()
    states = delta_rule_states(k, tracked, beta, g, chunk=chunk, initial=initial)
    _close(
        states.detach(),
        delta_rule_scan(
            q, k, beta, g, k[..., :, None] * (beta[..., None] * v)[..., None, :], initial=initial
        )[0],
        1e-5,
    )
    states.sum().backward()
    assert tracked.grad is not None and bool(tracked.grad.abs().sum() > 0)


def test_delta_rule_states_refuses_a_bad_chunk_or_initial_state() -> None:
    """A chunk below one position and an initial state that is not (batch, heads, d_key,
    d_value) (or broadcastable to it) are refused with a ParameterError naming what was given
    and what is valid; a broadcastable initial state gives the expanded one's states."""
    gen = torch.Generator().manual_seed(0)
    b, t, h, dk, dv = 2, 5, 3, 4, 6
    k = F.normalize(torch.randn(b, t, h, dk, generator=gen), dim=-1)
    v = torch.randn(b, t, h, dv, generator=gen)
    beta = torch.rand(b, t, h, generator=gen)
    g = -torch.rand(b, t, h, generator=gen)
    for chunk in (0, -3, 2.0, True):
        with pytest.raises(ParameterError, match=rf"chunk must be a positive int.*{chunk!r}"):
            delta_rule_states(k, v, beta, g, chunk=chunk)  # type: ignore[arg-type]
    for shape in [(b, h, dv, dk), (b, h, dk), (3, h, dk, dv), (1, b, h, dk, dv)]:
        with pytest.raises(ParameterError, match=r"initial has shape .*valid: .*\(2, 3, 4, 6\)"):
            delta_rule_states(k, v, beta, g, initial=torch.zeros(shape))
    shared = torch.randn(1, h, dk, dv, generator=gen)
    assert torch.equal(
        delta_rule_states(k, v, beta, g, initial=shared),
        delta_rule_states(k, v, beta, g, initial=shared.expand(b, h, dk, dv).clone()),
    )
