"""Per-head circuit scores on layers without softmax attention, read from their effective
attention: a Mamba-2 layer and an mLSTM (xLSTM) model built by hand so that a known layer and
head is an induction (or previous-token) head, against the same models with the mechanism
removed; and the registered method and ``archscope run circuits`` on such a model."""

from __future__ import annotations

import json
import math
import warnings
from typing import Any

import ground_truth as gt
import pytest
import torch
from click.testing import CliRunner

import archscope
from archscope.methods.circuits import (
    induction_head_score,
    normalised_attention,
    pattern_sites,
)

warnings.filterwarnings("ignore", message=".*falling back to its reference PyTorch.*")
TOKENS = 32  # the scored ids 0..31 have one-hot embeddings


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    with gt.one_thread():
        yield


# -- Mamba-2: the causal conv gives B the previous token, C the current one -----------------------
def mamba2_model(copying: bool = True) -> Any:
    """Two Mamba-2 layers (4 heads, one B/C group). Layer 0 by hand: no decay (A ≈ 0), Δ = 1,
    ``C_t`` = the current token's one-hot code and ``B_s`` the code of the token before s
    (``copying``) or of token s itself; its effective attention is then ``C_t·B_s``: non-zero
    exactly where the token before s is the current token (an induction head, every head of
    the group), or where token s is (a duplicate-token head). Layer 1 keeps random weights."""
    from transformers import Mamba2Config, Mamba2ForCausalLM

    torch.manual_seed(0)
    config = Mamba2Config(
        vocab_size=100,
        hidden_size=TOKENS,
        num_hidden_layers=2,
        state_size=TOKENS,
        expand=2,
        num_heads=4,
        head_dim=16,
        n_groups=1,
        conv_kernel=4,
        chunk_size=8,
    )
    model = Mamba2ForCausalLM(config).eval()
    mixer = model.backbone.layers[0].mixer
    inner, n = mixer.intermediate_size, mixer.ssm_state_size
    eye = torch.eye(TOKENS)
    with torch.no_grad():
        model.backbone.embeddings.weight[:TOKENS] = eye
        w = mixer.in_proj.weight  # rows: gate | x, B, C | dt
        w.zero_()
        w[inner : inner + TOKENS] = eye  # x
        w[2 * inner : 2 * inner + n] = eye  # B
        w[2 * inner + n : 2 * inner + 2 * n] = eye  # C
        mixer.dt_bias.fill_(math.log(math.e - 1))  # softplus = 1
        mixer.A_log.fill_(-30.0)  # A ≈ 0: no decay
        conv = mixer.conv1d
        conv.weight.zero_()
        conv.bias.zero_()
        last = conv.kernel_size[0] - 1  # the current position's tap
        conv.weight[:inner, 0, last] = 1.0
        conv.weight[inner : inner + n, 0, last - 1 if copying else last] = 1.0
        conv.weight[inner + n :, 0, last] = 1.0
    return model


def mamba2_with_tokenizer() -> tuple[Any, Any]:
    """The copying Mamba-2 model and the tests' 100-id tokenizer (for ``archscope run``)."""
    from archs import tokenizer

    return mamba2_model(True), tokenizer()


def test_mamba2_induction_through_effective_attention_separates_a_copying_layer():
    copying = induction_head_score(
        mamba2_model(True), n_pairs=12, seq_len=4, n_trials=12, vocab_size=TOKENS
    )
    other = induction_head_score(
        mamba2_model(False), n_pairs=12, seq_len=4, n_trials=12, vocab_size=TOKENS
    )
    heads = copying.raw["heads"]["per_layer"]
    assert heads["layer_0"]["site"] == "layer_0.effective_attention"
    # the hand-built layer: all its weight on the token after the earlier occurrence
    for score in heads["layer_0"]["induction"]:
        assert score == pytest.approx(1.0, abs=1e-4)
    assert max(heads["layer_1"]["induction"]) < 0.5  # random weights
    assert copying.raw["heads"]["top_induction"][0]["layer"] == 0
    # the duplicate-token layer attends to the earlier occurrence itself, never after it
    for score in other.raw["heads"]["per_layer"]["layer_0"]["induction"]:
        assert abs(score) < 1e-4


def test_scores_equal_the_normalised_site_read_by_hand():
    model = mamba2_model(True)
    backend = archscope.Backend.for_model(model)
    assert "attention_patterns" not in backend.capabilities
    sites = pattern_sites(backend)
    assert sites == ["layer_0.effective_attention", "layer_1.effective_attention"]
    block = torch.arange(5, 18)
    ids = torch.cat([torch.tensor([1, 2, 3, 4]), block, block]).unsqueeze(0)
    value = backend.run(ids, capture=sites)[sites[1]]
    pattern = normalised_attention(value, "effective_attention")
    rows = value.abs().sum(-1)
    torch.testing.assert_close(pattern.abs().sum(-1), torch.ones_like(rows))
    # a softmax pattern is left as it is
    soft = torch.softmax(torch.randn(1, 2, 4, 4), -1)
    assert torch.equal(normalised_attention(soft, "attn_pattern"), soft)


