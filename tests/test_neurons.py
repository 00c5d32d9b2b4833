"""Neuron modulation on a transformer, a Mamba, a hybrid and an LSTM: the search against a
per-text reference, ablation against random units on a planted contrast, the layer filter,
padding invariance, edits of plain model calls that never outlive their ``with`` block, the
0.2 calls and typed errors."""

from __future__ import annotations

import copy
from functools import cache
from typing import Any

import pytest
import torch
from archs import Arch, arch, words

import archscope
from archscope import Edit, InputError, ParameterError
from archscope.data import Contrast, pad_batch
from archscope.engine import last_real_index
from archscope.methods.neurons import NeuronEdit, NeuronEditConfig, find_neurons
from archscope.testing import MethodContract, hook_ids

#: Units kept per site: a few MLP units of 128, a few residual / hidden units of 16..32.
FRAC = {"gpt2": 0.05, "mamba": 0.1, "hybrid": 0.1, "lstm": 0.1}


def contrast(n: int = 16, seed: int = 3) -> tuple[list[str], list[str]]:
    """Prompts that differ only in their last token (w7 vs w8), of ragged lengths."""
    prefixes = words(n, seed=seed)
    return [p + " w7" for p in prefixes], [p + " w8" for p in prefixes]


def ids_of(a: Arch, texts: list[str]) -> list[list[int]]:
    return [list(r) for r in a.tokenizer(texts)["input_ids"]]


def sides(backend: Any) -> list[str]:
    return ["right", "left"] if backend.padding == "both" else [backend.padding]


def embedding(model: Any) -> Any:
    get = getattr(model, "get_input_embeddings", None)
    return get() if get is not None else model.embed


@cache
def planted(name: str) -> Arch:
    """A copy of the model whose token w7 embeds as w8 plus a large push along one axis: the
    two prompt sets differ only through that planted direction, which drives the logits."""
    base = arch(name)
    model = copy.deepcopy(base.model)
    weight = embedding(model).weight
    with torch.no_grad():
        push = 2.0 * float(weight.norm(dim=-1).mean())
        weight[7] = weight[8]
        weight[7, 5] += push
    return Arch(name, model, archscope.Backend.for_model(model), base.tokenizer)


def last_logprobs(a: Arch, texts: list[str], edits: list[Edit]) -> torch.Tensor:
    batch = pad_batch(
        ids_of(a, texts), a.backend.padding if a.backend.padding != "both" else "right"
    )
    out = a.backend.run(batch, capture=["logits"], edits=edits).logits
    assert out is not None
    rows = torch.arange(len(texts))
    return torch.log_softmax(out[rows, last_real_index(batch["attention_mask"])].double(), -1)


def reference_deltas(
    a: Arch, first: list[str], second: list[str], sites: list[str]
) -> dict[str, torch.Tensor]:
    """Mean last-token activation difference per site, one unpadded text at a time."""

    def mean(texts: list[str]) -> dict[str, torch.Tensor]:
        runs = [a.backend.run(torch.tensor([ids]), capture=sites) for ids in ids_of(a, texts)]
        return {s: torch.stack([r[s][0, -1].double() for r in runs]).mean(0) for s in sites}

    m1, m2 = mean(first), mean(second)
    return {s: m1[s] - m2[s] for s in sites}


# -- search ----------------------------------------------------------------------------------


def test_search_matches_a_per_text_reference(any_arch: Arch) -> None:
    first, second = contrast(10)
    edit = find_neurons(
        any_arch.model,
        first,
        second,
        NeuronEditConfig(FRAC[any_arch.name]),
        tokenizer=any_arch.tokenizer,
    )
    assert edit.layer_to_indices
    reference = reference_deltas(any_arch, first, second, list(edit.layer_to_indices))
    for site, idx in edit.layer_to_indices.items():
        delta = reference[site]
        k = max(1, int(FRAC[any_arch.name] * delta.numel() + 1e-9))
        expected = torch.topk(delta.abs(), k).indices
        assert idx.tolist() == expected.tolist(), site
        torch.testing.assert_close(
            edit.layer_to_deltas[site].double(), delta[expected], atol=1e-5, rtol=0
        )


def test_units_are_mlp_hidden_where_the_backend_has_them(any_arch: Arch) -> None:
    first, second = contrast(6)
    edit = find_neurons(
        any_arch.backend, first, second, NeuronEditConfig(0.1), tokenizer=any_arch.tokenizer
    )
    if "mlp_hidden" in any_arch.backend.capabilities:
        expected = [f"layer_{i}.mlp_hidden" for i in range(any_arch.backend.n_layers)]
    else:
        expected = any_arch.backend.layer_names()
        with pytest.raises(archscope.CapabilityError, match="mlp_hidden"):
            find_neurons(
                any_arch.backend,
                first,
                second,
                NeuronEditConfig(units="mlp_hidden"),
                tokenizer=any_arch.tokenizer,
            )
    assert list(edit.layer_to_indices) == expected
    residual = find_neurons(
        any_arch.backend,
        first,
        second,
        NeuronEditConfig(0.1, units="residual"),
        tokenizer=any_arch.tokenizer,
    )
    assert list(residual.layer_to_indices) == any_arch.backend.layer_names()


