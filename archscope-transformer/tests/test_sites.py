"""Every site kind equals an independent reference: HF hidden_states, the model's logits and
forward hooks registered by the test itself."""

from __future__ import annotations

import pytest
import torch
from transformer_reference import REFERENCE, TOL, blocks_of, ids_for, model_of, recording

from archscope import Backend, SiteError
from archscope_transformer.backend import TransformerBackend
from archscope_transformer.testing import tiny_model

ALL_ROLES = ("residual", "attn", "mlp", "mlp_hidden")


def _all_sites(n_layers: int) -> list[str]:
    return [
        "embed",
        *(f"layer_{i}.{r}" for i in range(n_layers) for r in ALL_ROLES),
        "final_norm",
        "logits",
    ]


def test_detected_without_hint_through_the_entry_point(family: str) -> None:
    backend = Backend.for_model(model_of(family))
    assert type(backend) is TransformerBackend
    assert backend.name == "transformer"
    assert backend.n_layers == 3


def test_every_site_equals_hidden_states_hooks_and_logits(family: str) -> None:
    model = model_of(family)
    backend = Backend.for_model(model)
    ids = ids_for()
    with torch.no_grad(), recording(model, family) as own:
        reference = model(ids, output_hidden_states=True)
    result = backend.run(ids, capture=_all_sites(3))
    hs = reference.hidden_states
    assert len(hs) == 4
    torch.testing.assert_close(result["embed"], hs[0], atol=TOL, rtol=0)
    for i in range(2):  # HF's entry i+1 is the raw output of block i, except the last
        torch.testing.assert_close(result[f"layer_{i}.residual"], hs[i + 1], atol=TOL, rtol=0)
    # the last block's raw output only shows in a hook; HF's last entry is after the final norm
    torch.testing.assert_close(result["layer_2.residual"], own["2.block"], atol=TOL, rtol=0)
    assert not torch.allclose(own["2.block"], hs[3], atol=1e-3)
    torch.testing.assert_close(result["final_norm"], hs[3], atol=TOL, rtol=0)
    torch.testing.assert_close(result["logits"], reference.logits, atol=TOL, rtol=0)
    torch.testing.assert_close(result.logits, reference.logits, atol=TOL, rtol=0)
    for i in range(3):
        for role in ("attn", "mlp", "mlp_hidden"):
            value = result[f"layer_{i}.{role}"]
            assert value.shape[:2] == ids.shape
            # OPT runs its MLP on (batch * seq, ...): the site is (batch, seq, ...) all the same
            expected = own[f"{i}.{role}"].reshape(value.shape)
            torch.testing.assert_close(value, expected, atol=TOL, rtol=0, msg=f"layer_{i}.{role}")


def test_block_output_is_its_input_plus_attention_plus_mlp(family: str) -> None:
    model = model_of(family)
    backend = Backend.for_model(model)
    ids = ids_for(1)
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
    result = backend.run(ids, capture=_all_sites(3))
    previous = hs[0]
    for i in range(3):
        total = previous + result[f"layer_{i}.attn"] + result[f"layer_{i}.mlp"]
        torch.testing.assert_close(result[f"layer_{i}.residual"], total, atol=1e-5, rtol=1e-5)
        previous = result[f"layer_{i}.residual"]


def test_mlp_hidden_feeds_the_mlp_output_projection(family: str) -> None:
    model = model_of(family)
    backend = Backend.for_model(model)
    ids = ids_for(2)
    projection = blocks_of(model, family)[1].get_submodule(REFERENCE[family][3])
    with torch.no_grad(), recording(model, family) as own:
        model(ids)
    result = backend.run(ids, capture=["layer_1.mlp_hidden"])
    hidden = result["layer_1.mlp_hidden"]
    assert hidden.shape[-1] == backend.hidden_dim("layer_1.mlp_hidden") == 64 or family in {
        "gpt2",
        "gptj",
        "gpt_neo",
        "bloom",
        "falcon",
        "mpt",
    }  # 4 x d_model by config
    assert hidden.shape[-1] == backend.hidden_dim("layer_1.mlp_hidden")
    with torch.no_grad():
        torch.testing.assert_close(
            projection(hidden),
            projection(own["1.mlp_hidden"]).reshape(*ids.shape, -1),
            atol=TOL,
            rtol=0,
        )


def test_unembed_of_the_final_residual_gives_the_logits(family: str) -> None:
    model = model_of(family)
    backend = Backend.for_model(model)
    ids = ids_for(3)
    with torch.no_grad():
        logits = model(ids).logits
        result = backend.run(ids, capture=["layer_2.residual"])
        assert result.logits is None  # stopped before the head
        torch.testing.assert_close(
            backend.unembed(result["layer_2.residual"]), logits, atol=TOL, rtol=0
        )


def test_gemma2_unembed_applies_the_final_logit_softcapping() -> None:
    model = tiny_model("gemma2", final_logit_softcapping=0.05)  # a cap that bites
    backend = Backend.for_model(model)
    ids = ids_for(4)
    residual = backend.run(ids, capture=["layer_2.residual"])["layer_2.residual"]
    with torch.no_grad():
        logits = backend.unembed(residual)
        raw = model.lm_head(model.model.norm(residual))
        torch.testing.assert_close(logits, model(ids).logits, atol=TOL, rtol=0)
    assert logits.abs().max() < 0.05
    assert raw.abs().max() > 0.1


def test_site_metadata_matches_the_captured_shapes(family: str) -> None:
    model = model_of(family)
    backend = Backend.for_model(model)
    names = _all_sites(3)
    result = backend.run(ids_for(), capture=names)
    sites = backend.sites()
    for name in names:
        info = sites[name]
        value = result[name]
        assert info.kind == "token"
        assert value.shape[:2] == (2, 7)
        assert value.shape[-1] == info.dim, name
        assert len(info.shape) == value.dim(), name
    orders = [sites[n].order for n in sites]
    assert orders == sorted(orders)
    assert set(backend.capabilities) == {
        "residual",
        "components",
        "mlp_hidden",
        "unembed",
        "logits",
        "attention_patterns",
        "edit",
    } | ({"freeze"} if backend.frozen_unavailable is None else set())
    # (soft-capped logits, gemma2, or interleaved query_key_value projections cannot be frozen)
    unfrozen = {"gemma2", "gpt_neox", "gpt_neo", "bloom", "falcon"}
    assert (backend.frozen_unavailable is None) == (family not in unfrozen)
    assert backend.layer_names() == ["layer_0.residual", "layer_1.residual", "layer_2.residual"]


def test_extract_returns_records_with_the_attention_mask(family: str) -> None:
    backend = Backend.for_model(model_of(family))
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1]])
    records = backend.extract({"input_ids": ids_for(), "attention_mask": mask})
    assert [r.layer_name for r in records] == backend.layer_names()
    for record in records:
        assert torch.equal(record.attention_mask, mask)
        assert record.meta["backend"] == "transformer"
        assert record.activations.shape == (2, 7, 32)


def test_unknown_site_names_list_the_valid_ones() -> None:
    backend = Backend.for_model(model_of("llama"))
    with pytest.raises(SiteError) as info:
        backend.run(ids_for(), capture=["layer_7.residual"])
    message = str(info.value)
    assert "layer_7.residual" in message and "layers 0..2" in message
    assert "mlp_hidden" in message and "attn_pattern" in message and "final_norm" in message
    with pytest.raises(SiteError, match="does not exist.*roles attn, attn_pattern"):
        backend.run(ids_for(), capture=["layer_0.mixer"])