# -- mLSTM: two layers, a previous-token head then an induction head -------------------------------
def xlstm_model(copying: bool = True) -> Any:
    """Two xLSTM blocks (hidden 64, 2 heads of 32). Tokens 0..15 have one-hot embeddings in
    dims 0..15. Layer 0 head 0: query = the current token's code, key = 1 - the code (q_t·k_s
    is non-zero unless token s is token t), strong forgetting: its effective attention is on
    the previous position; its value (code, -code: mean zero, so the per-head norm only scales
    it) goes to dims 16..31. Layer 1 head 0: query = the current token's code, key = dims
    16..31 (the previous token), no forgetting: it attends to the position after the earlier
    occurrence of the current token (``copying``; else its key reads the current token: a
    duplicate-token head). Other heads and the FFNs are zero."""
    from transformers import xLSTMConfig, xLSTMForCausalLM

    torch.manual_seed(0)
    config = xLSTMConfig(
        vocab_size=100,
        hidden_size=64,
        embedding_dim=64,
        num_hidden_layers=2,
        num_blocks=2,
        num_heads=2,
        qk_dim_factor=1.0,
        v_dim_factor=1.0,
    )
    model = xLSTMForCausalLM(config).eval()
    code = torch.eye(16)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.backbone.embeddings.weight[:16, :16] = code
        for block in model.backbone.blocks:
            for norm in (block.norm_mlstm, block.norm_ffn, block.mlstm_layer.multihead_norm):
                norm.weight.fill_(1.0)
        model.backbone.out_norm.weight.fill_(1.0)
        model.lm_head.weight.normal_(0.0, 0.02)
        first = model.backbone.blocks[0].mlstm_layer
        first.q.weight[:16, :16] = code
        first.k.weight[:16, :16] = 1.0 - code
        first.v.weight[:16, :16] = code
        first.v.weight[16:32, :16] = -code
        first.igate_preact.bias.fill_(10.0)
        first.fgate_preact.bias.fill_(-8.0)  # logσ(-8) ≈ -8: one step back dominates
        first.out_proj.weight[16:32, :16] = code
        second = model.backbone.blocks[1].mlstm_layer
        second.q.weight[:16, :16] = code
        reads = slice(16, 32) if copying else slice(0, 16)
        second.k.weight[:16, reads] = code
        second.v.weight[:16, :16] = code
        second.fgate_preact.bias.fill_(12.0)  # no forgetting
    return model


def test_mlstm_induction_and_previous_token_heads_through_effective_attention():
    trials = dict(n_pairs=8, seq_len=3, n_trials=12, vocab_size=16)
    copying = induction_head_score(xlstm_model(True), **trials)
    other = induction_head_score(xlstm_model(False), **trials)
    heads = copying.raw["heads"]["per_layer"]
    assert heads["layer_1"]["site"] == "layer_1.effective_attention"
    assert heads["layer_0"]["previous_token"][0] > 0.9  # the previous-token head
    assert heads["layer_1"]["induction"][0] > 0.9  # the induction head
    assert max(heads["layer_0"]["induction"]) < 0.1
    top = copying.raw["heads"]["top_induction"][0]
    assert (top["layer"], top["head"]) == (1, 0)
    without = other.raw["heads"]["per_layer"]["layer_1"]["induction"][0]
    assert abs(without) < 0.05


def test_the_method_and_the_cli_run_on_a_model_without_softmax_attention(tmp_path):
    backend = archscope.Backend.for_model(mamba2_model(True))
    report = archscope.run_method("circuits", backend, None, n_trials=6, n_pairs=5, lead_in=2)
    heads = report.scores["induction_head"].raw["heads"]
    assert set(heads["per_layer"]) == {"layer_0", "layer_1"}
    assert "Top induction heads" in report.to_markdown()
    figure = report.figure()
    assert len(figure.axes) >= 2
    from archscope.apps.cli import cli

    out = tmp_path / "circuits.json"
    result = CliRunner().invoke(
        cli,
        [
            "run",
            "circuits",
            f"{__file__}:mamba2_with_tokenizer",
            "--text",
            "w5 w6 w7 w5 w6 w7",
            "--quick",
            "--json",
            "--out",
            str(out),
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    saved = json.loads(out.read_text())
    per_layer = saved["scores"]["induction_head"]["raw"]["heads"]["per_layer"]
    assert per_layer["layer_0"]["site"] == "layer_0.effective_attention"
