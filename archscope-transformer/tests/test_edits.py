"""Edits (replace, add, scale, fn) on every site kind, checked against the test's own hooks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from transformer_reference import REFERENCE, blocks_of, ids_for, model_of

from archscope import Backend, Edit, SiteError

EDITABLE = [
    "embed",
    "layer_0.residual",
    "layer_1.attn",
    "layer_1.mlp",
    "layer_1.mlp_hidden",
    "layer_2.residual",
    "final_norm",
    "logits",
]


def _with_block_output_edit(
    model: Any, family: str, layer: int, change: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """The model's logits with ``change`` applied to block ``layer``'s output by a plain hook."""

    def hook(module: Any, args: Any, output: Any) -> Any:
        if isinstance(output, tuple):
            return (change(output[0]), *output[1:])
        return change(output)

    handle = blocks_of(model, family)[layer].register_forward_hook(hook)
    try:
        with torch.no_grad():
            return model(ids_for(10)).logits
    finally:
        handle.remove()


def test_identity_patches_leave_logits_bit_identical(family: str) -> None:
    backend = Backend.for_model(model_of(family))
    ids = ids_for(9)
    clean = backend.run(ids, capture=EDITABLE)
    for site in EDITABLE:
        patched = backend.run(ids, capture=["logits"], edits=[Edit.replace(site, clean[site])])
        assert torch.equal(patched.logits, clean.logits), site


def test_patching_the_last_residual_gives_the_other_prompts_logits(family: str) -> None:
    backend = Backend.for_model(model_of(family))
    target, source = ids_for(11), ids_for(12)
    donor = backend.run(source, capture=["layer_2.residual", "logits"])
    patched = backend.run(
        target,
        capture=["logits"],
        edits=[Edit.replace("layer_2.residual", donor["layer_2.residual"])],
    )
    torch.testing.assert_close(patched.logits, donor.logits, atol=1e-6, rtol=0)
    assert not torch.allclose(backend.run(target, capture=["logits"]).logits, donor.logits)


VECTOR = torch.linspace(-1.0, 1.0, 32)


@pytest.mark.parametrize(
    ("edit", "change"),
    [
        (Edit.add("layer_0.residual", VECTOR), lambda h: h + VECTOR),
        (
            Edit.add("layer_0.residual", VECTOR, positions=[1, -1]),
            lambda h: torch.cat([h[:, :1], h[:, 1:2] + VECTOR, h[:, 2:-1], h[:, -1:] + VECTOR], 1),
        ),
        (
            Edit.scale("layer_0.residual", 0.5, positions=slice(2, 5)),
            lambda h: torch.cat([h[:, :2], h[:, 2:5] * 0.5, h[:, 5:]], 1),
        ),
        (
            Edit.scale("layer_0.residual", 0.0, units=[0, 5, 31]),
            lambda h: h * torch.tensor([0.0 if u in (0, 5, 31) else 1.0 for u in range(32)]),
        ),
        (
            Edit.replace("layer_0.residual", 0.25, positions=[3]),
            lambda h: torch.cat([h[:, :3], torch.full_like(h[:, 3:4], 0.25), h[:, 4:]], 1),
        ),
        (
            Edit.apply("layer_0.residual", torch.tanh, positions="last"),
            lambda h: torch.cat([h[:, :-1], torch.tanh(h[:, -1:])], 1),
        ),
    ],
    ids=["add-all", "add-positions", "scale-slice", "ablate-units", "replace-one", "fn-last"],
)
def test_edits_match_a_plain_hook_doing_the_same(
    family: str, edit: Edit, change: Callable[[torch.Tensor], torch.Tensor]
) -> None:
    model = model_of(family)
    backend = Backend.for_model(model)
    edited = backend.run(ids_for(10), capture=["logits"], edits=[edit]).logits
    expected = _with_block_output_edit(model, family, 0, change)
    torch.testing.assert_close(edited, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(edited, backend.run(ids_for(10), capture=["logits"]).logits)


def test_ablating_mlp_hidden_units_matches_zeroing_the_projection_input(family: str) -> None:
    model = model_of(family)
    backend = Backend.for_model(model)
    units = [0, 3, 7]
    edited = backend.run(
        ids_for(10),
        capture=["logits", "layer_1.mlp_hidden"],
        edits=[Edit.scale("layer_1.mlp_hidden", 0.0, units=units)],
    )
    assert torch.all(edited["layer_1.mlp_hidden"][..., units] == 0)

    def zero(module: Any, args: Any) -> Any:
        hidden = args[0].clone()
        hidden[..., units] = 0
        return (hidden, *args[1:])

    projection = blocks_of(model, family)[1].get_submodule(REFERENCE[family][3])
    handle = projection.register_forward_pre_hook(zero)
    try:
        with torch.no_grad():
            expected = model(ids_for(10)).logits
    finally:
        handle.remove()
    torch.testing.assert_close(edited.logits, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(edited.logits, backend.run(ids_for(10), capture=["logits"]).logits)


def test_component_and_logit_edits_change_what_follows(family: str) -> None:
    backend = Backend.for_model(model_of(family))
    ids = ids_for(13)
    clean = backend.run(ids, capture=["layer_1.residual", "layer_2.residual", "logits"])
    for site in ("layer_1.attn", "layer_1.mlp"):
        zeroed = backend.run(
            ids, capture=["layer_1.residual", site], edits=[Edit.scale(site, 0.0)], stop_early=False
        )
        assert torch.all(zeroed[site] == 0)
        assert not torch.allclose(zeroed["layer_1.residual"], clean["layer_1.residual"])
    steered = backend.run(ids, capture=["logits"], edits=[Edit.add("logits", 1.5, positions=[0])])
    torch.testing.assert_close(steered.logits[:, 0], clean.logits[:, 0] + 1.5)
    assert torch.equal(steered.logits[:, 1:], clean.logits[:, 1:])


def test_attention_patterns_are_read_only() -> None:
    backend = Backend.for_model(model_of("llama"))
    with pytest.raises(SiteError, match="'layer_0.attn_pattern'.*read-only"):
        backend.run(ids_for(), edits=[Edit.scale("layer_0.attn_pattern", 0.0)])


def test_an_edit_value_of_the_wrong_shape_names_both_shapes() -> None:
    backend = Backend.for_model(model_of("gpt2"))
    with pytest.raises(SiteError, match=r"shape \(3,\).*\(2, 7, 32\)"):
        backend.run(ids_for(), edits=[Edit.add("layer_0.residual", torch.ones(3))])
