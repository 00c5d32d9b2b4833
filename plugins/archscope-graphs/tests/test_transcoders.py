"""Transcoders: the maps against their formulas written out here, training on the zoo
transformer through the SAE trainer, the metrics against independent computations, and the
three on-disk layouts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from archscope.errors import ArtifactError, ParameterError, SiteError
from archscope_graphs import Transcoder
from archscope_graphs.transcoders import (
    LayerTranscoder,
    TranscoderConfig,
    TranscoderStack,
    export_circuit_tracer,
    export_saelens,
    import_circuit_tracer,
    import_saelens,
    load_transcoders,
    reconstruct,
    save_transcoders,
    train_transcoders,
    transcoder_metrics,
)


def _random_tc(activation: str = "relu", skip: bool = False, seed: int = 0) -> LayerTranscoder:
    gen = torch.Generator().manual_seed(seed)
    d, f = 8, 20
    return LayerTranscoder(
        layer=1,
        W_enc=torch.randn(d, f, generator=gen),
        b_enc=torch.randn(f, generator=gen) * 0.3,
        W_dec={"layer_1.mlp": torch.randn(f, d, generator=gen)},
        b_dec=torch.randn(d, generator=gen),
        W_skip=torch.randn(d, d, generator=gen) if skip else None,
        threshold=torch.rand(f, generator=gen) if activation == "jumprelu" else None,
        activation=activation,
        k=3,
    )


@pytest.mark.parametrize("activation", ["relu", "jumprelu", "topk"])
def test_layer_transcoder_computes_its_formula(activation: str) -> None:
    tc = _random_tc(activation, skip=True)
    assert isinstance(tc, Transcoder)
    x = torch.randn(5, 4, 8, generator=torch.Generator().manual_seed(1))
    pre = x @ tc.W_enc + tc.b_enc
    if activation == "relu":
        acts = pre.clamp_min(0)
    elif activation == "jumprelu":
        assert tc.threshold is not None
        acts = torch.where(pre > tc.threshold, pre, torch.zeros(()))
    else:
        kth = pre.sort(dim=-1, descending=True).values[..., 2:3]
        acts = torch.where(pre >= kth, pre, torch.zeros(())).clamp_min(0)
        assert int((tc.encode(x) != 0).sum(-1).max()) <= 3
    torch.testing.assert_close(tc.encode(x), acts)
    w_dec = tc.decoder("layer_1.mlp")
    torch.testing.assert_close(tc.decode(acts, "layer_1.mlp"), acts @ w_dec + tc.b_dec)
    assert tc.W_skip is not None
    torch.testing.assert_close(tc.skip(x, "layer_1.mlp"), x @ tc.W_skip.T)
    torch.testing.assert_close(tc(x), acts @ w_dec + tc.b_dec + x @ tc.W_skip.T)
    torch.testing.assert_close(tc.encoder(), tc.W_enc.T)
    with pytest.raises(SiteError, match="no decoder for 'layer_0.mlp'"):
        tc.decode(acts, "layer_0.mlp")
    with pytest.raises(ParameterError, match=r"takes \(\.\.\., 8\) inputs"):
        tc.encode(torch.zeros(3, 7))


def test_jumprelu_threshold_gradient_is_the_straight_through_estimate() -> None:
    from archscope_graphs.transcoders import _jump

    pre = torch.tensor([[0.10, 0.52, 0.49, 2.0]], requires_grad=True)
    log_t = torch.log(torch.full((4,), 0.5)).requires_grad_(True)
    out = _jump(pre, log_t, 0.1)
    torch.testing.assert_close(out.detach(), torch.tensor([[0.0, 0.52, 0.0, 2.0]]))
    out.sum().backward()
    assert log_t.grad is not None and pre.grad is not None
    # d/dθ = -(θ/ε)·1{|pre-θ| < ε/2}; times θ for log θ: features 1 and 2 sit in the window
    want = torch.tensor([0.0, -(0.5 / 0.1) * 0.5, -(0.5 / 0.1) * 0.5, 0.0])
    torch.testing.assert_close(log_t.grad, want)
    torch.testing.assert_close(pre.grad, torch.tensor([[0.0, 1.0, 0.0, 1.0]]))


def test_cross_layer_stack_splits_into_views_that_add_up() -> None:
    """The stack's own prediction (normalised space, divided by the output scales) equals the
    sum over read layers of the split views' decodes plus skips."""
    config = TranscoderConfig(
        layers=[0, 1, 2], d_in=6, d_out=6, n_features=10, cross_layer=True, skip=True
    )
    stack = TranscoderStack(config, seed=3)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        stack.W_dec.add_(torch.randn(stack.W_dec.shape, generator=gen) * stack.dec_mask)
        stack.b_dec.copy_(torch.randn(stack.b_dec.shape, generator=gen))
        assert stack.W_skip is not None
        stack.W_skip.copy_(torch.randn(stack.W_skip.shape, generator=gen))
        stack.in_scale.copy_(torch.tensor([0.5, 2.0, 4.0]))
        stack.out_scale.copy_(torch.tensor([0.25, 1.0, 8.0]))
    xs = [torch.randn(7, 6, generator=gen) for _ in range(3)]
    rows = torch.cat([x * s for x, s in zip(xs, [0.5, 2.0, 4.0], strict=True)], dim=-1)
    with torch.no_grad():
        z = stack.activate(stack.pre_activations(rows))
        pred = stack.decode_normalized(z) + stack.skip_normalized(rows)
    views = stack.split()
    assert [v.write_sites for v in views] == [
        ("layer_0.mlp", "layer_1.mlp", "layer_2.mlp"),
        ("layer_1.mlp", "layer_2.mlp"),
        ("layer_2.mlp",),
    ]
    out = reconstruct(views, {f"layer_{i}.mlp_in": xs[i] for i in range(3)})
    for i, scale in enumerate([0.25, 1.0, 8.0]):
        torch.testing.assert_close(out[f"layer_{i}.mlp"], pred[:, i * 6 : (i + 1) * 6] / scale)
    # layer 2's features do not reach layer 0 or 1: those decoder blocks are masked out
    assert not bool((stack.W_dec * stack.dec_mask)[20:30, :12].any())


