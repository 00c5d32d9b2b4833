"""AtP* (Kramár et al. 2024) beside plain AtP: the attention-softmax fix on query and key
nodes against a hand-written one-layer GPT-2 (queries, keys, the softmax and the patched
logits computed here from the weights), the exact query/key patching against the same hand
forward, GradDrop against its definition computed with plain PyTorch hooks, and the errors
for options that do not apply."""

from __future__ import annotations

import sys
from typing import Any

import pytest
import torch
from archs import arch

import archscope
from archscope.errors import InputError, SiteError
from archscope.methods.attribute import attention_node_sweep, attribution_patch, patch_sweep
from archscope.testing import hook_ids

T = 7  # tokens per prompt
POS = 2  # the position where clean and corrupted differ (for the key nodes)


def metric(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return logits[:, -1, 3] - logits[:, -1, 5]


@pytest.fixture(scope="module")
def one_layer() -> Any:
    """A one-layer GPT-2 whose attention logits are scaled up until the softmax saturates."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=40, n_embd=32, n_head=4, n_layer=1, n_positions=16, attn_pdrop=0.0,
        resid_pdrop=0.0, embd_pdrop=0.0,
    )  # fmt: skip
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        model.transformer.h[0].attn.c_attn.weight[:, :64] *= 6.0  # queries and keys
    return model


def _ids(pos: int = POS) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    clean = torch.randint(0, 40, (1, T), generator=gen)
    corrupted = clean.clone()
    corrupted[0, pos] = (clean[0, pos] + 7) % 40
    return clean, corrupted


def _by_hand(model: Any, ids: torch.Tensor, **replace: torch.Tensor) -> dict[str, torch.Tensor]:
    """The one-layer GPT-2 written out: q, k, v, logits S, pattern P and the metric; ``q``,
    ``k`` or ``P`` given in ``replace`` are used instead of the computed ones."""
    tr, blk = model.transformer, model.transformer.h[0]
    d, heads = 32, 4
    x = tr.wte(ids) + tr.wpe(torch.arange(ids.shape[1]))[None]
    qkv = blk.ln_1(x) @ blk.attn.c_attn.weight + blk.attn.c_attn.bias
    q, k, v = (t.reshape(1, T, heads, d // heads).transpose(1, 2) for t in qkv.split(d, -1))
    q, k = replace.get("q", q), replace.get("k", k)
    scores = q @ k.transpose(-1, -2) / (d // heads) ** 0.5
    causal = torch.ones(T, T, dtype=torch.bool).triu(1)
    scores = scores.masked_fill(causal, float("-inf"))
    pattern = replace.get("P", torch.softmax(scores, -1))
    mixed = (pattern @ v).transpose(1, 2).reshape(1, T, d)
    x = x + mixed @ blk.attn.c_proj.weight + blk.attn.c_proj.bias
    x = x + blk.mlp(blk.ln_2(x))
    logits = model.lm_head(tr.ln_f(x))
    return {"q": q, "k": k, "S": scores, "P": pattern, "m": metric(logits, None)[0]}


def test_the_hand_forward_is_the_model(one_layer: Any) -> None:
    clean, _ = _ids()
    with torch.no_grad():
        want = metric(one_layer(clean).logits, None)[0]
        assert float(_by_hand(one_layer, clean)["m"]) == pytest.approx(float(want), abs=1e-5)


@pytest.mark.parametrize("node", ["key", "query"])
def test_atp_star_equals_the_patched_softmax_by_hand(one_layer: Any, node: str) -> None:
    # one layer: a query matters only at the position the metric reads, so change that one
    clean, corrupted = _ids(POS if node == "key" else T - 1)
    backend = archscope.Backend.for_model(one_layer)
    star = attention_node_sweep(backend, clean, corrupted, node=node, metric_fn=metric)
    plain = attention_node_sweep(
        backend, clean, corrupted, node=node, estimator="atp", metric_fn=metric, exact=False
    )
    with torch.no_grad():
        c, r = _by_hand(one_layer, clean), _by_hand(one_layer, corrupted)
    gap = float(c["m"] - r["m"])
    assert star.clean_metric == pytest.approx(float(c["m"]), abs=1e-4)
    assert star.corrupted_metric == pytest.approx(float(r["m"]), abs=1e-4)
    name = "k" if node == "key" else "q"
    scale = 8**-0.5
    want_star, want_plain, want_exact = [], [], []
    for t in range(T):
        delta = c[name][:, :, t] - r[name][:, :, t]  # (1, heads, d_head)
        # AtP*: the logits of the patched key (query) exactly, softmax exactly, then linear
        moved = r["S"].clone()
        if node == "key":
            moved[:, :, :, t] += torch.einsum("bhsd,bhd->bhs", r["q"], delta) * scale
        else:
            moved[:, :, t, :] += torch.einsum("bhd,bhsd->bhs", delta, r["k"]) * scale
        new_pattern = torch.softmax(moved, -1)
        pattern = r["P"].clone().requires_grad_(True)
        (g_pattern,) = torch.autograd.grad(_by_hand(one_layer, corrupted, P=pattern)["m"], pattern)
        want_star.append(float((g_pattern * (new_pattern - r["P"])).sum()) / gap)
        # plain AtP: linear in the key (query) itself
        node_value = r[name].clone().requires_grad_(True)
        (g_node,) = torch.autograd.grad(
            _by_hand(one_layer, corrupted, **{name: node_value})["m"], node_value
        )
        want_plain.append(float((g_node[:, :, t] * delta).sum()) / gap)
        # exact: that key (query) replaced by the clean run's
        with torch.no_grad():
            patched = r[name].clone()
            patched[:, :, t] = c[name][:, :, t]
            exact = _by_hand(one_layer, corrupted, **{name: patched})["m"]
        want_exact.append(float(exact - r["m"]) / gap)
    assert star.attribution is not None and plain.attribution is not None
    assert star.gap_restored is not None
    assert star.attribution[0] == pytest.approx(want_star, abs=1e-4)
    assert plain.attribution[0] == pytest.approx(want_plain, abs=1e-4)
    assert star.gap_restored[0] == pytest.approx(want_exact, abs=1e-4)
    assert star.estimator == "AtP*" and plain.estimator == "AtP"
    # saturated softmax: the fix matters here, and moves the estimate toward the exact effect
    err_star = sum(abs(a - b) for a, b in zip(want_star, want_exact, strict=True))
    err_plain = sum(abs(a - b) for a, b in zip(want_plain, want_exact, strict=True))
    assert err_star < err_plain


def test_grad_drop_equals_its_definition() -> None:
    a = arch("gpt2")
    model, backend = a.model, a.backend
    clean, corrupted = _ids()
    clean, corrupted = clean % 100, corrupted % 100
    got = attribution_patch(backend, clean, corrupted, grad_drop=True, metric_fn=metric)
    blocks = model.transformer.h
    n_layers = len(blocks)

    def block_outputs(ids: torch.Tensor, deltas: list[torch.Tensor] | None, drop: int | None):
        """Block outputs (with ``deltas`` added) and the metric; layer ``drop``'s attention
        and MLP outputs detached."""
        outs: list[torch.Tensor] = []
        handles = []

        def add(i: int) -> Any:
            def hook(module: Any, args: Any, output: Any) -> Any:
                hidden = output[0] if isinstance(output, tuple) else output
                if deltas is not None:
                    hidden = hidden + deltas[i]
                outs.append(hidden)
                return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

            return hook

        def detach(module: Any, args: Any, output: Any) -> Any:
            if isinstance(output, tuple):
                return (output[0].detach(), *output[1:])
            return output.detach()

        for i, b in enumerate(blocks):
            handles.append(b.register_forward_hook(add(i)))
        if drop is not None:
            handles.append(blocks[drop].attn.register_forward_hook(detach))
            handles.append(blocks[drop].mlp.register_forward_hook(detach))
        try:
            value = metric(model(ids).logits, None)[0]
        finally:
            for h in handles:
                h.remove()
        return outs, value

    with torch.no_grad():
        clean_out, clean_m = block_outputs(clean, None, None)
        corr_out, corr_m = block_outputs(corrupted, None, None)
    gap = float(clean_m - corr_m)
    total = torch.zeros(n_layers, T, dtype=torch.float64)
    for drop in range(n_layers):
        deltas = [torch.zeros(1, T, 32, requires_grad=True) for _ in blocks]
        _, value = block_outputs(corrupted, deltas, drop)
        grads = torch.autograd.grad(value, deltas)
        for j in range(n_layers):
            per_pos = (grads[j] * (clean_out[j] - corr_out[j])).sum(-1)[0].double()
            total[j] += per_pos.abs()
    want = total / (n_layers - 1) / abs(gap)
    assert got.estimator == "AtP+GradDrop"
    assert got.attribution is not None
    assert torch.tensor(got.attribution, dtype=torch.float64) == pytest.approx(want, abs=1e-5)


def test_runs_leave_the_model_as_they_found_it(one_layer: Any) -> None:
    clean, corrupted = _ids()
    home = sys.modules[type(one_layer.transformer.h[0].attn).__module__]
    eager = home.eager_attention_forward
    before = one_layer.config._attn_implementation
    weights = {k: v.clone() for k, v in one_layer.state_dict().items()}
    hooks = hook_ids(one_layer)
    attention_node_sweep(one_layer, clean, corrupted, node="key", metric_fn=metric)
    assert home.eager_attention_forward is eager
    assert one_layer.config._attn_implementation == before
    assert not one_layer.training
    assert hook_ids(one_layer) == hooks
    for k, v in one_layer.state_dict().items():
        assert torch.equal(v, weights[k]), k


def test_options_that_do_not_apply_are_refused(one_layer: Any) -> None:
    clean, corrupted = _ids()
    with pytest.raises(InputError, match="use 'key' or 'query'"):
        attention_node_sweep(one_layer, clean, corrupted, node="value")
    with pytest.raises(InputError, match="estimator='linear'"):
        attention_node_sweep(one_layer, clean, corrupted, estimator="linear")
    with pytest.raises(InputError, match="two layers or more"):
        attention_node_sweep(one_layer, clean, corrupted, grad_drop=True, metric_fn=metric)
    with pytest.raises(InputError, match="set attribution=True"):
        patch_sweep(one_layer, clean, corrupted, grad_drop=True)
    lstm = arch("lstm")
    ids = clean % 100, corrupted % 100
    with pytest.raises(InputError, match="no such contribution"):
        attribution_patch(lstm.backend, *ids, grad_drop=True, metric_fn=metric)
    with pytest.raises(SiteError, match="applies to attention only"):
        attention_node_sweep(arch("mamba").backend, *ids, metric_fn=metric)
    with pytest.raises(SiteError, match="attention layers of this model: \\[1\\]"):
        attention_node_sweep(arch("hybrid").backend, *ids, layers=[0], metric_fn=metric)
    g = arch("gpt2")
    data = archscope.data.Contrast(["w5 w6 w7 w8"], ["w5 w16 w7 w8"], tokenizer=g.tokenizer)
    with pytest.raises(InputError, match="needs node='key' or node='query'"):
        archscope.run_method("attribution-patch", g.backend, data, estimator="atp*")
    with pytest.raises(InputError, match="leave axis, site and embed"):
        archscope.run_method("attribution-patch", g.backend, data, node="key", embed=True)


def test_the_method_sweeps_keys_with_atp_star() -> None:
    g = arch("gpt2")
    texts = (["w5 w6 w7 w8 w9", "w10 w11 w12 w13"], ["w5 w16 w7 w8 w19", "w10 w21 w12 w23"])
    data = archscope.data.Contrast(*texts, tokenizer=g.tokenizer)
    sweep = archscope.run_method(
        "attribution-patch", g.backend, data, node="key", estimator="atp*", exact=True
    )
    assert sweep.estimator == "AtP*"
    assert sweep.rows == [f"layer_{i}" for i in range(g.backend.n_layers)]
    assert sweep.sites[0][0] == "layer_0.attn_key"
    assert sweep.correlation is not None and sweep.correlation > 0.5
    assert "AtP*" in sweep.to_markdown()
