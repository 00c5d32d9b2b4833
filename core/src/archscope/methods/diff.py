"""Model diff: how a fine-tuned model's activations moved away from its base model's, layer by
layer, over the real tokens of calibration texts (plus, when asked, circuit-score changes)."""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any

from ..backends import Backend, Edit
from ..batch import real_tokens
from ..collect import collect
from ..data import Dataset, as_dataset, padding_for
from ..errors import InputError, MethodError, ParameterError
from ..legacy import as_backend
from ..params import Param
from ..registry import method
from ..results import Result, pyplot
from ..sites import Site

if TYPE_CHECKING:
    import torch


@dataclass
class LayerDrift(Result):
    """How one layer's main site (residual stream, RNN hidden state) moved, over real tokens.

    ``mean_l2_delta``: mean per-token ‖a_ft − a_base‖; ``relative_drift``: that over the mean
    ‖a_base‖; ``cosine_similarity``: mean per-token cosine; ``top_shifted_neurons``: (unit,
    mean |Δ|) of the most shifted units. ``local_drift``: mean ‖Δ‖ of this layer's output when
    both models get the base model's input to the layer — nonzero only where the layer itself
    changed (None when the backend cannot patch the layer input).
    """

    layer: int
    layer_name: str
    mean_l2_delta: float
    relative_drift: float
    cosine_similarity: float
    top_shifted_neurons: list[tuple[int, float]] = field(default_factory=list)
    local_drift: float | None = None


@dataclass
class CircuitDelta(Result):
    """How one circuit score changed: ``delta = fine_tuned_score − base_score``,
    ``relative_change = delta / |base_score|`` (NaN when the base score is 0 and delta is not)."""

    name: str
    base_score: float
    fine_tuned_score: float
    delta: float
    relative_change: float


@dataclass
class ModelDiff(Result):
    """Base vs fine-tuned: per-layer drift, circuit deltas, notes."""

    arch_family: str
    n_layers: int
    n_calibration_texts: int
    layer_drift: list[LayerDrift] = field(default_factory=list)
    circuit_deltas: list[CircuitDelta] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    n_tokens: int = 0

    def top_changed_layers(self, k: int = 3) -> list[LayerDrift]:
        """The ``k`` layers with the largest relative drift."""
        return sorted(self.layer_drift, key=lambda d: -d.relative_drift)[:k]

    def to_markdown(self) -> str:
        lines = [
            f"## Model diff ({self.arch_family}, {self.n_layers} layers)",
            "",
            f"{self.n_calibration_texts} calibration texts, {self.n_tokens} real tokens "
            "(padding excluded).",
            "",
            "| layer | site | mean ‖Δa‖ | relative | cosine | local ‖Δ‖ | top shifted units |",
            "|---:|---|---:|---:|---:|---:|---|",
        ]
        for d in self.layer_drift:
            local = "—" if d.local_drift is None else f"{d.local_drift:.4g}"
            top = ", ".join(f"{u} ({v:.3g})" for u, v in d.top_shifted_neurons[:5])
            lines.append(
                f"| {d.layer} | {d.layer_name} | {d.mean_l2_delta:.4g} | "
                f"{d.relative_drift:.2%} | {d.cosine_similarity:.4f} | {local} | {top} |"
            )
        if self.layer_drift:
            lines += [
                "",
                "Most changed layers: "
                + ", ".join(
                    f"{d.layer_name} ({d.relative_drift:.2%})" for d in self.top_changed_layers(3)
                ),
            ]
        if self.circuit_deltas:
            lines += [
                "",
                "| circuit | base | fine-tuned | Δ | Δ relative |",
                "|---|---:|---:|---:|---:|",
            ]
            for c in self.circuit_deltas:
                rel = "—" if math.isnan(c.relative_change) else f"{c.relative_change:+.1%}"
                lines.append(
                    f"| {c.name} | {c.base_score:.4g} | {c.fine_tuned_score:.4g} | "
                    f"{c.delta:+.4g} | {rel} |"
                )
        if self.notes:
            lines += ["", *(f"- {n}" for n in self.notes)]
        return "\n".join(lines)

    def figure(self) -> Any:
        """Relative drift and cosine similarity per layer."""
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        layers = [d.layer for d in self.layer_drift]
        ax.plot(
            layers, [d.relative_drift for d in self.layer_drift], marker="o", label="relative drift"
        )
        if any(d.local_drift is not None for d in self.layer_drift):
            base = [
                d.mean_l2_delta / d.relative_drift if d.relative_drift else 0.0
                for d in self.layer_drift
            ]
            ax.plot(
                layers,
                [
                    (d.local_drift or 0.0) / b if b else 0.0
                    for d, b in zip(self.layer_drift, base, strict=True)
                ],
                marker="s",
                linestyle="--",
                label="local drift (relative)",
            )
        ax.set_xlabel("layer")
        ax.set_ylabel("‖Δa‖ / ‖a_base‖")
        ax.set_xticks(layers)
        twin = ax.twinx()
        twin.plot(
            layers,
            [d.cosine_similarity for d in self.layer_drift],
            color="grey",
            marker=".",
            alpha=0.6,
            label="cosine",
        )
        twin.set_ylabel("cosine similarity")
        ax.legend(loc="upper left")
        ax.set_title(f"Model diff ({self.arch_family})")
        fig.tight_layout()
        return fig


