"""The ModelSpec adapter on a custom hybrid written here: attention in parallel with a
bilinear, GRU-cell-gated mixer in each block; blocks return (hidden, recurrent state)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import archscope
from archscope import Backend, Edit, SiteError
from archscope.backends import BackendError
from archscope.testing import BackendContract
from archscope_recurrent import AdapterBackend, ModelSpec, SpecError, describe


class BilinearGRUMixer(nn.Module):
    """y_t = (A x_t) * (B s_t), with s_t a GRU-cell state over the sequence; returns (y, s_T)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.a = nn.Linear(d, d)
        self.b = nn.Linear(d, d)
        self.cell = nn.GRUCell(d, d)

    def forward(self, x):
        s = x.new_zeros(x.shape[0], x.shape[2])
        states = []
        for t in range(x.shape[1]):
            s = self.cell(x[:, t], s)
            states.append(s)
        return self.a(x) * self.b(torch.stack(states, 1)), s


class HybridBlock(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.mixer = BilinearGRUMixer(d)

    def forward(self, x):
        h = self.norm(x)
        causal = torch.triu(torch.ones(x.shape[1], x.shape[1], dtype=torch.bool), 1)
        a, _ = self.attn(h, h, h, attn_mask=causal, need_weights=False)
        m, state = self.mixer(h)
        return x + a + m, state


class HybridLM(nn.Module):
    def __init__(self, vocab: int = 50, d: int = 16, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(HybridBlock(d) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, input_ids):
        x = self.embed(input_ids)
        states = []
        for block in self.layers:
            x, state = block(x)
            states.append(state)
        return self.head(self.norm(x)), states


SPEC = ModelSpec(
    blocks="layers",
    block_output=0,
    embed="embed",
    final_norm="norm",
    unembed="head",
    submodules={"attn": ("attn", 0), "mixer": ("mixer", 0)},
    states={"state": 1, "mixer_state": lambda output, layer: output[1][layer]},
)


def hybrid(seed: int = 0) -> HybridLM:
    torch.manual_seed(seed)
    return HybridLM().eval()


def ids(batch: int = 2, seq: int = 5):
    return torch.randint(0, 50, (batch, seq), generator=torch.Generator().manual_seed(2))


def test_declared_sites_equal_an_independent_hook_capture():
    model = hybrid()
    tokens = ids()
    seen = {}
    handles = [model.embed.register_forward_hook(lambda m, a, o: seen.__setitem__("embed", o))]
    for i, block in enumerate(model.layers):
        handles.append(
            block.register_forward_hook(
                lambda m, a, o, i=i: seen.update(
                    {f"layer_{i}.residual": o[0], f"layer_{i}.state": o[1]}
                )
            )
        )
        handles.append(
            block.attn.register_forward_hook(
                lambda m, a, o, i=i: seen.__setitem__(f"layer_{i}.attn", o[0])
            )
        )
        handles.append(
            block.mixer.register_forward_hook(
                lambda m, a, o, i=i: seen.__setitem__(f"layer_{i}.mixer", o[0])
            )
        )
    with torch.no_grad():
        logits, states = model(tokens)
    for h in handles:
        h.remove()

    backend = describe(model, SPEC)
    names = [n for n in backend.sites() if n != "layer_1.mixer_state"]
    result = backend.run(tokens, capture=[*names, "layer_1.mixer_state"])
    for name, value in seen.items():
        torch.testing.assert_close(result[name], value, atol=0, rtol=0, msg=name)
    torch.testing.assert_close(result["layer_1.mixer_state"], states[1], atol=0, rtol=0)
    torch.testing.assert_close(result.logits, logits, atol=0, rtol=0)
    torch.testing.assert_close(backend.unembed(result["layer_1.residual"]), logits)
    assert backend.capabilities >= {
        "residual",
        "components",
        "unembed",
        "logits",
        "recurrent_state",
        "edit",
    }
    assert backend.sites()["layer_0.state"].kind == "state"
    assert backend.layer_names() == ["layer_0.residual", "layer_1.residual"]


def test_edits_reach_the_output_and_identity_edits_do_not():
    model = hybrid()
    backend = describe(model, SPEC)
    tokens = ids()
    plain = backend.run(tokens, capture=["logits"])
    same = backend.run(tokens, capture=["logits"], edits=[Edit.scale("layer_0.mixer", 1.0)])
    assert torch.equal(plain.logits, same.logits)
    ablated = backend.run(
        tokens,
        capture=["logits", "layer_0.mixer"],
        edits=[Edit.scale("layer_0.mixer", 0.0, positions=[2])],
    )
    assert torch.equal(ablated["layer_0.mixer"][:, 2], torch.zeros(2, 16))
    assert torch.equal(ablated.logits[:, :2], plain.logits[:, :2])  # causal: earlier unchanged
    assert not torch.allclose(ablated.logits[:, 2:], plain.logits[:, 2:])
    with pytest.raises(SiteError, match="read-only"):
        backend.run(tokens, edits=[Edit.add("layer_0.state", 1.0)])
    early = backend.run(tokens, capture=["layer_0.attn"])
    assert early.logits is None


def test_detection_through_an_attached_spec_and_the_kazdov_alias():
    model = hybrid()
    with pytest.raises(archscope.NoBackendError):
        Backend.for_model(model)
    model.archscope_spec = SPEC
    backend = Backend.for_model(model)
    assert isinstance(backend, AdapterBackend) and backend.name == "custom"
    assert isinstance(Backend.for_model(model, hint="kazdov"), AdapterBackend)
    bare = hybrid()
    with pytest.raises(SpecError, match="needs a ModelSpec.*archscope_spec"):
        Backend.for_model(bare, hint="kazdov")
    as_dict = describe(hybrid(), {"blocks": "layers", "block_output": 0})
    assert "layer_1.residual" in as_dict.sites() and "unembed" not in as_dict.capabilities
    with pytest.raises(BackendError, match="no 'unembed' capability"):
        as_dict.unembed(torch.zeros(1, 16))


def test_wrong_paths_name_what_exists():
    with pytest.raises(
        SpecError,
        match=r"ModelSpec.blocks = 'layerz'.*no attribute 'layerz'.*"
        r"embed, layers, norm, head",
    ):
        describe(hybrid(), ModelSpec(blocks="layerz"))
    with pytest.raises(
        SpecError,
        match=r"submodules\['mixer'\] in block 0.*'mixr'.*"
        r"norm, attn, mixer",
    ):
        describe(hybrid(), ModelSpec(blocks="layers", block_output=0, submodules={"mixer": "mixr"}))
    with pytest.raises(SpecError, match="ModelSpec.final_norm = 'ln_f'"):
        describe(hybrid(), ModelSpec(blocks="layers", block_output=0, final_norm="ln_f"))
    with pytest.raises(SpecError, match="is a Linear, not a list of blocks"):
        describe(hybrid(), ModelSpec(blocks="head"))
    with pytest.raises(SpecError, match="roles are lower-case identifiers"):
        describe(
            hybrid(), ModelSpec(blocks="layers", block_output=0, submodules={"Mixer": "mixer"})
        )


def test_wrong_output_arity_names_what_the_block_returned():
    with pytest.raises(
        SpecError,
        match=r"block 0 \(layers.0, HybridBlock\).*declared to return "
        r"a tensor but returned a tuple of 2 \(a tensor of shape "
        r"\(1, 2, 16\), a tensor of shape \(1, 16\)\)",
    ):
        describe(hybrid(), ModelSpec(blocks="layers"))
    with pytest.raises(SpecError, match="tensor at index 3 but returned a tuple of 2"):
        describe(hybrid(), ModelSpec(blocks="layers", block_output=3))
    with pytest.raises(
        SpecError,
        match=r"submodules\['attn'\].*MultiheadAttention.*returned a "
        r"tuple of 2",
    ):
        describe(hybrid(), ModelSpec(blocks="layers", block_output=0, submodules={"attn": "attn"}))
    with pytest.raises(
        SpecError, match=r"states\['s'\]\(output, 0\) returned a list of 2.*not a tensor"
    ):
        describe(
            hybrid(),
            ModelSpec(
                blocks="layers", block_output=0, states={"s": lambda output, layer: output[1]}
            ),
        )


def test_padding_follows_the_declaration():
    backend = describe(hybrid(), SPEC)
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    with pytest.raises(BackendError, match="declared with padding='right'.*left-padded"):
        backend.run({"input_ids": ids(), "attention_mask": mask}, capture=["layer_0.residual"])
    right = backend.run(
        {"input_ids": ids(), "attention_mask": mask.flip(-1)}, capture=["layer_0.residual"]
    )
    assert right["layer_0.residual"].shape == (2, 5, 16)


def test_model_unchanged_after_a_run_that_raises():
    model = hybrid()
    backend = describe(model, SPEC)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SiteError, match="does not fit"):
        backend.run(ids(), edits=[Edit.replace("layer_1.attn", torch.zeros(2, 2))])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


class TestAdapterBackend(BackendContract):
    """The conformance kit on the hybrid, described without its state (which, like the
    model, runs on over pad tokens)."""

    backend_name = "custom"
    distribution = "archscope-recurrent"

    def make_models(self):
        model = hybrid()
        model.archscope_spec = ModelSpec(
            blocks="layers",
            block_output=0,
            embed="embed",
            final_norm="norm",
            unembed="head",
            submodules={"attn": ("attn", 0), "mixer": ("mixer", 0)},
        )
        return {"hybrid": model}

    def make_foreign_models(self):
        return {"undescribed-hybrid": hybrid()}

    def reference_activations(self, model, batch):
        # recomputed from the sub-modules, outside the model's forward
        x = model.embed(batch["input_ids"])
        ref = {"embed": x}
        for i, block in enumerate(model.layers):
            h = block.norm(x)
            causal = torch.triu(torch.ones(x.shape[1], x.shape[1], dtype=torch.bool), 1)
            a = block.attn(h, h, h, attn_mask=causal, need_weights=False)[0]
            m = block.mixer(h)[0]
            x = x + a + m
            ref.update({f"layer_{i}.attn": a, f"layer_{i}.mixer": m, f"layer_{i}.residual": x})
        ref["final_norm"] = model.norm(x)
        ref["logits"] = model.head(ref["final_norm"])
        return ref
