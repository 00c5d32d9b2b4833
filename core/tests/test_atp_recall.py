"""AtP* with GradDrop against its definition: every GradDrop pass (one layer's attention and
MLP outputs detached) computed here, on a hand-written two-layer GPT-2 and on MiniMax's recall
fixture (core/tests/data/write_sae_recall), whose only softmax attention layer is layer 0.

In a pass that detaches the swept nodes' own layer they reach the metric by no path and count 0.
Where that layer is the model's only attention layer (OLMo-hybrid's and MiniMax's recall models
in ``benchmarks/bench_atp.py``), the metric of that pass has no gradient at all, which stopped
the sweep with autograd's "does not require grad"; it now counts 0 as the definition says."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import archscope
from archscope.methods.attribute import attention_node_sweep

T, D, HEADS, VOCAB = 7, 32, 4, 40


def metric(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return logits[:, -1, 3] - logits[:, -1, 5]


@pytest.fixture(scope="module")
def two_layers() -> Any:
    """A two-layer GPT-2 whose last layer's attention logits are scaled up until its softmax
    saturates (where AtP* and AtP differ)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(1)
    config = GPT2Config(
        vocab_size=VOCAB, n_embd=D, n_head=HEADS, n_layer=2, n_positions=16, attn_pdrop=0.0,
        resid_pdrop=0.0, embd_pdrop=0.0,
    )  # fmt: skip
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        model.transformer.h[1].attn.c_attn.weight[:, : 2 * D] *= 6.0  # queries and keys
    return model


def _ids() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    clean = torch.randint(0, VOCAB, (1, T), generator=gen)
    corrupted = clean.clone()
    corrupted[0, 2] = (clean[0, 2] + 11) % VOCAB
    return clean, corrupted


