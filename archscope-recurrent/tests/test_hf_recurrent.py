"""RWKV and xLSTM backends against forward hooks registered here and the models' own state."""

from __future__ import annotations

import pytest
import torch

from archscope import Edit, SiteError
from archscope.backends import BackendError
from archscope.testing import hook_ids
from archscope_recurrent.hf import RWKVBackend, XLSTMBackend
from archscope_recurrent.testing import tiny_rwkv, tiny_xlstm, token_batch

FAMILIES = {
    "rwkv": (tiny_rwkv, RWKVBackend, "rwkv.blocks", "attention", "feed_forward"),
    "xlstm": (tiny_xlstm, XLSTMBackend, "backbone.blocks", "mlstm_layer", "ffn"),
}


def hook_capture(model, blocks_path, mixer, mlp, ids):
    """Block, mixer and MLP outputs captured by forward hooks registered here."""
    blocks = model.get_submodule(blocks_path)
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for i, block in enumerate(blocks):
        for role, module in (
            ("residual", block),
            ("mixer", getattr(block, mixer)),
            ("mlp", getattr(block, mlp)),
        ):

            def hook(_m, _a, out, key=f"layer_{i}.{role}"):
                seen[key] = (out[0] if isinstance(out, tuple) else out).detach().clone()

            handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            output = model(ids, use_cache=True)
    finally:
        for h in handles:
            h.remove()
    return seen, output


@pytest.mark.parametrize("family", FAMILIES)
def test_sub_layer_sites_equal_an_independent_hook_capture(family):
    make, backend_cls, blocks, mixer, mlp = FAMILIES[family]
    model = make()
    ids = token_batch(2, 6)["input_ids"]
    reference, output = hook_capture(model, blocks, mixer, mlp, ids)
    backend = backend_cls(model)
    result = backend.run(ids, capture=[*reference, "logits"])
    for name, value in reference.items():
        torch.testing.assert_close(result[name], value, atol=0, rtol=0, msg=name)
    torch.testing.assert_close(result.logits, output.logits, atol=0, rtol=0)
    torch.testing.assert_close(
        backend.unembed(result["layer_1.residual"]), output.logits, atol=1e-5, rtol=0
    )


def test_rwkv_state_sites_are_slices_of_the_model_state():
    model = tiny_rwkv()
    ids = token_batch(2, 6)["input_ids"]
    with torch.no_grad():
        state = model(ids, use_cache=True).state
    backend = RWKVBackend(model)
    names = [n for n, i in backend.sites().items() if i.kind == "state"]
    assert len(names) == 6 * 2  # five tensors and their concatenation, per layer
    result = backend.run(ids, capture=names)
    roles = [
        "ffn_shift_state",
        "attn_shift_state",
        "wkv_num_state",
        "wkv_den_state",
        "wkv_max_state",
    ]
    for k, role in enumerate(roles):
        for layer in range(2):
            torch.testing.assert_close(
                result[f"layer_{layer}.{role}"], state[k][:, :, layer], atol=0, rtol=0
            )
    combined = torch.cat([state[k][:, :, 1].float() for k in range(5)], -1)
    torch.testing.assert_close(result["layer_1.state"], combined, atol=0, rtol=0)
    with pytest.raises(SiteError, match="read-only"):
        backend.run(ids, edits=[Edit.add("layer_1.state", 1.0)])
    with pytest.raises(SiteError, match="not state sites"):
        backend.run(ids, initial_state={"layer_1.state": combined})


def test_xlstm_state_sites_are_the_cache_rnn_state():
    model = tiny_xlstm()
    ids = token_batch(2, 6)["input_ids"]
    with torch.no_grad():
        out = model(ids, use_cache=True)
    cache = out.cache if hasattr(out, "cache") else out.cache_params  # renamed within 5.x
    backend = XLSTMBackend(model)
    result = backend.run(ids, capture=["layer_1.c_state", "layer_1.n_state", "layer_1.m_state"])
    for k, role in enumerate(("c", "n", "m")):
        torch.testing.assert_close(
            result[f"layer_1.{role}_state"], cache.rnn_state[1][k], atol=0, rtol=0
        )
    assert backend.sites()["layer_0.c_state"].shape == ("batch", "head", "d_qk", "d_v")


