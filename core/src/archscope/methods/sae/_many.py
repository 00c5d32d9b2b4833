"""Many dictionaries from one pass: SAEs for several sites (and several sizes or sparsities
per site) trained together, the model run once per batch of texts, each equal to training it
alone under the same seed."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch

from ...artifacts import ArtifactFit
from ...errors import ParameterError
from ._models import SAE, SAEConfig
from ._options import SAEOptions
from ._train import DictionaryJob, SAEJob, train_dictionaries

#: SAEConfig fields a variant may set (the rest follow the site)
_VARIANT_FIELDS = (
    "sae_type",
    "n_features",
    "k",
    "sparsity",
    "learning_rate",
    "batch_size",
    "seed",
    "aux_k",
    "aux_coefficient",
    "dead_after",
    "buffer_size",
    "threshold_lr",
    "normalize",
)


def train_saes(
    backend: Any,
    data: Any,
    sites: Sequence[str] | str | None = None,
    *,
    variants: Sequence[Mapping[str, Any]] | None = None,
    jobs: Sequence[DictionaryJob] = (),
    sae_type: str = SAEOptions.sae_type,
    n_features: int | None = None,
    k: int = SAEOptions.k,
    sparsity: float = SAEOptions.sparsity,
    learning_rate: float = SAEOptions.learning_rate,
    batch_size: int = SAEOptions.batch_size,
    seed: int = SAEOptions.seed,
    epochs: int = SAEOptions.epochs,
    stream: bool = False,
    text_batch_size: int = SAEOptions.text_batch_size,
    pool: str | None = None,
    tokenizer: Any = None,
    progress: bool | None = None,
) -> list[Any]:
    """Train one SAE per (site, variant), and any further ``jobs``, from one run of the model
    over ``data``: one result per job, SAEs first (site by site, each site's variants in
    order), then the results of ``jobs``.

    ``sites``: token or state sites (default: every layer's main site). ``variants``: SAE
    settings per site, each a mapping of `SAEConfig` fields (``n_features``, ``k``,
    ``sparsity``, ``sae_type``, ``seed``, ...) over the shared keyword settings; default one
    SAE per site. ``n_features`` defaults to 8 x the site's width. ``jobs``: other
    `DictionaryJob` objects (transcoders, write SAEs) trained in the same pass; the sites they
    read are collected too. The activations of every real token (``pool``: one pooled vector
    per text instead) are kept in memory and the model runs once; with ``stream`` they are
    not kept and the model runs once per epoch, each batch feeding every dictionary.

    Each SAE equals ``fit_sae`` on that site's activations alone with the same settings and
    seed: every job shuffles its rows with its own generator.
    """
    from ...collect import iter_collect
    from ...data import as_dataset

    if isinstance(sites, str):
        sites = [sites]
    chosen = list(backend.layer_names()) if sites is None else list(sites)
    if not chosen and not jobs:
        raise ParameterError("train_saes got no sites and no jobs: name at least one site")
    names = [backend.site_info(s).name for s in chosen]
    if len(set(names)) != len(names):
        raise ParameterError(
            f"sites {chosen} name a site twice; give each site once and several SAEs per site "
            "through variants=[{...}, {...}]"
        )
    variant_list = _checked_variants(variants)
    extra_reads = [s for job in jobs for s in job.reads]
    if any(s is None for s in extra_reads):
        raise ParameterError("a job trained by train_saes must name the sites it reads")
    collected = list(dict.fromkeys([*names, *(backend.site_info(s).name for s in extra_reads)]))
    dataset = as_dataset(data, tokenizer)

    def batches() -> Iterator[Any]:
        return iter_collect(
            backend,
            dataset,
            collected,
            pool=pool,  # type: ignore[arg-type]
            batch_size=text_batch_size,
            progress=progress,
        )

    training, widths = _training_data(batches, collected, stream)
    shared = dict(
        sae_type=sae_type,
        k=k,
        sparsity=sparsity,
        learning_rate=learning_rate,
        batch_size=batch_size,
        seed=seed,
    )
    sae_jobs: list[DictionaryJob] = []
    for site in names:
        width = widths[site]
        for v in variant_list:
            settings = {**shared, "n_features": n_features or 8 * width, **v}
            config = SAEConfig(input_dim=width, **settings)
            sae_jobs.append(SAEJob(site, config, fitted_on=ArtifactFit.of(backend, site)))
    results = train_dictionaries(
        training, [*sae_jobs, *jobs], epochs=epochs, device=str(backend.device)
    )
    for job, result in zip(sae_jobs, results, strict=False):
        if isinstance(result, SAE):
            result.site = job.reads[0]
    return results


def _checked_variants(variants: Sequence[Mapping[str, Any]] | None) -> list[dict[str, Any]]:
    variant_list = [dict(v) for v in (variants if variants is not None else [{}])]
    for v in variant_list:
        unknown = sorted(set(v) - set(_VARIANT_FIELDS))
        if unknown:
            raise ParameterError(
                f"variant {v} sets {unknown}, which no SAE setting is called; valid: "
                f"{', '.join(_VARIANT_FIELDS)}"
            )
    if not variant_list:
        raise ParameterError("variants=[] trains nothing: leave it out for one SAE per site")
    return variant_list


def _training_data(
    batches: Callable[[], Iterator[Any]], sites: list[str], stream: bool
) -> tuple[Any, dict[str, int]]:
    """What the jobs train on and each site's width: every site's activations in memory (the
    model runs once), or with ``stream`` a function returning a fresh pass of batches (the
    first pass is the one read here for the widths)."""
    if stream:
        first_pass = batches()
        first = next(first_pass, None)
        if first is None:
            raise ParameterError("train_saes got no data (an empty dataset)")
        fresh = [itertools.chain([first], first_pass)]

        def source() -> Any:
            return fresh.pop() if fresh else batches()

        return source, {s: int(first.activations[s].shape[-1]) for s in sites}
    parts = list(batches())
    if not parts:
        raise ParameterError("train_saes got no data (an empty dataset)")
    whole = {s: torch.cat([p.activations[s] for p in parts]) for s in sites}
    return whole, {s: int(whole[s].shape[-1]) for s in sites}
