"""Behaviour of the `mamba` backend beyond the conformance kit: HF layouts, hybrid layers,
state shapes, padding, state patching and its errors."""

from __future__ import annotations

import functools
import warnings
from typing import Any

import pytest
import torch
import transformers
from packaging.version import Version

from archscope import Backend, BackendError, Edit, SiteError
from archscope.testing import hook_ids, padded_batch
from archscope_mamba.backend import MambaBackend
from archscope_mamba.testing import (
    HF_FAMILIES,
    HYBRID_FAMILIES,
    PURE_SSM_FAMILIES,
    make_model,
    random_ids,
    stepped_states,
)

warnings.filterwarnings("ignore", message=".*falling back to its reference PyTorch.*")
ATOL = 1e-5


@functools.cache
def _model(family: str) -> Any:
    return make_model(family)


def _backend(family: str) -> MambaBackend:
    backend = Backend.for_model(_model(family))  # entry-point discovery, no hint
    assert isinstance(backend, MambaBackend)
    return backend


def _close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL) -> bool:
    return a.shape == b.shape and torch.allclose(a.float(), b.float(), atol=atol, rtol=0)


# -- layout ---------------------------------------------------------------------------------------
def _hf_starts_with_embedding(family: str) -> bool:
    """Hugging Face's own layout of `hidden_states` for the pure SSMs, by release: Mamba and
    Falcon-Mamba have no embedding entry (checked on transformers 5.6-5.25); Mamba-2 had none up
    to 5.24 and starts with the embedding from 5.25 on (FACTS.md)."""
    if family == "mamba2":
        return Version(transformers.__version__) >= Version("5.25")
    return False


def _block_outputs(model: Any, backend: MambaBackend, ids: torch.Tensor) -> list[torch.Tensor]:
    """Each block's raw output, read with plain forward hooks (independent of the backend)."""
    seen: list[torch.Tensor] = []
    blocks = [model.get_submodule(path) for path in _block_paths(model, backend.n_layers)]
    handles = [
        block.register_forward_hook(
            lambda _m, _i, out: seen.append((out[0] if isinstance(out, tuple) else out).detach())
        )
        for block in blocks
    ]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _block_paths(model: Any, n: int) -> list[str]:
    for prefix in ("backbone.layers", "model.layers"):
        try:
            model.get_submodule(f"{prefix}.0")
        except AttributeError:
            continue
        return [f"{prefix}.{i}" for i in range(n)]
    raise AssertionError("no block list found")


@pytest.mark.parametrize("family", PURE_SSM_FAMILIES)
def test_pure_ssm_residuals_equal_block_outputs_and_hf_hidden_states(family: str) -> None:
    model, backend = _model(family), _backend(family)
    ids = random_ids(2, 7)
    n = backend.n_layers
    result = backend.run(
        ids, capture=[*(f"layer_{i}.residual" for i in range(n)), "embed", "final_norm"]
    )
    blocks = _block_outputs(model, backend, ids)
    for i in range(n):  # the raw output of block i, whatever the HF layout
        assert _close(result[f"layer_{i}.residual"], blocks[i])
    hs = model(ids, output_hidden_states=True).hidden_states
    assert len(hs) == n + 1
    assert _close(result["final_norm"], hs[n])  # the last entry is after the final norm
    if _hf_starts_with_embedding(family):
        assert _close(result["embed"], hs[0])
        for i in range(n - 1):
            assert _close(result[f"layer_{i}.residual"], hs[i + 1])
    else:
        assert not _close(result["embed"], hs[0])
        for i in range(n):  # hidden_states[i] is the output of block i
            assert _close(result[f"layer_{i}.residual"], hs[i])


@pytest.mark.parametrize("family", HYBRID_FAMILIES)
def test_hybrid_hidden_states_start_with_the_embedding(family: str) -> None:
    model, backend = _model(family), _backend(family)
    ids = random_ids(2, 7)
    hs = model(ids, output_hidden_states=True).hidden_states
    n = backend.n_layers
    result = backend.run(
        ids, capture=[*(f"layer_{i}.residual" for i in range(n)), "embed", "final_norm"]
    )
    assert _close(result["embed"], hs[0])
    for i in range(n - 1):
        assert _close(result[f"layer_{i}.residual"], hs[i + 1])
    assert _close(result["final_norm"], hs[n])  # the last entry is after the final norm


def _roles(backend: MambaBackend, layer: int) -> set[str]:
    return {i.site.role for i in backend.sites().values() if i.site.layer == layer}