def test_layer_filter_is_honoured(any_arch: Arch) -> None:
    first, second = contrast(6)
    backend, tok = any_arch.backend, any_arch.tokenizer
    searched = list(
        find_neurons(backend, first, second, NeuronEditConfig(0.1), tokenizer=tok).layer_to_indices
    )
    for layer_filter, kept in [
        ("layer_1", [searched[1]]),
        (1, [searched[1]]),
        ([0, searched[-1]], [searched[0], searched[-1]]),
        (searched[0], [searched[0]]),
    ]:
        got = find_neurons(
            backend, first, second, NeuronEditConfig(0.1, layer_filter), tokenizer=tok
        )
        assert list(got.layer_to_indices) == kept, layer_filter
    with pytest.raises(ParameterError, match="matches none"):
        find_neurons(backend, first, second, NeuronEditConfig(0.1, "layer_9"), tokenizer=tok)


def test_padding_does_not_change_the_search(any_arch: Arch) -> None:
    first, second = contrast(8, seed=11)
    config = NeuronEditConfig(FRAC[any_arch.name])
    a, b = ids_of(any_arch, first), ids_of(any_arch, second)
    one = find_neurons(any_arch.backend, a, b, config, batch_size=1)
    runs = [
        find_neurons(any_arch.backend, pad_batch(a, side), pad_batch(b, side), config, batch_size=8)
        for side in sides(any_arch.backend)
    ]
    for other in runs:
        assert other.layer_to_indices.keys() == one.layer_to_indices.keys()
        for site, idx in one.layer_to_indices.items():
            assert other.layer_to_indices[site].tolist() == idx.tolist()
            torch.testing.assert_close(
                other.layer_to_deltas[site], one.layer_to_deltas[site], atol=1e-5, rtol=0
            )


# -- ablation --------------------------------------------------------------------------------


def test_ablating_found_units_moves_the_contrast_more_than_random_units(any_arch: Arch) -> None:
    a = planted(any_arch.name)
    first, second = contrast(16)
    edit = find_neurons(
        a.backend, first, second, NeuronEditConfig(FRAC[a.name]), tokenizer=a.tokenizer
    )
    clean = last_logprobs(a, first, []).mean(0) - last_logprobs(a, second, []).mean(0)

    def contrast_change(edits: list[Edit]) -> float:
        moved = last_logprobs(a, first, edits).mean(0) - last_logprobs(a, second, edits).mean(0)
        return float((moved - clean).norm())

    found = contrast_change(edit.edits())
    random = []
    for seed in range(5):
        gen = torch.Generator().manual_seed(seed)
        edits = []
        for site, idx in edit.layer_to_indices.items():
            taken = set(idx.tolist())
            others = torch.tensor(
                [u for u in range(a.backend.site_info(site).dim) if u not in taken]
            )
            pick = others[torch.randperm(len(others), generator=gen)[: len(idx)]]
            edits.append(Edit.scale(site, 0.0, units=pick.tolist()))
        random.append(contrast_change(edits))
    print(f"{a.name}: found {found:.4f}, random {[round(r, 4) for r in random]}")
    assert found > max(random)
    assert found > 1.5 * sum(random) / len(random)


# -- applying --------------------------------------------------------------------------------


def test_apply_hook_edits_plain_calls_then_leaves_the_model_as_it_was(any_arch: Arch) -> None:
    first, second = contrast(6)
    model, backend = any_arch.model, any_arch.backend
    edit = find_neurons(model, first, second, NeuronEditConfig(0.1), tokenizer=any_arch.tokenizer)
    side = "right" if backend.padding == "both" else backend.padding
    batch = pad_batch(ids_of(any_arch, first), side)
    hooks, training = hook_ids(model), model.training

    def logits(out: Any) -> torch.Tensor:
        return (out if isinstance(out, torch.Tensor) else out.logits).detach()

    with torch.no_grad():
        clean = logits(model(**batch))
        with edit.apply_hook(model):
            inside = logits(model(**batch))
        after = logits(model(**batch))
    reference = backend.run(batch, capture=["logits"], edits=edit.edits()).logits
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(inside[mask], reference[mask], atol=1e-5, rtol=0)
    assert float((inside - clean)[mask].abs().max()) > 1e-3  # the ablation did something
    torch.testing.assert_close(after, clean, atol=0, rtol=0)
    assert "forward" not in vars(model) and hook_ids(model) == hooks
    assert model.training == training

    # multiplier 0 ablates: the units read zero at every position during the run
    site, idx = next(iter(edit.layer_to_indices.items()))
    got = backend.run(batch, capture=[site], edits=edit.edits())[site]
    assert float(got[..., idx].abs().max()) == 0.0


