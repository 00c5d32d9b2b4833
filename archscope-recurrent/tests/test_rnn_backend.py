"""RNN backend behaviour: states, padding, edits, errors, persistence."""

from __future__ import annotations

import pytest
import torch

import archscope
from archscope import Edit, SiteError
from archscope.backends import BackendError
from archscope.errors import InputError, ModelSourceError
from archscope_recurrent.models import RecurrentLM
from archscope_recurrent.rnn import RNNBackend
from archscope_recurrent.testing import plain_lstm_lm, tiny_recurrent_lm, token_batch


def to_torch(values, dirs):
    """Our per-layer (batch, dirs*dim) states → torch's (layers*dirs, batch, dim)."""
    return torch.cat([v.reshape(v.shape[0], dirs, -1).transpose(0, 1) for v in values])


@pytest.mark.parametrize(
    ("cell", "options"), [("gru", {}), ("lstm", {"proj_size": 8}), ("rnn_tanh", {})], ids=str
)
def test_initial_state_run_equals_torch_module_with_h0_c0(cell, options):
    model = tiny_recurrent_lm(cell, num_layers=2, **options)
    backend = RNNBackend(model)
    ids = token_batch(2, 5)["input_ids"]
    g = torch.Generator().manual_seed(3)
    state = {
        name: torch.randn(2, info.dim, generator=g)
        for name, info in backend.sites().items()
        if info.kind == "state"
    }
    result = backend.run(
        ids, capture=["layer_1.hidden", "logits"], initial_state=state, return_state=True
    )
    dirs = backend.num_dirs
    h0 = to_torch([state[f"layer_{i}.hidden_state"] for i in range(2)], dirs)
    hx = (
        (h0, to_torch([state[f"layer_{i}.cell_state"] for i in range(2)], dirs))
        if cell == "lstm"
        else h0
    )
    with torch.no_grad():
        out, final = model.rnn(model.embed(ids), hx)
        logits = model.head(model.norm(out))
    torch.testing.assert_close(result["layer_1.hidden"], out, atol=1e-6, rtol=0)
    torch.testing.assert_close(result.logits, logits, atol=1e-6, rtol=0)
    h_n = final[0] if cell == "lstm" else final
    ours = to_torch([result.state[f"layer_{i}.hidden_state"] for i in range(2)], dirs)
    torch.testing.assert_close(ours, h_n, atol=1e-6, rtol=0)
    if cell == "lstm":
        ours_c = to_torch([result.state[f"layer_{i}.cell_state"] for i in range(2)], dirs)
        torch.testing.assert_close(ours_c, final[1], atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("cell", "options"), [("gru", {}), ("lstm", {}), ("lstm", {"bidirectional": True})], ids=str
)
def test_right_padded_rows_equal_unpadded_runs(cell, options):
    model = tiny_recurrent_lm(cell, num_layers=2, **options)
    backend = RNNBackend(model)
    lengths = [7, 4, 2]
    batch = token_batch(3, 7, lengths=lengths)
    names = list(backend.sites())
    padded = backend.run(batch, capture=names)
    for row, n in enumerate(lengths):
        alone = backend.run(batch["input_ids"][row : row + 1, :n], capture=names)
        for name in names:
            value = padded[name][row : row + 1]
            if backend.sites()[name].kind == "token":
                value = value[:, :n]
            torch.testing.assert_close(value, alone[name], atol=1e-5, rtol=0, msg=name)


def test_final_state_after_hidden_edit_with_padding_is_per_row():
    model = tiny_recurrent_lm("lstm", num_layers=2)
    backend = RNNBackend(model)
    batch = token_batch(2, 6, lengths=[6, 3])
    edit = [Edit.scale("layer_0.hidden", 0.5, positions=[1])]
    padded = backend.run(batch, edits=edit, return_state=True)
    short = backend.run(batch["input_ids"][1:, :3], edits=edit, return_state=True)
    for name, value in short.state.items():
        torch.testing.assert_close(padded.state[name][1:], value, atol=1e-6, rtol=0)


def test_state_patch_continues_like_the_full_sequence():
    model = tiny_recurrent_lm("lstm", num_layers=2)
    backend = RNNBackend(model)
    ids = token_batch(2, 8)["input_ids"]
    full = backend.run(ids, capture=["logits"])
    swapped = backend.state_patch(ids[:, :5] * 0 + 7, ids[:, :5], ids[:, 5:])
    torch.testing.assert_close(swapped.logits, full.logits[:, 5:], atol=1e-6, rtol=0)