def _drift(
    base: torch.Tensor, tuned: torch.Tensor, top_k: int
) -> tuple[float, float, float, list[tuple[int, float]]]:
    import torch

    a, b = base.to(torch.float64), tuned.to(torch.float64)
    delta = b - a
    dist = delta.norm(dim=-1)
    mean_l2 = float(dist.mean())
    base_norm = float(a.norm(dim=-1).mean())
    relative = mean_l2 / base_norm if base_norm > 0 else (0.0 if mean_l2 == 0 else math.inf)
    # identical vectors have cosine exactly 1 (the formula's rounding would say 1 - 1e-16)
    cos = torch.where(
        dist == 0, torch.ones_like(dist), torch.nn.functional.cosine_similarity(a, b, dim=-1)
    )
    shift = delta.abs().mean(0)
    top = torch.topk(shift, min(top_k, shift.numel()))
    return (
        mean_l2,
        relative,
        float(cos.mean()),
        [
            (int(i), float(v))
            for i, v in zip(top.indices.tolist(), top.values.tolist(), strict=True)
            if v > 0
        ],
    )


def _check_pair(base: Backend, tuned: Backend) -> list[str]:
    if base.name != tuned.name:
        raise InputError(
            f"model diff compares two models of one architecture; the base model "
            f"is served by backend {base.name!r}, the fine-tuned one by "
            f"{tuned.name!r}"
        )
    sites = base.layer_names()
    other = tuned.layer_names()
    if sites != other:
        raise InputError(
            f"the two models have different layers: base {sites}, fine-tuned "
            f"{other}; give a fine-tuned copy of the base model"
        )
    dims = {s: (base.site_info(s).dim, tuned.site_info(s).dim) for s in sites}
    bad = {s: d for s, d in dims.items() if d[0] != d[1]}
    if bad:
        raise InputError(f"layer widths differ between the models (base, fine-tuned): {bad}")
    return sites


def _local_drift(
    base: Backend, tuned: Backend, data: Dataset, sites: list[str], batch_size: int
) -> dict[str, float] | None:
    """Per layer, mean ‖f_ft(x) − f_base(x)‖ over real tokens with x the base model's input
    to that layer (patched into the fine-tuned run): zero wherever the layer is unchanged."""
    import torch

    inputs = ["embed", *sites[:-1]]
    table = tuned.sites()
    if "edit" not in tuned.capabilities or any(
        s not in table or not table[s].writable or table[s].kind != "token" for s in inputs
    ):
        return None
    sums = dict.fromkeys(sites, 0.0)
    count = 0
    for _, batch in data.batches(batch_size, padding_for(base)):
        ref = base.run(batch, capture=sorted({*inputs, *sites}))
        mask = batch["attention_mask"]
        for prev, site in zip(inputs, sites, strict=True):
            patched = tuned.run(
                batch, capture=[site], edits=[Edit.replace(prev, ref[prev].to(tuned.device))]
            )
            gap = real_tokens(
                patched[site].to(torch.float64).cpu() - ref[site].to(torch.float64).cpu(), mask
            )
            sums[site] += float(gap.norm(dim=-1).sum())
        count += int(mask.sum())
    return {s: v / count for s, v in sums.items()}


def circuit_deltas(
    base_model: Any, fine_tuned_model: Any, tokenizer: Any, device: str = "cpu"
) -> list[CircuitDelta]:
    """Circuit scores of both models (`archscope.methods.circuits.run_all_circuits`) and their change.
    Any failure propagates: a missing circuit score is an error, never a note."""
    from . import circuits

    def scores(model: Any) -> dict[str, float]:
        run = circuits.run_all_circuits
        kwargs = {"tokenizer": tokenizer}
        if "device" in inspect.signature(run).parameters:
            kwargs["device"] = device
        got = run(model, **kwargs)
        items = got.values() if isinstance(got, Mapping) else got
        return {str(s.name): float(s.score) for s in items}

    base, tuned = scores(base_model), scores(fine_tuned_model)
    if set(base) != set(tuned):
        raise MethodError(
            f"circuit scores differ in kind between the models: base "
            f"{sorted(base)}, fine-tuned {sorted(tuned)}"
        )
    out = []
    for name, b in base.items():
        d = tuned[name] - b
        rel = d / abs(b) if b != 0 else (0.0 if d == 0 else math.nan)
        out.append(CircuitDelta(name, b, tuned[name], d, rel))
    return out


