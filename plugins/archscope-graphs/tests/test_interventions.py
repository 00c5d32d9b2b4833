"""Checking graphs against the real model: ablating (or steering) the 10 most influential
features (an edit of the MLP output by decoder row × activation) moves the target logit as the
graph predicts, for both linearisations ("frozen" and "gradient")."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from archscope.errors import ParameterError
from archscope_graphs.attribution import attribute
from archscope_graphs.interventions import (
    check_graph,
    gradient_prediction,
    measure,
    node_edits,
    pearson,
)


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(4, 90, (1, 8), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_tiny_transformers_ablations_follow_the_graph(
    family: str, tiny_llama: Any, tiny_gpt2: Any, tiny_fitted: Any
) -> None:
    backend = tiny_llama if family == "llama" else tiny_gpt2
    tcs = tiny_fitted[family]
    for linearise in ("frozen", "gradient"):
        graph = attribute(backend, _ids(), transcoders=tcs, prune=False, linearise=linearise)
        result = check_graph(backend, _ids(), graph, transcoders=tcs, n=10)
        steered = check_graph(backend, _ids(), graph, transcoders=tcs, n=10, scale=1.1)
        print(f"{family}, {linearise}: r = {result['r']:.3f} (ablation), {steered['r']:.3f} (x1.1)")
        assert len(result["nodes"]) == 10
        assert result["r"] >= 0.8 and steered["r"] >= 0.8


def test_zoo_transformer_ablations_follow_the_graph(zoo: Any, zoo_transcoders: Any) -> None:
    _, tokenizer, backend = zoo["transformer"]
    ids = torch.tensor([tokenizer.encode("the cat sat on the mat and the dog")])
    for linearise in ("frozen", "gradient"):
        graph = attribute(
            backend, ids, transcoders=zoo_transcoders, prune=False, linearise=linearise
        )
        for scale in (0.0, 1.1, 2.0):
            result = check_graph(
                backend, ids, graph, transcoders=zoo_transcoders, n=10, scale=scale
            )
            print(f"zoo transformer, {linearise}, scale {scale}: r = {result['r']:.3f}")
            assert result["r"] >= 0.8


def test_an_ablation_edit_removes_exactly_the_feature_write(
    tiny_llama: Any, make_transcoders: Any
) -> None:
    tcs = make_transcoders(tiny_llama.site_info("layer_0.mlp").dim, 2)
    graph = attribute(tiny_llama, _ids(), transcoders=tcs, prune=False)
    node = next(n for n in graph.nodes if n.kind == "feature" and n.layer == 1)
    clean = tiny_llama.run(_ids(), capture=["layer_1.mlp"]).activations["layer_1.mlp"]
    (edit,) = node_edits(node, 0.0, tcs, None)
    edited = tiny_llama.run(_ids(), capture=["layer_1.mlp"], edits=[edit])
    change = edited.activations["layer_1.mlp"] - clean
    expected = torch.zeros_like(change)
    expected[0, node.position] = -node.value * tcs[1].decoder("layer_1.mlp")[node.index]
    torch.testing.assert_close(change, expected, atol=1e-5, rtol=0)
    # unscaled: nothing changes
    assert measure(tiny_llama, _ids(), node, 5, scale=1.0, transcoders=tcs) == 0.0


def test_bad_interventions_are_refused(tiny_llama: Any) -> None:
    graph = attribute(tiny_llama, _ids(), prune=False)
    logit = graph.nodes[graph.targets[0]]
    with pytest.raises(ParameterError, match="logit node"):
        node_edits(logit, 0.0, [], None)
    with pytest.raises(ParameterError, match="at least 2 nodes"):
        check_graph(tiny_llama, _ids(), graph, kinds=("feature",))
    assert pearson([1, 2, 3], [2, 4, 6.5]) > 0.99


def test_tokens_outside_the_vocabulary_are_refused(tiny_llama: Any) -> None:
    graph = attribute(tiny_llama, _ids(), prune=False)
    node = next(n for n in graph.nodes if n.kind == "embedding")
    vocab = tiny_llama.run(_ids(), capture=["logits"]).logits.shape[-1]
    for check in (measure, gradient_prediction):
        with pytest.raises(
            ParameterError, match=rf"token must be a token id in \[0, {vocab}\), got {vocab}"
        ):
            check(tiny_llama, _ids(), node, vocab)
        with pytest.raises(ParameterError, match="contrast must be a token id .* got -1"):
            check(tiny_llama, _ids(), node, 5, contrast=-1)
        with pytest.raises(ParameterError, match="token must be a token id .* got 2.0"):
            check(tiny_llama, _ids(), node, 2.0)
    # numpy-style integer ids are token ids
    token = torch.tensor(5)
    assert measure(tiny_llama, _ids(), node, token, scale=1.0) == 0.0