def test_each_hybrid_layer_exposes_only_the_sites_it_has() -> None:
    state = {"ssm_state", "conv_state"}
    jamba = _backend("jamba")  # mamba, attention, mamba, attention
    assert _roles(jamba, 0) == {"mixer", "mlp", "residual"} | state
    assert _roles(jamba, 1) == {"attn", "mlp", "residual"}
    nemotron = _backend("nemotron_h")  # mamba, attention, mlp, mamba
    assert _roles(nemotron, 0) == {"mixer", "residual"} | state
    assert _roles(nemotron, 1) == {"attn", "residual"}
    assert _roles(nemotron, 2) == {"mlp", "residual"}
    falcon = _backend("falcon_h1")  # attention and SSM side by side in every layer
    assert _roles(falcon, 0) == {"attn", "mixer", "mlp", "residual"} | state
    zamba = _backend("zamba2")  # mamba, hybrid (shared transformer + mamba), ...
    assert _roles(zamba, 0) == {"mixer", "residual"} | state
    assert _roles(zamba, 1) == {"attn", "mixer", "residual"} | state
    granite = _backend("granitemoehybrid")  # MoE + shared MLP are summed: no single mlp site
    assert _roles(granite, 1) == {"attn", "residual"}
    with pytest.raises(SiteError, match="layer_1.mixer"):
        jamba.run(random_ids(1, 4), capture=["layer_1.mixer"])


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_state_shapes(family: str) -> None:
    backend = _backend(family)
    sites = backend.sites()
    state_sites = [n for n, i in sites.items() if i.kind == "state"]
    result = backend.run(random_ids(3, 5), capture=state_sites)
    for name in state_sites:
        layer = backend.layers[sites[name].site.layer]
        mixer = layer.block.get_submodule(layer.ssm)
        value = result[name]
        if name.endswith("conv_state"):
            assert value.shape == (3, mixer.conv1d.in_channels, mixer.conv1d.kernel_size[0])
        elif mixer.A_log.dim() == 2:  # Mamba: (batch, d_inner, d_state)
            assert value.shape == (3, *mixer.A_log.shape)
            assert sites[name].shape == ("batch", "d_inner", "d_state")
        else:  # Mamba-2: (batch, heads, head_dim, d_state)
            assert value.shape == (3, mixer.num_heads, mixer.head_dim, mixer.ssm_state_size)
            assert sites[name].shape == ("batch", "heads", "head_dim", "d_state")


# -- padding --------------------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("family", ["mamba", "mamba2", "jamba", "bamba"])
def test_padded_row_state_equals_the_unpadded_state(family: str, side: str) -> None:
    model, backend = _model(family), _backend(family)
    ids = random_ids(2, 10, seed=4)
    batch = padded_batch(ids, [10, 6], side)
    names = [n for n, i in backend.sites().items() if i.kind == "state"] + ["layer_0.residual"]
    padded = backend.run(batch, capture=names)
    real = batch["attention_mask"][1].bool()
    alone_ids = batch["input_ids"][1:, real]
    alone = backend.run(alone_ids, capture=names)
    reference = stepped_states(model, family, alone_ids)
    for name in names:
        if name.endswith("state"):
            assert _close(padded[name][1:], alone[name]), name
            assert _close(padded[name][1:], reference[name]), name
        else:  # token sites at real positions are unchanged by padding
            assert _close(padded[name][1:, real], alone[name]), name
    full = backend.run(ids[:1], capture=names)  # the unpadded row is untouched
    for name in names:
        assert _close(padded[name][:1], full[name]), name


def test_right_padding_without_handling_would_give_a_wrong_state() -> None:
    """The plain HF forward keeps updating the state over right pads; the backend must not."""
    model, backend = _model("mamba"), _backend("mamba")
    batch = padded_batch(random_ids(2, 10, seed=4), [10, 6], "right")
    out = model(**batch, use_cache=True)
    cache = out.cache if hasattr(out, "cache") else out.cache_params  # renamed within 5.x
    naive = cache.layers[0].recurrent_states[0][1]
    fixed = backend.run(batch, capture=["layer_0.ssm_state"])["layer_0.ssm_state"][1]
    alone = backend.run(batch["input_ids"][1:, :6], capture=["layer_0.ssm_state"])
    assert _close(fixed, alone["layer_0.ssm_state"][0])
    assert (naive - fixed).abs().max() > 1e-3


