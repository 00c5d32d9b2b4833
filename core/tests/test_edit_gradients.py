"""Gradients through edits: an edit of a site's whole value (every position, every unit) gives
a result that depends on the old value only through what the edit computes from it, so a
backward pass skips whatever produced a value that was replaced; partial edits keep the old
value's gradient at what they leave alone. References are written out by hand."""

from __future__ import annotations

import pytest
import torch

from archscope import Edit, Site, SiteInfo
from archscope.edits import apply_edit

INFO = SiteInfo(Site.parse("layer_0.residual"), "token", ("batch", "seq", "d"), 4)


def _produced() -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """A leaf ``x`` and a value computed from it (``3 x``) whose backward calls are recorded."""
    x = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(0), requires_grad=True)
    value = x * 3.0
    calls: list[torch.Tensor] = []
    value.register_hook(lambda g: calls.append(g))
    return x, value, calls


def test_a_whole_value_replacement_sends_no_backward_pass_into_the_old_value() -> None:
    x, value, calls = _produced()
    leaf = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(1), requires_grad=True)
    out = apply_edit(value, Edit.apply("layer_0.residual", lambda _: leaf), INFO, None)
    assert torch.equal(out, leaf)
    weights = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(2))
    (out * weights).sum().backward()
    assert calls == []  # the old value's producer is not part of the backward pass
    assert x.grad is None
    assert leaf.grad is not None
    torch.testing.assert_close(leaf.grad, weights, rtol=0, atol=0)
    # the result is a tensor of its own: changing it in place leaves the function's tensor
    before = leaf.detach().clone()
    with torch.no_grad():
        out.add_(1.0)
    assert torch.equal(leaf.detach(), before)


@pytest.mark.parametrize("op", ["replace", "add", "scale", "fn"])
def test_whole_value_edits_give_the_hand_computed_values_and_gradients(op: str) -> None:
    x, value, _ = _produced()
    vector = torch.tensor([1.0, -2.0, 0.5, 3.0])
    edit, expected, grad = {
        "replace": (Edit.replace("layer_0.residual", vector), vector.expand(2, 5, 4), 0.0),
        "add": (Edit.add("layer_0.residual", vector), x.detach() * 3 + vector, 3.0),
        "scale": (Edit.scale("layer_0.residual", 2.0), x.detach() * 6, 6.0),
        "fn": (Edit.apply("layer_0.residual", lambda t: t * t), (x.detach() * 3) ** 2, None),
    }[op]
    out = apply_edit(value, edit, INFO, None)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    assert out.dtype == value.dtype and out.shape == value.shape
    if op == "replace":
        assert not out.requires_grad  # nothing of the old value is left
        return
    out.sum().backward()
    assert x.grad is not None
    want = 18.0 * x.detach() if grad is None else torch.full_like(x, grad)  # d(9x²)/dx = 18x
    torch.testing.assert_close(x.grad, want, rtol=1e-6, atol=1e-6)


def test_a_replacement_of_a_float64_value_by_a_float32_tensor_keeps_the_site_dtype() -> None:
    value = torch.zeros(1, 3, 4, dtype=torch.float64)
    new = torch.ones(1, 3, 4, requires_grad=True)
    out = apply_edit(value, Edit.apply("layer_0.residual", lambda _: new), INFO, None)
    assert out.dtype == torch.float64
    out.sum().backward()
    assert new.grad is not None and torch.equal(new.grad, torch.ones(1, 3, 4))


def test_a_partial_edit_keeps_the_gradient_of_what_it_leaves() -> None:
    x, value, calls = _produced()
    out = apply_edit(value, Edit.replace("layer_0.residual", 0.0, positions=[1, 3]), INFO, None)
    out.sum().backward()
    assert len(calls) == 1
    want = torch.full_like(x, 3.0)
    want[:, [1, 3]] = 0.0  # replaced positions: no gradient to the old value
    assert x.grad is not None
    torch.testing.assert_close(x.grad, want, rtol=0, atol=0)
    x2, value2, _ = _produced()
    out = apply_edit(value2, Edit.scale("layer_0.residual", 0.0, units=[0, 2]), INFO, None)
    out.sum().backward()
    want = torch.full_like(x2, 3.0)
    want[..., [0, 2]] = 0.0
    assert x2.grad is not None
    torch.testing.assert_close(x2.grad, want, rtol=0, atol=0)
