"""collect: pooled and per-token activations over a dataset, against per-text runs of the
backend (an independent path: one unpadded text at a time, read with plain indexing)."""

from __future__ import annotations

import pytest
import torch
from archs import Arch, arch, words

import archscope
from archscope.data import Dataset
from archscope.errors import InputError, SiteError


def _sites(a: Arch) -> list[str]:
    names = a.backend.layer_names()
    return [names[0], names[-1]]


def _per_text(a: Arch, texts: list[str], site: str) -> list[torch.Tensor]:
    out = []
    for text in texts:
        ids = torch.tensor([a.tokenizer(text)["input_ids"]])
        out.append(a.backend.run(ids, capture=[site])[site][0])
    return out


def test_pooled_and_per_token_match_one_text_at_a_time(any_arch: Arch) -> None:
    texts = words(7, seed=3)
    labels = [i % 2 for i in range(7)]
    data = Dataset.from_texts(texts, labels, tokenizer=any_arch.tokenizer)
    sites = _sites(any_arch)
    mean = archscope.collect(any_arch.backend, data, sites, pool="mean", batch_size=3)
    last = archscope.collect(any_arch.backend, data, sites, pool="last", batch_size=3)
    tokens = archscope.collect(any_arch.backend, data, sites, pool=None, batch_size=4)
    for site in sites:
        reference = _per_text(any_arch, texts, site)
        torch.testing.assert_close(
            mean[site], torch.stack([r.mean(0) for r in reference]), atol=1e-5, rtol=1e-5
        )
        torch.testing.assert_close(
            last[site], torch.stack([r[-1] for r in reference]), atol=1e-5, rtol=1e-5
        )
        torch.testing.assert_close(tokens[site], torch.cat(reference), atol=1e-5, rtol=1e-5)
    lengths = [len(any_arch.tokenizer(t)["input_ids"]) for t in texts]
    assert tokens.doc.tolist() == [i for i, n in enumerate(lengths) for _ in range(n)]
    assert tokens.position.tolist() == [p for n in lengths for p in range(n)]
    assert tokens.labels.tolist() == [labels[i] for i in tokens.doc.tolist()]
    assert mean.labels.tolist() == labels
    ids = [i for t in texts for i in any_arch.tokenizer(t)["input_ids"]]
    assert tokens.token_ids.tolist() == ids


def test_one_forward_per_batch_for_all_sites() -> None:
    a = arch("gpt2")
    calls = []
    handle = a.model.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        archscope.collect(
            a.backend, words(10), a.backend.layer_names(), tokenizer=a.tokenizer, batch_size=4
        )
    finally:
        handle.remove()
    assert len(calls) == 3


def test_state_sites_are_pooled_per_sequence_and_refused_per_token() -> None:
    a = arch("mamba")
    state = next(n for n, i in a.backend.sites().items() if i.kind == "state")
    got = archscope.collect(a.backend, words(3), [state], tokenizer=a.tokenizer, pool="last")
    assert got[state].shape[0] == 3 and got[state].dim() == 2
    with pytest.raises(SiteError, match="state site"):
        archscope.collect(a.backend, words(3), [state], tokenizer=a.tokenizer, pool=None)


def test_bad_requests_are_refused_clearly() -> None:
    a = arch("gpt2")
    with pytest.raises(InputError, match="no tokenizer"):
        archscope.collect(a.backend, ["w5 w6"], ["layer_0.residual"])
    with pytest.raises(InputError, match="pool must be"):
        archscope.collect(a.backend, [[5, 6]], ["layer_0.residual"], pool="max")  # type: ignore[arg-type]
    with pytest.raises(SiteError, match="does not exist"):
        archscope.collect(a.backend, [[5, 6]], ["layer_9.residual"])
    with pytest.raises(InputError, match="cannot use"):
        archscope.collect(a.backend, 42, ["layer_0.residual"])


def test_iter_collect_streams_batches_with_global_doc_indices() -> None:
    a = arch("lstm")
    parts = list(
        archscope.iter_collect(
            a.backend, words(5), ["layer_1.hidden"], tokenizer=a.tokenizer, batch_size=2, pool=None
        )
    )
    assert len(parts) == 3
    docs = torch.cat([p.doc for p in parts]).unique().tolist()
    assert docs == [0, 1, 2, 3, 4]