def test_config_refuses_bad_settings() -> None:
    with pytest.raises(ParameterError, match="activation 'gelu'"):
        TranscoderConfig(layers=[0], d_in=4, d_out=4, n_features=8, activation="gelu")
    with pytest.raises(ParameterError, match="k <= 8"):
        TranscoderConfig(layers=[0], d_in=4, d_out=4, n_features=8, activation="topk", k=9)
    with pytest.raises(ParameterError, match="distinct layer"):
        TranscoderConfig(layers=[0, 0], d_in=4, d_out=4, n_features=8)


# -- on the zoo transformer ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def zoo() -> Any:
    archscope = pytest.importorskip("archscope")
    zoo_pkg = pytest.importorskip("archscope_zoo")
    model, tokenizer, backend = archscope.load_model("zoo:transformer")
    texts = zoo_pkg.datasets("heldout", n=72)
    return model, tokenizer, backend, texts[:48], texts[48:]


@pytest.fixture(scope="module")
def trained(zoo: Any) -> list[LayerTranscoder]:
    model, tokenizer, backend, train, _ = zoo
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tcs = train_transcoders(
        backend,
        train,
        n_features=128,
        epochs=3,
        batch_size=64,
        sparsity=0.03,
        tokenizer=tokenizer,
        progress=False,
    )
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"training changed the model's {k}"
    assert not model.training
    return tcs


