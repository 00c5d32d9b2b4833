"""Neuron modulation: find the units whose activation at the last real token differs most
between two sets of prompts (contrastive search), then scale them during forward passes
(0 ablates). Searches real MLP hidden units where the backend has them, else each layer's
main site (residual stream or RNN hidden state)."""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Literal

from ..backends import Backend, Edit
from ..collect import collect
from ..data import Contrast, Dataset, as_dataset
from ..errors import BackendError, CapabilityError, InputError, ParameterError
from ..legacy import as_backend
from ..params import Param
from ..registry import method
from ..results import Result
from ..sites import Site

if TYPE_CHECKING:
    import torch

Mode = Literal["scalar", "ablate"]
Units = Literal["auto", "mlp_hidden", "residual"]
LayerFilter = str | int | Sequence[str | int] | None

_MODES = ("scalar", "ablate")
_UNITS = ("auto", "mlp_hidden", "residual")
_LAYER_PREFIX = re.compile(r"^layer_\d+$")


@dataclass
class NeuronOptions:
    """The ``neurons`` method's parameters: its one schema (`NeuronEditConfig` takes its
    ``top_frac`` and ``units`` defaults from here)."""

    top_frac: Annotated[
        float, Param(min=1e-9, max=1.0, help="fraction of each site's units kept")
    ] = 0.01
    layer_filter: Annotated[
        list[str] | None, Param(help="sites, layers (layer_1) or substrings to search; default all")
    ] = None
    units: Annotated[
        Units, Param(help="MLP hidden units where available (auto), or each layer's main site")
    ] = "auto"
    multiplier: Annotated[float, Param(help="scale applied by the edit (0 ablates)")] = 0.0
    batch_size: Annotated[int, Param(min=1)] = 32

    def config(self) -> NeuronEditConfig:
        return NeuronEditConfig(
            top_frac=self.top_frac, layer_filter=self.layer_filter, units=self.units
        )


@dataclass
class NeuronEditConfig:
    """How to search.

    ``top_frac``: fraction of each searched site's units kept (at least one), ranked by
    |mean difference|. ``layer_filter``: which sites to search — None (all), a site name
    (``"layer_1.mlp_hidden"``), a layer (``"layer_1"`` or ``1``), any other string as a
    substring of the site name (``"mlp"``), or a list of these. ``mode``: ``"scalar"``
    multiplies the units by `NeuronEdit.multiplier`, ``"ablate"`` sets them to zero.
    ``units``: ``"auto"`` (MLP hidden units where the backend has them, else each layer's main
    site), ``"mlp_hidden"`` (required) or ``"residual"`` (each layer's main site).
    """

    top_frac: float = NeuronOptions.top_frac
    layer_filter: LayerFilter = None
    mode: str = "scalar"
    units: str = NeuronOptions.units

    def __post_init__(self) -> None:
        frac = self.top_frac
        if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0 < frac <= 1:
            raise ParameterError(
                f"NeuronEditConfig.top_frac must be a number in (0, 1] (the "
                f"fraction of units kept per site), got {frac!r}"
            )
        if self.mode not in _MODES:
            raise ParameterError(
                f"NeuronEditConfig.mode must be one of {', '.join(_MODES)} "
                f"('ablate' sets the units to zero), got {self.mode!r}"
            )
        if self.units not in _UNITS:
            raise ParameterError(
                f"NeuronEditConfig.units must be one of {', '.join(_UNITS)}, got {self.units!r}"
            )