@pytest.mark.parametrize("positions", [[1], "last", None])
def test_edits_land_on_the_same_tokens_when_states_force_left_padding(positions: Any) -> None:
    backend = _backend("mamba2")
    batch = padded_batch(random_ids(2, 8, seed=6), [8, 5], "right")
    vector = torch.randn(backend.d_model)
    edits = [Edit.add("layer_0.residual", vector, positions=positions)]
    tokens_only = backend.run(batch, capture=["layer_2.residual", "logits"], edits=edits)
    with_state = backend.run(
        batch, capture=["layer_2.residual", "logits", "layer_2.ssm_state"], edits=edits
    )
    mask = batch["attention_mask"].bool()
    assert _close(with_state["layer_2.residual"][mask], tokens_only["layer_2.residual"][mask])
    assert _close(with_state.logits[mask], tokens_only.logits[mask])
    row = batch["input_ids"][1:, :5]
    one_edit = [Edit.add("layer_0.residual", vector, positions=positions)]
    alone = backend.run(row, capture=["layer_2.ssm_state"], edits=one_edit)
    assert _close(with_state["layer_2.ssm_state"][1:], alone["layer_2.ssm_state"])


def test_mixed_padding_is_refused_for_states() -> None:
    backend = _backend("mamba")
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 0]])
    with pytest.raises(BackendError, match="not all padded on one side"):
        backend.run(
            {"input_ids": random_ids(2, 4), "attention_mask": mask}, capture=["layer_0.ssm_state"]
        )


# -- state patching -------------------------------------------------------------------------------
STATE_PATCH_FAMILIES = (*PURE_SSM_FAMILIES, "native")


def _join(*parts: torch.Tensor) -> torch.Tensor:
    return torch.cat(parts, dim=1)


@pytest.mark.parametrize("family", STATE_PATCH_FAMILIES)
def test_swapping_every_state_continues_the_source_prompt(family: str) -> None:
    backend = _backend(family)
    a, b, suffix = random_ids(2, 5, seed=11), random_ids(2, 7, seed=12), random_ids(2, 4, seed=13)
    patched = backend.state_patch(a, b, suffix, capture=["layer_1.residual", "layer_1.ssm_state"])
    full = backend.run(
        _join(b, suffix), capture=["layer_1.residual", "logits", "layer_1.ssm_state"]
    )
    assert _close(patched.logits, full.logits[:, 7:])
    assert _close(patched["layer_1.residual"], full["layer_1.residual"][:, 7:])
    assert _close(patched["layer_1.ssm_state"], full["layer_1.ssm_state"])
    own = backend.state_patch(a, a, suffix)
    assert _close(own.logits, backend.run(_join(a, suffix)).logits[:, 5:])
    assert not _close(own.logits, patched.logits, atol=1e-3)


@pytest.mark.parametrize("family", STATE_PATCH_FAMILIES)
def test_swapping_some_states_changes_the_continuation_partially(family: str) -> None:
    backend = _backend(family)
    a, b, suffix = random_ids(2, 6, seed=21), random_ids(2, 6, seed=22), random_ids(2, 3, seed=23)
    none = backend.state_patch(a, a, suffix).logits
    every = backend.state_patch(a, b, suffix).logits
    first = backend.state_patch(a, b, suffix, sites=["layer_0.ssm_state", "layer_0.conv_state"])
    some = first.logits
    assert not _close(some, none, atol=1e-4) and not _close(some, every, atol=1e-4)
    # Layer 0's output depends only on its own state: there the partial swap equals the full one.
    got = backend.state_patch(
        a, b, suffix, sites=["layer_0.ssm_state", "layer_0.conv_state"], capture=["layer_0.mixer"]
    )["layer_0.mixer"]
    want = backend.state_patch(a, b, suffix, capture=["layer_0.mixer"])["layer_0.mixer"]
    assert _close(got, want)


def test_continued_run_applies_edits_at_suffix_positions() -> None:
    backend = _backend("mamba")
    prefix, suffix = random_ids(2, 5, seed=31), random_ids(2, 4, seed=32)
    state = backend.run(prefix, return_state=True).state
    vector = torch.randn(backend.d_model)
    continued = backend.run(
        suffix, initial_state=state, edits=[Edit.add("layer_1.residual", vector, positions=[2])]
    )
    full = backend.run(
        _join(prefix, suffix), edits=[Edit.add("layer_1.residual", vector, positions=[5 + 2])]
    )
    assert _close(continued.logits, full.logits[:, 5:])


def test_return_state_gives_every_state_site_after_the_last_real_token() -> None:
    backend = _backend("mamba2")
    batch = padded_batch(random_ids(2, 9, seed=41), [9, 4], "right")
    state = backend.run(batch, return_state=True).state
    assert state is not None
    assert sorted(state) == sorted(n for n, i in backend.sites().items() if i.kind == "state")
    alone = backend.run(batch["input_ids"][1:, :4], return_state=True).state
    assert all(_close(state[name][1:], alone[name]) for name in state)


