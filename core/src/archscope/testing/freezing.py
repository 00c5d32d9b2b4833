"""The freezing contract (`archscope.freeze`) as one check a backend's tests can call.

`check_frozen(backend, ids, sites)` holds a backend to what `archscope.freeze` promises, on
one unpadded prompt ``ids`` (1, seq):

1. inside ``freeze``, a run of the prompt is the model: the logits and every site in ``sites``
   equal the unfrozen run's;
2. around the prompt the frozen model is affine in the embeddings: f(a) + f(b) − f(a + b) −
   f(0) vanishes at the logits and at ``sites`` (with ``nonlinear=True`` the unfrozen model is
   checked to fail the same test, so the check has teeth);
3. the gradient at a leaf of each site in ``leaves`` (default: the embeddings) is the frozen
   model's exact slope: its product with a step equals the change the step makes;
4. the gradient reaches the last logit from earlier positions (through the held recurrence or
   attention); a position's logits and per-token ``sites`` depend on the embeddings and get
   nothing from later positions;
5. nothing is left behind (`unchanged`: hooks, weights, modes).

The conformance kit calls it for every model whose backend declares ``freeze``; backend
authors call it with the sites their freezing must reproduce (a mixer's output, a state write).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .untouched import unchanged

__all__ = ["check_frozen"]


def _fail(message: str) -> None:
    raise AssertionError(f"archscope freezing contract: {message}")


def check_frozen(
    backend: Any,
    ids: Any,
    sites: Sequence[str] = (),
    *,
    leaves: Sequence[str] = ("embed",),
    token: int = 7,
    tol: float = 1e-4,
    atol: float = 1e-5,
    rtol: float = 1e-4,
    nonlinear: bool = True,
) -> None:
    """Check that freezing ``backend`` at the prompt ``ids`` (a (1, seq) tensor of token ids)
    gives the model at the prompt and an affine model around it (see the module's docstring).
    ``sites``: sites whose values the frozen run must reproduce and keep affine; ``leaves``:
    sites at which the gradient must equal the frozen model's slope; ``token``: the logit the
    gradients are taken of; ``tol``: the affinity gaps' tolerance, relative to (1 + the largest
    value compared); ``atol``, ``rtol``: how close a frozen run of the prompt must be to the
    model; ``nonlinear``: also show that the unfrozen model fails the
    affinity check (set False for a model that is affine to begin with)."""
    import torch

    from archscope import Edit
    from archscope.freeze import freeze

    if "freeze" not in backend.capabilities:
        _fail(
            f"the backend {getattr(backend, 'name', type(backend).__name__)!r} does not declare "
            f"'freeze' ({getattr(backend, 'frozen_unavailable', None) or 'no reason given'})"
        )
    if ids.dim() != 2 or ids.shape[0] != 1:
        _fail(f"check_frozen takes one unpadded prompt of shape (1, seq); got {tuple(ids.shape)}")
    names = list(dict.fromkeys([*sites, "logits"]))
    real = backend.run(ids, capture=list(dict.fromkeys(["embed", *names, *leaves])))
    embed = real["embed"].detach()
    g = torch.Generator().manual_seed(1)
    a, b = (torch.randn(embed.shape, generator=g) * embed.std() for _ in range(2))
    zero = torch.zeros_like(embed)

    def outputs(x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = backend.run(ids, capture=names, edits=[Edit.replace("embed", x)])
        return {n: out[n].double() for n in names}

    def gaps() -> dict[str, float]:
        fa, fb, fab, f0 = (outputs(x) for x in (a, b, a + b, zero))
        return {
            n: float((fa[n] + fb[n] - fab[n] - f0[n]).abs().max()) / (1 + float(fab[n].abs().max()))
            for n in names
        }

    with unchanged(backend.model):
        with freeze(backend, ids) as values:
            if nonlinear and len(values) == 0:
                _fail("freeze held nothing on a nonlinear model: frozen_run records no factor")
            _check_prompt(backend.run(ids, capture=names), real, names, atol, rtol)
            frozen_gaps = gaps()
            for n, gap in frozen_gaps.items():
                if gap >= tol:
                    _fail(f"the frozen model is not affine in the embeddings at {n}: gap {gap:.3g}")
            for site in leaves:
                _check_slope(backend, ids, site, real[site].detach(), token)
            _check_causal(backend, ids, embed, sites)
        backend.model.zero_grad(set_to_none=True)
    if nonlinear:
        model_gap = max(gaps().values())
        if model_gap <= 1e-3:
            _fail(
                f"the unfrozen model is affine too (gap {model_gap:.3g}): the affinity check "
                "shows nothing here; pass nonlinear=False if that is expected"
            )


def _check_prompt(same: Any, real: Any, names: Sequence[str], atol: float, rtol: float) -> None:
    """A frozen run of the prompt gives the model's values at ``names``."""
    import torch

    for n in names:
        if not torch.allclose(same[n].double(), real[n].double(), atol=atol, rtol=rtol):
            gap = float((same[n].double() - real[n].double()).abs().max())
            _fail(f"a frozen run of the prompt differs from the model at {n} by {gap:.3g}")