@dataclass
class NeuronEdit(Result):
    """Which units to modulate (per site, ranked by |mean difference|) and by how much.

    ``layer_to_indices[site]``: unit indices (LongTensor); ``layer_to_deltas[site]``: their
    mean activation difference, first set minus second, at the last real token.
    `apply_hook` scales them during plain ``model(...)`` calls; `edits` gives the same change
    as `archscope.Edit` objects for `Backend.run` and `archscope.collect`.
    """

    layer_to_indices: dict[str, torch.Tensor]
    layer_to_deltas: dict[str, torch.Tensor]
    config: NeuronEditConfig = field(default_factory=NeuronEditConfig)
    multiplier: float = 0.0
    #: Registry name of the backend that found the units (used when `apply_hook` gets none).
    backend: str = ""
    n_harmful: int = 0
    n_benign: int = 0

    @property
    def factor(self) -> float:
        """The multiplier actually applied: 0 in ``ablate`` mode."""
        return 0.0 if self.config.mode == "ablate" else float(self.multiplier)

    @property
    def n_units(self) -> int:
        return sum(int(v.numel()) for v in self.layer_to_indices.values())

    def edits(self) -> list[Edit]:
        """One scale edit per site, over every position (``factor`` 0 ablates)."""
        return [
            Edit.scale(site, self.factor, units=[int(i) for i in idx.tolist()])
            for site, idx in self.layer_to_indices.items()
            if idx.numel()
        ]

    def apply_hook(
        self, model: Any, backend: Backend | str | None = None
    ) -> contextlib.AbstractContextManager[Any]:
        """A context manager under which plain ``model(...)`` calls have the units scaled.
        Nothing is attached before ``with`` is entered, and everything is removed when the
        block ends, also on an exception. ``backend``: a Backend of ``model``, a backend name,
        or None (the backend the units were found with)."""
        if backend is None or isinstance(backend, str):
            backend = Backend.for_model(model, hint=backend or self.backend or None)
        return edited(model, self.edits(), backend)

    def to_markdown(self) -> str:
        lines = [
            f"## Neuron edit ({self.backend or 'backend'}): {self.n_units} units, "
            f"{'ablate' if self.config.mode == 'ablate' else f'x{self.multiplier:g}'}",
            "",
            f"Contrast: {self.n_harmful} vs {self.n_benign} prompts, last real token; "
            f"top {self.config.top_frac:g} of units per site by |mean difference|.",
            "",
            "| site | units | largest differences (unit: delta) |",
            "|---|---:|---|",
        ]
        for site, idx in self.layer_to_indices.items():
            deltas = self.layer_to_deltas[site]
            top = ", ".join(
                f"{int(i)}: {float(d):+.3g}"
                for i, d in zip(idx[:5].tolist(), deltas[:5].tolist(), strict=True)
            )
            lines.append(f"| {site} | {int(idx.numel())} | {top} |")
        return "\n".join(lines)


# -- attaching edits to plain model calls ----------------------------------------------------


@contextlib.contextmanager
def edited(model: Any, edits: Sequence[Edit], backend: Backend | None = None) -> Iterator[Any]:
    """Apply ``edits`` to every plain ``model(...)`` call inside the ``with`` block.

    Each call is routed through ``backend.run(..., edits=edits)``, so the edits mean exactly
    what they mean in `Backend.run`. A backend that runs the model through its own ``forward``
    hands back the model's complete output for the caller's own arguments; a backend that
    computes the forward itself (e.g. step by step) returns its logits. The model's
    ``forward`` is restored when the block ends, whatever happens inside it.
    """
    import torch

    if backend is None:
        backend = Backend.for_model(model)
    if backend.model is not model:
        raise InputError(
            f"the backend given wraps a {type(backend.model).__name__} object, not "
            f"the model being edited; pass Backend.for_model(model) or None"
        )
    edits = list(edits)
    if edits and "edit" not in backend.capabilities:
        raise CapabilityError(
            f"backend {backend.name!r} cannot edit sites during a run (no "
            f"'edit' capability; it has {sorted(backend.capabilities)})"
        )
    backend.check_request((), edits)  # unknown or read-only sites fail before anything runs

    own = vars(model)
    had_own, previous = "forward" in own, own.get("forward")
    original = model.forward
    inside = False
    outputs: list[Any] = []
    call_args: tuple[Any, ...] = ()
    call_kwargs: dict[str, Any] = {}

    def forward(*args: Any, **kwargs: Any) -> Any:
        nonlocal inside, call_args, call_kwargs
        if inside:  # the backend calls the model: run it on the caller's own arguments
            outputs.append(original(*call_args, **call_kwargs))
            return outputs[-1]
        call_args, call_kwargs = args, kwargs
        batch = _batch_of_call(args, kwargs)
        outputs.clear()
        inside = True
        try:
            result = backend.run(batch, edits=edits, stop_early=False, grad=torch.is_grad_enabled())
        finally:
            inside = False
        if outputs:
            return outputs[-1]
        extra = sorted(
            k
            for k, v in kwargs.items()
            if v is not None and k not in ("input_ids", "attention_mask")
        )
        if extra or len(args) > 1:
            raise InputError(
                f"backend {backend.name!r} computes the forward pass itself, so "
                "edited calls take only input_ids and attention_mask; got "
                f"{extra or f'{len(args)} positional arguments'}"
            )
        return result.logits

    model.forward = forward
    try:
        yield model
    finally:
        if had_own:
            model.forward = previous
        else:
            del model.forward


