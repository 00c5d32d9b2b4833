"""Lens rows and positions, each against a computation by hand: the embedding row is the
model's own final norm and head applied to its embedding output, the batch lens's target rank
is a count over sorted logits, and a tuned lens restricted to positions evaluates exactly the
KL of those positions."""

from __future__ import annotations

import pytest
import torch
from archs import arch

import archscope
from archscope.data import pad_batch
from archscope.errors import InputError, ParameterError
from archscope.methods.lens import TunedLens, logit_lens, logit_lens_run

ROWS = [[5, 17, 42, 8, 99, 23], [7, 7, 31, 64], [12, 40, 3, 9, 55]]


def _llama_unembed(model: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
    """Llama's final RMSNorm and head, applied by hand."""
    with torch.no_grad():
        return model.lm_head(model.model.norm(h)).float()


def test_embed_row_is_the_unembedded_embedding_output() -> None:
    a = arch("llama")
    ids = ROWS[0]
    result = logit_lens(a.model, a.tokenizer, ids, embed=True, top_k=3)
    first = result.layers[0]
    assert (first.layer, first.layer_name) == (-1, "embed")
    assert [p.layer for p in result.layers[1:]] == list(range(a.backend.n_layers))
    with torch.no_grad():
        embedded = a.model.get_input_embeddings()(torch.tensor([ids]))[0]  # no positions: rotary
    logp = _llama_unembed(a.model, embedded).log_softmax(-1)
    with torch.no_grad():
        final = a.model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
    assert [t[0] for t in first.top_tokens] == logp[-1].topk(3).indices.tolist()
    kl = (final.exp() * (final - logp)).sum(-1)
    assert result.kl_grid[0] == pytest.approx(kl.tolist(), abs=1e-4)
    # the batch lens has the same row
    batch = pad_batch([ids], "right")
    run = logit_lens_run(a.backend, batch, embed=True)
    assert run.layers[0].layer_name == "embed"
    assert run.layers[0].kl_to_final[0] == pytest.approx(float(kl[-1]), abs=1e-4)
    assert len(run.mean_kl) == a.backend.n_layers + 1


def test_embed_row_is_refused_when_widths_differ() -> None:
    a = arch("lstm")  # embedding 16 wide, hidden 24: the head cannot read the embedding
    with pytest.raises(ParameterError, match="embedding output has 16 features"):
        logit_lens(a.model, a.tokenizer, ROWS[0], embed=True)


@pytest.mark.parametrize("name", ["gpt2", "mamba"])
def test_batch_lens_target_rank_counts_sorted_logits(name: str) -> None:
    a = arch(name)
    batch = pad_batch(ROWS, archscope.data.padding_for(a.backend))
    run = logit_lens_run(a.backend, batch, position=-2, target=42)
    got = a.backend.run(batch, capture=a.backend.layer_names())
    mask = batch["attention_mask"]
    for r, row in enumerate(ROWS):
        col = int(torch.nonzero(mask[r]).flatten()[len(row) - 2])
        for layer in run.layers:
            with torch.no_grad():
                logits = a.backend.unembed(got[layer.layer_name][r : r + 1, col]).float()[0]
            order = logits.argsort(descending=True).tolist()
            # rank = the target's place in the sorted logits (no ties in float logits here)
            assert layer.target_rank[r] == order.index(42)
            assert layer.target_prob[r] == pytest.approx(float(logits.softmax(-1)[42]), abs=1e-6)
    assert run.target_ids == [42, 42, 42]
    # without a target, each row's own final top-1: rank 0 at the last layer
    own = logit_lens_run(a.backend, batch)
    assert own.layers[-1].target_rank == [0, 0, 0]
    with pytest.raises(ParameterError, match="outside the vocabulary"):
        logit_lens_run(a.backend, batch, target=10_000)


def test_tuned_lens_positions_restrict_training_and_evaluation() -> None:
    a = arch("gpt2")
    rows = [list(range(4 + i, 12 + i)) for i in range(12)]
    lens = TunedLens.fit_rows(
        a.backend, rows, epochs=1, lr=1e-3, positions="last", eval_rows=rows[:4]
    )
    report = lens.report
    assert report is not None and report.positions == "last"
    assert report.n_eval_tokens == 4 and report.n_train_tokens == 12
    # the logit-lens KL at each row's last token, by hand
    per_layer = []
    for name in a.backend.layer_names():
        kls = []
        for row in rows[:4]:
            got = a.backend.run(torch.tensor([row]), capture=[name, "logits"])
            final = got["logits"][0, -1].float().log_softmax(-1)
            logp = a.backend.unembed(got[name][0, -1:]).float().log_softmax(-1)[0]
            kls.append(float((final.exp() * (final - logp)).sum()))
        per_layer.append(sum(kls) / len(kls))
    assert report.kl_logit == pytest.approx(per_layer, abs=1e-4)
    # two positions counted from both ends
    both = lens.evaluate(rows[:4], positions=[0, -1])
    assert both[0] != pytest.approx(report.kl_logit, abs=1e-6)
    with pytest.raises(ParameterError, match="positions="):
        TunedLens.fit_rows(a.backend, rows, epochs=1, positions="middle")
    with pytest.raises(InputError, match="no token"):
        TunedLens.fit_rows(a.backend, rows, epochs=1, positions=[40])
    registered = archscope.run_method(
        "tuned-lens", a.backend, rows, epochs=1, batch_size=4, positions="0,-1"
    )
    assert registered.positions == [0, -1]
