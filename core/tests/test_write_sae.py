"""Write SAEs: planted rank-1 atoms are recovered; the closed-form logit shift equals the
measured one on single linear-recurrence layers; a backend that declares its write site through
`archscope.recurrence` (defined here, outside every archscope package) gets the method with no
change; artifacts round-trip; bad input is refused clearly."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn

import archscope
from archscope import Edit
from archscope.data import Dataset
from archscope.engine import HookBackend, Hookpoint, SiteTable, apply_edit
from archscope.errors import ParameterError, SiteError
from archscope.methods.write_sae import (
    WriteLayout,
    WriteSAE,
    fit_write_sae,
    install,
    substitution_test,
    wilson_interval,
    write_layout,
    write_site,
)
from archscope.recurrence import declare_write_sites, write_sites_of
from archscope.testing import hook_ids


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Small tensors: one intra-op thread is many times faster on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- planted atoms ------------------------------------------------------------------------------
def _planted(
    n_atoms: int = 20, dv: int = 12, dk: int = 6, n: int = 4000, active: int = 2, seed: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    v = torch.nn.functional.normalize(torch.randn(n_atoms, dv, generator=g), dim=1)
    w = torch.nn.functional.normalize(torch.randn(n_atoms, dk, generator=g), dim=1)
    codes = torch.zeros(n, n_atoms)
    pick = torch.rand(n, n_atoms, generator=g).topk(active, dim=1).indices
    codes.scatter_(1, pick, torch.rand(n, active, generator=g) * 2 + 0.5)
    writes = torch.einsum("nf,fa,fb->nab", codes, v, w).reshape(n, dv * dk)
    return writes, v, w


@functools.cache
def _planted_sae(kind: str) -> tuple[WriteSAE, torch.Tensor, torch.Tensor]:
    writes, v, w = _planted()
    layout = WriteLayout("layer_0.state_write", ("batch", "seq", "value", "key"), (12, 6), 0)
    sae = fit_write_sae(
        writes,
        layout,
        write_type=kind,
        n_features=40,
        k=2,
        sparsity=0.03,
        epochs=25,
        batch_size=128,
        learning_rate=3e-3,
    )
    return sae, v, w


@pytest.mark.parametrize("kind", ["topk", "l1"])
def test_planted_rank1_atoms_are_recovered(kind: str) -> None:
    sae, v, w = _planted_sae(kind)
    value, key = sae.value_factors(), sae.key_factors()
    # both factors of the same learned atom match a planted atom, up to sign and scale
    cos_v = (value @ v.T).abs()  # (learned, planted)
    cos_w = (key @ w.T).abs()
    both = torch.minimum(cos_v, cos_w).max(0).values
    assert float((both >= 0.9).float().mean()) >= 0.9, both
    # atoms are exactly rank-1 with unit Frobenius norm
    atoms = sae.atoms()
    torch.testing.assert_close(atoms.flatten(1).norm(dim=1), torch.ones(len(atoms)))
    torch.testing.assert_close(atoms, value[:, :, None] * key[:, None, :], atol=1e-5, rtol=0)
    assert torch.linalg.matrix_rank(atoms[:5]).tolist() == [1] * 5


def test_atom_factors_match_an_svd_and_the_artifact_round_trips(tmp_path: Any) -> None:
    sae, _, _ = _planted_sae("topk")
    s = torch.linalg.svdvals(sae.atoms())
    torch.testing.assert_close(s[:, 0], torch.ones(sae.n_features), atol=1e-5, rtol=0)
    assert bool((s[:, 1] < 1e-4).all())
    path = sae.save(tmp_path / "w")
    loaded = WriteSAE.load(path)
    assert type(loaded) is type(sae) and loaded.layout == sae.layout
    x = _planted(n=20, seed=5)[0]
    torch.testing.assert_close(loaded.encode(x), sae.encode(x))
    torch.testing.assert_close(loaded.reconstruct(x), sae.reconstruct(x))


def test_wilson_interval_matches_the_formula() -> None:
    low, high = wilson_interval(9, 10)
    assert abs(low - 0.5958) < 1e-3 and abs(high - 0.9821) < 1e-3  # textbook values
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_bad_input_is_refused_clearly() -> None:
    layout = WriteLayout("layer_0.state_write", ("batch", "seq", "value", "key"), (4, 3), 0)
    with pytest.raises(ParameterError, match=r"\(tokens, 12\)"):
        fit_write_sae(torch.zeros(5, 7), layout)
    with pytest.raises(ParameterError, match="unknown write-SAE type"):
        fit_write_sae(torch.randn(50, 12), layout, write_type="dense")
    with pytest.raises(ParameterError, match="every write in the sample is zero"):
        fit_write_sae(torch.zeros(50, 12), layout)
    with pytest.raises(ParameterError, match="head=3"):
        WriteLayout.of("s", ("batch", "seq", "heads", "v", "k"), torch.zeros(1, 2, 2, 4, 3), 3)
    with pytest.raises(SiteError, match="value, key"):
        WriteLayout.of("s", ("batch", "seq", "d"), torch.zeros(1, 2, 4), 0)


# -- a third-party backend that declares a write site through the public contract ---------------
class LinearRecurrence(nn.Module):
    """Per head: S_t = a_t S_{t-1} + v_t k_tᵀ, y_t = S_t q_t (a gated linear attention)."""

    def __init__(self, d_model: int, heads: int, dv: int, dk: int) -> None:
        super().__init__()
        self.heads, self.dv, self.dk = heads, dv, dk
        self.v = nn.Linear(d_model, heads * dv)
        self.k = nn.Linear(d_model, heads * dk)
        self.q = nn.Linear(d_model, heads * dk)
        self.a = nn.Linear(d_model, heads)
        self.out = nn.Linear(heads * dv, d_model)
        self.on_write: Any = None  # set by the backend while it runs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        v = self.v(x).view(b, t, self.heads, self.dv)
        k = torch.nn.functional.normalize(self.k(x).view(b, t, self.heads, self.dk), dim=-1)
        q = self.q(x).view(b, t, self.heads, self.dk)
        decay = torch.sigmoid(self.a(x) + 2.0)
        write = v[..., :, None] * k[..., None, :]
        if self.on_write is not None:
            write = self.on_write(write, decay)
        state = torch.zeros_like(write[:, 0])
        ys = []
        for i in range(t):
            state = decay[:, i, :, None, None] * state + write[:, i]
            ys.append((state @ q[:, i, :, :, None])[..., 0])
        return self.out(torch.stack(ys, 1).reshape(b, t, -1))  # type: ignore[no-any-return]


class Block(nn.Module):
    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.mixer = LinearRecurrence(d_model, heads=2, dv=6, dk=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mixer(x)  # type: ignore[no-any-return]


class LinearLM(nn.Module):
    """Embedding, blocks, a linear head (no final norm: a read-out linear in the state)."""

    def __init__(self, vocab: int = 24, d_model: int = 16, n_layers: int = 1) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, d_model)
        self.blocks = nn.ModuleList(Block(d_model) for _ in range(n_layers))
        self.head = nn.Linear(d_model, vocab)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x)
        return self.head(x)  # type: ignore[no-any-return]


class LinearLMBackend(HookBackend):
    """Declares ``layer_i.state_write`` and ``layer_i.write_decay`` with
    `declare_write_sites` and computes / edits them itself while the mixers run."""

    name = "linear-lm-test"
    description = "a gated linear-attention LM declared only through archscope.recurrence"
    capabilities = frozenset({"residual", "logits", "edit"})
    padding = "right"
    edits_unhooked = True

    def site_table(self) -> SiteTable:
        m = self.model
        d = m.embed.embedding_dim
        table = SiteTable()
        table.add("embed", Hookpoint(m.embed), dim=d)
        for i, block in enumerate(m.blocks):
            mixer = block.mixer
            shapes = {
                "state_write": (("batch", "seq", "heads", "d_value", "d_key"), mixer.dk),
                "write_decay": (("batch", "seq", "heads"), mixer.heads),
            }
            declare_write_sites(table, i, shapes, mixer.heads)
            table.add(f"layer_{i}.residual", Hookpoint(block), dim=d)
        table.add("logits", Hookpoint(m.head), dim=m.head.out_features)
        return table

    def read_unhooked(self, ctx: Any, output: Any, names: list[str]) -> dict[str, Any]:
        return {n: ctx.store[n] for n in names if n in ctx.store}

    def run_settings(self, ctx: Any) -> contextlib.AbstractContextManager[Any]:
        return self._writes(ctx)

    @contextlib.contextmanager
    def _writes(self, ctx: Any) -> Iterator[None]:
        wanted = write_sites_of([*ctx.capture, *ctx.edits])
        mixers = []
        for layer in wanted:
            mixer = self.model.blocks[layer].mixer
            site, decay_site = f"layer_{layer}.state_write", f"layer_{layer}.write_decay"
            info = self.table.info(site)

            def on_write(
                write: Any,
                decay: Any,
                site: str = site,
                decay_site: str = decay_site,
                info: Any = info,
            ) -> Any:
                for edit in ctx.edits.get(site, []):
                    write = apply_edit(write, edit, info, ctx.attention_mask)
                for name, value in ((site, write), (decay_site, decay)):
                    if name in ctx.capture:
                        ctx.store[name] = value if ctx.grad else value.detach()
                return write

            mixer.on_write = on_write
            mixers.append(mixer)
        try:
            yield
        finally:
            for mixer in mixers:
                mixer.on_write = None


def _rows(vocab: int, n: int, length: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (n, length), generator=g).tolist()


def test_third_party_write_site_gets_the_method_unchanged() -> None:
    backend = LinearLMBackend(LinearLM())
    ids = torch.tensor(_rows(24, 2, 6))
    clean = backend.run(ids, capture=["logits", "layer_0.state_write"])
    same = backend.run(ids, capture=["logits"], edits=[Edit.scale("layer_0.state_write", 1.0)])
    assert torch.equal(same.logits, clean.logits)  # the toy's edit path is the identity here
    assert clean["layer_0.state_write"].shape == (2, 6, 2, 6, 4)
    data = Dataset(token_ids=_rows(24, 20, 10))
    method = archscope.plugins.get_manager().methods.get("write-sae").obj
    report = method(backend, data, **{**method.quick_params(), "head": 1})
    assert report.site == "layer_0.state_write" and report.write_shape == (6, 4)
    assert report.substitution is not None and report.substitution.n_firings > 0
    # one layer, a linear read-out: the closed form is exact here
    assert report.substitution.closed_form_r2 is not None
    assert report.substitution.closed_form_r2 >= 0.999
    assert report.installed is not None
    assert "Write SAE on layer_0.state_write head 1" in report.to_markdown()
    report.to_json()
    assert hook_ids(backend.model) == set() and backend.model.blocks[0].mixer.on_write is None


def test_substitution_and_install_on_the_third_party_backend() -> None:
    backend = LinearLMBackend(LinearLM(n_layers=2))
    data = _rows(24, 40, 12, seed=3)
    site = write_site(backend, 1)
    layout = write_layout(backend, site, 0, data[0])
    from archscope.methods.write_sae import collect_writes

    writes = collect_writes(backend, data[:30], layout)
    sae = fit_write_sae(writes, layout, n_features=16, k=2, epochs=6, batch_size=64)
    result = substitution_test(sae, backend, data[30:], per_text=4, batch_size=8)
    assert result.n_firings == 40
    assert len(result.kl["atom"]) == 40 and min(result.kl["deleted"]) >= 0
    low, high = result.win_ci
    assert low <= result.win_rate <= high
    # a substitution by the write itself changes nothing: deleting does
    assert result.closed_form_r2 is not None and result.closed_form_r2 > 0.5
    installed = install(sae, backend, data[30:34], atom=result.atom_of[0], max_new_tokens=3)
    assert installed.rank_after <= installed.rank_before
    with pytest.raises(SiteError, match="layers with one"):
        write_site(backend, 5)


def test_a_backend_without_write_sites_is_told_clearly() -> None:
    from archscope.testing.methods import ToyMethodBackend, toy_model

    backend = ToyMethodBackend(toy_model())
    method = archscope.plugins.get_manager().methods.get("write-sae").obj
    data = Dataset(token_ids=_rows(20, 4, 6))
    # a sweep over every method runs through: a report and a warning that say why
    with pytest.warns(UserWarning, match="declares no state-write sites"):
        report = method(backend, data)
    assert report.eval is None and "declares no state-write sites" in report.to_markdown()
    report.to_json()
    # asking for a layer, or the functions themselves, is an error
    with pytest.raises(SiteError, match="declares no state-write sites"):
        method(backend, data, layer=0)
    with pytest.raises(SiteError, match="declares no state-write sites"):
        write_site(backend)


# -- Mamba: the closed form on a single layer, everything after it frozen ------------------------
@pytest.mark.parametrize("family", ["mamba", "mamba2"])
def test_closed_form_on_one_mamba_layer(family: str) -> None:
    pytest.importorskip("archscope_mamba")
    import transformers

    from archscope_mamba.backend import MambaBackend
    from archscope_mamba.testing import _HF_SPECS

    config_name, model_name, kwargs = _HF_SPECS[family]
    config = getattr(transformers, config_name)(
        vocab_size=40, hidden_size=32, **{**kwargs, "num_hidden_layers": 1}
    )
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(config).eval()
    backend = archscope.Backend.for_model(model)
    assert isinstance(backend, MambaBackend)
    rows = _rows(40, 30, 10, seed=2)
    layout = write_layout(backend, write_site(backend, 0), 0, rows[0])
    from archscope.methods.write_sae import collect_writes

    sae = fit_write_sae(collect_writes(backend, rows[:24], layout), layout, n_features=24, epochs=3)
    # freeze the final norm at the clean run: its scale per position is fixed
    norm = model.backbone.norm_f
    probe: dict[str, Any] = {}
    results = []
    seen: dict[str, torch.Tensor] = {}
    for row in rows[24:]:
        keep = norm.register_forward_pre_hook(lambda _m, args: seen.update(h=args[0]))
        try:
            with torch.no_grad():
                model(torch.tensor([row]))
        finally:
            keep.remove()
        h = seen["h"]
        scale = torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
        probe["scale"] = scale

        def frozen(_m: Any, args: Any, _out: Any) -> Any:
            return norm.weight * (args[0].float() * probe["scale"]).to(args[0].dtype)

        handle = norm.register_forward_hook(frozen)
        try:
            results.append(substitution_test(sae, backend, [row], per_text=6, batch_size=8))
        finally:
            handle.remove()
    pred = torch.tensor([p for r in results for p in r.predicted], dtype=torch.float64)
    meas = torch.tensor([m for r in results for m in r.measured], dtype=torch.float64)
    r2 = 1 - (meas - pred).pow(2).sum() / (meas - meas.mean()).pow(2).sum()
    if family == "mamba":  # read-out linear in the state given the gates: exact
        assert float(r2) >= 0.999, float(r2)
    else:  # Mamba-2's gated RMSNorm after the read-out is not linear: first order (0.9999)
        assert float(r2) >= 0.99, float(r2)