def test_left_padding_is_refused_with_a_clear_error():
    backend = RNNBackend(tiny_recurrent_lm("gru"))
    batch = token_batch(2, 5, lengths=[5, 3])
    batch["attention_mask"] = batch["attention_mask"].flip(-1)
    with pytest.raises(BackendError, match="right padding only.*left-padded"):
        backend.run(batch, capture=["layer_0.hidden"])


def test_identity_edits_leave_logits_bit_identical():
    model = tiny_recurrent_lm("lstm", num_layers=2)
    backend = RNNBackend(model)
    ids = token_batch(2, 6)["input_ids"]
    plain = backend.run(ids, capture=["logits"])
    for edit in (
        Edit.add("layer_0.hidden", 0.0, positions=[2]),
        Edit.scale("layer_1.cell", 1.0),
        Edit.add("embed", 0.0),
        Edit.scale("logits", 1.0),
    ):
        edited = backend.run(ids, capture=["logits"], edits=[edit])
        assert torch.equal(edited.logits, plain.logits), edit


def test_model_unchanged_after_a_run_that_raises():
    model = tiny_recurrent_lm("lstm", num_layers=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())
    backend = RNNBackend(model)
    with pytest.raises(SiteError, match="does not fit"):
        backend.run(
            token_batch(2, 5),
            edits=[Edit.replace("layer_0.hidden", torch.ones(3, 3), positions=[1])],
        )
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not model.training
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert all(p is params[n] for n, p in model.named_parameters())


def test_bad_requests_get_clear_errors():
    backend = RNNBackend(tiny_recurrent_lm("gru", num_layers=2))
    ids = token_batch(1, 4)["input_ids"]
    with pytest.raises(SiteError, match="layer_0.hidden.*hidden_state"):
        backend.run(ids, capture=["layer_0.cell"])
    with pytest.raises(SiteError, match=r"initial_state\['layer_0.hidden_state'\] must have shape"):
        backend.run(ids, initial_state={"layer_0.hidden_state": torch.zeros(1, 3)})
    with pytest.raises(SiteError, match="not state sites.*layer_0.hidden_state"):
        backend.run(ids, initial_state={"layer_0.hidden": torch.zeros(1, 24)})
    bidi = RNNBackend(tiny_recurrent_lm("lstm", bidirectional=True))
    with pytest.raises(SiteError, match=r"read-only \(the cell state of a bidirectional layer"):
        bidi.run(ids, edits=[Edit.add("layer_0.cell", 1.0, positions=[1])])
    with pytest.raises(SiteError, match="positions apply only to token sites"):
        backend.run(ids, edits=[Edit.add("layer_0.hidden_state", 1.0, positions=[1])])


def test_bidirectional_hidden_edit_changes_the_layer_output_seen_by_the_next_layer():
    model = tiny_recurrent_lm("gru", num_layers=2, bidirectional=True)
    backend = RNNBackend(model)
    ids = token_batch(2, 5)["input_ids"]
    value = torch.ones(backend.out_size)
    result = backend.run(
        ids,
        capture=["layer_0.hidden", "layer_1.hidden"],
        edits=[Edit.replace("layer_0.hidden", value, positions=[2])],
    )
    rnn = model.rnn

    def single(i):  # layer i of the stack as its own module, loaded from the state dict
        module = torch.nn.GRU(
            rnn.input_size if i == 0 else 2 * rnn.hidden_size,
            rnn.hidden_size,
            batch_first=True,
            bidirectional=True,
        )
        module.load_state_dict(
            {k.replace(f"_l{i}", "_l0"): v for k, v in rnn.state_dict().items() if f"_l{i}" in k}
        )
        return module

    with torch.no_grad():
        layer0, _ = single(0)(model.embed(ids))
        layer0[:, 2] = value
        layer1, _ = single(1)(layer0)
    torch.testing.assert_close(result["layer_0.hidden"], layer0, atol=1e-6, rtol=0)
    torch.testing.assert_close(result["layer_1.hidden"], layer1, atol=1e-6, rtol=0)