@pytest.mark.parametrize("family", FAMILIES)
def test_initial_state_continues_like_the_models_own_cache(family):
    make, backend_cls, *_ = FAMILIES[family]
    model = make()
    ids = token_batch(2, 8)["input_ids"]
    backend = backend_cls(model)
    prefix = backend.run(ids[:, :5], return_state=True)
    suffix = backend.run(ids[:, 5:], capture=["logits"], initial_state=prefix.state)
    with torch.no_grad():
        own = model(ids[:, :5], use_cache=True)
        # xLSTM's cache keyword and output field are cache_params before transformers 5.24
        key = "state" if family == "rwkv" else "cache" if hasattr(own, "cache") else "cache_params"
        cont = model(ids[:, 5:], use_cache=True, **{key: getattr(own, key)})
        full = model(ids)
    torch.testing.assert_close(suffix.logits, cont.logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(suffix.logits, full.logits[:, 5:], atol=1e-5, rtol=0)
    # a swapped-in state changes what follows
    swapped = backend.state_patch(ids[:, :5], ids[:, :5].flip(0), ids[:, 5:])
    assert (swapped.logits - suffix.logits).abs().max() > 1e-4


def test_rwkv_runs_without_rescaling_and_restores_the_model():
    model = tiny_rwkv(num_layers=3, rescale_every=1)
    ids = token_batch(2, 5)["input_ids"]
    with torch.no_grad():
        model(ids)  # eval-mode forward divides the output weights (rescale_every=1)
    assert model.rwkv.layers_are_rescaled
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        own_logits = model(ids).logits
    unscaled = tiny_rwkv(num_layers=3, rescale_every=0)  # same seed: same weights, no rescaling
    reference, output = hook_capture(unscaled, "rwkv.blocks", "attention", "feed_forward", ids)

    backend = RWKVBackend(model)
    result = backend.run(ids, capture=["layer_2.residual", "layer_1.residual", "logits"])
    torch.testing.assert_close(
        result["layer_2.residual"], reference["layer_2.residual"], atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(result.logits, output.logits, atol=1e-5, rtol=1e-5)
    assert model.config.rescale_every == 1 and model.rwkv.layers_are_rescaled
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, own_logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_padding_rules(family):
    make, backend_cls, *_ = FAMILIES[family]
    backend = backend_cls(make())
    batch = token_batch(2, 6, lengths=[6, 4])
    right = backend.run(batch, capture=["layer_1.residual"])
    alone = backend.run(batch["input_ids"][1:, :4], capture=["layer_1.residual"])
    torch.testing.assert_close(
        right["layer_1.residual"][1:, :4], alone["layer_1.residual"], atol=1e-6, rtol=0
    )
    states = [n for n, i in backend.sites().items() if i.kind == "state"]
    ragged = backend.run(batch, capture=states, return_state=True)
    for row, n in enumerate([6, 4]):
        own = backend.run(batch["input_ids"][row : row + 1, :n], capture=states)
        for name in states:
            torch.testing.assert_close(ragged[name][row : row + 1], own[name], atol=1e-5, rtol=0)
            if not name.endswith(".state"):  # the concatenation is not part of the state
                torch.testing.assert_close(ragged.state[name], ragged[name], atol=0, rtol=0)
    with pytest.raises(BackendError, match="cannot apply edits of token sites.*lengths \\[4, 6\\]"):
        backend.run(batch, capture=states[:1], edits=[Edit.add("layer_0.residual", 1.0)])
    left = dict(batch, attention_mask=batch["attention_mask"].flip(-1))
    with pytest.raises(
        BackendError, match=f"{family} ignores attention_mask.*right padding only.*left-padded"
    ):
        backend.run(left, capture=["layer_0.residual"])


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_edit_leaves_logits_bit_identical_and_hooks_are_removed(family):
    make, backend_cls, *_ = FAMILIES[family]
    model = make()
    backend = backend_cls(model)
    ids = token_batch(2, 5)["input_ids"]
    plain = backend.run(ids, capture=["logits"])
    hooks = hook_ids(model)
    edited = backend.run(
        ids,
        capture=["logits"],
        edits=[Edit.add("layer_0.mixer", 0.0), Edit.scale("layer_1.residual", 1.0)],
    )
    assert torch.equal(plain.logits, edited.logits)
    steered = backend.run(ids, capture=["logits"], edits=[Edit.add("layer_0.residual", 1.0)])
    assert not torch.equal(plain.logits, steered.logits)
    with pytest.raises(SiteError, match="does not fit"):
        backend.run(ids, edits=[Edit.replace("layer_0.mlp", torch.zeros(3))])
    assert hook_ids(model) == hooks


def test_xlstm_logits_are_read_only_and_bad_state_is_refused():
    backend = XLSTMBackend(tiny_xlstm())
    ids = token_batch(1, 4)["input_ids"]
    with pytest.raises(SiteError, match="read-only"):
        backend.run(ids, edits=[Edit.add("logits", 1.0)])
    plain = backend.run(ids, return_state=True)
    edited = backend.run(
        ids,
        capture=["layer_0.n_state"],
        return_state=True,
        edits=[Edit.scale("layer_0.n_state", 2.0)],
    )
    torch.testing.assert_close(edited["layer_0.n_state"], 2 * plain.state["layer_0.n_state"])
    torch.testing.assert_close(edited.state["layer_0.n_state"], edited["layer_0.n_state"])
    assert torch.equal(edited.logits, plain.logits)  # the state after the last token
    with pytest.raises(SiteError, match=r"initial_state\['layer_0.m_state'\] must have shape"):
        backend.run(ids, initial_state={"layer_0.m_state": torch.zeros(1, 4)})
