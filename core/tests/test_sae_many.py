"""Many dictionaries from one pass (`train_saes`, `train_dictionaries`): SAEs of several sites
and settings trained together equal, bit for bit, the same SAEs trained one at a time under
the same seeds; the model runs once per batch of texts; a job reading two sites (the
transcoder shape) joins through the `DictionaryJob` interface; bad input is refused clearly.

Bitwise, not to a tolerance: each job performs exactly the floating-point operations it
would perform alone (its rows are the same tensors, shuffled by its own seeded generator,
and the model's activations at a site do not depend on which other sites are captured), so
on one CPU the results are identical, and any difference means the jobs leak into each other.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from archs import arch, words

import archscope
from archscope.data import as_dataset
from archscope.errors import ParameterError
from archscope.methods.sae import (
    SAE,
    DictionaryJob,
    SAEConfig,
    SAEJob,
    fit_sae,
    train_dictionaries,
    train_saes,
)

VARIANTS = [
    {"sae_type": "topk", "n_features": 48, "k": 4, "seed": 3},
    {"sae_type": "dense", "n_features": 32, "sparsity": 0.05, "seed": 7},
    {"sae_type": "batchtopk", "n_features": 40, "k": 3, "buffer_size": 90},
]
SHARED: dict[str, Any] = {"batch_size": 32, "learning_rate": 3e-3}


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _same(a: SAE, b: SAE) -> None:
    ta, tb = a.state_tensors(), b.state_tensors()
    assert ta.keys() == tb.keys()
    for name in ta:
        assert torch.equal(ta[name], tb[name]), name
    assert a.last_metrics == pytest.approx(b.last_metrics, nan_ok=True, rel=0, abs=0)
    assert a.site == b.site
    assert a.fitted_on == b.fitted_on


def _config(width: int, variant: dict[str, Any]) -> SAEConfig:
    return SAEConfig(input_dim=width, **{**SHARED, **variant})


@pytest.mark.parametrize("name", ["gpt2", "lstm"])
def test_trained_together_equal_trained_alone(name: str) -> None:
    a = arch(name)
    backend, texts = a.backend, as_dataset(words(30, seed=1), a.tokenizer)
    sites = backend.layer_names()[:2] + [s for s in backend.sites() if s.endswith("mlp")][:1]
    together = train_saes(
        backend, texts, sites, variants=VARIANTS, epochs=2, text_batch_size=8, **SHARED
    )
    assert len(together) == len(sites) * len(VARIANTS)
    for i, site in enumerate(sites):
        got = archscope.collect(backend, texts, [site], pool=None, batch_size=8)
        acts = got.activations[site]
        for j, variant in enumerate(VARIANTS):
            alone = fit_sae(
                acts,
                _config(acts.shape[-1], variant),
                epochs=2,
                fitted_on=archscope.ArtifactFit.of(backend, site),
            )
            alone.site = site
            _same(together[i * len(VARIANTS) + j], alone)
    assert {s.sae_type for s in together} == {"topk", "dense", "batchtopk"}


def test_streamed_together_equal_streamed_alone_and_run_the_model_once_per_batch() -> None:
    a = arch("gpt2")
    backend, texts = a.backend, as_dataset(words(30, seed=2), a.tokenizer)
    sites = backend.layer_names()
    calls: list[int] = []
    handle = a.model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        together = train_saes(
            backend,
            texts,
            sites,
            variants=VARIANTS,
            epochs=2,
            stream=True,
            text_batch_size=8,
            **SHARED,
        )
    finally:
        handle.remove()
    assert len(calls) == 2 * 4  # two epochs of ceil(30 / 8) batches, whatever the site count
    for i, site in enumerate(sites):

        def chunks(site: str = site) -> Any:
            for c in archscope.iter_collect(backend, texts, [site], pool=None, batch_size=8):
                yield c.activations[site]

        for j, variant in enumerate(VARIANTS):
            alone = fit_sae(
                chunks,
                _config(backend.site_info(site).dim, variant),
                epochs=2,
                fitted_on=archscope.ArtifactFit.of(backend, site),
            )
            alone.site = site
            _same(together[i * len(VARIANTS) + j], alone)


class LinearMapJob:
    """A job reading two sites: a linear map from ``src`` rows to ``dst`` rows trained by
    plain gradient steps (the shape of a transcoder), independent of the SAE code."""

    def __init__(self, src: str, dst: str, dims: tuple[int, int], seed: int = 0) -> None:
        self.reads = (src, dst)
        self.dims = dims
        self.batch_size, self.buffer_size, self.seed = 16, 50, seed
        self.w = torch.zeros(dims)
        self.seen: list[torch.Tensor] = []
        self.started_with = 0

    def start(self, sample: tuple[torch.Tensor, ...], device: torch.device) -> None:
        self.started_with = len(sample[0])

    def begin_epoch(self) -> None:
        pass

    def step(self, batch: tuple[torch.Tensor, ...], record: bool) -> None:
        x, y = batch
        assert len(x) == len(y)
        self.w -= 0.01 * x.t() @ (x @ self.w - y) / len(x)
        self.seen.append(torch.cat([x, y], 1))

    def metrics(self) -> dict[str, float]:
        return {}

    def finish(self) -> torch.Tensor:
        return self.w


def test_a_two_site_job_trains_beside_saes_on_aligned_rows() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=gen)
    y = x @ torch.randn(6, 4, generator=gen)
    data = {"a": x, "b": y}
    job = LinearMapJob("a", "b", (6, 4), seed=5)
    assert isinstance(job, DictionaryJob)
    chunks = [{k: v[i : i + 30] for k, v in data.items()} for i in range(0, 200, 30)]
    sae, w = train_dictionaries(chunks, [SAEJob("a", _config(6, VARIANTS[0])), job], epochs=3)
    alone_job = LinearMapJob("a", "b", (6, 4), seed=5)
    (w_alone,) = train_dictionaries(chunks, [alone_job], epochs=3)
    assert torch.equal(w, w_alone)
    # rows stay paired through the shuffle: every (x, y) seen is a row of the data
    rows = torch.cat(job.seen)
    assert len(rows) == 3 * 200
    pairs = {tuple(r.tolist()) for r in torch.cat([x, y], 1)}
    assert all(tuple(r.tolist()) in pairs for r in rows)
    assert job.started_with >= 50
    _same(sae, fit_sae([c["a"] for c in chunks], _config(6, VARIANTS[0]), epochs=3))


def test_bad_jobs_and_sources_are_refused_clearly() -> None:
    a = arch("gpt2")
    sites = a.backend.layer_names()
    texts = as_dataset(words(4), a.tokenizer)
    with pytest.raises(ParameterError, match="not a dictionary job"):
        train_dictionaries(torch.zeros(4, 2), [object()], epochs=1)  # type: ignore[list-item]
    with pytest.raises(ParameterError, match="no dictionary jobs"):
        train_dictionaries(torch.zeros(4, 2), [], epochs=1)
    with pytest.raises(ParameterError, match="holds \\['b'\\]"):
        train_dictionaries([{"b": torch.zeros(4, 6)}], [SAEJob("a", _config(6, VARIANTS[0]))])
    with pytest.raises(ParameterError, match="as many rows"):
        train_dictionaries(
            [{"a": torch.zeros(4, 6), "b": torch.zeros(3, 4)}], [LinearMapJob("a", "b", (6, 4))]
        )
    with pytest.raises(ParameterError, match="name a site twice"):
        train_saes(a.backend, texts, [sites[0], sites[0]])
    with pytest.raises(ParameterError, match="valid: sae_type"):
        train_saes(a.backend, texts, sites, variants=[{"width": 3}])
    with pytest.raises(ParameterError, match="epochs must be"):
        train_saes(a.backend, texts, sites, epochs=0)
    with pytest.raises(ParameterError, match="got no activations of a"):
        train_dictionaries({"a": torch.zeros(0, 6)}, [SAEJob("a", _config(6, VARIANTS[0]))])
