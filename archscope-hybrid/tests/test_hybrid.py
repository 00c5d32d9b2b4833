"""Behaviour of the `hybrid` backend beyond the conformance kit: detection, the model's own
hidden states and cache as references, padding, continuing from a state and its refusals."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import warnings
from typing import Any

import pytest
import torch

from archscope import Backend, BackendError, Edit
from archscope.testing import padded_batch
from archscope_hybrid.backend import HybridBackend
from archscope_hybrid.testing import (
    ALL_FAMILIES,
    FAMILIES,
    RECURRENT_FAMILIES,
    cache_states,
    language_model,
    make_model,
    missing,
    random_ids,
)

warnings.filterwarnings("ignore", message=".*falling back to its reference PyTorch.*")
ATOL = 1e-5


def _families(names: tuple[str, ...]) -> list[Any]:
    return [
        pytest.param(f, marks=pytest.mark.skip(reason=missing(f))) if missing(f) else f
        for f in names
    ]


@functools.cache
def _model(family: str) -> Any:
    return make_model(family)


def _backend(family: str) -> HybridBackend:
    backend = Backend.for_model(_model(family))  # entry-point discovery, no hint
    assert isinstance(backend, HybridBackend)
    return backend


def _close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL) -> bool:
    return a.shape == b.shape and torch.allclose(a.float(), b.float(), atol=atol, rtol=0)


def _types(family: str) -> list[str]:
    config = _model(family).config
    return list(getattr(config, "text_config", config).layer_types)


# -- detection and sites ----------------------------------------------------------------------
@pytest.mark.parametrize("family", _families(ALL_FAMILIES))
def test_for_model_picks_the_hybrid_backend_without_a_hint(family: str) -> None:
    backend = _backend(family)
    assert backend.name == "hybrid"
    recurrent = [t != "full_attention" for t in _types(family)]
    assert [layer.recurrent for layer in backend.layers] == recurrent
    assert ("state_patch" in backend.capabilities) == all(recurrent)
    assert ("attention_patterns" in backend.capabilities) == (not all(recurrent))


def test_archscope_info_lists_the_backend() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "archscope.apps.cli", "info", "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0 or not done.stdout.strip():  # the console script, where installed
        done = subprocess.run(
            [str(__import__("shutil").which("archscope")), "info", "--json"],
            capture_output=True,
            text=True,
            check=True,
        )
    backends = {b["name"]: b for b in json.loads(done.stdout)["backends"]}
    assert backends["hybrid"]["distribution"] == "archscope-hybrid"
    assert {"recurrent_state", "residual", "components"} <= set(backends["hybrid"]["capabilities"])


def _roles(backend: HybridBackend, layer: int) -> set[str]:
    return {i.site.role for i in backend.sites().values() if i.site.layer == layer}


@pytest.mark.parametrize("family", _families(FAMILIES))
def test_each_layer_exposes_the_sites_of_its_kind(family: str) -> None:
    backend = _backend(family)
    conv_only = family.startswith("lfm")
    # layers with a matrix state also have the write sites (test_state_writes.py)
    writes = {"state_write", "write_value", "write_key", "write_decay", "ssm_states"}
    writes.add("effective_attention")
    for i, kind in enumerate(_types(family)):
        if kind == "full_attention":
            assert _roles(backend, i) == {"attn", "attn_pattern", "mlp_in", "mlp", "residual"}
        elif family == "minimax":  # lightning attention: a matrix state, no convolution
            assert _roles(backend, i) == {
                "mixer",
                "mlp_in",
                "mlp",
                "residual",
                "ssm_state",
                *writes,
            }
        elif conv_only:
            assert _roles(backend, i) == {"mixer", "mlp_in", "mlp", "residual", "conv_state"}
        else:
            expected = {"mixer", "mlp_in", "mlp", "residual", "ssm_state", "conv_state", *writes}
            assert _roles(backend, i) == expected


@pytest.mark.parametrize("family", _families(ALL_FAMILIES))
def test_state_shapes_follow_the_modules(family: str) -> None:
    backend = _backend(family)
    names = backend.state_sites
    result = backend.run(random_ids(3, 5), capture=names)
    for layer in backend.layers:
        if not layer.recurrent:
            continue
        module = layer.block.get_submodule(layer.mixer)
        if hasattr(module, "slope_rate"):  # lightning attention: (heads, head_dim, head_dim)
            matrix = result[f"layer_{layer.index}.ssm_state"]
            assert matrix.shape == (3, module.num_attention_heads, module.head_dim, module.head_dim)
            continue
        conv = module.conv1d if hasattr(module, "conv1d") else module.conv
        value = result[f"layer_{layer.index}.conv_state"]
        assert value.shape == (3, conv.in_channels, conv.kernel_size[0])
        if hasattr(module, "num_v_heads"):  # gated delta net: (value heads, key dim, value dim)
            matrix = result[f"layer_{layer.index}.ssm_state"]
            assert matrix.shape == (3, module.num_v_heads, module.head_k_dim, module.head_v_dim)
        elif hasattr(module, "conv1d"):  # Kimi delta attention: one head size
            matrix = result[f"layer_{layer.index}.ssm_state"]
            assert matrix.shape == (3, module.num_heads, module.head_dim, module.head_dim)


# -- the model's own outputs as references ----------------------------------------------------
@pytest.mark.parametrize("family", _families(ALL_FAMILIES))
def test_residuals_and_logits_equal_the_models_hidden_states(family: str) -> None:
    model, backend = _model(family), _backend(family)
    ids = random_ids(2, 9)
    n = backend.n_layers
    names = ["embed", *(f"layer_{i}.residual" for i in range(n)), "final_norm", "logits"]
    result = backend.run(ids, capture=names)
    kwargs: dict[str, Any] = {}
    if "full_attention" not in _types(family):
        kwargs["attention_mask"] = {t: None for t in set(_types(family))}
    with torch.no_grad():
        out = model(ids, output_hidden_states=True, use_cache=False, **kwargs)
    hs = out.hidden_states
    assert len(hs) == n + 1
    assert _close(result["embed"], hs[0])
    for i in range(n - 1):
        assert _close(result[f"layer_{i}.residual"], hs[i + 1]), i
    assert _close(result["final_norm"], hs[n])  # the last entry is after the final norm
    assert _close(result.logits, out.logits)
    assert _close(backend.unembed(result[f"layer_{n - 1}.residual"]), out.logits)


@pytest.mark.parametrize("family", _families(FAMILIES))
def test_attention_pattern_equals_the_models_own_eager_attention(family: str) -> None:
    model, backend = _model(family), _backend(family)
    ids = random_ids(2, 6)
    attn = [i for i, t in enumerate(_types(family)) if t == "full_attention"]
    result = backend.run(ids, capture=[f"layer_{i}.attn_pattern" for i in attn])
    seen: dict[int, torch.Tensor] = {}
    blocks = language_model(model).layers
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    handles = [
        blocks[i].self_attn.register_forward_hook(
            lambda _m, _a, out, i=i: seen.__setitem__(i, out[1].detach())
        )
        for i in attn
    ]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for handle in handles:
            handle.remove()
        model.set_attn_implementation(before)
    for i in attn:
        pattern = result[f"layer_{i}.attn_pattern"]
        assert _close(pattern, seen[i])
        assert _close(pattern.sum(-1), torch.ones(pattern.shape[:-1]))
    assert model.config._attn_implementation == before


# -- states after the last real token ---------------------------------------------------------
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("family", _families(ALL_FAMILIES))
def test_padded_row_state_equals_the_models_cache_on_the_unpadded_row(
    family: str, side: str
) -> None:
    model, backend = _model(family), _backend(family)
    ids = random_ids(2, 10, seed=4)
    batch = padded_batch(ids, [10, 6], side)
    names = [*backend.state_sites, "layer_0.residual", "logits"]
    padded = backend.run(batch, capture=names)
    real = batch["attention_mask"][1].bool()
    alone_ids = batch["input_ids"][1:, real]
    reference = cache_states(model, alone_ids)  # the model's own cache, no padding at all
    full_reference = cache_states(model, ids[:1])
    alone = backend.run(alone_ids, capture=names)
    assert set(reference) == set(backend.state_sites)
    for name in backend.state_sites:
        assert _close(padded[name][1:], reference[name]), name
        assert _close(padded[name][:1], full_reference[name]), name
    for name in ("layer_0.residual", "logits"):  # real positions are unchanged by padding
        assert _close(padded[name][1:, real], alone[name]), name


def test_right_padding_would_change_the_state_without_regrouping() -> None:
    """The model's own cache after a right-padded row holds the state after the pads (the
    decay applies at every position): the backend's state is the one after the last real
    token."""
    model, backend = _model("qwen3_next"), _backend("qwen3_next")
    batch = padded_batch(random_ids(2, 10, seed=4), [10, 6], "right")
    naive = cache_states(model, batch["input_ids"], batch["attention_mask"])["layer_0.ssm_state"]
    fixed = backend.run(batch, capture=["layer_0.ssm_state"])["layer_0.ssm_state"]
    alone = cache_states(model, batch["input_ids"][1:, :6])["layer_0.ssm_state"]
    assert _close(fixed[1:], alone)
    assert (naive[1] - fixed[1]).abs().max() > 1e-3


# -- continuing from a state ------------------------------------------------------------------
@pytest.mark.parametrize("family", _families(RECURRENT_FAMILIES))
def test_continuing_from_a_captured_state_reproduces_the_full_run(family: str) -> None:
    backend = _backend(family)
    prefix, suffix = random_ids(2, 6, seed=7), random_ids(2, 5, seed=8)
    whole = torch.cat([prefix, suffix], dim=1)
    names = ["layer_1.residual", "layer_0.mixer", "logits"]
    full = backend.run(whole, capture=names, return_state=True)
    start = backend.run(prefix, return_state=True, stop_early=False).state
    assert start is not None
    continued = backend.run(suffix, capture=names, initial_state=start, return_state=True)
    for name in names:
        assert _close(continued[name], full[name][:, prefix.shape[1] :]), name
    assert full.state is not None and continued.state is not None
    for name, value in full.state.items():
        assert _close(continued.state[name], value), name


@pytest.mark.parametrize("family", _families(RECURRENT_FAMILIES))
def test_state_patching_one_layer_changes_only_what_follows_from_it(family: str) -> None:
    backend = _backend(family)
    a, b, suffix = random_ids(1, 6, seed=11), random_ids(1, 6, seed=12), random_ids(1, 4, seed=13)
    site = "layer_1.conv_state"
    patched = backend.state_patch(a, b, suffix, sites=[site], capture=["layer_0.residual"])
    plain = backend.state_patch(a, a, suffix, capture=["layer_0.residual", "logits"])
    own = backend.run(torch.cat([a, suffix], 1), capture=["layer_0.residual", "logits"])
    # layer 0 does not see layer 1's state; swapping a state for itself changes nothing
    assert _close(patched["layer_0.residual"], own["layer_0.residual"][:, 6:])
    assert _close(plain.logits, own.logits[:, 6:])
    assert not _close(patched.logits, plain.logits)


@pytest.mark.parametrize("family", _families(RECURRENT_FAMILIES))
def test_an_edit_during_a_continued_run_lands_on_its_position(family: str) -> None:
    backend = _backend(family)
    prefix, suffix = random_ids(1, 5, seed=3), random_ids(1, 4, seed=4)
    start = backend.run(prefix, return_state=True, stop_early=False).state
    vector = torch.randn(backend.d_model)
    edit = Edit.add("layer_0.residual", vector, positions=[2])
    whole = torch.cat([prefix, suffix], dim=1)
    full = backend.run(whole, capture=["logits"], edits=[Edit.add(edit.site, vector, [7])])
    continued = backend.run(suffix, capture=["logits"], initial_state=start, edits=[edit])
    assert _close(continued.logits, full.logits[:, 5:])


@pytest.mark.parametrize("family", _families(("qwen3_next", "lfm2", "minimax", "kimi_linear")))
def test_continuing_a_hybrid_with_attention_is_refused_with_the_reason(family: str) -> None:
    backend = _backend(family)
    state = backend.run(random_ids(1, 4), capture=backend.state_sites)
    with pytest.raises(BackendError, match="state_patch"):
        backend.run(random_ids(1, 3), initial_state={n: state[n] for n in backend.state_sites})


@pytest.mark.skipif(missing("lfm2_conv") is not None, reason=str(missing("lfm2_conv")))
def test_a_left_padded_suffix_from_a_state_is_refused() -> None:
    backend = _backend("lfm2_conv")
    start = backend.run(random_ids(2, 4), return_state=True, stop_early=False).state
    batch = padded_batch(random_ids(2, 4), [4, 2], "left")
    with pytest.raises(BackendError, match="left-padded"):
        backend.run(batch, initial_state=start)


@pytest.mark.skipif(missing("lfm2_conv") is not None, reason=str(missing("lfm2_conv")))
def test_a_right_padded_suffix_from_a_state_continues_each_row_at_its_real_tokens() -> None:
    backend = _backend("lfm2_conv")
    prefix, suffix = random_ids(2, 5, seed=1), random_ids(2, 4, seed=2)
    start = backend.run(prefix, return_state=True, stop_early=False).state
    batch = padded_batch(suffix, [4, 2], "right")
    names = ["logits", "layer_1.conv_state"]
    continued = backend.run(batch, initial_state=start, capture=names)
    short = backend.run(torch.cat([prefix[1:], suffix[1:, :2]], dim=1), capture=names)
    assert _close(continued.logits[1:, :2], short.logits[:, 5:])
    assert _close(continued["layer_1.conv_state"][1:], short["layer_1.conv_state"])


@pytest.mark.parametrize("side", ["left", "right"])
def test_a_stack_without_attention_runs_padded_without_filling_a_cache(side: str) -> None:
    """Token sites of an all-recurrent stack need no cache: the padded run equals the model's own
    forward (``use_cache=False``, the 2D mask) on every transformers the package allows; reading a
    state fills one, which older transformers cannot do for such a stack: then a clear error."""
    from archscope.compat import transformers_release
    from archscope_hybrid.backend import CACHE_WITHOUT_ATTENTION

    # below its floor too: the family is checked from transformers 5.25 on only
    model = make_model("qwen3_5_linear", check_floor=False)
    backend = Backend.for_model(model)
    assert isinstance(backend, HybridBackend)
    ids = random_ids(2, 8, seed=6)
    batch = padded_batch(ids, [8, 5], side)
    with torch.no_grad():
        own = model(**batch, use_cache=False).logits
    run = backend.run(batch, capture=["logits", "layer_1.residual"])
    real = batch["attention_mask"].bool()
    assert _close(run["logits"][real], own[real])
    if transformers_release() >= CACHE_WITHOUT_ATTENTION:
        state = backend.run(batch, capture=["layer_0.ssm_state"])["layer_0.ssm_state"]
        assert state.shape[0] == 2
    else:
        cached: list[Any] = []
        model.register_forward_pre_hook(
            lambda _m, _a, kwargs: cached.append(kwargs.get("use_cache")), with_kwargs=True
        )
        for request in ({"capture": ["layer_0.ssm_state"]}, {"return_state": True}):
            with pytest.raises(BackendError, match=r"transformers 5\.\d+\.\d+ cannot fill a cache"):
                backend.run(batch, **request)
        assert True not in cached  # refused before the model is asked to fill a cache