def test_trained_transcoders_reconstruct_the_mlps(zoo: Any, trained: list[LayerTranscoder]) -> None:
    import archscope

    _, tokenizer, backend, _, held = zoo
    assert [t.read_site for t in trained] == ["layer_0.mlp_in", "layer_1.mlp_in"]
    metrics = transcoder_metrics(trained, backend, held, tokenizer=tokenizer)
    # explained variance, computed here independently from collect
    got = archscope.collect(
        backend,
        held,
        ["layer_0.mlp_in", "layer_0.mlp", "layer_1.mlp_in", "layer_1.mlp"],
        pool=None,
        tokenizer=tokenizer,
    )
    for tc in trained:
        y = got[tc.own_site].double()
        pred = tc(got[tc.read_site]).double()
        ev = 1 - (pred - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum()
        assert metrics.explained_variance[tc.own_site] == pytest.approx(float(ev), abs=1e-6)
        assert float(ev) > 0.5, f"{tc.own_site}: explained variance {float(ev):.3f}"
        l0 = float((tc.encode(got[tc.read_site]) != 0).sum(-1).float().mean())
        assert metrics.l0[tc.read_site] == pytest.approx(l0)
        assert l0 < tc.n_features
    assert metrics.n_tokens == len(got)
    assert metrics.clean_loss < metrics.replaced_loss < metrics.zero_ablated_loss
    assert metrics.loss_recovered > 0.5
    assert 0.0 <= metrics.dead_fraction["layer_0.mlp_in"] < 1.0


def test_metrics_of_an_all_zero_transcoder_equal_zero_ablation(zoo: Any) -> None:
    _, tokenizer, backend, _, held = zoo
    d = int(backend.site_info("layer_0.mlp").dim)
    zero = [
        LayerTranscoder(
            layer=i,
            W_enc=torch.zeros(d, 4),
            b_enc=torch.zeros(4),
            W_dec={f"layer_{i}.mlp": torch.zeros(4, d)},
            b_dec=torch.zeros(d),
        )
        for i in (0, 1)
    ]
    metrics = transcoder_metrics(zero, backend, held[:6], tokenizer=tokenizer)
    assert metrics.replaced_loss == pytest.approx(metrics.zero_ablated_loss, rel=1e-6)
    assert metrics.loss_recovered == pytest.approx(0.0, abs=1e-6)
    assert metrics.l0 == {"layer_0.mlp_in": 0.0, "layer_1.mlp_in": 0.0}
    assert metrics.dead_fraction == {"layer_0.mlp_in": 1.0, "layer_1.mlp_in": 1.0}


@pytest.mark.parametrize("activation", ["topk", "jumprelu"])
def test_topk_and_jumprelu_train(zoo: Any, activation: str) -> None:
    _, tokenizer, backend, train, held = zoo
    (tc,) = train_transcoders(
        backend,
        train[:24],
        n_features=64,
        layers=[1],
        activation=activation,
        k=8,
        epochs=2,
        batch_size=64,
        sparsity=0.03,
        tokenizer=tokenizer,
        progress=False,
    )
    metrics = transcoder_metrics([tc], backend, held[:8], tokenizer=tokenizer)
    assert metrics.explained_variance["layer_1.mlp"] > 0.3
    if activation == "topk":
        assert metrics.l0["layer_1.mlp_in"] <= 8
    else:
        assert tc.threshold is not None
        moved = (tc.threshold - 0.01).abs().max()
        assert float(moved) > 1e-4, "the thresholds did not train"


def test_cross_layer_transcoder_trains_with_masked_blocks(zoo: Any) -> None:
    _, tokenizer, backend, train, held = zoo
    tcs = train_transcoders(
        backend,
        train[:24],
        n_features=64,
        cross_layer=True,
        skip=True,
        epochs=2,
        batch_size=64,
        sparsity=0.03,
        tokenizer=tokenizer,
        progress=False,
    )
    assert [t.write_sites for t in tcs] == [("layer_0.mlp", "layer_1.mlp"), ("layer_1.mlp",)]
    assert float(tcs[0].decoder("layer_1.mlp").abs().sum()) > 0  # layer 0 writes layer 1
    metrics = transcoder_metrics(tcs, backend, held[:8], tokenizer=tokenizer)
    assert min(metrics.explained_variance.values()) > 0.3


def test_training_refuses_layers_without_an_mlp(zoo: Any) -> None:
    _, tokenizer, backend, train, _ = zoo
    with pytest.raises(SiteError, match=r"layers \[5\]"):
        train_transcoders(backend, train[:2], layers=[5], tokenizer=tokenizer)
    with pytest.raises(ParameterError, match="epochs"):
        train_transcoders(backend, train[:2], epochs=0, tokenizer=tokenizer)


# -- layouts ------------------------------------------------------------------------------------
def test_archscope_folder_round_trip_of_a_cross_layer_set(tmp_path: Path) -> None:
    config = TranscoderConfig(
        layers=[0, 1], d_in=5, d_out=5, n_features=6, cross_layer=True, activation="jumprelu"
    )
    views = TranscoderStack(config, seed=1).split()
    save_transcoders(views, tmp_path / "tc", model="m")
    back = load_transcoders(tmp_path / "tc")
    x = {f"layer_{i}.mlp_in": torch.randn(3, 5) for i in (0, 1)}
    a, b = reconstruct(views, x), reconstruct(back, x)
    for site in a:
        torch.testing.assert_close(a[site], b[site])
    doc = json.loads((tmp_path / "tc" / "transcoders.json").read_text())
    assert doc["info"] == {"model": "m"}
    with pytest.raises(ArtifactError, match="no transcoders.json"):
        load_transcoders(tmp_path)


@pytest.mark.parametrize(
    ("activation", "skip"), [("relu", False), ("relu", True), ("jumprelu", False)]
)
def test_saelens_layout_round_trip(tmp_path: Path, activation: str, skip: bool) -> None:
    from safetensors.torch import load_file

    tc = _random_tc(activation, skip=skip)
    folder = export_saelens(tc, tmp_path / "sl", model_name="zoo:transformer")
    cfg = json.loads((folder / "cfg.json").read_text())
    arch = {("relu", False): "transcoder", ("relu", True): "skip_transcoder"}
    assert cfg["architecture"] == arch.get((activation, skip), "jumprelu_transcoder")
    assert (cfg["d_in"], cfg["d_sae"], cfg["d_out"]) == (8, 20, 8)
    assert cfg["metadata"]["hook_name_out"] == "layer_1.mlp"
    weights = load_file(str(folder / "sae_weights.safetensors"))
    assert tuple(weights["W_enc"].shape) == (8, 20) and tuple(weights["W_dec"].shape) == (20, 8)
    back = import_saelens(folder)
    x = torch.randn(4, 8)
    torch.testing.assert_close(back(x), tc(x))
    assert back.layer == 1 and back.read_site == "layer_1.mlp_in"


def test_circuit_tracer_files_compute_circuit_tracers_formula(tmp_path: Path) -> None:
    """The files hold what circuit-tracer 0.5's ``SingleLayerTranscoder`` computes with:
    ``act(F.linear(x, W_enc, b_enc)) @ W_dec + b_dec + x @ W_skip.T`` (written out here)."""
    from safetensors.torch import load_file

    for activation, skip in (("relu", True), ("jumprelu", False)):
        tc = _random_tc(activation, skip=skip, seed=5)
        (path,) = export_circuit_tracer([tc], tmp_path / activation)
        assert path.name == "layer_1.safetensors"
        w = load_file(str(path))
        x = torch.randn(6, 8)
        pre = torch.nn.functional.linear(x, w["W_enc"], w["b_enc"])
        if activation == "jumprelu":
            acts = pre * (pre > w["activation_function.threshold"])
        else:
            acts = torch.relu(pre)
        out = acts @ w["W_dec"] + w["b_dec"]
        if skip:
            out = out + x @ w["W_skip"].T
        else:
            assert "W_skip" not in w
        torch.testing.assert_close(out, tc(x))
        back = import_circuit_tracer(path, layer=1)
        torch.testing.assert_close(back(x), tc(x))
    with pytest.raises(ParameterError, match="not TopK"):
        export_circuit_tracer([_random_tc("topk")], tmp_path / "topk")
    views = TranscoderStack(
        TranscoderConfig(layers=[0, 1], d_in=4, d_out=4, n_features=5, cross_layer=True)
    ).split()
    with pytest.raises(ParameterError, match="cross-layer"):
        export_circuit_tracer(views, tmp_path / "clt")
    with pytest.raises(ParameterError, match="cross-layer"):
        export_saelens(views[0], tmp_path / "clt")