def test_editing_a_final_state_changes_the_returned_state_only():
    model = tiny_recurrent_lm("lstm", num_layers=2)
    backend = RNNBackend(model)
    ids = token_batch(2, 5)["input_ids"]
    plain = backend.run(ids, return_state=True)
    edited = backend.run(
        ids,
        capture=["layer_1.cell_state"],
        return_state=True,
        edits=[Edit.scale("layer_1.cell_state", 0.0)],
    )
    assert torch.equal(edited.logits, plain.logits)
    assert torch.equal(edited["layer_1.cell_state"], torch.zeros_like(edited["layer_1.cell_state"]))
    assert torch.equal(edited.state["layer_1.cell_state"], edited["layer_1.cell_state"])
    torch.testing.assert_close(
        edited.state["layer_0.cell_state"], plain.state["layer_0.cell_state"], atol=0, rtol=0
    )


def test_parameters_replaced_after_construction_are_used():
    model = tiny_recurrent_lm("gru", num_layers=2)
    backend = RNNBackend(model)
    ids = token_batch(1, 4)["input_ids"]
    backend.run(ids, capture=["layer_1.hidden"])
    model.rnn.weight_hh_l1 = torch.nn.Parameter(torch.zeros_like(model.rnn.weight_hh_l1))
    with torch.no_grad():
        reference = model(ids)
    torch.testing.assert_close(backend.run(ids, capture=["logits"]).logits, reference)


def test_structural_detection_checks_the_forward():
    model = plain_lstm_lm()
    backend = RNNBackend(model)
    ids = token_batch(2, 5)["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(backend.run(ids, capture=["logits"]).logits, model(ids))
    assert "final_norm" not in backend.sites()

    class Shifted(type(model)):
        def forward(self, input_ids):
            return super().forward(input_ids) + 1.0

    odd = Shifted().eval()
    with pytest.raises(BackendError, match="forward computes something else.*ModelSpec"):
        RNNBackend(odd)


def test_unembed_of_last_hidden_equals_logits():
    model = tiny_recurrent_lm("lstm", num_layers=2, proj_size=8)
    backend = RNNBackend(model)
    result = backend.run(token_batch(2, 4), capture=["layer_1.hidden", "logits"])
    torch.testing.assert_close(backend.unembed(result["layer_1.hidden"]), result.logits)
    with pytest.raises(InputError, match="width 8"):
        backend.unembed(torch.zeros(1, 2, 5))


def test_save_and_load_round_trip_and_model_source(tmp_path):
    model = tiny_recurrent_lm("lstm", num_layers=2, proj_size=8)
    model.save_pretrained(tmp_path / "lm")
    assert sorted(p.name for p in (tmp_path / "lm").iterdir()) == [
        "model.safetensors",
        "recurrent_lm.json",
    ]
    loaded = RecurrentLM.from_pretrained(tmp_path / "lm")
    ids = token_batch(2, 5)["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), atol=0, rtol=0)
    again, tokenizer, backend = archscope.load_model(str(tmp_path / "lm"))
    assert tokenizer is None and backend.name == "recurrent"
    assert again.config == model.config
    with pytest.raises(ModelSourceError, match="recurrent_lm.json is missing"):
        archscope.load_model(f"recurrent:{tmp_path}")


def test_grad_flows_when_asked():
    model = tiny_recurrent_lm("gru", num_layers=2)
    backend = RNNBackend(model)
    result = backend.run(token_batch(1, 4), capture=["layer_0.hidden", "logits"], grad=True)
    result.logits.sum().backward()
    assert model.rnn.weight_hh_l0.grad is not None
    model.zero_grad()
    assert not backend.run(token_batch(1, 4), capture=["logits"]).logits.requires_grad


def test_bidirectional_models_have_no_state_patch():
    backend = RNNBackend(tiny_recurrent_lm("lstm", bidirectional=True))
    assert "state_patch" not in backend.capabilities
    assert "state_patch" in RNNBackend(tiny_recurrent_lm("lstm")).capabilities
    ids = token_batch(1, 4)["input_ids"]
    with pytest.raises(BackendError, match="bidirectional model lacks.*capture the"):
        backend.run(ids, return_state=True)
    with pytest.raises(BackendError, match="lacks the capability 'state_patch'"):
        backend.state_patch(ids, ids, ids)
    assert backend.run(ids, capture=["layer_1.cell_state"])["layer_1.cell_state"].shape == (1, 48)
