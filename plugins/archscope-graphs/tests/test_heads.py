"""Heads in attribution graphs: `edge_heads` (which head carries an edge) and `qk_attribution`
(what sets a head's attention score), on a GPT-2 whose induction circuit is set by hand
(`ground_truth.trained`: layer 0 head 0 a previous-token head, layer 1 head 0 an induction
head) and on the zoo transformer's induction prompts.

Independent checks: the scores `qk_attribution` recomputes give the model's own attention
pattern (Hugging Face's ``output_attentions``); the decomposition adds up to the score; the
head found on the key side is the one whose ablation in the real model takes the induction
head's attention away from the copied token; an edge's part through a head equals the edge
minus the edge with that head's output zeroed, and the part that bypasses a layer's heads
equals the edge with all of them zeroed (computed by hooks of the test's own)."""

from __future__ import annotations

from typing import Any

import ground_truth as gt
import numpy as np
import pytest
import torch

import archscope
from archscope.errors import ParameterError
from archscope_graphs.attribution import attribute
from archscope_graphs.heads import edge_heads, qk_attribution
from archscope_graphs.replacement import ReplacementModel

INDUCTION_HEAD = (1, 2)  # the zoo transformer's, as the circuits method ranks it


# -- the hand-built induction model -------------------------------------------------------------
@pytest.fixture(scope="module")
def hand() -> tuple[Any, Any]:
    model = gt.trained()
    return model, archscope.Backend.for_model(model)


