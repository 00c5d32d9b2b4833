"""The hook engine on plain torch modules (a small stack of nn.Linear blocks).

References are computed by hand from the model's own sub-modules, never through the engine.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from archscope import Edit, Site, SiteError, SiteInfo
from archscope.backends import BackendError
from archscope.engine import HookBackend, Hookpoint, last_real_index, padding_side
from archscope.testing import hook_ids


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.calls = 0

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None = None):
        self.calls += 1
        return (h + torch.tanh(self.lin(h)), None)


class Stack(nn.Module):
    def __init__(self, vocab: int = 23, d: int = 8, n_layers: int = 6) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)
        for block in self.blocks:
            h = block(h, mask=attention_mask)[0]
        return self.head(self.norm(h))

    def reference(self, input_ids):
        """Every intermediate value, computed without hooks."""
        h = self.emb(input_ids)
        out = {"embed": h}
        for i, block in enumerate(self.blocks):
            h = h + torch.tanh(block.lin(h))
            out[f"layer_{i}.residual"] = h
        out["final_norm"] = self.norm(h)
        out["logits"] = self.head(out["final_norm"])
        return out


class StackBackend(HookBackend):
    name = "stack"
    capabilities = frozenset({"residual", "unembed", "logits", "edit"})

    def _site_table(self):
        m = self.model
        d = m.emb.embedding_dim
        tok = ("batch", "seq", "d_model")
        table = {
            "embed": (
                SiteInfo(Site("embed"), "token", tok, d, order=0),
                Hookpoint(m.blocks[0], io="input", arg="h"),
            )
        }
        for i, block in enumerate(m.blocks):
            table[f"layer_{i}.residual"] = (
                SiteInfo(Site("residual", i), "token", tok, d, order=i + 1),
                Hookpoint(block, index=0),
            )
        n = len(m.blocks)
        table["final_norm"] = (
            SiteInfo(Site("final_norm"), "token", tok, d, order=n + 1),
            Hookpoint(m.norm),
        )
        table["logits"] = (
            SiteInfo(
                Site("logits"),
                "token",
                ("batch", "seq", "vocab"),
                m.head.out_features,
                writable=False,
                order=n + 2,
            ),
            Hookpoint(m.head),
        )
        return table

    def unembed(self, residual):
        return self.model.head(self.model.norm(residual))


@pytest.fixture
def stack():
    torch.manual_seed(0)
    return Stack().eval()


@pytest.fixture
def ids():
    torch.manual_seed(1)
    return torch.randint(0, 23, (3, 7))


def test_every_site_equals_the_hand_computed_reference(stack, ids):
    backend = StackBackend(stack)
    result = backend.run(ids, capture=list(backend.sites()))
    with torch.no_grad():
        ref = stack.reference(ids)
    for name, value in ref.items():
        torch.testing.assert_close(result[name], value, rtol=0, atol=1e-6, msg=name)
    torch.testing.assert_close(result.logits, stack(ids), rtol=0, atol=0)


def test_only_requested_sites_are_materialised(stack, ids):
    result = StackBackend(stack).run(ids, capture=["layer_2.residual"])
    assert list(result.activations) == ["layer_2.residual"]


def test_early_stop_runs_only_the_needed_blocks_and_gives_identical_values(stack, ids):
    backend = StackBackend(stack)
    full = backend.run(ids, capture=["layer_1.residual"], stop_early=False)
    for block in stack.blocks:
        block.calls = 0
    early = backend.run(ids, capture=["layer_1.residual"])
    assert [b.calls for b in stack.blocks] == [1, 1, 0, 0, 0, 0]
    assert early.logits is None
    assert full.logits is not None
    assert torch.equal(early["layer_1.residual"], full["layer_1.residual"])


def test_early_stop_on_an_input_hook_site(stack, ids):
    for block in stack.blocks:
        block.calls = 0
    result = StackBackend(stack).run(ids, capture=["embed"])
    assert [b.calls for b in stack.blocks] == [0] * 6
    torch.testing.assert_close(result["embed"], stack.emb(ids).detach())


def test_capturing_logits_runs_the_whole_model(stack, ids):
    result = StackBackend(stack).run(ids, capture=["layer_0.residual", "logits"])
    torch.testing.assert_close(result["logits"], stack(ids).detach(), rtol=0, atol=0)


def test_identity_patch_leaves_logits_bit_identical(stack, ids):
    backend = StackBackend(stack)
    clean = backend.run(ids)
    for name, info in backend.sites().items():
        if not info.writable:
            continue
        same = backend.run(ids, edits=[Edit.apply(name, lambda x: x)])
        assert torch.equal(same.logits, clean.logits), name
        value = backend.run(ids, capture=[name])[name]
        same = backend.run(ids, edits=[Edit.replace(name, value)])
        assert torch.equal(same.logits, clean.logits), name


def test_patching_the_last_residual_with_another_prompt_gives_its_logits(stack, ids):
    backend = StackBackend(stack)
    other = torch.randint(0, 23, ids.shape, generator=torch.Generator().manual_seed(9))
    source = backend.run(other, capture=["layer_5.residual", "logits"])
    patched = backend.run(ids, edits=[Edit.replace("layer_5.residual", source["layer_5.residual"])])
    assert torch.equal(patched.logits, source.logits)


def test_add_scale_and_fn_edits_at_chosen_positions_and_units(stack, ids):
    backend = StackBackend(stack)
    base = backend.run(ids, capture=["layer_0.residual"])["layer_0.residual"]
    vec = torch.arange(8, dtype=torch.float32)
    added = backend.run(
        ids,
        capture=["layer_0.residual"],
        edits=[Edit.add("layer_0.residual", vec, positions=[2, -1])],
    )["layer_0.residual"]
    expected = base.clone()
    expected[:, [2, 6]] += vec
    torch.testing.assert_close(added, expected)
    scaled = backend.run(
        ids, capture=["layer_0.residual"], edits=[Edit.scale("layer_0.residual", 0.0, units=[1, 3])]
    )["layer_0.residual"]
    expected = base.clone()
    expected[..., [1, 3]] = 0
    torch.testing.assert_close(scaled, expected)
    fn = backend.run(
        ids,
        capture=["layer_0.residual"],
        edits=[Edit.apply("layer_0.residual", lambda x: -x, positions=slice(0, 2))],
    )
    expected = base.clone()
    expected[:, :2] = -expected[:, :2]
    torch.testing.assert_close(fn["layer_0.residual"], expected)


def test_an_edit_changes_everything_downstream(stack, ids):
    backend = StackBackend(stack)
    clean = backend.run(ids, capture=["layer_3.residual", "logits"])
    edited = backend.run(
        ids, capture=["layer_3.residual", "logits"], edits=[Edit.scale("layer_1.residual", 0.0)]
    )
    with torch.no_grad():
        h = torch.zeros_like(clean["layer_3.residual"])
        for block in stack.blocks[2:4]:
            h = h + torch.tanh(block.lin(h))
    torch.testing.assert_close(edited["layer_3.residual"], h)
    assert not torch.equal(edited.logits, clean.logits)


def test_edit_at_each_rows_last_real_token(stack):
    backend = StackBackend(stack)
    batch = {
        "input_ids": torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]),
    }
    base = backend.run(batch, capture=["layer_0.residual"])["layer_0.residual"]
    out = backend.run(
        batch,
        capture=["layer_0.residual"],
        edits=[Edit.replace("layer_0.residual", torch.ones(8), positions="last")],
    )
    expected = base.clone()
    expected[0, 2] = 1
    expected[1, 1] = 1
    torch.testing.assert_close(out["layer_0.residual"], expected)


def test_edit_with_misaligned_shape_is_a_clear_error(stack, ids):
    backend = StackBackend(stack)
    with pytest.raises(SiteError, match=r"shape \(3, 5, 8\) does not fit .* shape \(3, 7, 8\)"):
        backend.run(ids, edits=[Edit.replace("layer_0.residual", torch.zeros(3, 5, 8))])
    with pytest.raises(
        SiteError, match="positions \\[9\\] out of range for a sequence of length 7"
    ):
        backend.run(ids, edits=[Edit.add("layer_0.residual", torch.zeros(8), positions=[9])])
    with pytest.raises(SiteError, match="unit index out of range for dimension 8"):
        backend.run(ids, edits=[Edit.scale("layer_0.residual", 2.0, units=[8])])
    with pytest.raises(SiteError, match="function must return a tensor of shape"):
        backend.run(ids, edits=[Edit.apply("layer_0.residual", lambda x: x[:, :1])])
    assert hook_ids(stack) == set()


def test_read_only_site_cannot_be_edited(stack, ids):
    with pytest.raises(
        SiteError, match="'logits' of backend 'stack' is read-only; writable sites include embed"
    ):
        StackBackend(stack).run(ids, edits=[Edit.scale("logits", 2.0)])


def test_unknown_site_lists_valid_ones(stack, ids):
    with pytest.raises(SiteError) as err:
        StackBackend(stack).run(ids, capture=["layer_6.residual"])
    message = str(err.value)
    assert "'layer_6.residual' does not exist" in message
    assert "layers 0..5" in message and "roles residual" in message and "embed" in message
    with pytest.raises(SiteError, match="roles residual"):
        StackBackend(stack).run(ids, capture=["layer_0.mlp"])


def test_hooks_removed_and_model_unchanged_when_the_forward_raises(stack, ids):
    backend = StackBackend(stack)
    before = {k: v.clone() for k, v in stack.state_dict().items()}
    clean = backend.run(ids).logits

    def boom(x):
        raise RuntimeError("edit exploded")

    with pytest.raises(RuntimeError, match="edit exploded"):
        backend.run(ids, capture=["layer_4.residual"], edits=[Edit.apply("layer_2.residual", boom)])
    assert hook_ids(stack) == set()
    assert not stack.training
    assert all(torch.equal(before[k], v) for k, v in stack.state_dict().items())
    assert torch.equal(backend.run(ids).logits, clean)


def test_training_mode_is_left_as_it_was(stack, ids):
    stack.train()
    StackBackend(stack).run(ids, capture=["layer_1.residual"])
    assert stack.training and all(m.training for m in stack.modules())


def test_grad_flag_keeps_the_graph(stack, ids):
    backend = StackBackend(stack)
    out = backend.run(ids, capture=["layer_2.residual"], grad=True)
    assert out["layer_2.residual"].requires_grad
    out = backend.run(ids, capture=["layer_2.residual"])
    assert not out["layer_2.residual"].requires_grad


def test_extract_returns_records_with_mask_and_metadata(stack):
    backend = StackBackend(stack)
    batch = {
        "input_ids": torch.tensor([[1, 2, 3], [4, 5, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]]),
    }
    records = backend.extract(batch)
    assert [r.layer_name for r in records] == [f"layer_{i}.residual" for i in range(6)]
    assert records[0].meta["kind"] == "token" and records[0].meta["dim"] == 8
    assert torch.equal(records[0].attention_mask, batch["attention_mask"])
    assert backend.hidden_dim("layer_3.residual") == 8
    assert backend.layer_names() == [r.layer_name for r in records]


def test_inputs_are_validated_with_clear_messages(stack):
    backend = StackBackend(stack)
    with pytest.raises(TypeError, match="take token ids, not text"):
        backend.run(["hello world"])
    with pytest.raises(ValueError, match="needs 'input_ids'"):
        backend.run({"ids": torch.ones(1, 2)})
    with pytest.raises(ValueError, match="must be padded"):
        backend.run([[1, 2, 3], [1, 2]])
    with pytest.raises(
        ValueError, match=r"attention_mask shape \(1, 2\) does not match input_ids shape \(1, 3\)"
    ):
        backend.run({"input_ids": torch.tensor([[1, 2, 3]]), "attention_mask": torch.ones(1, 2)})
    with pytest.raises(ValueError, match="integer token ids"):
        backend.run(torch.rand(1, 3))
    with pytest.raises(ValueError, match="no real token"):
        backend.run({"input_ids": torch.tensor([[1, 2]]), "attention_mask": torch.tensor([[0, 0]])})
    with pytest.raises(TypeError, match="archscope.Edit"):
        backend.run(torch.tensor([[1, 2]]), edits=[("layer_0.residual", "scale", 0)])
    assert backend.run([1, 2, 3], capture=["embed"])["embed"].shape == (1, 3, 8)


def test_state_features_need_the_capability(stack, ids):
    backend = StackBackend(stack)
    with pytest.raises(BackendError, match="lacks the capability 'state_patch'"):
        backend.run(ids, return_state=True)
    with pytest.raises(BackendError, match="lacks the capability 'state_patch'"):
        backend.state_patch(ids, ids, ids)


def test_unembed_matches_logits(stack, ids):
    backend = StackBackend(stack)
    result = backend.run(ids, capture=["layer_5.residual", "logits"])
    torch.testing.assert_close(backend.unembed(result["layer_5.residual"]), result.logits)


def test_padding_helpers():
    right = torch.tensor([[1, 1, 0], [1, 1, 1]])
    left = torch.tensor([[0, 1, 1], [1, 1, 1]])
    assert padding_side(right) == "right" and padding_side(left) == "left"
    assert padding_side(torch.ones(2, 3)) == "none"
    assert padding_side(torch.tensor([[1, 0, 1]])) == "mixed"
    assert last_real_index(right).tolist() == [1, 2]
    assert last_real_index(left).tolist() == [2, 2]


def test_run_request_padding_side_uses_the_carried_side_else_the_mask():
    from archscope.runs import RunRequest

    right = torch.tensor([[1, 1, 0], [1, 1, 1]])
    ids = torch.zeros(2, 3, dtype=torch.long)
    assert RunRequest({"input_ids": ids}, [], {}).padding_side == "none"
    request = RunRequest({"input_ids": ids, "attention_mask": right}, [], {})
    assert request.padding_side == "right"
    assert request.fresh(batch={"input_ids": ids}).padding_side == "none"
    # a side `Backend.run` already found is not computed again
    assert (
        RunRequest({"input_ids": ids, "attention_mask": right}, [], {}, padding="left").padding_side
        == "left"
    )


def test_model_without_an_attention_mask_argument_is_called_without_one():
    class Bare(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(5, 4)
            self.blocks = nn.ModuleList([Block(4)])
            self.norm = nn.LayerNorm(4)
            self.head = nn.Linear(4, 5)

        def forward(self, x):  # neither input_ids nor attention_mask by name
            return self.head(self.norm(self.blocks[0](self.emb(x))[0]))

    model = Bare().eval()
    out = StackBackend(model).run(torch.tensor([[1, 2, 3]]), capture=["logits"])
    torch.testing.assert_close(out.logits, model(torch.tensor([[1, 2, 3]])).detach())


def test_padding_the_backend_does_not_handle_is_refused(stack):
    class RightOnly(StackBackend):
        padding = "right"

    backend = RightOnly(stack)
    left = {
        "input_ids": torch.tensor([[0, 1, 2], [3, 4, 5]]),
        "attention_mask": torch.tensor([[0, 1, 1], [1, 1, 1]]),
    }
    with pytest.raises(
        ValueError, match="handles only right padding, but this batch is left-padded"
    ):
        backend.run(left)
    gaps = {"input_ids": torch.tensor([[1, 0, 2]]), "attention_mask": torch.tensor([[1, 0, 1]])}
    with pytest.raises(ValueError, match="not all padded on one side"):
        backend.run(gaps)
    right = {"input_ids": torch.tensor([[1, 2, 0]]), "attention_mask": torch.tensor([[1, 1, 0]])}
    assert backend.run(right).logits.shape == (1, 3, 23)
    assert hook_ids(stack) == set()


def test_edits_of_sites_without_a_hookpoint_are_refused_unless_the_backend_applies_them(stack, ids):
    class WithState(StackBackend):
        def _site_table(self):
            table = super()._site_table()
            table["layer_0.state"] = (
                SiteInfo(Site("state", 0), "state", ("batch", "d_model"), 8, order=1.5),
                None,
            )
            return table

    with pytest.raises(BackendError, match=r"cannot edit \['layer_0.state'\] during a run"):
        WithState(stack).run(ids, edits=[Edit.scale("layer_0.state", 0.0)])
    assert hook_ids(stack) == set()


def test_index_tensors_are_accepted_as_positions_and_units(stack, ids):
    backend = StackBackend(stack)
    by_list = backend.run(
        ids, edits=[Edit.scale("layer_0.residual", 0.0, positions=[1, 2], units=[0, 3])]
    ).logits
    by_tensor = backend.run(
        ids,
        edits=[
            Edit.scale(
                "layer_0.residual", 0.0, positions=torch.tensor([1, 2]), units=torch.tensor([0, 3])
            )
        ],
    ).logits
    assert torch.equal(by_list, by_tensor)


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda: Edit("layer_0.residual", "bogus", 1.0),
            "unknown op 'bogus'; use replace, add, scale or fn",
        ),
        (
            lambda: Edit.add("layer_0.residual", 1.0, positions="first"),
            "positions must be None (all), an int",
        ),
        (lambda: Edit.add("layer_0.residual", 1.0, positions=[1, "x"]), "positions must be None"),
        (lambda: Edit.add("layer_0.residual", "abc"), "is a number or a tensor, got str"),
        (lambda: Edit.apply("layer_0.residual", 3), "needs a function tensor -> tensor, got int"),
        (
            lambda: Edit.scale("layer_0.residual", 0.0, units=[1.5]),
            "units must be a list of feature indices",
        ),
    ],
)
def test_malformed_edits_are_refused_when_made(make, message):
    with pytest.raises((ValueError, TypeError)) as err:
        make()
    assert message in str(err.value)
    assert "'layer_0.residual'" in str(err.value)