def _check_slope(backend: Any, ids: Any, site: str, value: Any, token: int) -> None:
    """The gradient of ``token``'s last logit at a leaf of ``site`` times a step equals the
    change the step makes in the frozen model."""
    import torch

    from archscope import Edit

    leaf = value.clone().requires_grad_(True)
    live = backend.run(
        ids, capture=["logits"], edits=[Edit.apply(site, lambda x: leaf.to(x.dtype))], grad=True
    )
    target = live.logits[0, -1, token]
    (grad,) = torch.autograd.grad(target, [leaf])
    g = torch.Generator().manual_seed(9)
    step = torch.randn(value.shape, generator=g) * value.float().std() * 0.1
    moved = backend.run(ids, capture=["logits"], edits=[Edit.replace(site, value + step)])
    expected = float(moved.logits[0, -1, token].double() - target.detach().double())
    predicted = float((grad.double() * step.double()).sum())
    if abs(expected) <= 1e-6:
        _fail(f"a step at {site} does not move logit {token}: the slope check shows nothing")
    if abs(predicted - expected) > 1e-3 * abs(expected) + 1e-6:
        _fail(
            f"the gradient at {site} predicts a change of {predicted:.6g} in logit {token}; "
            f"the frozen model moves by {expected:.6g}: some held factor is not detached, or "
            "a run inside the freeze does not use the held values"
        )


def _check_causal(backend: Any, ids: Any, embed: Any, sites: Sequence[str]) -> None:
    """Earlier positions reach the last logit; a position's logits, and its values at each
    per-token site in ``sites``, depend on the embeddings (they are not detached) and get
    nothing from later positions."""
    import torch

    from archscope import Edit

    seq = embed.shape[1]
    if seq < 3:
        _fail(f"check_frozen needs a prompt of at least 3 tokens; got {seq}")
    per_token = [s for s in sites if s != "logits" and backend.site_info(s).kind == "token"]
    leaf = embed.clone().requires_grad_(True)
    edits = [Edit.replace("embed", leaf)]
    live = backend.run(ids, capture=["logits", *per_token], edits=edits, grad=True)
    middle = seq // 2
    for name in ["logits", *per_token]:
        (back,) = torch.autograd.grad(live[name][0, middle].sum(), [leaf], retain_graph=True)
        if float(back[0, middle + 1 :].abs().sum()) != 0.0:
            _fail(f"{name} at position {middle} gets a gradient from later positions")
        if float(back[0, : middle + 1].abs().sum()) == 0.0:
            _fail(f"{name} at position {middle} gets no gradient from the embeddings")
    (last,) = torch.autograd.grad(live.logits[0, -1].sum(), [leaf])
    if float(last[0, :-1].abs().sum()) == 0.0:
        _fail("no gradient reaches the last logits from earlier positions")