def _repeat(seed: int = 3, block: int = 10, again: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randperm(gt.VOCAB - 4, generator=g)[:block] + 4
    ids = torch.cat([torch.tensor([7, 8, 9, 10]), tokens, tokens[:again]]).unsqueeze(0)
    return ids, tokens


@pytest.mark.parametrize("seed", [3, 4])
def test_qk_on_the_hand_built_circuit_finds_the_previous_token_head_on_the_key_side(
    hand: Any, seed: int, head_zeroing: Any
) -> None:
    model, backend = hand
    ids, _ = _repeat(seed)
    query = ids.shape[1] - 1  # the 5th token of the block, shown again
    key = 4 + 5  # the token after its first showing
    layer, head = gt.INDUCTION_HEAD
    result = qk_attribution(backend, ids, layer, head, query, key)
    # the recomputed scores are the model's own pattern (Hugging Face, no archscope)
    with torch.no_grad():
        hf = model(input_ids=ids, output_attentions=True).attentions[layer][0, head, query]
    torch.testing.assert_close(
        torch.softmax(result.row, -1), hf[: query + 1].double(), atol=1e-5, rtol=0
    )
    assert float(hf[key]) > 0.95
    # the terms add up to the score, on each side and pair by pair
    for terms in (result.key_terms, result.query_terms):
        assert abs(sum(t.value for t in terms) - result.score) < 1e-5
    assert abs(float(result.pairs.sum()) - result.score) < 1e-5
    # key side: the previous-token head's write; query side: the token itself
    prev = f"L{gt.PREV_HEAD[0]}H{gt.PREV_HEAD[1]}"
    assert result.top("key", 1)[0].name == prev
    assert result.term("key", prev).value > 0.95 * result.score
    assert result.top("query", 1)[0].kind == "embedding"
    # by size: the same terms ordered by |part|, the largest first
    terms = result.key_terms
    assert [t.name for t in result.top("key", len(terms), by_abs=True)] == [
        t.name for t in sorted(terms, key=lambda t: -abs(t.value))
    ]
    assert result.top("key", 1, by_abs=True)[0].name == prev
    for side in ("keys", "value", ""):
        with pytest.raises(ParameterError, match=f"side is 'key' or 'query', got {side!r}"):
            result.term(side, prev)
        with pytest.raises(ParameterError, match="side is 'key' or 'query'"):
            result.top(side)
    # ablating the previous-token head in the real model takes the attention away
    handle = head_zeroing(model, *gt.PREV_HEAD)
    try:
        with torch.no_grad():
            ablated = model(input_ids=ids, output_attentions=True).attentions[layer]
    finally:
        handle.remove()
    assert float(ablated[0, head, query, key]) < 0.2


def test_edge_heads_on_the_hand_built_circuit(hand: Any) -> None:
    _, backend = hand
    ids, tokens = _repeat()
    graph = attribute(backend, ids, target=int(tokens[5]), prune=False)
    row = graph.adjacency[graph.targets[0]]
    top = int(row.argmax())
    assert graph.nodes[top].position == 4 + 5  # the copied token's embedding
    split = edge_heads(backend, ids, graph, graph.targets[0], top)
    assert split.edge == pytest.approx(float(row[top]), rel=1e-5)
    assert split.top(1)[0][0] == gt.INDUCTION_HEAD
    assert split.share(*gt.INDUCTION_HEAD) > 0.99
    # layer 0's heads do not carry it (the token reaches the induction head's values directly)
    assert abs(split.bypass[0] - split.edge) < 1e-3 * abs(split.edge)


# -- the zoo transformer's induction prompts ---------------------------------------------------
def _previous_token_scores(zoo: Any, n: int = 12) -> torch.Tensor:
    """Layer 0's previous-token score per head on the corpus's induction texts: the circuits
    method's definition (attention from each position to the one before, averaged)."""
    import archscope_zoo

    _, tokenizer, backend = zoo["transformer"]
    data = archscope_zoo.datasets("induction", n=n)
    scores = []
    for text in data.texts:
        ids = torch.tensor([tokenizer.encode(text)])
        pattern = backend.run(ids, capture=["layer_0.attn_pattern"])["layer_0.attn_pattern"][0]
        pos = torch.arange(1, ids.shape[1])
        scores.append(pattern[:, pos, pos - 1].mean(-1))
    return torch.stack(scores).mean(0)


def test_qk_on_the_zoo_induction_prompts_puts_layer_0s_previous_token_head_on_the_key_side(
    zoo: Any, head_zeroing: Any, induction_prompts: Any
) -> None:
    model, _, backend = zoo["transformer"]
    previous = _previous_token_scores(zoo)
    prev_head = int(previous.argmax())
    print("layer 0 previous-token scores:", [round(float(s), 3) for s in previous])
    layer, head = INDUCTION_HEAD
    site = f"layer_{layer}.attn_pattern"
    checked, drops, shares = 0, [], []
    for ids, _, _, copied, _ in induction_prompts(zoo):
        result = qk_attribution(backend, ids, layer, head, -1, copied)
        pattern = backend.run(ids, capture=[site])[site][0, head, -1]
        torch.testing.assert_close(
            torch.softmax(result.row, -1), pattern.double(), atol=1e-5, rtol=0
        )
        assert float(pattern[copied]) > 0.5  # the induction head looks at the copied token
        for terms in (result.key_terms, result.query_terms):
            assert abs(sum(t.value for t in terms) - result.score) < 1e-5 * (1 + result.score)
        top = result.top("key", 1)[0]
        assert (top.kind, top.layer, top.head) == ("head", 0, prev_head), result.top("key", 3)
        shares.append(top.value / result.score)
        handle = head_zeroing(model, 0, prev_head)
        try:
            ablated = backend.run(ids, capture=[site])[site][0, head, -1, copied]
        finally:
            handle.remove()
        drops.append(float(pattern[copied] - ablated))
        checked += 1
    print(f"{checked} prompts; key-side share of L0H{prev_head}: {[round(s, 2) for s in shares]}")
    print(f"ablating it lowers the induction head's attention by {[round(d, 2) for d in drops]}")
    assert checked >= 6
    assert min(shares) > 0.6
    assert all(d > 0 for d in drops) and sum(drops) / len(drops) > 0.3


def test_qk_with_transcoders_splits_the_mlp_write_exactly(
    zoo: Any, zoo_transcoders: Any, induction_prompts: Any
) -> None:
    _, _, backend = zoo["transformer"]
    ids, _, _, copied, _ = next(induction_prompts(zoo))
    plain = qk_attribution(backend, ids, *INDUCTION_HEAD, -1, copied)
    split = qk_attribution(backend, ids, *INDUCTION_HEAD, -1, copied, transcoders=zoo_transcoders)
    assert split.score == pytest.approx(plain.score, abs=1e-6)
    for side in ("key", "query"):
        mlp = plain.term(side, "mlp_0").value
        parts = [
            t.value
            for t in (split.key_terms if side == "key" else split.query_terms)
            if t.layer == 0 and t.kind in ("feature", "transcoder_bias", "error")
        ]
        assert any(t.kind == "feature" for t in split.key_terms)
        assert sum(parts) == pytest.approx(mlp, abs=1e-4)
        # the heads' terms do not change
        assert split.term(side, "L0H3").value == pytest.approx(plain.term(side, "L0H3").value)


def test_edge_heads_on_the_zoo_induction_prompts(
    zoo: Any, head_zeroing: Any, induction_prompts: Any
) -> None:
    model, _, backend = zoo["transformer"]
    seen = leading = 0
    for ids, _, _, copied, target in induction_prompts(zoo, n=6):
        graph = attribute(backend, ids, target=target, prune=False)
        source = next(
            i for i, n in enumerate(graph.nodes) if n.kind == "embedding" and n.position == copied
        )
        split = edge_heads(backend, ids, graph, graph.targets[0], source)
        edge = float(graph.adjacency[graph.targets[0], source])
        assert split.edge == pytest.approx(edge, rel=1e-4, abs=1e-5)
        row = graph.adjacency[graph.targets[0]]
        earlier = [i for i, n in enumerate(graph.nodes) if n.kind == "embedding"][: copied + 1]
        if max(earlier, key=lambda i: float(row[i])) == source:  # the copied token's edge leads
            assert split.top(1)[0][0] == INDUCTION_HEAD and split.share(*INDUCTION_HEAD) > 0.8
            leading += 1
        # independent: the edge less the edge with the head's output zeroed (test's own hook)
        with ReplacementModel.build(backend, ids, []) as rm:

            def edge_now(rm: Any = rm, copied: int = copied, target: int = target) -> float:
                embed = rm.embed.clone()
                embed[copied] = 0
                base = rm.run(1).logits[0, -1, target].detach()
                return float(base - rm.run(1, {"embed": embed}).logits[0, -1, target].detach())

            for layer, head in [INDUCTION_HEAD, (0, 1)]:
                handle = head_zeroing(model, layer, head)
                try:
                    without = edge_now()
                finally:
                    handle.remove()
                assert split.through[(layer, head)] == pytest.approx(edge - without, abs=1e-4)
            # what bypasses a layer's heads: the edge with all of them zeroed
            for layer in (0, 1):
                handle = head_zeroing(model, layer, range(4))
                try:
                    without = edge_now()
                finally:
                    handle.remove()
                assert split.bypass[layer] == pytest.approx(without, abs=1e-4)
        seen += 1
    assert seen >= 3 and leading >= 2


def test_edge_heads_from_a_feature_into_a_feature(
    tiny_llama: Any, make_transcoders: Any, head_zeroing: Any
) -> None:
    tcs = make_transcoders(tiny_llama.site_info("layer_0.mlp").dim, 2)
    ids = torch.randint(4, 90, (1, 7), generator=torch.Generator().manual_seed(2))
    graph = attribute(tiny_llama, ids, transcoders=tcs, prune=False)
    features = [i for i, n in enumerate(graph.nodes) if n.kind == "feature"]
    late = [i for i in features if graph.nodes[i].layer == 1]
    target = max(late, key=lambda i: float(graph.adjacency[i].abs().sum()))
    source = max(
        (i for i in features if graph.nodes[i].layer == 0),
        key=lambda i: abs(float(graph.adjacency[target, i])),
    )
    split = edge_heads(tiny_llama, ids, graph, target, source, transcoders=tcs)
    assert split.edge == pytest.approx(float(graph.adjacency[target, source]), rel=1e-4, abs=1e-5)
    # nothing of a layer-0 feature's write passes through layer 0's heads (they come before)
    assert all(abs(split.through[(0, h)]) < 1e-6 for h in range(4))
    # independent: the edge in the replacement model, less the edge with heads zeroed by a
    # hook of the test's own (source: its decoder write taken out at its position; target: the
    # read at its position dotted with its encoder row)
    src, tgt = graph.nodes[source], graph.nodes[target]
    (t_src,) = [t for t in tcs if t.read_site == src.site]
    (t_tgt,) = [t for t in tcs if t.read_site == tgt.site]
    with ReplacementModel.build(tiny_llama, ids, tcs) as rm:
        removed = {}
        for site in t_src.write_sites:
            removed[site] = rm.direct[site].clone()
            removed[site][src.position] -= src.value * t_src.decoder(site)[src.index].detach()

        def pre_activation(leaves: Any = None) -> float:
            read = rm.run(1, leaves).reads[t_tgt.read_site][0, tgt.position].detach()
            return float(read @ t_tgt.encoder()[tgt.index].detach())

        def edge_now() -> float:
            return pre_activation() - pre_activation(removed)

        assert edge_now() == pytest.approx(split.edge, rel=1e-4, abs=1e-5)
        model = tiny_llama.model
        tops = [head for head, _ in split.top(2)]
        assert all(layer == 1 for layer, _ in tops)
        for layer, head in tops:
            handle = head_zeroing(model, layer, head)
            try:
                without = edge_now()
            finally:
                handle.remove()
            assert split.through[(layer, head)] == pytest.approx(
                split.edge - without, rel=1e-3, abs=1e-5
            )
        handle = head_zeroing(model, 1, range(4))
        try:
            without = edge_now()
        finally:
            handle.remove()
        assert split.bypass[1] == pytest.approx(without, rel=1e-3, abs=1e-5)
        assert abs(split.edge - split.bypass[1]) > 1e-3 * abs(split.edge)  # heads carry a part


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_qk_on_a_half_precision_model(family: str, dtype: torch.dtype) -> None:
    import copy

    from archscope_transformer.testing import tiny_model

    full = tiny_model(family, n_layers=2)
    half = copy.deepcopy(full).to(dtype)
    ids = torch.randint(4, 90, (1, 8), generator=torch.Generator().manual_seed(0))
    eps = torch.finfo(dtype).eps
    reference = qk_attribution(archscope.Backend.for_model(full), ids, 1, 0, 7, 3)
    backend = archscope.Backend.for_model(half)
    result = qk_attribution(backend, ids, 1, 0, 7, 3)
    # the terms add up to the score (float32 arithmetic on the half-precision run's values)
    for terms in (result.key_terms, result.query_terms):
        assert abs(sum(t.value for t in terms) - result.score) < 1e-5 * (1 + abs(result.score))
    assert abs(float(result.pairs.sum()) - result.score) < 1e-5 * (1 + abs(result.score))
    # the recomputed scores give the half-precision model's own pattern, within its rounding
    pattern = backend.run(ids, capture=["layer_1.attn_pattern"])["layer_1.attn_pattern"]
    mine = torch.softmax(result.row, -1)
    assert float((mine - pattern[0, 0, 7, :8].double()).abs().max()) < 4 * eps
    # and the decomposition is the float32 model's, within the dtype's precision
    scale = 1 + max(abs(t.value) for t in reference.key_terms)
    assert abs(result.score - reference.score) < 16 * eps * scale
    for mine_term, ref_term in zip(result.key_terms, reference.key_terms, strict=True):
        assert mine_term.name == ref_term.name
        assert abs(mine_term.value - ref_term.value) < 16 * eps * scale


def test_bad_requests_are_refused(tiny_llama: Any, zoo: Any) -> None:
    ids = torch.tensor([[5, 6, 7, 8]])
    with pytest.raises(ParameterError, match="4 heads"):
        qk_attribution(tiny_llama, ids, 1, 9, 3, 1)
    with pytest.raises(ParameterError, match="key <= query"):
        qk_attribution(tiny_llama, ids, 1, 0, 1, 3)
    with pytest.raises(ParameterError, match="layer must be in"):
        qk_attribution(tiny_llama, ids, 5, 0, 3, 1)
    _, _, lstm = zoo["lstm"]
    with pytest.raises(ParameterError, match="transformer backend"):
        qk_attribution(lstm, ids, 0, 0, 3, 1)
    with pytest.raises(ParameterError, match=r"query must be an integer, got 3.0 \(float\)"):
        qk_attribution(tiny_llama, ids, 1, 0, 3.0, 1)
    with pytest.raises(ParameterError, match=r"key must be an integer, got 1.5 \(float\)"):
        qk_attribution(tiny_llama, ids, 1, 0, 3, 1.5)
    with pytest.raises(ParameterError, match="head must be an integer"):
        qk_attribution(tiny_llama, ids, 1, torch.tensor(0.0), 3, 1)
    # numpy and tensor integers are positions like ints
    plain = qk_attribution(tiny_llama, ids, 1, 0, 3, 1)
    typed = qk_attribution(tiny_llama, ids, np.int64(1), 0, torch.tensor(3), np.int32(1))
    assert typed.score == plain.score and typed.query == 3 and typed.key == 1
    graph = attribute(tiny_llama, ids, prune=False)
    with pytest.raises(ParameterError, match=r"a node \(its index in the graph, or its id\)"):
        edge_heads(tiny_llama, ids, graph, graph.targets[0], 1.0)
    with pytest.raises(ParameterError, match="node index 999 outside"):
        edge_heads(tiny_llama, ids, graph, graph.targets[0], np.int64(999))
    source = next(i for i, n in enumerate(graph.nodes) if n.kind == "embedding")
    by_int = edge_heads(tiny_llama, ids, graph, graph.targets[0], source)
    by_numpy = edge_heads(tiny_llama, ids, graph, np.int64(graph.targets[0]), torch.tensor(source))
    assert (by_numpy.source, by_numpy.target, by_numpy.edge) == (
        by_int.source,
        by_int.target,
        by_int.edge,
    )
    with pytest.raises(ParameterError, match="logit or feature node"):
        edge_heads(tiny_llama, ids, graph, 0, graph.targets[0])
    with pytest.raises(ParameterError, match="no node 'nope'"):
        edge_heads(tiny_llama, ids, graph, graph.targets[0], "nope")
    with pytest.raises(ParameterError, match="another prompt"):
        edge_heads(tiny_llama, torch.tensor([[5, 6, 7, 9]]), graph, graph.targets[0], 0)


def test_a_feature_edge_without_its_transcoders_is_refused(
    tiny_llama: Any, make_transcoders: Any
) -> None:
    tcs = make_transcoders(tiny_llama.site_info("layer_0.mlp").dim, 2)
    ids = torch.randint(4, 90, (1, 7), generator=torch.Generator().manual_seed(2))
    graph = attribute(tiny_llama, ids, transcoders=tcs, prune=False)
    feature = next(i for i, n in enumerate(graph.nodes) if n.kind == "feature" and n.layer == 1)
    embedding = next(i for i, n in enumerate(graph.nodes) if n.kind == "embedding")
    source = next(i for i, n in enumerate(graph.nodes) if n.kind == "feature" and n.layer == 0)
    # a feature target, then a feature source, with no transcoders to read them
    with pytest.raises(ParameterError, match="no transcoder reads 'layer_1.*pass the transcoders"):
        edge_heads(tiny_llama, ids, graph, feature, embedding)
    with pytest.raises(ParameterError, match="no transcoder reads 'layer_0.*pass the transcoders"):
        edge_heads(tiny_llama, ids, graph, graph.targets[0], source)


def test_the_docs_example_runs_and_says_what_it_prints() -> None:
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[3] / "docs" / "graphs.md").read_text()
    section = text[text.index("## Heads") : text.index("## Checking a graph")]
    (block,) = re.findall(r"```python\n(.*?)```", section, re.S)
    namespace: dict[str, Any] = {"__name__": "docs_heads"}
    exec(compile(block, "docs/graphs.md", "exec"), namespace)
    assert namespace["split"].top(1)[0][0] == INDUCTION_HEAD
    assert namespace["qk"].top("key", 1)[0].name == "L0H3"
