"""Freezing: the contract by which a backend holds a model's nonlinearities at one prompt's values.

With every nonlinear factor of a model (attention patterns, normalisation scales, the Δ, B, C
and gates of a selective SSM, LSTM/GRU gates, elementwise activations, ...) held at the values
one prompt gave it, the model is an affine function of what is added to its residual stream
(or fed to its recurrence): gradients then flow only through the linear paths, and the direct
effect of one part of the model on another is a product of gradient and activation. This is
what attribution graphs are computed on (the ``archscope-graphs`` plugin).

A backend takes part by

- declaring the capability ``freeze`` (`FREEZE`) in ``capabilities``;
- listing what it holds in ``freezes`` (names from `NONLINEARITIES`, or its own) and what it
  cannot hold in ``cannot_freeze`` (name → why); `archscope info BACKEND` shows both;
- on an instance whose model it cannot freeze (a layer kind it does not know), removing
  ``freeze`` from the instance's capabilities and saying why in ``frozen_unavailable``;
- implementing ``frozen_run(values: FrozenValues)``, a context manager in which every run of
  the backend passes each nonlinear factor through ``values.hold(key, factor)`` and uses the
  returned tensor, detached, in place of the factor. Keys name the factor uniquely within one
  forward pass (a module and what it holds; `FrozenValues` counts repeated calls).

`freeze(backend, inputs)` is what callers use: it runs ``inputs`` once, recording each
factor, and then, until the context ends, every run of the backend replays the recorded
factors (broadcast over the batch, so a batch of copies of the prompt can carry one backward
pass per row). Inside it a run is exactly the model on the prompt (same values), and, on any
other input of the prompt's length, the model with its nonlinearities held at the prompt's
values: an affine function of its inputs. This module knows no architecture; the helpers at
the end (`frozen_norm`, `frozen_activation`) are the pieces most backends need.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from .errors import CapabilityError

if TYPE_CHECKING:
    import torch

__all__ = [
    "FREEZE",
    "NONLINEARITIES",
    "Freezable",
    "FreezeError",
    "FrozenValues",
    "cannot_freeze_of",
    "freeze",
    "freezes_of",
    "frozen_activation",
    "frozen_norm",
]

#: The capability a backend declares when it implements `Freezable`.
FREEZE = "freeze"

#: Nonlinearities with a documented meaning (backends may add names of their own).
NONLINEARITIES: dict[str, str] = {
    "attention_pattern": "softmax attention probabilities (queries and keys held)",
    "norm_scale": "the 1/σ (LayerNorm) or 1/rms (RMSNorm) of every normalisation",
    "ssm_parameters": "Δ, B and C of a selective state-space layer (and its decay exp(Δ·A))",
    "gate": "multiplicative gates: SiLU/sigmoid output gates, gated norms, LSTM/GRU gates",
    "activation_slope": "elementwise activations f(u) held as u·(f(u)/u) (SiLU, tanh, GELU)",
    "delta_rule": "a gated delta net's decay, write strength β and normalised keys",
    "mlp": "MLP nonlinearities (held through the MLP's slopes; replaced by transcoders)",
}


class FreezeError(CapabilityError):
    """A backend cannot freeze the model (or one of its nonlinearities), or a frozen run was
    asked for something it cannot replay."""


@runtime_checkable
class Freezable(Protocol):
    """What a backend with the ``freeze`` capability implements."""

    freezes: frozenset[str]
    cannot_freeze: Mapping[str, str]

    def frozen_run(self, values: FrozenValues) -> contextlib.AbstractContextManager[Any]: ...


def freezes_of(backend: Any) -> frozenset[str]:
    """What ``backend`` (a backend or its class) declares it can freeze."""
    return frozenset(getattr(backend, "freezes", ()) or ())


def cannot_freeze_of(backend: Any) -> dict[str, str]:
    """What ``backend`` (a backend or its class) declares it cannot freeze: name → why."""
    return dict(getattr(backend, "cannot_freeze", {}) or {})


class FrozenValues:
    """The nonlinear factors of one prompt: recorded on the first run of a `freeze` context,
    replayed on every later one.

    Backends call `hold` for each factor; callers only pass this object around."""

    def __init__(self) -> None:
        self.recording = True
        self._records: dict[Hashable, list[torch.Tensor]] = {}
        self._calls: dict[Hashable, int] = {}

    def __len__(self) -> int:
        return sum(len(v) for v in self._records.values())

    def start_run(self) -> None:
        """A new forward pass begins: repeated calls are counted from zero again."""
        self._calls.clear()

    def recorded(self, key: Hashable) -> bool:
        """Whether the prompt's run held a factor under ``key``."""
        return key in self._records

    def hold(self, key: Hashable, factor: torch.Tensor) -> torch.Tensor:
        """The held value of ``factor``: while recording, ``factor`` itself (detached, and
        remembered); afterwards, the recorded value, expanded over the batch (dim 0) when the
        run has several copies of the prompt. ``key`` names the factor within one forward
        pass; a factor computed several times per pass (a module called in a loop) is told
        apart by the order of the calls."""
        n = self._calls.get(key, 0)
        self._calls[key] = n + 1
        if self.recording:
            self._records.setdefault(key, []).append(factor.detach())
            return factor.detach()
        records = self._records.get(key)
        if records is None or n >= len(records):
            raise FreezeError(
                f"the frozen run computed a factor {key!r} (call {n + 1}) that the prompt's run "
                f"did not ({0 if records is None else len(records)} recorded): a frozen run "
                "must run the model the way the prompt's run did (same sites, same length)"
            )
        value = records[n]
        return _broadcast(value, factor, key)