def diff_backends(
    base: Backend,
    tuned: Backend,
    data: Any,
    *,
    tokenizer: Any = None,
    top_k_units: int = 10,
    batch_size: int = 32,
    local: bool = True,
) -> ModelDiff:
    """Per-layer drift of ``tuned`` from ``base`` over the real tokens of ``data``."""
    import torch

    if isinstance(top_k_units, bool) or not isinstance(top_k_units, int) or top_k_units < 1:
        raise ParameterError(f"top_k_units must be an integer >= 1, got {top_k_units!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ParameterError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    dataset = as_dataset(data, tokenizer)
    sites = _check_pair(base, tuned)
    got_base = collect(base, dataset, sites, pool=None, batch_size=batch_size)
    got_tuned = collect(tuned, dataset, sites, pool=None, batch_size=batch_size)
    assert torch.equal(got_base.doc, got_tuned.doc)  # same tokens in the same order
    locals_ = _local_drift(base, tuned, dataset, sites, batch_size) if local else None
    result = ModelDiff(
        arch_family=base.name,
        n_layers=len(sites),
        n_calibration_texts=len(dataset),
        n_tokens=len(got_base),
    )
    for site in sites:
        mean_l2, rel, cos, top = _drift(got_base[site], got_tuned[site], top_k_units)
        layer = Site.parse(site).layer
        result.layer_drift.append(
            LayerDrift(
                layer=layer if layer is not None else -1,
                layer_name=site,
                mean_l2_delta=mean_l2,
                relative_drift=rel,
                cosine_similarity=cos,
                top_shifted_neurons=top,
                local_drift=None if locals_ is None else locals_[site],
            )
        )
    if locals_ is None and local:
        result.notes.append(
            f"local drift not measured: backend {tuned.name!r} cannot replace "
            "each layer's input during a run"
        )
    return result


def compare(
    base_model: Any,
    fine_tuned_model: Any,
    tokenizer: Any,
    calibration_texts: list[str],
    backend_hint: str | None = None,
    run_circuits: bool = True,
    max_length: int = 32,
    device: str = "cpu",
    *,
    top_k_units: int = 10,
    batch_size: int = 32,
) -> ModelDiff:
    """Compare a fine-tuned model with its base model on ``calibration_texts`` (each cut to
    ``max_length`` tokens): per-layer drift over real tokens and, with ``run_circuits``,
    circuit-score deltas (a circuit failure raises). Inputs go to each model's own device;
    ``device`` is passed to the circuit tests."""
    if (
        isinstance(calibration_texts, str)
        or not isinstance(calibration_texts, Sequence)
        or not calibration_texts
        or not all(isinstance(t, str) for t in calibration_texts)
    ):
        raise InputError(
            "calibration_texts must be a non-empty list of strings, got "
            f"{type(calibration_texts).__name__}"
        )
    base = as_backend(base_model, backend_hint)
    tuned = as_backend(fine_tuned_model, backend_hint)
    data = Dataset.from_texts(list(calibration_texts), tokenizer=tokenizer, max_length=max_length)
    result = diff_backends(base, tuned, data, top_k_units=top_k_units, batch_size=batch_size)
    if run_circuits:
        result.circuit_deltas = circuit_deltas(base_model, fine_tuned_model, tokenizer, device)
    return result


@method(
    "diff",
    "Per-layer activation drift of a fine-tuned model from its base model over real tokens",
    requires={"residual"},
    input="dataset",
    arity=2,
    quick={"top_k_units": 5},
)
def diff_method(
    backend_a: Backend,
    backend_b: Backend,
    data: Dataset,
    *,
    top_k_units: Annotated[int, Param(min=1, help="most shifted units listed per layer")] = 10,
    batch_size: Annotated[int, Param(min=1)] = 32,
    local: Annotated[bool, Param(help="also measure each layer's own change")] = True,
    circuits: Annotated[bool, Param(help="also compare circuit scores")] = False,
) -> ModelDiff:
    """The registered ``diff`` method: model A is the base, model B the fine-tuned one."""
    result = diff_backends(
        backend_a, backend_b, data, top_k_units=top_k_units, batch_size=batch_size, local=local
    )
    if circuits:
        result.circuit_deltas = circuit_deltas(backend_a.model, backend_b.model, data.tokenizer)
    return result
