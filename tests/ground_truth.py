"""Ground truths for the circuit and lens tests. A 2-layer GPT-2 whose weights are set by hand
so that it provably copies (an induction circuit), and its untrained twin (same config,
random initialisation).

Training a transformer until an induction head forms takes minutes of CPU here; setting the
weights takes milliseconds and says exactly which heads do what:

- layer 0, head 0 (`PREV_HEAD`) attends from each position to the one before (a query that
  rotates the sinusoidal position code back one step) and writes that token's embedding into
  a "previous token" subspace;
- layer 1, head 0 (`INDUCTION_HEAD`) attends from the current token to the position whose
  previous token equals it (query: token subspace, key: previous-token subspace) and writes
  the token found there into an "output" subspace, which the (untied) unembedding reads.

Every other head and both MLPs are zero. The vocabulary has 512 ids (ids 0..3 special, as in
the shared tokenizer), so that 100x chance (1/512) is reachable.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from functools import cache
from typing import Any

VOCAB = 512
D = 512
HEADS = 4
HEAD_DIM = D // HEADS
N_FREQ = 16
TOK, PREV, OUT = slice(0, 128), slice(128, 256), slice(256, 384)
POS = slice(384, 384 + 2 * N_FREQ)
PREV_HEAD = (0, 0)
INDUCTION_HEAD = (1, 0)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread for a while: on a shared, loaded machine small models train
    several times faster without thread contention."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _config() -> Any:
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=VOCAB,
        n_positions=64,
        n_embd=D,
        n_layer=2,
        n_head=HEADS,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        attn_implementation="eager",
    )


@cache
def untrained() -> Any:
    import torch
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(_config()).eval()


@cache
def trained() -> Any:
    """The hand-set induction model (see the module docstring)."""
    import torch
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(_config()).eval()
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(VOCAB, TOK.stop - TOK.start, generator=g)
    emb = emb / emb.norm(dim=-1, keepdim=True)  # near-orthogonal token codes
    tr = model.transformer
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for block in tr.h:
            for ln in (block.ln_1, block.ln_2):
                ln.weight.fill_(1.0)
        tr.ln_f.weight.fill_(1.0)
        tr.wte.weight[:, TOK] = emb
        steps = torch.arange(64, dtype=torch.float32).unsqueeze(1)
        freqs = 2 * math.pi * torch.arange(1, N_FREQ + 1) / 128
        code = torch.stack([torch.cos(steps * freqs), torch.sin(steps * freqs)], -1)
        tr.wpe.weight[:, POS] = 0.25 * code.reshape(64, -1)

        # Conv1D weights: y = x @ W; columns [0, D) queries, [D, 2D) keys, [2D, 3D) values.
        def qkv(layer: int, head: int) -> tuple[Any, Any, Any, Any]:
            w = tr.h[layer].attn.c_attn.weight
            cols = slice(head * HEAD_DIM, (head + 1) * HEAD_DIM)
            q = w[:, cols]
            k = w[:, D + cols.start : D + cols.stop]
            v = w[:, 2 * D + cols.start : 2 * D + cols.stop]
            o = tr.h[layer].attn.c_proj.weight[cols, :]
            return q, k, v, o

        # Layer 0 head 0: previous-token head. The query is the position code rotated back one
        # step, so q_t . k_s = sum_f cos(w_f (t - 1 - s)), largest at s = t - 1.
        q, k, v, o = qkv(*PREV_HEAD)
        for f in range(N_FREQ):
            c, s = math.cos(freqs[f]), math.sin(freqs[f])
            rot = torch.tensor([[c, s], [-s, c]])  # p_t -> p_{t-1}
            rows = slice(POS.start + 2 * f, POS.start + 2 * f + 2)
            q[rows, 2 * f : 2 * f + 2] = 8.0 * rot.T
            k[rows, 2 * f : 2 * f + 2] = torch.eye(2)
        v[TOK, :128] = torch.eye(128)
        o[:128, PREV] = torch.eye(128) / 16.0  # undo the layer norm's gain
        # Layer 1 head 0: induction head: current token against the previous-token subspace.
        q, k, v, o = qkv(*INDUCTION_HEAD)
        q[TOK, :128] = 2.0 * torch.eye(128)
        k[PREV, :128] = torch.eye(128)
        v[TOK, :128] = torch.eye(128)
        o[:128, OUT] = torch.eye(128) / 13.0
        model.lm_head.weight[:, OUT] = 3.0 * emb
    return model


def markov_rows(n: int, length: int = 16, seed: int = 0) -> list[list[int]]:
    """``n`` token rows from a fixed sparse Markov chain over ids 4..99 (each token has three
    likely successors): text a small model learns in a few seconds."""
    import torch

    g = torch.Generator().manual_seed(1234)
    successors = torch.randint(4, 100, (100, 3), generator=g)  # the chain, fixed
    g = torch.Generator().manual_seed(seed)
    rows = torch.empty(n, length, dtype=torch.long)
    rows[:, 0] = torch.randint(4, 100, (n,), generator=g)
    for t in range(1, length):
        pick = torch.randint(0, 3, (n,), generator=g)
        rows[:, t] = successors[rows[:, t - 1], pick]
    return rows.tolist()


@cache
def markov_gpt2() -> Any:
    """A 3-layer tiny GPT-2 (vocabulary 100) trained for 40 steps on `markov_rows` text:
    a trained model whose intermediate layers are not yet in the unembedding's basis."""
    import torch

    from archscope_transformer.testing import tiny_model

    model = tiny_model("gpt2", n_layers=3, seed=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    data = torch.tensor(markov_rows(40 * 16, seed=7))
    torch.manual_seed(0)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    with one_thread():
        for ids in data.split(16):
            loss = model(input_ids=ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.zero_grad(set_to_none=True)
    return model.eval()
