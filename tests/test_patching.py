"""Activation patching, sweeps, attribution patching, DIM and state patching on a transformer,
a Mamba, a hybrid and an LSTM, each checked against an independent computation: single
unpadded runs patched one cell at a time, Hugging Face hidden states with autograd, plain runs
of the clean input, and a tiny transformer trained on repeated random sequences."""

from __future__ import annotations

import math
import warnings
from typing import Any

import pytest
import torch
from archs import Arch, arch

import archscope
from archscope import Edit
from archscope.data import Contrast, pad_batch, padding_for
from archscope.errors import ArchscopeError, CapabilityError, InputError, SiteError
from archscope.methods.attribute import (
    activation_patch,
    attribution_patch,
    dim_decompose,
    patch_sweep,
    state_patch_sweep,
)
from archscope.testing import hook_ids

TOL = 1e-5


def _rows(lengths: list[int], seed: int = 0) -> tuple[list[list[int]], list[list[int]]]:
    """Clean rows and corrupted copies (second and last real tokens changed)."""
    g = torch.Generator().manual_seed(seed)
    clean = [torch.randint(4, 100, (n,), generator=g).tolist() for n in lengths]
    corrupted = []
    for row in clean:
        new = list(row)
        new[1] = 4 + (row[1] + 17) % 96
        new[-1] = 4 + (row[-1] + 41) % 96
        corrupted.append(new)
    return clean, corrupted


def _batches(
    a: Arch, lengths: list[int], side: str | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list, list]:
    clean, corrupted = _rows(lengths)
    side = side or padding_for(a.backend)
    return pad_batch(clean, side), pad_batch(corrupted, side), clean, corrupted