def _broadcast(value: torch.Tensor, like: torch.Tensor, key: Hashable) -> torch.Tensor:
    if value.shape == like.shape:
        return value.to(like.dtype)
    if value.dim() == like.dim() and value.shape[0] == 1 and value.shape[1:] == like.shape[1:]:
        return value.to(like.dtype).expand(like.shape)
    rows = value.shape[0]
    if (
        value.dim() == like.dim()
        and rows
        and like.shape[0] % rows == 0
        and value.shape[1:] == like.shape[1:]
    ):  # (batch · seq, ...) layouts: the prompt's rows once per copy
        return value.to(like.dtype).repeat(like.shape[0] // rows, *[1] * (value.dim() - 1))
    raise FreezeError(
        f"factor {key!r}: the prompt's run held a value of shape {tuple(value.shape)}, this "
        f"run computes one of shape {tuple(like.shape)}; a frozen run takes the prompt itself "
        "or a batch of copies of it (the same length), not other inputs"
    )


@contextlib.contextmanager
def freeze(
    backend: Any, inputs: Any, *, require: Iterable[str] = (), **run_kwargs: Any
) -> Iterator[FrozenValues]:
    """Hold ``backend``'s nonlinearities at the values ``inputs`` (one prompt) gives them.

    Runs ``inputs`` once (recording); inside the context every run of ``backend`` replays the
    recorded factors. ``require`` names nonlinearities that must be frozen (a `FreezeError`
    says which the backend cannot freeze, and why). Every hook is removed at the end, also
    after an error; weights and modes are not touched."""
    caps = set(getattr(backend, "capabilities", ()))
    name = getattr(backend, "name", type(backend).__name__)
    why = getattr(backend, "frozen_unavailable", None)
    if why:  # the backend freezes, but not this model
        raise FreezeError(f"backend {name!r} cannot freeze this model: {why}")
    if FREEZE not in caps or not callable(getattr(backend, "frozen_run", None)):
        raise FreezeError(
            f"backend {name!r} cannot freeze its model's nonlinearities: it lacks the "
            f"capability {FREEZE!r} (it has: {', '.join(sorted(caps)) or 'none'}). Freezing is "
            "available on the transformer, mamba, recurrent and hybrid backends; a backend adds "
            "it by implementing archscope.freeze.Freezable (docs/plugin-authors.md)"
        )
    missing = sorted(set(require) - freezes_of(backend))
    if missing:
        reasons = cannot_freeze_of(backend)
        detail = "; ".join(f"{m}: {reasons.get(m, 'not declared')}" for m in missing)
        raise FreezeError(
            f"backend {name!r} cannot freeze {', '.join(missing)} ({detail}); it freezes "
            f"{', '.join(sorted(freezes_of(backend))) or 'nothing'}"
        )
    values = FrozenValues()
    with backend.frozen_run(values):
        values.start_run()
        backend.run(inputs, capture=["logits"], **run_kwargs)
        values.recording = False
        yield values


# -- pieces most backends need -----------------------------------------------------------------
def _norm_forms(
    module: Any, xf: torch.Tensor
) -> list[tuple[str, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]]:
    """The forms a norm ``module`` may compute on ``xf``: (name, its scale s = 1/σ, the norm
    recomputed with a given s)."""
    import torch

    weight = getattr(module, "weight", None)
    bias = getattr(module, "bias", None)
    own = next(
        (e for e in (getattr(module, n, None) for n in ("eps", "variance_epsilon")) if e), None
    )
    # a norm that keeps no eps of its own (OLMo's parameter-free LayerNorm) gets the two
    # common defaults tried, in this order
    epsilons = (own,) if own is not None else (1e-5, 1e-6)
    mean = xf.mean(-1, keepdim=True)
    var = (xf - mean).pow(2).mean(-1, keepdim=True)
    ms = xf.pow(2).mean(-1, keepdim=True)

    def affine(y: torch.Tensor, plus_one: bool) -> torch.Tensor:
        if weight is not None:
            w = weight.float()
            y = y * ((1.0 + w) if plus_one else w)
        if bias is not None:
            y = y + bias.float()
        return y

    centred = isinstance(module, torch.nn.LayerNorm) or "LayerNorm" in type(module).__name__
    # (form, its scale s, the norm recomputed with a held s)
    candidates: list[tuple[str, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]] = []
    for eps in epsilons:
        tag = "" if own is not None else f"@{eps:g}"
        if centred:
            candidates.append(
                (
                    "layer" + tag,
                    torch.rsqrt(var + eps),
                    lambda s: affine((xf - xf.mean(-1, keepdim=True)) * s, False),
                )
            )
        else:
            rms = torch.rsqrt(ms + eps)
            candidates.append(("rms" + tag, rms, lambda s: affine(xf * s, False)))
            candidates.append(("rms1" + tag, rms, lambda s: affine(xf * s, True)))
    return candidates


def frozen_activation(
    u: torch.Tensor, out: torch.Tensor, values: FrozenValues, key: Hashable
) -> torch.Tensor:
    """An elementwise activation ``out = f(u)`` held at its slope ``f(u)/u``: the result is
    ``u · s`` with ``s`` held (where ``u`` is 0, ``s`` is 0; ``f(0) = 0`` for SiLU, tanh, GELU,
    ReLU). Its value is ``out``; its gradient with respect to ``u`` is ``s``."""
    import torch

    safe = torch.where(u == 0, torch.ones_like(u), u)
    slope = torch.where(u == 0, torch.zeros_like(out), out / safe)
    return u * values.hold(key, slope)


def frozen_norm(
    module: Any, x: torch.Tensor, out: torch.Tensor, values: FrozenValues, key: Hashable
) -> torch.Tensor:
    """A LayerNorm or RMSNorm ``module`` (weight, optional bias, ``eps`` / ``variance_epsilon``
    over the last axis) recomputed on ``x`` with its scale 1/σ held:
    ``(x − mean(x)) · s · w + b`` or ``x · s · w`` (or ``(1 + w)``). The form is chosen by
    matching the module's own output ``out``; a `FreezeError` names a norm none matches."""
    import torch

    candidates = _norm_forms(module, x.float())
    if not values.recording:  # the form the prompt's run found
        for form, scale, fn in candidates:
            if values.recorded((key, form)):
                return fn(values.hold((key, form), scale)).to(out.dtype)
    tol = 1e-3 * (1.0 + float(out.detach().abs().max()))
    errors = []
    for form, scale, fn in candidates:
        with torch.no_grad():
            trial = fn(scale).to(out.dtype)
        if trial.shape == out.shape:
            errors.append((float((trial - out.detach()).abs().max()), form, scale, fn))
    if errors:  # the closest form (and eps), if it is close at all
        error, form, scale, fn = min(errors, key=lambda e: e[0])
        if error <= tol:
            return fn(values.hold((key, form), scale)).to(out.dtype)
    raise FreezeError(
        f"cannot freeze the normalisation {type(module).__name__}: its output matches neither "
        "(x − mean)·s·w + b nor x·s·w nor x·s·(1 + w) with s = 1/σ over the last axis; a "
        "backend must hold this norm's scale itself"
    )
