"""Class 5 of the reliability issue: requests that used to give a silently wrong result or an
unclear error (edit slices beyond the sequence, 0-d tensor values, fractional float masks,
``capture=None``, a single Edit instead of a list) on every architecture."""

from __future__ import annotations

import pytest
import torch
from archs import Arch
from reliability.support import batch

from archscope import Edit
from archscope.errors import ArchscopeError, InputError, SiteError
from archscope.testing import unchanged


def _site(a: Arch) -> str:
    return a.backend.layer_names()[0]


def test_edit_slice_beyond_sequence_raises_like_a_list(any_arch: Arch) -> None:
    b, site = any_arch.backend, _site(any_arch)
    ids = batch([5, 5])
    with pytest.raises(SiteError, match=r"positions \[7\].*length 5"):
        b.run(ids, capture=["logits"], edits=[Edit.scale(site, 0.0, positions=[7])])
    with pytest.raises(SiteError, match=r"slice\(6, 9.*length 5"):
        b.run(ids, capture=["logits"], edits=[Edit.scale(site, 0.0, positions=slice(6, 9))])


def test_edit_slice_partly_inside_edits_the_inside_part(any_arch: Arch) -> None:
    # a slice that ends beyond the sequence but starts inside it is a range "from 3 on", as in
    # Python indexing; only a slice that selects nothing is refused
    b, site = any_arch.backend, _site(any_arch)
    ids = batch([5])
    clean = b.run(ids, capture=[site])[site]
    edited = b.run(ids, capture=[site], edits=[Edit.replace(site, 0.0, positions=slice(3, 50))])[
        site
    ]
    assert torch.equal(edited[:, :3], clean[:, :3])
    assert bool((edited[:, 3:] == 0).all())


def test_zero_dim_tensor_value_acts_like_the_float(any_arch: Arch) -> None:
    b, site = any_arch.backend, _site(any_arch)
    ids = batch([4, 6])
    with_float = b.run(ids, capture=["logits"], edits=[Edit.scale(site, 0.5)]).logits
    with_tensor = b.run(ids, capture=["logits"], edits=[Edit.scale(site, torch.tensor(0.5))]).logits
    assert torch.equal(with_float, with_tensor)
    added = b.run(ids, capture=[site], edits=[Edit.add(site, torch.tensor(2.0), positions=[0])])[
        site
    ]
    clean = b.run(ids, capture=[site])[site]
    assert torch.allclose(added[:, 0], clean[:, 0] + 2.0)


def test_fractional_float_mask_refused(any_arch: Arch) -> None:
    ids = batch([5, 5])
    mask = torch.ones(2, 5) * 0.5
    with pytest.raises(InputError, match=r"attention_mask.*0 and 1.*0\.5"):
        any_arch.backend.run(
            {"input_ids": ids["input_ids"], "attention_mask": mask}, capture=["logits"]
        )


def test_float_mask_of_zeros_and_ones_accepted(any_arch: Arch) -> None:
    ids = batch([5, 3])
    b = any_arch.backend
    as_int = b.run(ids, capture=["logits"]).logits
    as_float = b.run(
        {"input_ids": ids["input_ids"], "attention_mask": ids["attention_mask"].float()},
        capture=["logits"],
    ).logits
    assert torch.equal(as_int, as_float)


def test_capture_none_means_nothing_captured(any_arch: Arch) -> None:
    b = any_arch.backend
    ids = batch([4])
    result = b.run(ids, capture=None)
    assert result.activations == {}
    assert result.logits is not None
    assert torch.equal(result.logits, b.run(ids).logits)


def test_single_edit_instead_of_list_is_accepted(any_arch: Arch) -> None:
    b, site = any_arch.backend, _site(any_arch)
    ids = batch([4])
    edit = Edit.scale(site, 0.0, positions=[1])
    single = b.run(ids, capture=["logits"], edits=edit).logits
    listed = b.run(ids, capture=["logits"], edits=[edit]).logits
    assert torch.equal(single, listed)


@pytest.mark.parametrize("bad", [3, "layer_0.residual", {"site": "x"}])
def test_edits_of_wrong_type_name_what_was_given(any_arch: Arch, bad: object) -> None:
    with unchanged(any_arch.model):
        with pytest.raises(ArchscopeError, match=r"Edit") as info:
            any_arch.backend.run(batch([3]), edits=bad)  # type: ignore[arg-type]
        assert type(bad).__name__ in str(info.value)
