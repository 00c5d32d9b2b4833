"""``layer_i.mlp_in``, the site a transcoder reads, on the backends that have MLP-like blocks:
the MLP applied to the captured input gives the captured output, an edit of the input reaches
the output, and transcoders train on it."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from archscope import Edit

HYBRIDS = ["qwen3_next", "lfm2", "lfm2_moe", "olmo_hybrid", "kimi_linear", "minimax"]


def _hybrid(family: str) -> Any:
    testing = pytest.importorskip("archscope_hybrid.testing")
    why = testing.missing(family)
    if why:
        pytest.skip(why)
    from archscope_hybrid.backend import HybridBackend

    return HybridBackend(testing.make_model(family)), testing.random_ids


@pytest.mark.parametrize("family", HYBRIDS)
def test_hybrid_mlp_in_is_the_mlps_input(family: str) -> None:
    backend, random_ids = _hybrid(family)
    ids = random_ids(2, 6)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    n_mlp = sum(1 for s in backend.sites() if s.endswith(".mlp"))
    assert n_mlp > 0 and sum(1 for s in backend.sites() if s.endswith(".mlp_in")) == n_mlp
    for layer in backend.layers:
        if layer.mlp is None or layer.mlp_out != layer.mlp:
            continue  # a post-norm block: the MLP's own output is not the site
        i = layer.index
        got = backend.run(batch, capture=[f"layer_{i}.mlp_in", f"layer_{i}.mlp"]).activations
        mlp = getattr(layer.block, layer.mlp)
        with torch.no_grad():
            torch.testing.assert_close(mlp(got[f"layer_{i}.mlp_in"]), got[f"layer_{i}.mlp"])
            shifted = got[f"layer_{i}.mlp_in"] * 0.5
            edited = backend.run(
                batch,
                capture=[f"layer_{i}.mlp"],
                edits=[Edit.scale(f"layer_{i}.mlp_in", 0.5)],
            ).activations[f"layer_{i}.mlp"]
            torch.testing.assert_close(edited, mlp(shifted))
        break
    else:
        pytest.fail(f"{family}: no block whose MLP output is the mlp site")


def test_transcoders_train_on_a_hybrid() -> None:
    from archscope_graphs.transcoders import train_transcoders, transcoder_metrics

    backend, random_ids = _hybrid("lfm2")
    data = random_ids(16, 12).tolist()  # 192 tokens
    tcs = train_transcoders(backend, data, n_features=32, epochs=30, batch_size=16, progress=False)
    assert [t.read_site for t in tcs] == [
        f"layer_{i}.mlp_in" for i in range(backend.n_layers) if f"layer_{i}.mlp" in backend.sites()
    ]
    # fitted on the training tokens (a random model: nothing to generalise to)
    metrics = transcoder_metrics(tcs, backend, data)
    assert all(v > 0.3 for v in metrics.explained_variance.values()), metrics
