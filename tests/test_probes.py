"""Probes on every architecture: held-out AUROC against planted ground truth, one model pass per
batch for the layer sweep, padding invariance, the Artifact round trip and the 0.2 calls."""

from __future__ import annotations

import itertools
import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from archs import ARCH_NAMES, Arch, arch, words

import archscope
from archscope.data import Dataset
from archscope.errors import (
    ArtifactError,
    CapabilityError,
    InputError,
    ParameterError,
    SiteError,
)
from archscope.methods.probes import (
    Probe,
    ProbeConfig,
    ProbeFit,
    ProbeSweep,
    auroc,
    fit_probe,
    pooled_activations,
)
from archscope.testing import MethodContract, unchanged

# Tiny tensors: one thread avoids contention overhead and keeps the tests fast.
torch.set_num_threads(1)


def reference_pooled(a: Arch, texts: list[str], site: str, how: str = "mean") -> torch.Tensor:
    """Each text run alone (no padding at all), pooled by hand: the independent reference."""
    rows = []
    for text in texts:
        ids = torch.tensor([a.tokenizer(text)["input_ids"]])
        acts = a.backend.run({"input_ids": ids}, capture=[site])[site][0].float()
        rows.append(acts.mean(0) if how == "mean" else acts[-1])
    return torch.stack(rows)