def test_initial_state_errors_name_what_is_wrong() -> None:
    backend = _backend("mamba")
    state = backend.run(random_ids(2, 4), return_state=True).state
    suffix = random_ids(2, 3)
    partial = {k: v for k, v in state.items() if not k.startswith("layer_2")}
    with pytest.raises(SiteError, match=r"missing \['layer_2.ssm_state', 'layer_2.conv_state'\]"):
        backend.run(suffix, initial_state=partial)
    with pytest.raises(SiteError, match="not state sites: \\['layer_0.residual'\\]"):
        backend.run(suffix, initial_state={**state, "layer_0.residual": state["layer_0.ssm_state"]})
    with pytest.raises(SiteError, match=r"has shape \(2, 64, 8\); expected \(3, 64, 8\)"):
        backend.run(random_ids(3, 3), initial_state=state)
    with pytest.raises(BackendError, match="only be right-padded"):
        backend.run(padded_batch(random_ids(2, 3), [3, 2], "left"), initial_state=state)
    with pytest.raises(SiteError, match="read-only"):
        backend.run(suffix, edits=[Edit.scale("layer_0.ssm_state", 0.0)])


@pytest.mark.parametrize("family", HYBRID_FAMILIES)
def test_hybrids_read_states_but_do_not_claim_state_patching(family: str) -> None:
    backend = _backend(family)
    assert "recurrent_state" in backend.capabilities
    assert "state_patch" not in backend.capabilities
    assert "state_patch" in MambaBackend.capabilities  # the class serves pure SSM stacks too
    with pytest.raises(BackendError, match="lacks the capability 'state_patch'"):
        backend.run(random_ids(1, 3), return_state=True)


# -- native structure (stand-in) -------------------------------------------------------------------
def test_native_residual_edit_reaches_the_next_block_exactly() -> None:
    backend = _backend("native")
    assert backend.native and backend.padding == "right"
    ids = random_ids(2, 6)
    clean = backend.run(ids, capture=["layer_0.residual", "layer_1.residual"])
    replaced = backend.run(
        ids,
        capture=["layer_1.residual"],
        edits=[Edit.replace("layer_0.residual", clean["layer_0.residual"] * 2.0)],
    )
    blocks = backend.model.backbone.layers
    with torch.no_grad():  # block 1 fed (doubled stream, no separate residual) by hand
        hidden, residual = blocks[1](clean["layer_0.residual"] * 2.0, None)
    assert _close(replaced["layer_1.residual"], hidden + residual)


def test_native_left_padding_and_edited_padded_states_are_refused() -> None:
    backend = _backend("native")
    with pytest.raises((BackendError, ValueError), match="right.*left-padded"):
        backend.run(padded_batch(random_ids(2, 5), [5, 3], "left"), capture=["layer_0.residual"])
    with pytest.raises(BackendError, match="cannot carry edits"):
        backend.run(
            padded_batch(random_ids(2, 5), [5, 3], "right"),
            capture=["layer_0.ssm_state"],
            edits=[Edit.scale("layer_0.residual", 2.0)],
        )


# -- detection ------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", HYBRID_FAMILIES)
def test_hybrids_go_to_this_backend_even_with_a_transformer_backend_installed(family: str) -> None:
    model = _model(family)
    for entry in Backend.registered().items():
        name, cls = entry
        if name != "mamba":
            score = cls.can_handle(model)
            assert score is None or score < MambaBackend.can_handle(model)
    assert Backend.for_model(model).name == "mamba"


def test_non_ssm_stacks_are_explained_when_forced() -> None:
    import transformers

    model = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=50,
            hidden_size=16,
            num_hidden_layers=1,
            intermediate_size=32,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    with pytest.raises(BackendError, match="no block list with an SSM mixer"):
        MambaBackend(model)


def test_a_base_model_without_head_has_no_logits_and_says_why_it_cannot_unembed() -> None:
    base = _model("mamba").backbone  # MambaModel: blocks at .layers, no lm_head
    backend = Backend.for_model(base)
    assert backend.name == "mamba" and "logits" not in backend.sites()
    ids = random_ids(2, 5)
    hs = base(ids, output_hidden_states=True).hidden_states
    assert _close(backend.run(ids, capture=["layer_1.residual"])["layer_1.residual"], hs[1])
    with pytest.raises(BackendError, match="no lm_head"):
        backend.unembed(hs[1])


def test_hooks_are_removed_when_a_continued_run_raises() -> None:
    backend = _backend("mamba")
    model = backend.model
    state = backend.run(random_ids(1, 4), return_state=True).state

    before = hook_ids(model)

    def boom(x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("deliberate failure")

    with pytest.raises(RuntimeError, match="deliberate failure"):
        backend.run(
            random_ids(1, 3),
            initial_state=state,
            capture=["layer_2.residual"],
            edits=[Edit.apply("layer_1.residual", boom)],
        )
    assert hook_ids(model) == before