def _batch_of_call(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The token batch of a ``model(...)`` call, for `Backend.run`."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    if ids is None:
        if kwargs.get("inputs_embeds") is not None:
            return {"inputs_embeds": kwargs["inputs_embeds"]}
        raise InputError("an edited model call needs input_ids (first argument or keyword)")
    batch: dict[str, Any] = {"input_ids": ids}
    mask = kwargs.get("attention_mask")
    # during cached generation the mask also covers earlier tokens: the edits do not need it
    if mask is not None and tuple(getattr(mask, "shape", ())) == tuple(getattr(ids, "shape", ())):
        batch["attention_mask"] = mask
    return batch


# -- search ----------------------------------------------------------------------------------


def candidate_sites(backend: Backend, units: str = "auto") -> list[str]:
    """The sites a search looks at: MLP hidden units where the backend has them (``auto``),
    else each layer's main site."""
    if units not in _UNITS:
        raise ParameterError(f"units must be one of {', '.join(_UNITS)}, got {units!r}")
    if units == "mlp_hidden" or (units == "auto" and "mlp_hidden" in backend.capabilities):
        backend.require("mlp_hidden")
        infos = [
            i
            for i in backend.sites().values()
            if i.site.role == "mlp_hidden" and i.kind == "token" and i.dim > 0
        ]
        if infos:
            return [i.name for i in sorted(infos, key=lambda i: (i.site.layer or 0, i.order))]
        if units == "mlp_hidden":
            raise CapabilityError(
                f"backend {backend.name!r} declares 'mlp_hidden' but has no layer_i.mlp_hidden site"
            )
    names = backend.layer_names()
    if not names:
        raise BackendError(f"backend {backend.name!r} lists no per-layer sites (layer_names())")
    return names


def _matches(name: str, item: str | int) -> bool:
    layer = Site.parse(name).layer
    if isinstance(item, bool):
        return False
    if isinstance(item, int):
        return layer == item
    if item == name or name.startswith(item + "."):
        return True
    return not _LAYER_PREFIX.match(item) and item in name  # "layer_1" must not match layer_10


def filter_sites(names: list[str], layer_filter: LayerFilter) -> list[str]:
    """``names`` restricted by a layer filter (see `NeuronEditConfig`); nothing matching is an
    error that lists the sites searched."""
    if layer_filter is None:
        return list(names)
    items: list[str | int] = (
        [layer_filter] if isinstance(layer_filter, (str, int)) else list(layer_filter)
    )
    bad = [i for i in items if isinstance(i, bool) or not isinstance(i, (str, int))]
    if bad or not items:
        raise ParameterError(
            f"layer_filter takes a site name, a layer ('layer_1' or 1), a "
            f"substring such as 'mlp', or a list of these; got {layer_filter!r}"
        )
    kept = [n for n in names if any(_matches(n, i) for i in items)]
    if not kept:
        raise ParameterError(
            f"layer_filter {layer_filter!r} matches none of the searched sites "
            f"({', '.join(names)}); give one of them, a layer index, or None"
        )
    return kept


def _last_token_means(
    backend: Backend, data: Dataset, sites: list[str], batch_size: int
) -> tuple[dict[str, torch.Tensor], int]:
    import torch

    got = collect(backend, data, sites, pool="last", batch_size=batch_size)
    return {s: got[s].to(torch.float64).mean(0) for s in sites}, len(got)


def search(
    backend: Backend,
    harmful: Any,
    benign: Any,
    config: NeuronEditConfig | None = None,
    *,
    tokenizer: Any = None,
    batch_size: int = 32,
    multiplier: float = 0.0,
) -> NeuronEdit:
    """Contrastive search on ``backend`` (see `find_neurons`)."""
    import torch

    config = config if config is not None else NeuronEditConfig()
    if not isinstance(config, NeuronEditConfig):
        raise ParameterError(f"config must be a NeuronEditConfig, got {type(config).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ParameterError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    first, second = as_dataset(harmful, tokenizer), as_dataset(benign, tokenizer)
    sites = filter_sites(candidate_sites(backend, config.units), config.layer_filter)
    mean_a, n_a = _last_token_means(backend, first, sites, batch_size)
    mean_b, n_b = _last_token_means(backend, second, sites, batch_size)
    indices: dict[str, torch.Tensor] = {}
    deltas: dict[str, torch.Tensor] = {}
    for site in sites:
        delta = mean_a[site] - mean_b[site]
        # the small epsilon keeps e.g. 0.3 * 10 from flooring to 2
        k = min(delta.numel(), max(1, math.floor(config.top_frac * delta.numel() + 1e-9)))
        top = torch.topk(delta.abs(), k)
        indices[site] = top.indices
        deltas[site] = delta[top.indices].to(torch.float32)
    return NeuronEdit(indices, deltas, config, multiplier, backend.name, n_a, n_b)


def find_neurons(
    model: Any,
    inputs_harmful: Any,
    inputs_benign: Any,
    config: NeuronEditConfig | None = None,
    backend_hint: str | None = None,
    *,
    tokenizer: Any = None,
    batch_size: int = 32,
    multiplier: float = 0.0,
) -> NeuronEdit:
    """Units whose mean activation at each prompt's last real token differs most between
    ``inputs_harmful`` and ``inputs_benign`` (per searched site, the top ``config.top_frac``
    by |difference|).

    Inputs: token batches (``{"input_ids", "attention_mask"}``, padding removed by the mask),
    lists of token-id lists, `archscope.Dataset` objects, or texts with ``tokenizer=``.
    ``model`` may also be a `Backend`. Returns a `NeuronEdit` (multiplier 0: ablation).
    """
    backend = as_backend(model, backend_hint)
    return search(
        backend,
        inputs_harmful,
        inputs_benign,
        config,
        tokenizer=tokenizer,
        batch_size=batch_size,
        multiplier=multiplier,
    )


@method(
    "neurons",
    "Units whose last-token activation differs most between two prompt sets "
    "(MLP hidden units where available), to ablate or scale",
    requires={"residual"},
    input="contrast",
    quick={"top_frac": 0.05},
    options=NeuronOptions,
)
def neurons_method(backend: Backend, data: Contrast, options: NeuronOptions) -> NeuronEdit:
    """The registered ``neurons`` method: clean inputs are the first set, corrupted the
    second."""
    first, second = data.datasets()
    return search(
        backend,
        first,
        second,
        options.config(),
        batch_size=options.batch_size,
        multiplier=options.multiplier,
    )
