"""On the zoo transformer's induction prompts, the strongest positive edge into the copied
token's logit from the first copy of the span comes from the token being copied, and the path
carrying it runs through the induction head (layer 1 head 2, the one the circuits method
singles out) and, in layer 0, through a head whose pattern at the copied token looks at that
token itself (value composition: it writes the token's identity where the induction head
reads it). The previous-token head acts on where the induction head looks (key composition),
which the frozen attention pattern holds: it shapes the pattern, it is not an edge. (The
largest edges of all often come from the ':' before each copy: positional cues that raise
every code word's logit, with opposite signs at the two colons.)

The graph has no feature nodes here (no transcoders): the MLPs are frozen linear maps, so an
embedding's edge to the logit is its whole effect in the frozen model, a sum over paths; the
share through one head is the edge minus the edge with that head's output zeroed."""

from __future__ import annotations

from typing import Any

import torch

from archscope_graphs.attribution import _graph
from archscope_graphs.replacement import ReplacementModel

INDUCTION_HEAD = (1, 2)


def _patterns(backend: Any, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    acts = backend.run(ids, capture=["layer_0.attn_pattern", "layer_1.attn_pattern"]).activations
    return acts["layer_0.attn_pattern"][0], acts["layer_1.attn_pattern"][0]  # (head, q, k)


def test_the_copying_path_runs_through_the_induction_head(
    zoo: Any, head_zeroing: Any, induction_prompts: Any
) -> None:
    model, _, backend = zoo["transformer"]
    heads = model.config.num_attention_heads
    checked = copying = 0
    for ids, first, length, copied, target in induction_prompts(zoo):
        copying += 1  # the model copies here (the others have nothing to explain)
        with ReplacementModel.build(backend, ids, []) as rm:
            assert int(rm.logits[-1].argmax()) == target
            graph = _graph(rm, target, 1, 0.95, 32, 0.0)
            row = graph.adjacency[graph.targets[0]]
            span_nodes = [
                i
                for i, n in enumerate(graph.nodes)
                if n.kind == "embedding" and first <= n.position < first + length
            ]
            top = max(span_nodes, key=lambda i: float(row[i]))
            if graph.nodes[top].position != copied:  # not the token being copied
                continue

            def edge(position: int, rm: Any = rm, target: int = target) -> float:
                embed = rm.embed.clone()
                embed[position] = 0
                base = rm.run(1).logits[0, -1, target].detach()
                return float(base - rm.run(1, {"embed": embed}).logits[0, -1, target].detach())

            full = edge(copied)
            assert abs(full - float(row[top])) < 1e-3
            through = {}
            for layer in range(2):
                for head in range(heads):
                    handle = head_zeroing(model, layer, head)
                    try:
                        through[(layer, head)] = full - edge(copied)
                    finally:
                        handle.remove()
        layer0_pattern, layer1_pattern = _patterns(backend, ids)
        # the induction head looks from the last token at the copied one, and carries the path
        assert float(layer1_pattern[INDUCTION_HEAD[1], -1, copied]) > 0.5
        assert through[INDUCTION_HEAD] > 0.8 * full
        assert max(through, key=lambda h: through[h] if h[0] == 1 else -1e9) == INDUCTION_HEAD
        layer0 = max(range(heads), key=lambda h: through[(0, h)])
        # ... and the layer-0 head that carries most of it looks at the copied token itself
        assert float(layer0_pattern[layer0, copied, copied]) > 0.2
        assert through[(0, layer0)] > 0.3 * full
        checked += 1
    print(f"copied token is the top span edge in {checked} of {copying} copying prompts")
    assert checked >= 4 and checked >= 0.6 * copying