def test_apply_hook_removes_everything_on_an_exception(any_arch: Arch) -> None:
    first, second = contrast(6)
    model = any_arch.model
    edit = find_neurons(model, first, second, NeuronEditConfig(0.1), tokenizer=any_arch.tokenizer)
    ids = torch.tensor([ids_of(any_arch, first)[0]])
    hooks = hook_ids(model)
    unused = edit.apply_hook(model)  # made but never entered: nothing is attached
    assert "forward" not in vars(model) and hook_ids(model) == hooks
    del unused
    with torch.no_grad():
        clean = model(ids)
        with pytest.raises(RuntimeError, match="inside"), edit.apply_hook(model):
            model(ids)
            raise RuntimeError("inside")
        again = model(ids)
    assert "forward" not in vars(model) and hook_ids(model) == hooks
    c = clean if isinstance(clean, torch.Tensor) else clean.logits
    g = again if isinstance(again, torch.Tensor) else again.logits
    torch.testing.assert_close(g, c, atol=0, rtol=0)


def test_scalar_mode_scales_and_ablate_mode_zeroes() -> None:
    a = arch("gpt2")
    first, second = contrast(6)
    edit = find_neurons(
        a.model, first, second, NeuronEditConfig(0.05), tokenizer=a.tokenizer, multiplier=3.0
    )
    site, idx = next(iter(edit.layer_to_indices.items()))
    batch = pad_batch(ids_of(a, first), "right")
    clean = a.backend.run(batch, capture=[site])[site]
    scaled = a.backend.run(batch, capture=[site], edits=edit.edits())[site]
    torch.testing.assert_close(scaled[..., idx], 3.0 * clean[..., idx])
    ablate = NeuronEdit(
        edit.layer_to_indices,
        edit.layer_to_deltas,
        NeuronEditConfig(0.05, mode="ablate"),
        multiplier=3.0,
    )
    zeroed = a.backend.run(batch, capture=[site], edits=ablate.edits())[site]
    assert float(zeroed[..., idx].abs().max()) == 0.0


# -- 0.2 calls, the registered method, errors -------------------------------------------------


def test_02_calls() -> None:
    a = arch("gpt2")
    first, second = contrast(6)
    inputs_h = pad_batch(ids_of(a, first), "right")
    inputs_b = pad_batch(ids_of(a, second), "left")
    edit = find_neurons(
        a.model,
        inputs_harmful=inputs_h,
        inputs_benign=inputs_b,
        config=NeuronEditConfig(top_frac=0.001),
        backend_hint="transformer",
    )
    assert sum(len(v) for v in edit.layer_to_indices.values()) == a.backend.n_layers
    assert edit.multiplier == 0.0 and edit.config.mode == "scalar"
    with torch.no_grad(), edit.apply_hook(a.model):
        out = a.model(**inputs_h)
    assert out.logits.shape[:2] == inputs_h["input_ids"].shape
    assert "| layer_0.mlp_hidden | 1 |" in edit.to_markdown()
    assert (
        edit.to_dict()["layer_to_indices"]["layer_0.mlp_hidden"]
        == edit.layer_to_indices["layer_0.mlp_hidden"].tolist()
    )


def test_registered_method_matches_find_neurons() -> None:
    a = arch("lstm")
    first, second = contrast(6)
    got = archscope.run_method(
        "neurons",
        a.backend,
        Contrast(first, second, a.tokenizer),
        top_frac=0.1,
        layer_filter=["layer_1"],
    )
    direct = find_neurons(
        a.backend, first, second, NeuronEditConfig(0.1, ["layer_1"]), tokenizer=a.tokenizer
    )
    assert {k: v.tolist() for k, v in got.layer_to_indices.items()} == {
        k: v.tolist() for k, v in direct.layer_to_indices.items()
    }
    with pytest.raises(ParameterError, match="top_frac"):
        archscope.run_method(
            "neurons", a.backend, Contrast(first, second, a.tokenizer), top_frac=2.0
        )


def test_bad_input_gets_typed_errors() -> None:
    a = arch("gpt2")
    first, second = contrast(4)
    with pytest.raises(ParameterError, match="top_frac"):
        NeuronEditConfig(top_frac=0)
    with pytest.raises(ParameterError, match="mode"):
        NeuronEditConfig(mode="amplify")
    with pytest.raises(ParameterError, match="layer_filter"):
        find_neurons(
            a.model,
            first,
            second,
            NeuronEditConfig(0.1, [1.5]),  # type: ignore[list-item]
            tokenizer=a.tokenizer,
        )
    with pytest.raises(InputError, match="tokenizer"):
        find_neurons(a.model, first, second)
    edit = find_neurons(a.model, first, second, NeuronEditConfig(0.1), tokenizer=a.tokenizer)
    with pytest.raises(InputError, match="wraps"), edit.apply_hook(a.model, arch("lstm").backend):
        pass
    assert "forward" not in vars(a.model)


class TestNeuronsMethodContract(MethodContract):
    """The method conformance kit on the registered ``neurons`` method."""

    method_name = "neurons"
