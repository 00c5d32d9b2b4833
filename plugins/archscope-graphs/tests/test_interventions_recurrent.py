"""Interventions on recurrent families, and what they show about the frozen linearisation.

- zoo:gdn (gated delta nets with MLPs) has feature nodes: ablating or steering the 10 most
  influential transcoder features in the real model moves the target logit as the graph
  predicts (Pearson r >= 0.8), as on transformers, with either linearisation.
- On zoo LSTM and zoo Mamba (no MLP, so embedding nodes only) a small intervention (x1.1) is
  predicted almost exactly by the real model's own gradient (`gradient_prediction`), so the
  linearisation holds at that size; the frozen graph's prediction is another linear map (the
  gates held rather than differentiated), and its correlation with the measurement is
  reported, not asserted.
- The "gradient" graph of the same prompts (edges through the live recurrence, gates
  differentiated) predicts x1.1 with r >= 0.99 on both; with embedding nodes only it is the real
  model's own gradient node by node (asserted), so its ablation r is whatever the model's
  first-order prediction of an ablation reaches (printed: an embedding's ablation is no small
  change).
- `gradient_prediction` is checked against a finite difference of the real model."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from archscope_graphs.attribution import attribute
from archscope_graphs.interventions import check_graph, gradient_prediction, measure
from archscope_graphs.transcoders import train_transcoders

PROMPTS = ["tom eats the bread . then tom eats the", "the cat sat on the mat and the dog"]


@pytest.fixture(scope="module")
def gdn() -> tuple[Any, Any, Any]:
    """zoo:gdn and transcoders of its two MLPs, trained by the package on held-out documents."""
    import archscope_zoo

    _, tokenizer, backend = archscope_zoo.load("gdn")
    texts = archscope_zoo.datasets("heldout", n=64)
    torch.manual_seed(0)
    tcs = train_transcoders(
        backend, texts, n_features=128, epochs=3, batch_size=64, tokenizer=tokenizer
    )
    return backend, tokenizer, tcs


@pytest.mark.parametrize("text", PROMPTS)
def test_gdn_feature_interventions_follow_the_graph(gdn: Any, text: str) -> None:
    backend, tokenizer, tcs = gdn
    ids = torch.tensor([tokenizer.encode(text)])
    for linearise in ("frozen", "gradient"):
        graph = attribute(backend, ids, transcoders=tcs, prune=False, linearise=linearise)
        ablated = check_graph(backend, ids, graph, transcoders=tcs, n=10)
        steered = check_graph(backend, ids, graph, transcoders=tcs, n=10, scale=1.1)
        print(
            f"zoo:gdn {text!r}, {linearise}: r = {ablated['r']:.3f} (ablation), "
            f"{steered['r']:.3f} (x1.1)"
        )
        assert len(ablated["nodes"]) == 10
        assert ablated["r"] >= 0.8 and steered["r"] >= 0.8


@pytest.mark.parametrize("name", ["lstm", "mamba"])
def test_small_interventions_on_embeddings_are_linear_in_the_real_model(
    zoo: Any, name: str
) -> None:
    _, tokenizer, backend = zoo[name]
    for text in PROMPTS:
        ids = torch.tensor([tokenizer.encode(text)])
        graph = attribute(backend, ids, prune=False)
        result = check_graph(
            backend, ids, graph, kinds=("embedding",), n=10, scale=1.1, gradient=True
        )
        frozen = torch.tensor(result["predicted"]).norm() / torch.tensor(result["gradient"]).norm()
        print(
            f"zoo {name} {text!r} x1.1: r(graph) = {result['r']:.2f}, "
            f"r(gradient) = {result['r_gradient']:.3f}, |graph| / |gradient| = {float(frozen):.2f}"
        )
        assert result["r_gradient"] >= 0.95
        # the gradient graph: edges through the live recurrence (gates differentiated)
        linear = attribute(backend, ids, prune=False, linearise="gradient")
        ablated = check_graph(backend, ids, linear, kinds=("embedding",), n=10, gradient=True)
        steered = check_graph(backend, ids, linear, kinds=("embedding",), n=10, scale=1.1)
        frozen_ablated = check_graph(backend, ids, graph, kinds=("embedding",), n=10)
        print(
            f"zoo {name} {text!r} embeddings: frozen r = {frozen_ablated['r']:.2f} (ablation), "
            f"{result['r']:.2f} (x1.1); gradient r = {ablated['r']:.3f} (ablation), "
            f"{steered['r']:.3f} (x1.1); the real model's own first-order prediction of the "
            f"ablations r = {ablated['r_gradient']:.3f}"
        )
        # without features the gradient graph is the model's own gradient, node by node (an
        # independent computation: `gradient_prediction` is one plain backward per node)
        torch.testing.assert_close(
            torch.tensor(ablated["predicted"]),
            torch.tensor(ablated["gradient"]),
            rtol=1e-4,
            atol=1e-5,
        )
        assert steered["r"] >= 0.8  # small changes are first-order; ablations need not be


def test_gradient_prediction_is_the_first_order_change(
    tiny_llama: Any, make_transcoders: Any
) -> None:
    tcs = make_transcoders(tiny_llama.site_info("layer_0.mlp").dim, 2)
    ids = torch.randint(4, 90, (1, 7), generator=torch.Generator().manual_seed(4))
    graph = attribute(tiny_llama, ids, transcoders=tcs, prune=False)
    target = graph.targets[0]
    token = graph.nodes[target].index or 0

    def strongest(kind: str) -> Any:
        nodes = [i for i, n in enumerate(graph.nodes) if n.kind == kind]
        return graph.nodes[max(nodes, key=lambda i: abs(float(graph.adjacency[target, i])))]

    # a feature's write (activation x decoder row) is large: a smaller step stays linear
    for node, eps in ((strongest("feature"), 0.003), (strongest("embedding"), 0.01)):
        first = gradient_prediction(tiny_llama, ids, node, token, scale=1 + eps, transcoders=tcs)
        up = measure(tiny_llama, ids, node, token, scale=1 + eps, transcoders=tcs)
        down = measure(tiny_llama, ids, node, token, scale=1 - eps, transcoders=tcs)
        central = (up - down) / 2  # the finite difference, second-order terms cancelled
        assert abs(first) > 1e-5
        assert first == pytest.approx(central, rel=5e-2)
        twice = gradient_prediction(
            tiny_llama, ids, node, token, scale=1 + 2 * eps, transcoders=tcs
        )
        assert twice == pytest.approx(2 * first, rel=1e-4)