def _logprob7(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return logits[:, -1].log_softmax(-1)[:, 7] - logits[:, -1].log_softmax(-1)[:, 11]


class Reference:
    """The logit-difference metric computed one unpadded row at a time: each row's clean and
    corrupted runs once, then any set of cells patched with `Edit.replace`."""

    def __init__(
        self, backend: Any, clean: list[list[int]], corrupted: list[list[int]], sites: list[str]
    ) -> None:
        self.backend, self.corrupted = backend, corrupted
        self.clean_runs = [
            backend.run(torch.tensor([r]), capture=[*sites, "logits"]) for r in clean
        ]
        corr_logits = [
            backend.run(torch.tensor([r]), capture=["logits"])["logits"][0, -1] for r in corrupted
        ]
        self.tops = [
            (int(c["logits"][0, -1].argmax()), int(r.argmax()))
            for c, r in zip(self.clean_runs, corr_logits, strict=True)
        ]
        self.clean = self._mean([c["logits"][0, -1] for c in self.clean_runs])
        self.corr_rows = [self._diff(n, x) for n, x in enumerate(corr_logits)]
        self.corr = sum(self.corr_rows) / len(self.corr_rows)

    def _diff(self, n: int, last: torch.Tensor) -> float:
        a, b = self.tops[n]
        return float(last[a] - last[b])

    def _mean(self, lasts: list[torch.Tensor]) -> float:
        return sum(self._diff(n, x) for n, x in enumerate(lasts)) / len(lasts)

    def patched(self, patches: dict[int, list[tuple[str, list[int]]]]) -> float:
        """Mean metric with row n patched at ``patches[n]`` = [(site, positions)]."""
        values = []
        for n, row in enumerate(self.corrupted):
            cells = patches.get(n)
            if not cells:
                values.append(self.corr_rows[n])
                continue
            edits = [
                Edit.replace(s, self.clean_runs[n][s][0, p], positions=[p])
                for s, ps in cells
                for p in ps
            ]
            run = self.backend.run(torch.tensor([row]), capture=["logits"], edits=edits)
            values.append(self._diff(n, run["logits"][0, -1]))
        return sum(values) / len(values)

    def fraction(self, patches: dict[int, list[tuple[str, list[int]]]]) -> float:
        return (self.patched(patches) - self.corr) / (self.clean - self.corr)

    def assert_fraction(
        self, got: float | None, patches: dict[int, list[tuple[str, list[int]]]], what: Any = ""
    ) -> None:
        """Compared in metric units (1e-5), not as a fraction of a possibly small gap."""
        assert got is not None
        gap = self.clean - self.corr
        assert abs((got - self.fraction(patches)) * gap) <= TOL, what


# -- activation_patch ------------------------------------------------------------------------
def test_identity_patch_changes_nothing(any_arch: Arch) -> None:
    """Position 0 holds the same token in both inputs, so its clean activations equal the
    corrupted ones at every layer of a causal model: patching them restores nothing."""
    clean, corrupted, *_ = _batches(any_arch, [6, 4, 5])
    backend = any_arch.backend
    result = activation_patch(
        backend, clean, corrupted, list(range(backend.n_layers)), None, positions=[0]
    )
    assert abs(result.gap_restored) < 1e-6
    assert abs(result.patched_metric - result.baseline_metric) < 1e-6
    assert result.clean_metric != pytest.approx(result.baseline_metric)


def test_patching_the_last_layer_everywhere_restores_exactly_one(any_arch: Arch) -> None:
    clean, corrupted, c_rows, r_rows = _batches(any_arch, [6, 4, 5])
    backend = any_arch.backend
    result = activation_patch(backend, clean, corrupted, [backend.n_layers - 1], None)
    assert result.gap_restored == 1.0
    assert result.patched_metric == result.clean_metric
    # the three metric values agree with plain unpadded runs (clean = source run)
    ref = Reference(backend, c_rows, r_rows, [])
    assert result.clean_metric == pytest.approx(ref.clean, abs=TOL)
    assert result.baseline_metric == pytest.approx(ref.corr, abs=TOL)


def test_legacy_one_argument_metric_gets_outputs_with_logits() -> None:
    a = arch("gpt2")
    clean, corrupted, *_ = _batches(a, [5, 5])
    new = activation_patch(
        a.backend, clean, corrupted, [1], lambda logits, mask: logits[:, -1, 7] - logits[:, -1, 9]
    )
    old = activation_patch(
        a.backend,
        clean,
        corrupted,
        [1],
        lambda out: (out.logits[:, -1, 7] - out.logits[:, -1, 9]).mean(),
    )
    assert old.gap_restored == pytest.approx(new.gap_restored, abs=1e-9)
    assert old.clean_metric == pytest.approx(new.clean_metric, abs=1e-9)


def test_zero_gap_gives_nan_with_a_warning() -> None:
    a = arch("gpt2")
    clean, _, *_ = _batches(a, [5, 4])
    with pytest.warns(UserWarning, match="no gap to restore"):
        result = activation_patch(a.backend, clean, clean, [0], None)
    assert math.isnan(result.gap_restored)


def test_inputs_that_cannot_align_raise_typed_errors() -> None:
    a = arch("gpt2")
    clean, corrupted, *_ = _batches(a, [6, 4, 5])
    with pytest.raises(InputError, match="3 clean and 2 corrupted"):
        activation_patch(a.backend, clean, {k: v[:2] for k, v in corrupted.items()}, [0], None)
    shorter = pad_batch(_rows([6, 3, 5])[1], "right")
    with pytest.raises(InputError, match="row 1 has 4 real tokens in the clean input but 3"):
        activation_patch(a.backend, clean, shorter, [0], None)
    with pytest.raises(InputError, match="position 5 .* row 1, which has 4 real tokens"):
        activation_patch(a.backend, clean, corrupted, [0], None, positions=[5])
    with pytest.raises(SiteError, match="out of range"):
        activation_patch(a.backend, clean, corrupted, [7], None)
    with pytest.raises(SiteError, match="read-only"):
        activation_patch(a.backend, clean, corrupted, [0], None, site="attn_pattern")
    m = arch("mamba")
    clean_m, corrupted_m, *_ = _batches(m, [5, 5])
    with pytest.raises(SiteError, match="read-only"):
        activation_patch(m.backend, clean_m, corrupted_m, [0], None, site="ssm_state")
    r = arch("lstm")
    clean_r, corrupted_r, *_ = _batches(r, [5, 5])
    with pytest.raises(SiteError, match="state site"):
        activation_patch(r.backend, clean_r, corrupted_r, [0], None, site="hidden_state")


# -- sweeps ----------------------------------------------------------------------------------
def test_position_sweep_equals_single_patched_runs(any_arch: Arch) -> None:
    """Every cell of the batched sweep (ragged, padded rows; positions in real tokens) equals
    the reference: each unpadded row run alone with that one cell replaced."""
    backend = any_arch.backend
    clean, corrupted, c_rows, r_rows = _batches(any_arch, [4, 3])
    sweep = patch_sweep(backend, clean, corrupted, embed=True, batch_size=5)
    role = backend.primary_role
    sites = ["embed", *(f"layer_{i}.{role}" for i in range(backend.n_layers))]
    assert sweep.columns == list(range(4))
    assert sweep.rows == ["embed", *(f"layer_{i}" for i in range(backend.n_layers))]
    assert sweep.gap_restored is not None
    ref = Reference(backend, c_rows, r_rows, sites)
    for i, site in enumerate(sites):
        for p in range(4):
            patches = {n: [(site, [p])] for n, r in enumerate(r_rows) if p < len(r)}
            ref.assert_fraction(sweep.gap_restored[i][p], patches, (site, p))


def _inner_calls(backend: Any, sweep: Any) -> tuple[Any, int]:
    """(result, calls of block 0's first parametrised submodule): a replayed block runs none
    of its submodules."""
    block = backend.hookpoint(backend.layer_names()[0]).module
    inner = next(
        m
        for m in block.modules()
        if m is not block and any(True for _ in m.parameters(recurse=False))
    )
    calls = []
    handle = inner.register_forward_hook(lambda *args: calls.append(1))
    try:
        return sweep(), len(calls)
    finally:
        handle.remove()


@pytest.mark.parametrize("name", ["gpt2", "mamba", "hybrid"])
def test_sweeps_replay_the_blocks_before_the_patched_layer(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Patched runs replay the corrupted run's block outputs before the patched cell instead of
    computing them: fewer block passes, the same grid as running every block."""
    from archscope.methods.attribute import _engine

    backend = arch(name).backend
    clean, corrupted, *_ = _batches(arch(name), [5, 4])

    def sweep() -> Any:
        return patch_sweep(backend, clean, corrupted, embed=True, batch_size=4).gap_restored

    fast, fast_calls = _inner_calls(backend, sweep)
    monkeypatch.setattr(_engine.BlockReplay, "of", classmethod(lambda cls, b: None))
    slow, slow_calls = _inner_calls(backend, sweep)
    torch.testing.assert_close(
        torch.tensor(fast, dtype=torch.float64),
        torch.tensor(slow, dtype=torch.float64),
        atol=1e-5,
        rtol=1e-5,
    )
    # block 0 runs in the runs patched at the embedding and at its own output only when
    # nothing is replayed; with replay, only in the embedding row's runs and the check
    assert fast_calls < slow_calls, (fast_calls, slow_calls)


def test_a_single_patched_run_costs_three_forwards() -> None:
    """Clean, corrupted, patched: the replay check (one more forward) is paid only by sweeps
    that run more than one patched forward."""
    a = arch("gpt2")
    clean, corrupted, *_ = _batches(a, [5, 4])
    calls = []
    handle = a.model.get_input_embeddings().register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        activation_patch(a.backend, clean, corrupted, [1], None)
    finally:
        handle.remove()
    assert len(calls) == 3


def test_blocks_that_talk_past_their_outputs_are_not_replayed() -> None:
    """A model whose last block reads something the first block leaves aside (as a shared
    key/value cache would) fails the replay check: the sweep runs every block and still
    equals single patched runs; the blocks' own forward attributes are restored."""
    a = arch("gpt2")
    blocks = a.model.transformer.h
    side: dict[str, torch.Tensor] = {}
    first_forward, last_forward = blocks[0].forward, blocks[-1].forward

    def first(*args: Any, **kwargs: Any) -> Any:
        out = first_forward(*args, **kwargs)
        side["x"] = out
        return out

    def last(*args: Any, **kwargs: Any) -> Any:
        out = last_forward(*args, **kwargs)
        return out + 0.5 * side.pop("x", torch.zeros_like(out))

    blocks[0].forward, blocks[-1].forward = first, last
    try:
        clean, corrupted, c_rows, r_rows = _batches(a, [4, 3])
        sweep = patch_sweep(a.backend, clean, corrupted, embed=True, batch_size=4)
        assert blocks[0].forward is first and blocks[-1].forward is last
        assert sweep.gap_restored is not None
        ref = Reference(a.backend, c_rows, r_rows, ["layer_0.residual", "layer_2.residual"])
        for i, site in [(1, "layer_0.residual"), (3, "layer_2.residual")]:
            for p in range(3):
                patches = {n: [(site, [p])] for n, r in enumerate(r_rows) if p < len(r)}
                ref.assert_fraction(sweep.gap_restored[i][p], patches, (site, p))
    finally:
        del blocks[0].forward, blocks[-1].forward


@pytest.mark.parametrize("name", ["gpt2", "hybrid"])
def test_component_sweep_equals_single_patched_runs(name: str) -> None:
    a = arch(name)
    backend = a.backend
    clean, corrupted, c_rows, r_rows = _batches(a, [4, 3])
    sweep = patch_sweep(backend, clean, corrupted, axis="component", batch_size=4)
    assert sweep.gap_restored is not None
    sites = backend.sites()
    expected_cols = [
        r
        for r in ("attn", "mixer", "mlp")
        if any(f"layer_{i}.{r}" in sites for i in range(backend.n_layers))
    ]
    assert sweep.columns == expected_cols
    ref = Reference(
        backend, c_rows, r_rows, [s for row in sweep.sites for s in row if s is not None]
    )
    for i in range(backend.n_layers):
        for c, role in enumerate(sweep.columns):
            site = f"layer_{i}.{role}"
            if site not in sites:
                assert sweep.gap_restored[i][c] is None
                continue
            patches = {n: [(site, list(range(len(r))))] for n, r in enumerate(r_rows)}
            ref.assert_fraction(sweep.gap_restored[i][c], patches, (i, role))


def test_positions_are_counted_in_real_tokens_whatever_the_padding() -> None:
    a = arch("gpt2")
    backend = a.backend
    right = _batches(a, [5, 3], "right")
    left = _batches(a, [5, 3], "left")
    sweeps = [patch_sweep(backend, b[0], b[1], positions=[-1, 2]) for b in (right, left)]
    _, _, c_rows, r_rows = right
    ref = Reference(
        backend, c_rows, r_rows, [f"layer_{i}.residual" for i in range(backend.n_layers)]
    )
    for i in range(backend.n_layers):
        for c, p in enumerate([-1, 2]):
            patches = {n: [(f"layer_{i}.residual", [p % len(r)])] for n, r in enumerate(r_rows)}
            for sweep in sweeps:
                assert sweep.gap_restored is not None
                ref.assert_fraction(sweep.gap_restored[i][c], patches, (i, p))
    last = patch_sweep(backend, left[0], left[1], positions="last")
    assert last.columns == ["last"]
    assert last.gap_restored is not None and sweeps[1].gap_restored is not None
    assert [r[0] for r in last.gap_restored] == pytest.approx(
        [r[0] for r in sweeps[1].gap_restored], abs=TOL
    )


def test_sweeps_leave_no_hooks_gradients_or_weight_changes() -> None:
    a = arch("gpt2")
    before = {k: v.clone() for k, v in a.model.state_dict().items()}
    hooks = hook_ids(a.model)
    clean, corrupted, *_ = _batches(a, [5, 4])
    patch_sweep(a.backend, clean, corrupted, attribution=True)
    assert hook_ids(a.model) == hooks
    assert not a.model.training
    assert all(p.grad is None for p in a.model.parameters())
    assert all(torch.equal(before[k], v) for k, v in a.model.state_dict().items())


# -- attribution patching --------------------------------------------------------------------
def test_attribution_equals_a_hand_computed_gradient_on_gpt2() -> None:
    """AtP of residual cell (layer i, position p) = grad of the metric w.r.t. the block's
    output · (clean − corrupted), from Hugging Face hidden states and autograd."""
    a = arch("gpt2")
    clean, corrupted, *_ = _batches(a, [5, 5])
    sweep = attribution_patch(a.backend, clean, corrupted)
    assert sweep.attribution is not None and sweep.gap_restored is None
    model = a.model
    with torch.no_grad():
        c_out = model(**clean, output_hidden_states=True)
    out = model(**corrupted, output_hidden_states=True)
    hidden = out.hidden_states
    a_tok = c_out.logits[:, -1].argmax(-1)
    b_tok = out.logits[:, -1].detach().argmax(-1)
    last = out.logits[:, -1]
    metric = (last.gather(1, a_tok[:, None]) - last.gather(1, b_tok[:, None])).mean()
    layers = range(a.backend.n_layers - 1)  # the last entry of hidden_states is after ln_f
    grads = torch.autograd.grad(metric, [hidden[i + 1] for i in layers])
    with torch.no_grad():
        c_metric = (
            c_out.logits[:, -1].gather(1, a_tok[:, None])
            - c_out.logits[:, -1].gather(1, b_tok[:, None])
        ).mean()
    gap = float(c_metric - metric.detach())
    for i, g in zip(layers, grads, strict=True):
        diff = c_out.hidden_states[i + 1] - hidden[i + 1].detach()
        per_pos = (g * diff).sum(-1).sum(0) / gap
        assert sweep.attribution[i] == pytest.approx(per_pos.tolist(), abs=TOL)
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", ["mamba", "lstm"])
def test_attribution_is_the_first_order_change_of_an_exact_patch(name: str) -> None:
    """On recurrent models the gradient is taken through the backend's edit semantics (an
    edited RNN step is recomputed onwards): a finite difference of exact runs agrees."""
    a = arch(name)
    backend = a.backend
    clean, corrupted, *_ = _batches(a, [5, 5])
    sweep = attribution_patch(backend, clean, corrupted)
    assert sweep.attribution is not None
    site, p = f"layer_0.{backend.primary_role}", 2
    c_val = backend.run(clean, capture=[site])[site]
    r_val = backend.run(corrupted, capture=[site])[site]
    eps = 1e-3
    delta = torch.zeros_like(r_val)
    delta[:, p] = eps * (c_val[:, p] - r_val[:, p])
    metric = lambda run: float(  # noqa: E731
        (
            run.logits[:, -1].gather(1, tops[0][:, None])
            - run.logits[:, -1].gather(1, tops[1][:, None])
        ).mean()
    )
    tops = [backend.run(b, capture=["logits"]).logits[:, -1].argmax(-1) for b in (clean, corrupted)]
    # a central difference of two edited runs: both take the backend's edited path, so the
    # rounding difference between an RNN's fused call and its stepped one cancels out
    up = metric(backend.run(corrupted, capture=["logits"], edits=[Edit.add(site, delta)]))
    down = metric(backend.run(corrupted, capture=["logits"], edits=[Edit.add(site, -delta)]))
    gap = sweep.clean_metric - sweep.corrupted_metric
    assert sweep.attribution[0][p] == pytest.approx(
        (up - down) / (2 * eps) / gap, rel=2e-2, abs=1e-3
    )


# -- DIM -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["gpt2", "mamba", "hybrid"])
def test_dim_shares_equal_patching_each_component(name: str) -> None:
    a = arch(name)
    backend = a.backend
    clean, corrupted, c_rows, r_rows = _batches(a, [4, 3])
    layers = list(range(backend.n_layers))
    result = dim_decompose(backend, clean, corrupted, layers, None)
    table = backend.sites()
    roles = {
        "gpt2": ["attention", "mlp"],
        "mamba": ["mixer"],
        "hybrid": ["attention", "mixer", "mlp"],
    }[name]
    assert list(result.components) == roles
    ref = Reference(backend, c_rows, r_rows, [s for v in result.sites.values() for s in v])
    assert result.total == pytest.approx(ref.clean - ref.corr, abs=TOL)
    for comp, share in result.components.items():
        role = "attn" if comp == "attention" else comp
        sites = [f"layer_{i}.{role}" for i in layers if f"layer_{i}.{role}" in table]
        assert result.sites[comp] == sites
        patches = {n: [(s, list(range(len(r)))) for s in sites] for n, r in enumerate(r_rows)}
        ref.assert_fraction(share, patches, comp)
    # with a fixed metric, swapping the inputs flips the gap's sign
    fixed = dim_decompose(backend, clean, corrupted, layers, _logprob7)
    swapped = dim_decompose(backend, corrupted, clean, layers, _logprob7)
    assert swapped.total == pytest.approx(-fixed.total, abs=TOL) and fixed.total != 0


def test_dim_errors_and_zero_gap() -> None:
    m = arch("mamba")
    clean, corrupted, *_ = _batches(m, [5, 4])
    with pytest.raises(SiteError, match="attention"):
        dim_decompose(m.backend, clean, corrupted, [0, 1], None, components=("attention",))
    with pytest.warns(UserWarning, match="no gap"):
        same = dim_decompose(m.backend, clean, clean, [0, 1], None)
    assert same.total == 0.0
    assert all(math.isnan(v) for v in same.components.values())


# -- state patching --------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mamba", "lstm"])
def test_state_patching_reproduces_the_source_run_and_single_swaps(name: str) -> None:
    a = arch(name)
    backend = a.backend
    c_rows, r_rows = _rows([5, 4], seed=3)
    k = 2
    result = state_patch_sweep(
        backend, pad_batch(c_rows), pad_batch(r_rows), suffix_tokens=k, metric_fn=_logprob7
    )
    # swapping every state reproduces the plain run of clean prefix + suffix
    assert result.all_states == pytest.approx(1.0, abs=TOL)
    assert result.all_states_metric == pytest.approx(result.clean_metric, abs=TOL)
    for c_row, r_row in zip(c_rows, r_rows, strict=True):
        suffix = torch.tensor([r_row[-k:]])
        source = backend.run(torch.tensor([c_row[:-k]]), return_state=True, stop_early=False)
        swapped = backend.run(suffix, capture=["logits"], initial_state=source.state)
        plain = backend.run(torch.tensor([c_row[:-k] + r_row[-k:]]), capture=["logits"])
        torch.testing.assert_close(swapped["logits"][0], plain["logits"][0, -k:], atol=TOL, rtol=0)
    # each single swap equals the backend's own state_patch, row by row
    kinds = {"mamba": ["ssm_state", "conv_state"], "lstm": ["hidden_state", "cell_state"]}
    assert result.kinds == kinds[name]

    def mean_metric(runs: list[Any]) -> float:
        return sum(float(_logprob7(r["logits"], None)) for r in runs) / len(runs)  # type: ignore[arg-type]

    corr = mean_metric([backend.run(torch.tensor([r]), capture=["logits"]) for r in r_rows])
    cl = mean_metric(
        [
            backend.run(torch.tensor([c[:-k] + r[-k:]]), capture=["logits"])
            for c, r in zip(c_rows, r_rows, strict=True)
        ]
    )
    assert result.corrupted_metric == pytest.approx(corr, abs=TOL)
    assert result.clean_metric == pytest.approx(cl, abs=TOL)
    for i in result.layers:
        for j, kind in enumerate(result.kinds):
            patched = mean_metric(
                [
                    backend.state_patch(
                        torch.tensor([r[:-k]]),
                        torch.tensor([c[:-k]]),
                        torch.tensor([r[-k:]]),
                        sites=[f"layer_{i}.{kind}"],
                        capture=["logits"],
                    )
                    for c, r in zip(c_rows, r_rows, strict=True)
                ]
            )
            got = result.gap_restored[i][j]
            assert got is not None
            assert abs(got * (cl - corr) - (patched - corr)) <= TOL, (i, kind)


@pytest.mark.parametrize("name", ["gpt2", "hybrid"])
def test_state_patching_needs_the_capability(name: str) -> None:
    a = arch(name)
    clean, corrupted, *_ = _batches(a, [5, 4])
    with pytest.raises(CapabilityError, match="state_patch"):
        state_patch_sweep(a.backend, clean, corrupted)


# -- registered methods ----------------------------------------------------------------------
def test_registered_methods_run_on_a_contrast_of_texts(tmp_path: Any) -> None:
    g = arch("gpt2")
    texts = (["w5 w6 w7 w8 w9", "w10 w11 w12 w13"], ["w5 w16 w7 w8 w19", "w10 w21 w12 w23"])
    data = Contrast(*texts, tokenizer=g.tokenizer)
    patched = archscope.run_method("patch", g.backend, data, layers=[2])
    assert patched.gap_restored == 1.0
    sweep = archscope.run_method("patch-sweep", g.backend, data, positions="0,-1", batch_size=4)
    assert sweep.columns == [0, -1] and sweep.gap_restored[2][1] == pytest.approx(1.0, abs=TOL)
    atp = archscope.run_method("attribution-patch", g.backend, data, exact=True)
    assert atp.correlation is not None and atp.gap_restored is not None
    dim = archscope.run_method("dim", g.backend, data, components=["mlp"])
    assert list(dim.components) == ["mlp"]
    lstm = arch("lstm")
    state = archscope.run_method(
        "state-patch", lstm.backend, Contrast(*texts, tokenizer=lstm.tokenizer), suffix_tokens=1
    )
    assert state.kinds == ["hidden_state", "cell_state"]
    for result in (patched, sweep, atp, dim, state):
        assert result.to_dict() and result.to_markdown().startswith("##")
    with pytest.raises(CapabilityError):
        archscope.run_method("state-patch", g.backend, data)
    with pytest.raises(archscope.ParameterError):
        archscope.run_method("patch-sweep", g.backend, data, batch_size=0)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.raises(ArchscopeError, match=r"archscope\[plot\]"):
            atp.plot(tmp_path / "sweep.png")
    else:
        assert atp.plot(tmp_path / "sweep.png").stat().st_size > 0
        assert state.plot(tmp_path / "state.png").stat().st_size > 0


# -- a model that learned something ----------------------------------------------------------
INDUCTION_SPAN = 6


@pytest.fixture(scope="session")
def induction_model() -> Any:
    """A 2-layer GPT-2 (d 32) trained for 250 steps on random spans of 6 tokens followed by
    their repeat: it learns to predict the repeat (loss ≈ 0.3 nats vs 4.6 for chance) by
    copying the token after the span position it is at. Seconds on one CPU thread."""
    from archscope_transformer.testing import tiny_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = tiny_model("gpt2", n_layers=2, n_embd=32, n_positions=32, seed=0).train()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(0)
        for _ in range(250):
            span = torch.randint(4, 100, (16, INDUCTION_SPAN), generator=g)
            ids = torch.cat([span, span], 1)
            logits = model(input_ids=ids).logits[:, INDUCTION_SPAN:-1]
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), ids[:, INDUCTION_SPAN + 1 :].reshape(-1)
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def test_attribution_correlates_with_exact_patching_on_a_trained_model(
    induction_model: Any,
) -> None:
    """Clean: a span and the start of its repeat (the model predicts the span's 4th token);
    corrupted: the span's 4th token changed. Exact patching localises the copy (embedding of
    that token, then the last position); AtP over the same embed + layer x position sweep
    must correlate >= 0.8 with it."""
    backend = archscope.Backend.for_model(induction_model)
    g = torch.Generator().manual_seed(1)
    span = torch.randint(4, 100, (8, INDUCTION_SPAN), generator=g)
    changed = span.clone()
    changed[:, 3] = 4 + (span[:, 3] + 7) % 96
    clean = torch.cat([span, span[:, :3]], 1)
    corrupted = torch.cat([changed, span[:, :3]], 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sweep = attribution_patch(backend, clean, corrupted, exact=True, embed=True)
    assert sweep.clean_metric > 0 > sweep.corrupted_metric  # it copies the span's 4th token
    assert sweep.gap_restored is not None
    assert sweep.gap_restored[0][3] > 0.5  # the copied token's embedding carries the answer
    assert sweep.correlation is not None and sweep.correlation >= 0.8
    print(f"AtP vs exact correlation on the trained model: {sweep.correlation:.3f}")