def planted_labels(x: torch.Tensor, seed: int, margin: float = 0.25) -> tuple[list[int], list[int]]:
    """Labels from a random linear direction in ``x`` (above/below the median projection);
    rows within ``margin`` standard deviations of the median are dropped. Returns (kept rows,
    labels)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(x.shape[1], generator=g)
    proj = (x - x.mean(0)) @ u
    centre, spread = proj.median(), proj.std()
    keep = [i for i in range(len(proj)) if abs(float(proj[i] - centre)) > margin * float(spread)]
    return keep, [int(proj[i] > centre) for i in keep]


class TestAuroc:
    def test_matches_pair_counting_with_ties(self) -> None:
        scores = [0.1, 0.4, 0.4, 0.35, 0.8, 0.4, 0.2, 0.9]
        labels = [0, 0, 1, 1, 1, 0, 0, 1]
        pos = [s for s, y in zip(scores, labels, strict=True) if y == 1]
        neg = [s for s, y in zip(scores, labels, strict=True) if y == 0]
        pairs = [1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg)]
        assert auroc(torch.tensor(scores), torch.tensor(labels)) == pytest.approx(
            sum(pairs) / len(pairs)
        )

    def test_one_class_gives_half_with_a_warning(self) -> None:
        with pytest.warns(UserWarning, match="one class"):
            assert auroc(torch.tensor([0.2, 0.9]), torch.tensor([1, 1])) == 0.5

    def test_single_class_held_out_split_reports_half(self) -> None:
        x = torch.randn(20, 4, generator=torch.Generator().manual_seed(0))
        y = torch.tensor([0, 1] * 10)
        with pytest.warns(UserWarning, match="one class"):
            m = ProbeFit(ProbeConfig(), 4).train(x, y, epochs=2, held_out=(x[:3], torch.ones(3)))
        assert m.val_auroc == 0.5


class TestSyntheticActivations:
    def planted(
        self, n: int = 300, d: int = 32, seed: int = 0, strength: float = 2.0
    ) -> tuple[torch.Tensor, ...]:
        g = torch.Generator().manual_seed(seed)
        u = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)
        y = (torch.rand(n, generator=g) < 0.5).long()
        x = torch.randn(n, d, generator=g) + 5.0  # off-centre: the probe must learn a bias
        x = x + (2 * y - 1).float()[:, None] * strength * u
        return x, y, u

    def test_planted_direction_gives_high_held_out_auroc(self) -> None:
        x, y, u = self.planted()
        fit = ProbeFit(ProbeConfig(seed=1), x.shape[1])
        m = fit.train(x, y, epochs=60, lr=0.01)
        assert m.val_auroc >= 0.95 and m.n_val == 60 and m.n_train == 240
        # direction and bias act on raw activations exactly as the probe does.
        torch.testing.assert_close(
            x @ fit.direction + fit.bias, fit.logits(x), atol=1e-4, rtol=1e-4
        )
        cos = torch.nn.functional.cosine_similarity(fit.direction, u, dim=0)
        assert cos > 0.8

    def test_shuffled_labels_give_chance(self) -> None:
        x, y, _ = self.planted()
        y = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(7))]
        from archscope.methods.probes import cross_validate

        _, held = cross_validate(x, y, ProbeConfig(), folds=5, epochs=30)
        assert abs(sum(held) / len(held) - 0.5) <= 0.1

    def test_mlp_probe_separates_what_a_linear_probe_cannot(self) -> None:
        g = torch.Generator().manual_seed(3)
        x = torch.randn(400, 6, generator=g)
        y = ((x[:, 0] * x[:, 1]) > 0).long()  # XOR of two signs: no linear direction
        linear = ProbeFit(ProbeConfig(), 6).train(x, y, epochs=60, lr=0.01)
        mlp = ProbeFit(ProbeConfig(probe_type="mlp", hidden_dim=32), 6).train(
            x, y, epochs=150, lr=0.01
        )
        assert linear.val_auroc < 0.7
        assert mlp.val_auroc >= 0.9

    def test_same_seed_same_probe_and_global_rng_untouched(self) -> None:
        x, y, _ = self.planted(n=100)
        torch.manual_seed(123)
        before = torch.random.get_rng_state()
        a = ProbeFit(ProbeConfig(seed=4), x.shape[1])
        a.train(x, y, epochs=5)
        assert torch.equal(torch.random.get_rng_state(), before)
        b = ProbeFit(ProbeConfig(seed=4), x.shape[1])
        b.train(x, y, epochs=5)
        assert torch.equal(a.direction, b.direction) and torch.equal(a.bias, b.bias)
        c = ProbeFit(ProbeConfig(seed=5), x.shape[1])
        c.train(x, y, epochs=5)
        assert not torch.equal(a.direction, c.direction)

    def test_probe_init_is_the_one_torch_manual_seed_gives(self) -> None:
        """A CPU probe seeds only the CPU generator: its initial weights are those of the net
        built after `torch.manual_seed(seed)`, for a linear and an MLP probe."""
        for config in (ProbeConfig(seed=4), ProbeConfig(probe_type="mlp", hidden_dim=8, seed=7)):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.seed)
                reference = Probe(6, config)
            fit = ProbeFit(config, 6)
            want, got = reference.state_dict(), fit.probe.state_dict()
            assert want.keys() == got.keys()
            assert all(torch.equal(want[k], got[k]) for k in want)

    def test_newton_reaches_the_penalised_logistic_optimum(self) -> None:
        x, y, _ = self.planted(n=200, d=8)
        x = x + 1.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
        decay = 0.05
        fit = ProbeFit(ProbeConfig(solver="newton", weight_decay=decay), x.shape[1])
        m = fit.train(x, y, epochs=50, held_out=(x, y))
        assert m.train_auroc > 0.9
        z = ((x - x.mean(0)) / x.std(0, unbiased=False)).double()
        a = torch.cat([z, torch.ones(len(z), 1, dtype=torch.float64)], 1)
        net = fit.probe.net
        found = torch.cat([net.weight.detach().flatten(), net.bias.detach()]).double()

        def objective(w: torch.Tensor) -> torch.Tensor:
            return (
                torch.nn.functional.binary_cross_entropy_with_logits(a @ w, y.double())
                + decay / 2 * w[:-1].pow(2).sum()
            )

        # Independent checks of the optimum of this strictly convex objective: its gradient
        # (by autograd) vanishes there, and torch's L-BFGS lands on the same logits.
        w = found.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(objective(w), w)
        assert float(grad.abs().max()) < 1e-5
        ref = torch.zeros(a.shape[1], dtype=torch.float64, requires_grad=True)
        lbfgs = torch.optim.LBFGS(
            [ref],
            max_iter=500,
            tolerance_grad=1e-12,
            tolerance_change=1e-15,
            line_search_fn="strong_wolfe",
        )

        def closure() -> torch.Tensor:
            lbfgs.zero_grad()
            loss = objective(ref)
            loss.backward()
            return loss

        lbfgs.step(closure)
        torch.testing.assert_close(fit.logits(x).double(), (a @ ref).detach(), atol=1e-4, rtol=1e-4)
        # The AdamW fit of the same data ranks the rows alike.
        adam = ProbeFit(ProbeConfig(seed=1), x.shape[1]).train(
            x, y, epochs=60, lr=0.01, held_out=(x, y)
        )
        assert abs(adam.train_auroc - m.train_auroc) < 0.02

    def test_newton_with_fewer_rows_than_features(self) -> None:
        """The Woodbury step equals the direct solve of the full Hessian; the fit lands where
        the objective's gradient (autograd) vanishes."""
        from archscope.methods.probes import _newton_step_few_rows

        g = torch.Generator().manual_seed(4)
        a = torch.randn(3, 20, 50, generator=g, dtype=torch.float64)
        a = torch.cat([a, torch.ones(3, 20, 1, dtype=torch.float64)], 2)
        a[2, 15:] = 0.0  # padding rows of a shorter problem
        curvature = torch.rand(3, 20, generator=g, dtype=torch.float64) * 0.25 / 20
        curvature[2, 15:] = 0.0
        grad = torch.randn(3, 51, generator=g, dtype=torch.float64)
        diag = torch.full((51,), 0.01 + 1e-10, dtype=torch.float64)
        diag[-1] = 1e-10
        hessian = (a.transpose(1, 2) * curvature[:, None, :]) @ a + torch.diag(diag)
        torch.testing.assert_close(
            _newton_step_few_rows(a, curvature, grad, 0.01),
            torch.linalg.solve(hessian, grad),
            rtol=1e-7,
            atol=1e-9,
        )

        x, y, _ = self.planted(n=40, d=64)
        decay = 0.01
        fit = ProbeFit(ProbeConfig(solver="newton", weight_decay=decay), x.shape[1])
        fit.train(x, y, epochs=50, held_out=(x, y))
        z = ((x - x.mean(0)) / x.std(0, unbiased=False)).double()
        z1 = torch.cat([z, torch.ones(len(z), 1, dtype=torch.float64)], 1)
        net = fit.probe.net
        w = torch.cat([net.weight.detach().flatten(), net.bias.detach()]).double()
        w.requires_grad_(True)
        loss = (
            torch.nn.functional.binary_cross_entropy_with_logits(z1 @ w, y.double())
            + decay / 2 * w[:-1].pow(2).sum()
        )
        (gw,) = torch.autograd.grad(loss, w)
        assert float(gw.abs().max()) < 1e-5

    def test_newton_folds_solved_together_equal_folds_fitted_one_by_one(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Cross-validation solving its folds together (folds of 9, 9, 8, 8 and 8 rows, so the
        shorter training sets are padded and masked) gives each fold the weights, bias and
        AUROCs that fitting fold by fold does; a weak signal keeps the held-out AUROCs away
        from 1, so a wrong fold would show."""
        from archscope.methods.probes import cross_validate, stratified_folds

        x, y, _ = self.planted(n=42, d=64, strength=0.3)
        config = ProbeConfig(solver="newton", weight_decay=0.01)
        parts = stratified_folds(y, 5, config.seed)
        assert sorted((len(p) for p in parts), reverse=True) == [9, 9, 8, 8, 8]
        fitted: list[tuple[torch.Tensor, torch.Tensor]] = []
        measure = ProbeFit._measure

        def recording(fit: ProbeFit, *split: torch.Tensor) -> Any:
            net = fit.probe.net
            fitted.append((net.weight.detach().clone(), net.bias.detach().clone()))
            return measure(fit, *split)

        monkeypatch.setattr(ProbeFit, "_measure", recording)
        together = cross_validate(x, y, config, folds=5, epochs=50)
        together_fits, fitted[:] = list(fitted), []

        one_by_one: tuple[list[float], list[float]] = ([], [])
        for k, test in enumerate(parts):
            train = torch.cat([p for j, p in enumerate(parts) if j != k])
            m = ProbeFit(config, x.shape[1]).train(
                x[train], y[train], epochs=50, held_out=(x[test], y[test])
            )
            one_by_one[0].append(m.train_auroc)
            one_by_one[1].append(m.val_auroc)
        assert together == one_by_one
        # every held-out AUROC well below 1 (0.44 to 0.75 when written), all distinct folds
        assert max(together[1]) < 0.9 and len(set(together[1])) == 5, together
        assert len(together_fits) == len(fitted) == 5
        for (w, b), (rw, rb) in zip(together_fits, fitted, strict=True):
            torch.testing.assert_close(w, rw)
            torch.testing.assert_close(b, rb)

    def test_report_without_the_final_fit_has_the_fold_averages_and_no_probe(self) -> None:
        """`_report(fit_final=False)` (what the profile uses) reports the k-fold AUROCs of
        `cross_validate`, averaged as with the final fit, and fits no probe on every row."""
        from types import SimpleNamespace

        from archscope.methods.probes import ProbeOptions, _report, cross_validate

        x, y, _ = self.planted(n=60, d=16, strength=0.5)
        options = ProbeOptions(folds=3, epochs=20, solver="newton", weight_decay=1e-2)
        site = "layer_0.residual"
        backend: Any = SimpleNamespace(name="stand-in")
        report = _report(backend, site, x, y, options, fit_final=False)
        train, held = cross_validate(
            x, y, options.config(site), folds=3, epochs=20, lr=options.lr, batch_size=64
        )
        assert report._probe is None and report.n_examples == 60
        assert report.heldout_auroc_folds == held
        assert report.heldout_auroc == sum(held) / 3
        assert report.train_auroc == sum(train) / 3

    def test_problems_cross_validated_together_equal_each_alone(self) -> None:
        """`cross_validate_many` (what the profile and the sweep use: every site and label
        variant solved in one Newton call) returns exactly what `cross_validate` returns for
        each problem alone: several sites, shuffled labels, a problem with fewer rows (another
        shape, solved apart), another penalty and an AdamW problem in the same call."""
        from archscope.methods.probes import cross_validate, cross_validate_many

        x, y, _ = self.planted(n=42, d=64, strength=0.3)
        x2, y2, _ = self.planted(n=42, d=64, seed=1, strength=0.5)
        x3, y3, _ = self.planted(n=30, d=64, seed=2, strength=0.5)
        shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
        newton = ProbeConfig(solver="newton", weight_decay=0.01)
        problems = [
            (x, y, newton),
            (x2, y2, newton),
            (x, shuffled, newton),
            (x3, y3, newton),
            (x2, y2, ProbeConfig(solver="newton", weight_decay=0.1)),
            (x, y, ProbeConfig()),
            (x2, y2, ProbeConfig(solver="newton", weight_decay=0.01, seed=3)),
        ]
        together = cross_validate_many(problems, folds=5, epochs=30)
        alone = [cross_validate(a, b, c, folds=5, epochs=30) for a, b, c in problems]
        assert together == alone
        # the problems solved in one call have AUROCs of their own: a mix-up would show
        assert len({tuple(r[1]) for r in alone[:4]}) == 4

    def test_reports_of_many_sites_equal_one_report_each(self) -> None:
        from types import SimpleNamespace

        from archscope.methods.probes import ProbeOptions, _report, _reports

        x, y, _ = self.planted(n=60, d=16, strength=0.5)
        x2, _, _ = self.planted(n=60, d=16, seed=1, strength=0.5)
        options = ProbeOptions(folds=3, epochs=20, solver="newton", weight_decay=1e-2)
        backend: Any = SimpleNamespace(name="stand-in")
        problems = [("layer_0.residual", x, y), ("layer_1.residual", x2, y)]
        many = _reports(backend, problems, options, fit_final=False)
        one = [_report(backend, s, a, b, options, fit_final=False) for s, a, b in problems]
        assert many == one and many[0] != many[1]

    def test_unknown_solver_is_refused_with_the_valid_ones(self) -> None:
        with pytest.raises(ParameterError, match="adamw, newton"):
            ProbeConfig(solver="sgd")
        with pytest.raises(ParameterError, match="linear probes"):
            ProbeConfig(solver="newton", probe_type="mlp")


@pytest.fixture(scope="module")
def planted() -> dict[str, Any]:
    """Per architecture: texts, the hand-pooled last-layer activations and planted labels."""
    out = {}
    for name in ARCH_NAMES:
        a = arch(name)
        site = a.backend.layer_names()[-1]
        texts = words(320, seed=3)
        x = reference_pooled(a, texts, site)
        keep, labels = planted_labels(x, seed=11)
        out[name] = {
            "site": site,
            "texts": [texts[i] for i in keep],
            "labels": labels,
            "x": x[keep],
        }
    return out


def test_planted_direction_in_model_activations(any_arch: Arch, planted: dict[str, Any]) -> None:
    p = planted[any_arch.name]
    data = Dataset.from_texts(p["texts"], p["labels"], tokenizer=any_arch.tokenizer)
    report = archscope.run_method("probe", any_arch.backend, data, site=p["site"], epochs=60)
    assert report.heldout_auroc >= 0.95, report.to_markdown()
    assert len(report.heldout_auroc_folds) == 5 and report.n_examples == len(p["labels"])
    # The probe fitted on every example scores the activations pooled by hand.
    assert auroc(report.probe.score(p["x"]), torch.tensor(p["labels"])) >= 0.95

    # Shuffled labels: held-out AUROC at chance. One shuffle's k-fold mean has a spread of
    # about 0.05 at this size, so three shuffles are averaged.
    chance = []
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        shuffled = [p["labels"][i] for i in torch.randperm(len(p["labels"]), generator=g)]
        data = Dataset.from_texts(p["texts"], shuffled, tokenizer=any_arch.tokenizer)
        chance.append(
            archscope.run_method(
                "probe", any_arch.backend, data, site=p["site"], epochs=30, seed=seed
            ).heldout_auroc
        )
    assert abs(sum(chance) / 3 - 0.5) <= 0.1, chance


class CountForwards:
    """Counts forward passes through the model by a pre-hook on its token embedding (the first
    module of every pass, whatever the architecture)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.module = next(m for m in model.modules() if isinstance(m, torch.nn.Embedding))
        self.calls = 0

    def __enter__(self) -> CountForwards:
        def count(module: Any, args: Any) -> None:
            self.calls += 1

        self.handle = self.module.register_forward_pre_hook(count)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.handle.remove()


def test_sweep_runs_one_model_pass_per_batch(
    any_arch: Arch, planted: dict[str, Any], tmp_path: Path
) -> None:
    p = planted[any_arch.name]
    data = Dataset.from_texts(p["texts"], p["labels"], tokenizer=any_arch.tokenizer)
    layers = any_arch.backend.layer_names()
    assert len(layers) >= 2
    with CountForwards(any_arch.model) as counter:
        sweep = archscope.run_method("probe-sweep", any_arch.backend, data, folds=3, epochs=20)
    batches = -(-len(p["labels"]) // 32)  # collect's default batch size
    assert counter.calls == batches
    assert isinstance(sweep, ProbeSweep)
    assert [r.site for r in sweep.layers] == layers
    # The labels were planted at the last layer: its probe must find them.
    assert sweep.layers[-1].heldout_auroc >= 0.9
    assert all(0.0 <= r.heldout_auroc <= 1.0 for r in sweep.layers)
    assert "held-out AUROC" in sweep.to_markdown()
    json.loads(sweep.to_json())
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.raises(archscope.ArchscopeError, match=r"archscope\[plot\]"):
            sweep.plot(tmp_path / "sweep.png")
    else:
        fig = sweep.figure()  # held-out AUROC per layer is what the figure plots
        assert list(fig.axes[0].lines[0].get_ydata()) == pytest.approx(
            [r.heldout_auroc for r in sweep.layers]
        )
        archscope.results.pyplot().close(fig)
        assert sweep.plot(tmp_path / "sweep.png").stat().st_size > 0


def padded(texts: list[str], labels: list[int], side: str) -> dict[str, torch.Tensor]:
    from archscope_transformer.testing import tiny_tokenizer

    tok = tiny_tokenizer()  # a fresh one: the shared tokenizer must not change
    tok.pad_token = "<pad>"
    tok.padding_side = side
    enc = tok(texts, padding=True, return_tensors="pt")
    assert int(enc["attention_mask"].sum()) < enc["attention_mask"].numel()  # really padded
    return {
        "input_ids": enc["input_ids"],
        "attention_mask": enc["attention_mask"],
        "labels": torch.tensor(labels),
    }


@pytest.mark.parametrize("how", ["mean", "last"])
def test_padding_invariance(any_arch: Arch, planted: dict[str, Any], how: str) -> None:
    p = planted[any_arch.name]
    texts, labels, site = p["texts"][:40], p["labels"][:40], p["site"]
    backend = any_arch.backend
    one_by_one = reference_pooled(any_arch, texts, site, how)
    right = pooled_activations(backend, padded(texts, labels, "right"), [site], pool=how)[site]
    left = pooled_activations(backend, padded(texts, labels, "left"), [site], pool=how)[site]
    single = pooled_activations(
        backend,
        Dataset.from_texts(texts, tokenizer=any_arch.tokenizer),
        [site],
        pool=how,
        batch_size=1,
    )[site]
    for got in (right, left, single):
        torch.testing.assert_close(got, one_by_one, atol=1e-5, rtol=1e-5)
    # A padded batch straight through the backend, on each side it supports, pooled over real
    # tokens, gives the same vectors the probe sees.
    for side in ("right", "left"):
        if backend.padding in (side, "both"):
            batch = padded(texts, labels, side)
            acts = backend.run(
                {k: batch[k] for k in ("input_ids", "attention_mask")}, capture=[site]
            )
            torch.testing.assert_close(
                archscope.pool(acts[site].float(), acts.attention_mask, how),
                one_by_one,
                atol=1e-5,
                rtol=1e-5,
            )
    if how == "mean":
        reports = [
            archscope.run_method("probe", backend, d, site=site, folds=3, epochs=20)
            for d in (
                padded(texts, labels, "right"),
                padded(texts, labels, "left"),
                Dataset.from_texts(texts, labels, tokenizer=any_arch.tokenizer),
            )
        ]
        for other in reports[1:]:
            assert other.heldout_auroc_folds == pytest.approx(
                reports[0].heldout_auroc_folds, abs=1e-5
            )
            torch.testing.assert_close(
                other.probe.direction, reports[0].probe.direction, atol=1e-5, rtol=1e-4
            )


class TestArtifact:
    def test_save_load_round_trip_and_fit_checks(self, tmp_path: Path) -> None:
        a = arch("gpt2")
        texts = words(30, seed=8)
        fit = fit_probe(
            a.model,
            pos_texts=texts[:15],
            neg_texts=texts[15:],
            tokenizer=a.tokenizer,
            layer_name="layer_1.residual",
            epochs=5,
        )
        path = fit.save(tmp_path / "probe")
        x = torch.randn(5, 32, generator=torch.Generator().manual_seed(0))
        loaded = ProbeFit.load(path, backend=a.backend)
        assert torch.equal(loaded.score(x), fit.score(x))
        assert torch.equal(loaded.direction, fit.direction)
        assert loaded.fitted_on is not None and loaded.fitted_on.site == "layer_1.residual"
        assert loaded.metrics is not None and loaded.metrics.val_auroc == fit.metrics.val_auroc
        assert isinstance(archscope.Artifact.load(path), ProbeFit)
        by_hand = reference_pooled(a, texts[:6], "layer_1.residual")
        torch.testing.assert_close(
            loaded.score_data(a.backend, texts[:6], a.tokenizer),
            fit.score(by_hand),
            atol=1e-5,
            rtol=1e-5,
        )
        with pytest.raises(ArtifactError, match="backend"):
            ProbeFit.load(path, backend=arch("lstm").backend)
        meta = json.loads((path / "artifact.json").read_text())
        meta["config"]["input_dim"] = 31
        (path / "artifact.json").write_text(json.dumps(meta))
        with pytest.raises(ArtifactError, match="input dimension 31"):
            ProbeFit.load(path)

    def test_a_state_site_is_probed_flattened(self, tmp_path: Path) -> None:
        a = arch("mamba")
        texts = words(16, seed=4)
        data = Dataset.from_texts(texts, [0, 1] * 8, tokenizer=a.tokenizer)
        report = archscope.run_method(
            "probe", a.backend, data, site="layer_1.ssm_state", folds=2, epochs=3
        )
        state = a.backend.run(
            {"input_ids": torch.tensor([a.tokenizer(texts[0])["input_ids"]])},
            capture=["layer_1.ssm_state"],
        )["layer_1.ssm_state"]
        assert report.probe.input_dim == state[0].numel()
        loaded = ProbeFit.load(report.probe.save(tmp_path / "state"), backend=a.backend)
        torch.testing.assert_close(
            loaded.score_data(a.backend, texts[:1], a.tokenizer),
            report.probe.score(state.reshape(1, -1).float()),
            atol=1e-5,
            rtol=1e-5,
        )

    def test_mlp_probe_round_trips(self, tmp_path: Path) -> None:
        x = torch.randn(40, 8, generator=torch.Generator().manual_seed(1))
        y = torch.tensor([0, 1] * 20)
        fit = ProbeFit(ProbeConfig(probe_type="mlp", hidden_dim=5), 8)
        fit.train(x, y, epochs=3)
        loaded = ProbeFit.load(fit.save(tmp_path / "mlp"))
        assert torch.equal(loaded.score(x), fit.score(x))
        assert loaded.config.hidden_dim == 5


class TestApi02:
    def test_fit_probe_with_tokenized_dicts_and_with_texts(self) -> None:
        a = arch("mamba")
        tokenize = archscope.make_tokenize_fn(padded_tokenizer(), max_length=32)
        texts = words(40, seed=9)
        pos = [t + " w5 w5 w5" for t in texts[:20]]
        neg = [t + " w6 w6 w6" for t in texts[20:]]
        by_dicts = fit_probe(
            a.model,
            tokenize(pos),
            tokenize(neg),
            "layer_2.residual",
            backend_hint="mamba",
            epochs=20,
            lr=0.01,
        )
        by_texts = fit_probe(
            a.model,
            layer_name="layer_2.residual",
            tokenizer=a.tokenizer,
            pos_texts=pos,
            neg_texts=neg,
            epochs=20,
            lr=0.01,
        )
        for fit in (by_dicts, by_texts):
            assert isinstance(fit, ProbeFit)
            assert fit.metrics is not None
            assert fit.metrics["val_auroc"] >= 0.9 and "train_auroc" in fit.metrics.keys()
            assert fit.direction.shape == (32,) and fit.bias.dim() == 0
            scores = fit.score(torch.randn(3, 32))
            assert scores.shape == (3,) and bool(((scores >= 0) & (scores <= 1)).all())
        torch.testing.assert_close(by_dicts.direction, by_texts.direction, atol=1e-5, rtol=1e-4)

    def test_config_probe_and_probefit_signatures(self) -> None:
        config = ProbeConfig(
            layer_name="layer_0.residual", probe_type="mlp", hidden_dim=8, target="sentiment"
        )
        probe = Probe(12, config)
        assert probe.forward(torch.zeros(3, 12)).shape == (3,)
        fit = ProbeFit(config, 12, device="cpu")
        x = torch.randn(50, 12, generator=torch.Generator().manual_seed(0))
        y = torch.tensor([0, 1] * 25)
        metrics = fit.train(x, y, epochs=2, lr=0.001, batch_size=16, val_split=0.2)
        assert {"train_auroc", "val_auroc", "train_loss", "val_loss"} <= set(metrics.keys())
        with pytest.raises(ParameterError, match="linear"):
            _ = fit.direction


def padded_tokenizer() -> Any:
    from archscope_transformer.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    tok.pad_token = "<pad>"
    tok.padding_side = "left"
    return tok


class TestBadInputs:
    def test_typed_errors(self) -> None:
        a = arch("gpt2")
        texts = words(12, seed=1)
        with pytest.raises(ParameterError, match="probe_type"):
            ProbeConfig(probe_type="svm")
        with pytest.raises(ParameterError, match="pool"):
            ProbeConfig(pool="max")
        with pytest.raises(ParameterError, match="exactly one"):
            fit_probe(
                a.model,
                {"input_ids": [[5, 6]]},
                {"input_ids": [[7, 8]]},
                tokenizer=a.tokenizer,
                pos_texts=texts[:2],
                neg_texts=texts[2:4],
            )
        with pytest.raises(ParameterError, match="tokenizer"):
            fit_probe(a.model, pos_texts=texts[:2], neg_texts=texts[2:4])
        with pytest.raises(SiteError):
            fit_probe(
                a.model,
                pos_texts=texts[:6],
                neg_texts=texts[6:],
                tokenizer=a.tokenizer,
                layer_name="layer_9.residual",
            )
        with pytest.raises(InputError, match="labelled"):
            archscope.run_method(
                "probe", a.backend, Dataset.from_texts(texts, tokenizer=a.tokenizer)
            )
        labelled = Dataset.from_texts(texts, [0, 1] * 6, tokenizer=a.tokenizer)
        with pytest.raises(ParameterError, match="folds"):
            archscope.run_method("probe", a.backend, labelled, folds=1)
        with pytest.raises(ParameterError, match="no parameter"):
            archscope.run_method("probe", a.backend, labelled, layer=1)
        with pytest.raises(InputError, match="0/1"):
            archscope.run_method(
                "probe", a.backend, Dataset.from_texts(texts, [0, 1, 2] * 4, tokenizer=a.tokenizer)
            )
        fit = ProbeFit(ProbeConfig(), 4)
        with pytest.raises(InputError, match=r"\(n, 4\)"):
            fit.score(torch.zeros(2, 5))
        with pytest.raises(InputError, match="one label per row"):
            fit.train(torch.zeros(6, 4), torch.tensor([0, 1]))
        with pytest.raises(ParameterError, match="val_split"):
            fit.train(torch.randn(6, 4), torch.tensor([0, 1] * 3), val_split=0.0)
        with pytest.raises(InputError, match="0/1"):
            auroc(torch.zeros(3), torch.tensor([0, 1, 2]))

    def test_a_backend_without_the_capability_is_refused(self) -> None:
        class Bare:
            name = "bare"
            capabilities = frozenset({"logits"})

        with pytest.raises(CapabilityError, match="residual"):
            archscope.run_method("probe", Bare(), Dataset.from_ids([[1, 2]], [1]))

    def test_no_hook_left_and_model_unchanged(self) -> None:
        a = arch("lstm")
        data = Dataset.from_texts(words(12, seed=2), [0, 1] * 6, tokenizer=a.tokenizer)
        with unchanged(a.model), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            archscope.run_method("probe-sweep", a.backend, data, folds=2, epochs=2)


class TestProbeMethodContract(MethodContract):
    method_name = "probe"


class TestProbeSweepMethodContract(MethodContract):
    method_name = "probe-sweep"


def test_importing_probes_and_transfer_needs_no_torch() -> None:
    """`archscope info` reads the method signatures from these modules; torch stays out."""
    import subprocess
    import sys

    code = (
        "import sys, archscope.methods.probes, archscope.methods.transfer\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