def _by_hand(
    model: Any, ids: torch.Tensor, patterns: dict[int, torch.Tensor] | None = None, drop: int = -1
) -> tuple[list[dict[str, torch.Tensor]], torch.Tensor]:
    """The GPT-2 written out: per layer q, k, logits S and pattern P (``patterns`` used instead
    where given), layer ``drop``'s attention and MLP outputs detached; and the metric."""
    tr = model.transformer
    x = tr.wte(ids) + tr.wpe(torch.arange(T))[None]
    causal = torch.ones(T, T, dtype=torch.bool).triu(1)
    seen = []
    for i, blk in enumerate(tr.h):
        qkv = blk.ln_1(x) @ blk.attn.c_attn.weight + blk.attn.c_attn.bias
        q, k, v = (t.reshape(1, T, HEADS, D // HEADS).transpose(1, 2) for t in qkv.split(D, -1))
        scores = (q @ k.transpose(-1, -2) * (D // HEADS) ** -0.5).masked_fill(causal, -torch.inf)
        pattern = (patterns or {}).get(i, torch.softmax(scores, -1))
        out = (pattern @ v).transpose(1, 2).reshape(1, T, D) @ blk.attn.c_proj.weight
        out = out + blk.attn.c_proj.bias
        x = x + (out.detach() if i == drop else out)
        mlp = blk.mlp(blk.ln_2(x))
        x = x + (mlp.detach() if i == drop else mlp)
        seen.append({"q": q, "k": k, "S": scores, "P": pattern})
    return seen, metric(model.lm_head(tr.ln_f(x)), None)[0]


def _reference(model: Any, node: str, layers: list[int]) -> torch.Tensor:
    """AtP*+GradDrop by its definition: for each dropped layer l, the gradient of the metric
    at the chosen layers' patterns (0 where no path is left), times the exact change of each
    pattern when that position's key (query) takes the clean value; magnitudes summed over l,
    divided by L - 1, as a share of |gap|."""
    clean, corrupted = _ids()
    with torch.no_grad():
        c_seen, c_m = _by_hand(model, clean)
        r_seen, r_m = _by_hand(model, corrupted)
    n_layers = len(c_seen)
    name = "k" if node == "key" else "q"
    total = torch.zeros(len(layers), T, dtype=torch.float64)
    for drop in range(n_layers):
        leaves = {i: r_seen[i]["P"].clone().requires_grad_(True) for i in layers}
        _, value = _by_hand(model, corrupted, leaves, drop)
        grads: tuple[torch.Tensor | None, ...] = (None,) * len(leaves)
        if value.requires_grad:
            grads = torch.autograd.grad(value, list(leaves.values()), allow_unused=True)
        for row, (i, g) in enumerate(zip(layers, grads, strict=True)):
            g = torch.zeros_like(leaves[i]) if g is None else g
            r = r_seen[i]
            for t in range(T):
                delta = c_seen[i][name][:, :, t] - r[name][:, :, t]
                moved = r["S"].clone()
                if node == "key":
                    moved[:, :, :, t] += torch.einsum("bhsd,bhd->bhs", r["q"], delta) * 8**-0.5
                else:
                    moved[:, :, t, :] += torch.einsum("bhd,bhsd->bhs", delta, r["k"]) * 8**-0.5
                change = (g * (torch.softmax(moved, -1) - r["P"])).sum()
                total[row, t] += abs(float(change))
    return total / (n_layers - 1) / abs(float(c_m - r_m))


def test_the_hand_forward_is_the_model(two_layers: Any) -> None:
    clean, _ = _ids()
    with torch.no_grad():
        assert float(_by_hand(two_layers, clean)[1]) == pytest.approx(
            float(metric(two_layers(clean).logits, None)[0]), abs=1e-5
        )


@pytest.mark.parametrize("node", ["key", "query"])
@pytest.mark.parametrize("layers", [[0, 1], [1]])
def test_atp_star_grad_drop_equals_its_definition(
    two_layers: Any, node: str, layers: list[int]
) -> None:
    """``layers=[1]``: the pass dropping layer 1 cuts every path from the swept nodes to the
    metric (layer 0's attention still reaches it); those nodes count 0 from it."""
    clean, corrupted = _ids()
    backend = archscope.Backend.for_model(two_layers)
    got = attention_node_sweep(
        backend,
        clean,
        corrupted,
        node=node,
        layers=layers,
        grad_drop=True,
        metric_fn=metric,
        exact=False,
    )
    want = _reference(two_layers, node, layers)
    assert got.estimator == "AtP*+GradDrop" and got.rows == [f"layer_{i}" for i in layers]
    assert got.attribution is not None
    assert torch.tensor(got.attribution, dtype=torch.float64) == pytest.approx(want, abs=1e-5)
    # the last layer's nodes matter (not a comparison of zeros)
    assert float(want[-1].max()) > 1e-3


# -- a model with one softmax attention layer: the recall fixture of MiniMax ------------------
def _recall_fixtures() -> Any:
    """test_write_sae_recall.py (its task and its fixture loader), loaded by path."""
    path = Path(__file__).resolve().parent / "test_write_sae_recall.py"
    spec = importlib.util.spec_from_file_location("_recall_fixtures", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _minimax_by_hand(
    model: Any, ids: torch.Tensor, metric_fn: Any, drop: int | None
) -> tuple[dict[str, Any], torch.Tensor]:
    """MiniMax's forward with its softmax attention function replaced by one written here (the
    pattern a leaf; q, k, logits S recorded) and layer ``drop``'s mixer and MLP outputs
    detached; returns what the attention saw and the mean metric."""
    home: Any = sys.modules[type(model.model.layers[0].self_attn).__module__]
    seen: dict[str, Any] = {}
    n = ids.shape[1]

    def eager(module: Any, q: Any, k: Any, v: Any, mask: Any, **kw: Any) -> Any:
        scores = q @ k.transpose(-1, -2) * kw["scaling"]
        if mask is not None:
            scores = scores + mask[..., :n]
        pattern = torch.softmax(scores, -1).detach().requires_grad_(True)
        seen.update(q=q.detach(), k=k.detach(), S=scores.detach(), P=pattern, scale=kw["scaling"])
        return (pattern @ v).transpose(1, 2), pattern

    def detach(module: Any, args: Any, output: Any) -> Any:
        if isinstance(output, tuple):
            return (output[0].detach(), *output[1:])
        return output.detach()

    layers = model.model.layers
    handles = []
    if drop is not None:
        handles = [
            m.register_forward_hook(detach) for m in (layers[drop].self_attn, layers[drop].mlp)
        ]
    saved, before = home.eager_attention_forward, model.config._attn_implementation
    home.eager_attention_forward, model.config._attn_implementation = eager, "eager"
    try:
        with torch.enable_grad():
            value = metric_fn(model(ids).logits, None).mean()
    finally:
        home.eager_attention_forward, model.config._attn_implementation = saved, before
        for h in handles:
            h.remove()
    return seen, value


@pytest.mark.parametrize("node", ["key", "query"])
def test_atp_star_grad_drop_on_the_only_attention_layer(node: str) -> None:
    """MiniMax's recall fixture (softmax attention in layer 0, lightning attention in layer 1):
    the pass dropping layer 0 leaves the metric with no gradient at all (it used to stop the
    sweep) and counts 0; the other pass, layer 1's mixer and MLP outputs detached, against the
    attention function written out here and the softmax fix computed from its logits."""
    pytest.importorskip("archscope_hybrid")
    from archscope_hybrid.testing import missing

    if missing("minimax"):
        pytest.skip(str(missing("minimax")))
    rec = _recall_fixtures()
    model = rec._model("minimax")
    clean, _, query = rec.mqar(4, rec.HELDOUT_SEED + 3)
    corrupted = clean.clone()
    rows = torch.arange(4)
    other = (query + 1) % 4  # swap the queried pair's key with the next pair's
    corrupted[rows, 2 * query] = clean[rows, 2 * other]
    corrupted[rows, 2 * other] = clean[rows, 2 * query]
    good, bad = clean[rows, 2 * query + 1], clean[rows, 2 * other + 1]

    def answer(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return logits[rows, -1, good] - logits[rows, -1, bad]

    with torch.no_grad():
        c_seen, c_value = _minimax_by_hand(model, clean, answer, None)
        _, r_value = _minimax_by_hand(model, corrupted, answer, None)
    gap = float(c_value.detach() - r_value.detach())
    got = attention_node_sweep(
        archscope.Backend.for_model(model),
        clean,
        corrupted,
        node=node,
        grad_drop=True,
        metric_fn=answer,
        exact=False,
    )
    seen, value = _minimax_by_hand(model, corrupted, answer, 1)  # dropping layer 0 counts 0
    (g,) = torch.autograd.grad(value, [seen["P"]])
    name = "k" if node == "key" else "q"
    want = []
    for t in range(clean.shape[1]):
        delta = c_seen[name][:, :, t] - seen[name][:, :, t]
        moved = seen["S"].clone()
        if node == "key":
            moved[:, :, :, t] += torch.einsum("bhsd,bhd->bhs", seen["q"], delta) * seen["scale"]
        else:
            moved[:, :, t, :] += torch.einsum("bhd,bhsd->bhs", delta, seen["k"]) * seen["scale"]
        want.append(
            abs(float((g * (torch.softmax(moved, -1) - seen["P"].detach())).sum())) / abs(gap)
        )
    assert got.rows == ["layer_0"] and got.attribution is not None
    assert got.estimator == "AtP*+GradDrop"
    # small: this attention looks at the previous token and is saturated (a swapped query
    # moves no probability at all: 0 on both sides); compared relative to the largest cell
    if node == "key":
        assert max(want) > 1e-5
    assert got.attribution[0] == pytest.approx(want, abs=1e-4 * max(want) + 1e-9)
    assert model.config._attn_implementation == "sdpa"
