"""Freezing on the families added after the first four: a frozen run reproduces the prompt's
logits, is affine in the embeddings (the model itself is not), leaves no hook behind, and an
attribution graph's rows add up to their logits (with independently computed bias terms)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import archscope
from archscope.freeze import freeze
from archscope.testing import check_frozen
from archscope_graphs.attribution import _graph, bias_rows, bias_terms
from archscope_graphs.replacement import ReplacementModel


def _mamba2() -> Any:
    from archscope_mamba.testing import make_model

    return archscope.Backend.for_model(make_model("mamba2"))


def _hybrid(family: str) -> Any:
    from archscope_hybrid.testing import make_model, missing

    reason = missing(family)
    if reason is not None:  # the oldest transformers the packages allow lacks the family
        pytest.skip(reason)
    return archscope.Backend.for_model(make_model(family))


BUILDERS = {
    "mamba2": _mamba2,
    # fused gated-delta-net projections, and mixture-of-experts MLPs on every second layer
    "qwen3_next": lambda: _hybrid("qwen3_next"),
    "olmo_hybrid": lambda: _hybrid("olmo_hybrid"),
    # gated short convolutions (B and C held), SwiGLU MLPs, LFM2-MoE's routed experts and
    # LFM3's attention output gate
    "lfm2": lambda: _hybrid("lfm2"),
    "lfm2_moe": lambda: _hybrid("lfm2_moe"),
    "lfm3": lambda: _hybrid("lfm3"),
    # lightning attention (queries, keys, norm scale and output gate held; fixed decays)
    "minimax": lambda: _hybrid("minimax"),
    # KDA (per-channel decays held) beside multi-head latent attention
    "kimi_linear": lambda: _hybrid("kimi_linear"),
}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def family(request: Any) -> tuple[str, Any]:
    return request.param, BUILDERS[request.param]()


def _ids(seq: int = 11, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, 90, (1, seq), generator=torch.Generator().manual_seed(seed))


def test_a_frozen_run_is_the_model_at_the_prompt_and_affine_around_it(
    family: tuple[str, Any],
) -> None:
    _, backend = family
    check_frozen(backend, _ids())


def test_graph_rows_add_up_to_the_logits(family: tuple[str, Any]) -> None:
    _, backend = family
    ids = _ids()
    with ReplacementModel.build(backend, ids, None) as rm:
        graph = _graph(rm, None, 5, 0.95, 16, 0.0)
        bias = bias_terms(rm, graph)
    rows = bias_rows(graph)
    values = torch.tensor(graph.metadata["target_values"], dtype=torch.float64)[rows]
    torch.testing.assert_close(
        graph.adjacency[rows].double().sum(1) + bias, values, atol=1e-4, rtol=0
    )
    # the first token reaches the last logit through the held recurrence
    first = next(i for i, n in enumerate(graph.nodes) if n.kind == "embedding")
    assert float(graph.adjacency[graph.targets[0], first].abs()) > 1e-5


def test_what_the_hybrid_backend_cannot_freeze_is_said() -> None:
    """An expert layout the freezing does not know (one module per expert, as older
    mixture-of-experts code has it): the instance drops ``freeze`` and says why."""
    from archscope.freeze import FreezeError
    from archscope_hybrid.testing import make_model, missing

    if missing("lfm2_moe") is not None:
        pytest.skip(missing("lfm2_moe"))
    model = make_model("lfm2_moe")
    moe = next(b.feed_forward for b in model.model.layers if hasattr(b.feed_forward, "experts"))
    moe.experts = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(2))
    backend = archscope.Backend.for_model(model)
    assert "freeze" not in backend.capabilities
    assert "expert" in backend.frozen_unavailable
    with pytest.raises(FreezeError, match="expert"):
        with freeze(backend, _ids()):
            pass
