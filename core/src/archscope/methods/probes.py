"""Probes: linear (logistic) and small-MLP classifiers trained on one site's activations, pooled
over real tokens only, always reported with held-out AUROC; and a layer sweep that fits one probe
per layer from a single pass of the data through the model."""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Literal

from ..artifacts import Artifact, ArtifactFit
from ..backends import Backend
from ..data import Dataset
from ..errors import ArtifactError, InputError, MissingKeyError, ParameterError
from ..legacy import as_backend
from ..params import Param
from ..registry import method
from ..results import Result, pyplot
from .splits import held_out_split

if TYPE_CHECKING:  # torch is imported when a probe is built: `archscope info` must stay light
    import torch
    from torch import nn


PROBE_TYPES = ("linear", "mlp")
SOLVERS = ("adamw", "newton")

# Parameters the `probe` and `probe-sweep` methods share (their schema, read by the CLI).
HiddenDim = Annotated[int, Param(min=1, help="MLP probe width")]
Folds = Annotated[int, Param(min=2, help="k of stratified k-fold")]
Epochs = Annotated[int, Param(min=1, help="AdamW passes over the data; Newton iterations")]
LearningRate = Annotated[float, Param(min=0.0, help="AdamW learning rate")]
WeightDecay = Annotated[
    float,
    Param(min=0.0, help="AdamW's decoupled decay; Newton's L2 penalty (weight_decay / 2 * |w|^2)"),
]
Solver = Literal["adamw", "newton"]
BatchSize = Annotated[int, Param(min=1)]
POOLS = ("mean", "last")


# -- AUROC --------------------------------------------------------------------------------------
def auroc(scores: torch.Tensor | Sequence[float], labels: torch.Tensor | Sequence[int]) -> float:
    """Area under the ROC curve of ``scores`` for binary ``labels`` (1 = positive), with ties
    counted as half (the Mann-Whitney statistic). One class only: 0.5 and a warning."""
    import torch

    s = torch.as_tensor(scores, dtype=torch.float64).detach().flatten().cpu()
    y = torch.as_tensor(labels).detach().flatten().cpu()
    if s.shape != y.shape:
        raise InputError(
            f"auroc: {s.numel()} scores for {y.numel()} labels; give one score per label"
        )
    if not bool(((y == 0) | (y == 1)).all()):
        raise InputError(f"auroc needs binary labels 0/1, got values {sorted(set(y.tolist()))[:6]}")
    if not bool(torch.isfinite(s).all()):
        raise InputError("auroc: some scores are NaN or infinite")
    n_pos = int(y.sum())
    n_neg = int(y.numel()) - n_pos
    if n_pos == 0 or n_neg == 0:
        warnings.warn(
            f"archscope: AUROC is undefined on a split with one class ({n_pos} positive,"
            f" {n_neg} negative); reporting 0.5",
            stacklevel=2,
        )
        return 0.5
    # Average ranks make tied scores count one half, as the AUROC definition requires.
    order = torch.argsort(s)
    sorted_s = s[order]
    ranks = torch.empty_like(s)
    i = 0
    n = int(s.numel())
    while i < n:
        j = i
        while j + 1 < n and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    rank_sum = float(ranks[y == 1].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


# -- configuration and the probe module ---------------------------------------------------------
@dataclass
class ProbeOptions:
    """How a probe is fitted and measured: the parameters of the ``probe`` and ``probe-sweep``
    methods (their one schema; `ProbeConfig` takes its defaults from here)."""

    pool: Literal["mean", "last"] = "mean"
    probe_type: Literal["linear", "mlp"] = "linear"
    hidden_dim: HiddenDim = 64
    folds: Folds = 5
    epochs: Epochs = 100
    lr: LearningRate = 0.01
    weight_decay: WeightDecay = 1e-4
    batch_size: BatchSize = 64
    solver: Solver = "adamw"
    seed: int = 0

    def config(self, site: str) -> ProbeConfig:
        """The `ProbeConfig` of a probe on ``site`` fitted with these options."""
        return ProbeConfig(
            layer_name=site,
            probe_type=self.probe_type,
            hidden_dim=self.hidden_dim,
            pool=self.pool,
            weight_decay=self.weight_decay,
            seed=self.seed,
            solver=self.solver,
        )


@dataclass
class ProbeParams(ProbeOptions):
    """The ``probe`` method's parameters: the shared options and the site."""

    site: Annotated[str | None, Param(help="site to probe (default: the middle layer's)")] = None


@dataclass
class ProbeSweepParams(ProbeOptions):
    """The ``probe-sweep`` method's parameters: the shared options and the sites."""

    sites: Annotated[
        list[str] | None, Param(help="sites to probe (default: every layer's main site)")
    ] = None


@dataclass
class ProbeConfig:
    """What to probe and with what: ``layer_name`` (a site), ``probe_type`` ("linear" or
    "mlp"), ``hidden_dim`` (MLP width), ``target`` (a name for what the labels mean), ``pool``
    (mean over real tokens, or the last real token), ``weight_decay``, ``seed`` and ``solver``:
    "adamw" (minibatch AdamW for ``epochs``) or, for linear probes, "newton" (Newton's method
    with a backtracking line search, at most ``epochs`` iterations, on the mean logistic loss
    plus ``weight_decay / 2 * |w|^2``, bias unpenalised: penalised logistic regression solved
    to its unique optimum, in about ten iterations, when ``weight_decay > 0``)."""

    layer_name: str = ""
    probe_type: str = ProbeOptions.probe_type
    hidden_dim: int = ProbeOptions.hidden_dim
    target: str = "label"
    pool: str = ProbeOptions.pool
    weight_decay: float = ProbeOptions.weight_decay
    seed: int = ProbeOptions.seed
    solver: str = ProbeOptions.solver

    def __post_init__(self) -> None:
        if self.probe_type not in PROBE_TYPES:
            raise ParameterError(
                f"ProbeConfig.probe_type {self.probe_type!r} is unknown; use "
                f"one of {', '.join(PROBE_TYPES)}"
            )
        if self.pool not in POOLS:
            raise ParameterError(
                f"ProbeConfig.pool {self.pool!r} is unknown; use 'mean' (over "
                "real tokens) or 'last' (the last real token)"
            )
        if self.solver not in SOLVERS:
            raise ParameterError(
                f"ProbeConfig.solver {self.solver!r} is unknown; use one of {', '.join(SOLVERS)}"
            )
        if self.solver == "newton" and self.probe_type != "linear":
            raise ParameterError(
                "ProbeConfig.solver 'newton' fits linear probes; an MLP probe needs solver='adamw'"
            )
        if int(self.hidden_dim) < 1:
            raise ParameterError(f"ProbeConfig.hidden_dim must be >= 1, got {self.hidden_dim}")
        if self.weight_decay < 0:
            raise ParameterError(f"ProbeConfig.weight_decay must be >= 0, got {self.weight_decay}")


class ProbeMetrics(dict[str, Any], Result):
    """What `ProbeFit.train` reports: AUROC and loss on the training part and on the held-out
    part. A dict, as in 0.2 (``"val_auroc" in m``, ``m["val_auroc"]``, ``dict(m)``,
    ``json.dumps(m)``), whose entries also read as attributes (``m.val_auroc``)."""

    FIELDS = ("train_auroc", "val_auroc", "train_loss", "val_loss", "n_train", "n_val")

    def __init__(
        self,
        *,
        train_auroc: float,
        val_auroc: float,
        train_loss: float,
        val_loss: float,
        n_train: int,
        n_val: int,
    ) -> None:
        super().__init__(
            train_auroc=float(train_auroc),
            val_auroc=float(val_auroc),
            train_loss=float(train_loss),
            val_loss=float(val_loss),
            n_train=int(n_train),
            n_val=int(n_val),
        )

    def __missing__(self, key: str) -> Any:
        raise MissingKeyError(f"{key!r}: probe metrics are {', '.join(map(repr, self.FIELDS))}")

    @property
    def train_auroc(self) -> float:
        return float(self["train_auroc"])

    @property
    def val_auroc(self) -> float:
        return float(self["val_auroc"])

    @property
    def train_loss(self) -> float:
        return float(self["train_loss"])

    @property
    def val_loss(self) -> float:
        return float(self["val_loss"])

    @property
    def n_train(self) -> int:
        return int(self["n_train"])

    @property
    def n_val(self) -> int:
        return int(self["n_val"])


def _check_training(where: str, epochs: int, lr: float, batch_size: int) -> None:
    """Refuse training settings that cannot train (``where`` names the caller)."""
    if epochs < 1 or batch_size < 1 or not lr > 0:
        raise ParameterError(
            f"{where} needs epochs >= 1, batch_size >= 1, lr > 0; got epochs={epochs}, "
            f"batch_size={batch_size}, lr={lr}"
        )


def _warn_if_one_class(y: torch.Tensor, stacklevel: int) -> None:
    """Warn where the training labels ``y`` have one class; ``stacklevel`` as seen from the
    caller (2: the caller's caller)."""
    if y.min() == y.max():
        warnings.warn(
            "archscope: the probe's training rows all have one class; the probe cannot learn "
            "to separate anything",
            stacklevel=stacklevel + 1,
        )


def _check_xy(activations: Any, labels: Any, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    x = torch.as_tensor(activations)
    y = torch.as_tensor(labels)
    if x.dim() != 2:
        raise InputError(
            f"{where}: activations must be (n_examples, features), got shape "
            f"{tuple(x.shape)}; pool token sites first (archscope.collect with "
            "pool='mean' or 'last')"
        )
    y = y.flatten()
    if y.numel() != x.shape[0]:
        raise InputError(
            f"{where}: {y.numel()} labels for {x.shape[0]} examples; give one label per row"
        )
    if not bool(((y == 0) | (y == 1)).all()):
        raise InputError(f"{where}: labels must be 0/1, got values {sorted(set(y.tolist()))[:6]}")
    if not x.dtype.is_floating_point or not bool(torch.isfinite(x).all()):
        raise InputError(f"{where}: activations must be finite floating-point numbers")
    return x.float().cpu(), y.long().cpu()


def stratified_split(
    labels: torch.Tensor, val_split: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, held-out) with about ``val_split`` of each class held out (at least one
    per class when the class has two or more examples): `held_out_split` by label."""
    import torch

    train, held = held_out_split(len(labels), val_split, seed, labels=labels)
    return torch.tensor(train, dtype=torch.long), torch.tensor(held, dtype=torch.long)


def stratified_folds(labels: torch.Tensor, folds: int, seed: int) -> list[torch.Tensor]:
    """``folds`` disjoint index sets covering every example, each class dealt round-robin."""
    import torch

    g = torch.Generator().manual_seed(seed)
    parts: list[list[int]] = [[] for _ in range(folds)]
    start = 0
    for cls in (0, 1):
        idx = torch.nonzero(labels == cls).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        for k, i in enumerate(idx.tolist()):
            parts[(start + k) % folds].append(i)
        start += len(idx)
    return [torch.tensor(sorted(p), dtype=torch.long) for p in parts]


def _newton_many(
    z: torch.Tensor,
    mask: torch.Tensor,
    y: torch.Tensor,
    weight_decay: float,
    iterations: int,
) -> torch.Tensor:
    """Penalised logistic regressions solved by Newton's method, several at once: problem
    ``b`` has the rows of ``z[b]`` (float64, (problems, rows, features)) where ``mask[b]`` is 1
    (padding elsewhere) and labels ``y[b]``; it minimises the mean binary cross-entropy over
    its rows plus ``weight_decay / 2 * |w|^2`` (the bias unpenalised). Each problem steps with
    its own backtracking (Armijo) line search and stops on its own: at a gradient below
    1e-9, when no step lowers its loss, or after ``iterations``. Returns (problems,
    features + 1): the weights, then the bias."""
    import torch
    from torch.nn.functional import binary_cross_entropy_with_logits as bce

    n_problems, n_rows, _ = z.shape
    a = torch.cat([z, torch.ones(n_problems, n_rows, 1, dtype=z.dtype, device=z.device)], 2)
    a = a * mask[..., None]  # padding rows contribute nothing
    count = mask.sum(1)
    penalty = torch.full((a.shape[2],), float(weight_decay), dtype=torch.float64, device=z.device)
    penalty[-1] = 0.0  # the bias is not penalised
    ridge = torch.diag(penalty + 1e-10)  # + a jitter: one class only leaves H singular

    def objective(w: torch.Tensor) -> torch.Tensor:
        logits = (a @ w[..., None])[..., 0]
        loss = (bce(logits, y, reduction="none") * mask).sum(1) / count
        return loss + 0.5 * (penalty * w * w).sum(1)

    w = torch.zeros(n_problems, a.shape[2], dtype=torch.float64, device=z.device)
    value = objective(w)
    active = torch.ones(n_problems, dtype=torch.bool, device=z.device)
    for _ in range(iterations):
        p = torch.sigmoid((a @ w[..., None])[..., 0])
        grad = (a.transpose(1, 2) @ ((p - y) * mask)[..., None])[..., 0] / count[:, None]
        grad = grad + penalty * w
        active &= grad.abs().amax(1) >= 1e-9
        if not bool(active.any()):
            break
        curvature = p * (1 - p) * mask / count[:, None]
        if n_rows < a.shape[2] - 1 and weight_decay > 0:
            step = _newton_step_few_rows(a, curvature, grad, float(weight_decay))
        else:
            step = torch.linalg.solve((a.transpose(1, 2) * curvature[:, None, :]) @ a + ridge, grad)
        slope = (grad * step).sum(1)
        # backtrack until the loss falls enough (Armijo); no such step: at the optimum within
        # float precision, and that problem stops
        t = torch.ones(n_problems, dtype=torch.float64, device=z.device)
        pending = active.clone()
        while True:
            trying = pending & (t >= 1e-8)
            if not bool(trying.any()):
                break
            candidate = w - t[:, None] * step
            new = objective(candidate)
            ok = trying & (new <= value - 1e-4 * t * slope)
            w = torch.where(ok[:, None], candidate, w)
            value = torch.where(ok, new, value)
            pending &= ~ok
            t = torch.where(pending, t / 2, t)
        active &= ~pending
    return w


def _newton_step_few_rows(
    a: torch.Tensor, curvature: torch.Tensor, grad: torch.Tensor, weight_decay: float
) -> torch.Tensor:
    """The Newton step ``H^-1 grad`` of `_newton_many` (``H = a^T diag(curvature) a`` plus
    ``weight_decay + 1e-10`` on the weights' diagonal and ``1e-10`` on the bias's, ``a``'s
    last column the ones of the bias) when there are fewer rows than features: the weight
    block is inverted with the Woodbury identity (a rows x rows solve instead of features x
    features) and the bias eliminated through its Schur complement. The same step as the
    direct solve, to rounding."""
    import torch

    z = a[..., :-1]  # (problems, rows, d)
    ones = a[..., -1]  # 1 on real rows, 0 on padding
    root = curvature.sqrt()
    b = z * root[..., None]  # M = b^T b + r I is the weight block
    r = weight_decay + 1e-10
    kernel = b @ b.transpose(1, 2) + r * torch.eye(a.shape[1], dtype=a.dtype, device=a.device)

    def solve_weights(x: torch.Tensor) -> torch.Tensor:  # M^-1 x, x (problems, d, k)
        inner: torch.Tensor = torch.linalg.solve(kernel, b @ x)
        out: torch.Tensor = (x - b.transpose(1, 2) @ inner) / r
        return out

    coupling = z.transpose(1, 2) @ (curvature * ones)[..., None]  # (problems, d, 1)
    both = solve_weights(torch.cat([grad[:, :-1, None], coupling], 2))
    u, v = both[..., 0], both[..., 1]
    schur = (curvature * ones).sum(1) + 1e-10 - (coupling[..., 0] * v).sum(1)
    step_b = (grad[:, -1] - (coupling[..., 0] * u).sum(1)) / schur
    step_w = u - v * step_b[:, None]
    return torch.cat([step_w, step_b[:, None]], 1)


# -- the fitted probe ---------------------------------------------------------------------------
class ProbeFit(Artifact):
    """A probe together with its training: `train` fits it and reports held-out AUROC, `score`
    applies it, ``direction`` / ``bias`` give a linear probe's weights in the activations' own
    coordinates. Saves and loads as an `archscope.Artifact` (kind ``probe``)."""

    kind = "probe"

    def __init__(self, config: ProbeConfig, input_dim: int, device: str = "cpu") -> None:
        import torch

        from ._probe_net import Probe

        self.config = config
        self.input_dim = int(input_dim)
        self.device = torch.device(device)
        # Seeded init without touching the global RNG: the net is built on the CPU. For a CPU
        # probe only the CPU generator is seeded (and restored): `torch.manual_seed` also
        # seeds every accelerator's generator, at ~0.2 ms a call, and cross-validation builds
        # one probe per fold and site. An accelerator probe keeps `torch.manual_seed`, whose
        # seeding of its device's generator its training's dropout has always drawn from.
        with torch.random.fork_rng(devices=[]):
            if self.device.type == "cpu":
                torch.default_generator.manual_seed(config.seed)
            else:
                torch.manual_seed(config.seed)
            self.probe = Probe(self.input_dim, config).to(self.device)
        # Inputs are standardised with statistics of the training part; `direction` and `bias`
        # fold the standardisation back in, so they apply to raw activations.
        self.mean = torch.zeros(self.input_dim)
        self.std = torch.ones(self.input_dim)
        self.metrics: ProbeMetrics | None = None
        self.fitted_on: ArtifactFit | None = None

    # -- training --------------------------------------------------------------------------------
    def train(
        self,
        activations: torch.Tensor,
        labels: torch.Tensor,
        epochs: int = 50,
        lr: float = 0.001,
        batch_size: int = 64,
        val_split: float = 0.2,
        *,
        held_out: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> ProbeMetrics:
        """Fit on a stratified ``1 - val_split`` of the rows and report AUROC and loss on the
        training part and the held-out part. With ``held_out=(acts, labels)`` it trains on
        every given row and reports on that separate held-out set instead."""
        x, y = _check_xy(activations, labels, "ProbeFit.train")
        self._check_dim(x, "ProbeFit.train")
        _check_training("ProbeFit.train", epochs, lr, batch_size)
        if held_out is not None:
            xv, yv = _check_xy(held_out[0], held_out[1], "ProbeFit.train(held_out=...)")
            self._check_dim(xv, "ProbeFit.train(held_out=...)")
            xt, yt = x, y
        else:
            if not 0.0 < val_split < 1.0:
                raise ParameterError(
                    f"val_split must be in (0, 1) so that AUROC is measured on "
                    f"held-out rows; got {val_split}"
                )
            tr, va = stratified_split(y, val_split, self.config.seed)
            if len(va) == 0 or len(tr) == 0:
                raise InputError(
                    f"ProbeFit.train: {len(y)} examples are too few to hold "
                    f"{val_split:.0%} out; give more examples"
                )
            xt, yt, xv, yv = x[tr], y[tr], x[va], y[va]
        _warn_if_one_class(yt, stacklevel=2)
        self._fit_rows(xt, yt, epochs, lr, batch_size)
        return self._measure(xt, yt, xv, yv)

    def _measure(
        self, xt: torch.Tensor, yt: torch.Tensor, xv: torch.Tensor, yv: torch.Tensor
    ) -> ProbeMetrics:
        """AUROC and loss on the training rows and the held-out rows, kept in ``metrics``."""
        train_loss, train_scores = self._loss_and_logits(xt, yt)
        val_loss, val_scores = self._loss_and_logits(xv, yv)
        self.metrics = ProbeMetrics(
            train_auroc=auroc(train_scores, yt),
            val_auroc=auroc(val_scores, yv),
            train_loss=train_loss,
            val_loss=val_loss,
            n_train=len(yt),
            n_val=len(yv),
        )
        return self.metrics

    def _fit_rows(
        self, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, batch_size: int
    ) -> None:
        import torch

        z = self._standardise(x)
        target = y.float().to(self.device)
        if self.config.solver == "newton":
            self._fit_newton(z, target, epochs)
            return
        optim = torch.optim.AdamW(
            self.probe.parameters(), lr=lr, weight_decay=self.config.weight_decay
        )
        loss_fn = torch.nn.BCEWithLogitsLoss()
        g = torch.Generator().manual_seed(self.config.seed + 1)
        self.probe.train()
        for _ in range(epochs):
            order = torch.randperm(len(z), generator=g).to(self.device)
            for start in range(0, len(z), batch_size):
                rows = order[start : start + batch_size]
                optim.zero_grad(set_to_none=True)
                loss = loss_fn(self.probe(z[rows]), target[rows])
                loss.backward()
                optim.step()
        self.probe.eval()

    def _standardise(self, x: torch.Tensor) -> torch.Tensor:
        """Keep the mean and std of the training rows ``x``; return them standardised."""
        import torch

        self.mean = x.mean(0)
        std = x.std(0, unbiased=False) if len(x) > 1 else torch.ones(x.shape[1])
        # A constant feature carries no information; dividing by ~0 would only blow it up.
        self.std = torch.where(std > 1e-8, std, torch.ones_like(std))
        return ((x - self.mean) / self.std).to(self.device)

    def _set_linear(self, w: torch.Tensor) -> None:
        """The linear probe's weights (``w[:-1]``) and bias (``w[-1]``)."""
        import torch

        linear = self.probe.net
        assert isinstance(linear, torch.nn.Linear)
        with torch.no_grad():
            linear.weight.copy_(w[:-1].to(linear.weight.dtype)[None])
            linear.bias.copy_(w[-1:].to(linear.bias.dtype))

    def _fit_newton(self, z: torch.Tensor, target: torch.Tensor, iterations: int) -> None:
        import torch

        ones = torch.ones(1, len(z), dtype=torch.float64, device=z.device)
        w = _newton_many(
            z.double()[None], ones, target.double()[None], self.config.weight_decay, iterations
        )
        self._set_linear(w[0])

    def _loss_and_logits(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, torch.Tensor]:
        import torch

        logits = self.logits(x)
        if len(y) == 0:
            return math.nan, logits
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y.float())
        return float(loss), logits

    # -- applying --------------------------------------------------------------------------------
    def _check_dim(self, x: torch.Tensor, where: str) -> None:
        if x.dim() != 2 or x.shape[1] != self.input_dim:
            raise InputError(
                f"{where}: this probe takes (n, {self.input_dim}) activations, got "
                f"shape {tuple(x.shape)}"
            )

    def logits(self, activations: torch.Tensor) -> torch.Tensor:
        """The probe's logit per row of (N, input_dim) activations."""
        import torch

        x = torch.as_tensor(activations)
        self._check_dim(x, "ProbeFit.score")
        with torch.no_grad():
            z = ((x.float().cpu() - self.mean) / self.std).to(self.device)
            logits: torch.Tensor = self.probe(z)
            return logits.float().cpu()

    def score(self, activations: torch.Tensor) -> torch.Tensor:
        """P(label = 1) per row of (N, input_dim) activations."""
        import torch

        return torch.sigmoid(self.logits(activations))

    def score_data(
        self, backend: Backend, data: Any, tokenizer: Any = None, batch_size: int = 32
    ) -> torch.Tensor:
        """P(label = 1) per text of ``data``, read at the site and with the pooling the probe
        was fitted with (the backend must fit the probe's fit record)."""
        if self.fitted_on is None:
            raise ArtifactError(
                "this probe has no fit record (it was trained on bare "
                "activations): pool the activations yourself and call score()"
            )
        self.check_fits(backend)
        site = self.fitted_on.site
        x = pooled_activations(
            backend, data, [site], pool=self.config.pool, batch_size=batch_size, tokenizer=tokenizer
        )[site]
        return self.score(x)

    @property
    def direction(self) -> torch.Tensor:
        """A linear probe's weight vector on raw activations: logit = x @ direction + bias."""

        linear = self._linear()
        return (linear.weight.detach().cpu()[0] / self.std).clone()

    @property
    def bias(self) -> torch.Tensor:
        """A linear probe's bias on raw activations (a 0-d tensor)."""

        linear = self._linear()
        w = linear.weight.detach().cpu()[0] / self.std
        return (linear.bias.detach().cpu()[0] - (w * self.mean).sum()).clone()

    def _linear(self) -> nn.Linear:
        import torch

        if self.config.probe_type != "linear":
            raise ParameterError(
                f"direction and bias exist for probe_type='linear'; this probe "
                f"is {self.config.probe_type!r} (use score() instead)"
            )
        assert isinstance(self.probe.net, torch.nn.Linear)
        return self.probe.net

    # -- Artifact ---------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {f"probe.{k}": v for k, v in self.probe.state_dict().items()}
        tensors["input_mean"] = self.mean
        tensors["input_std"] = self.std
        return tensors

    def artifact_config(self) -> dict[str, Any]:
        return {
            "probe": dataclasses.asdict(self.config),
            "input_dim": self.input_dim,
            "metrics": None if self.metrics is None else self.metrics.to_dict(),
        }

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> ProbeFit:
        try:
            probe_config = ProbeConfig(**config["probe"])
            input_dim = int(config["input_dim"])
        except (KeyError, TypeError, ParameterError) as exc:
            raise ArtifactError(
                f"probe artifact config is malformed ({exc}); it needs 'probe' "
                "(ProbeConfig fields) and 'input_dim'"
            ) from None
        fit = cls(probe_config, input_dim)
        state = {k[len("probe.") :]: v for k, v in tensors.items() if k.startswith("probe.")}
        expected = fit.probe.state_dict()
        if set(state) != set(expected) or any(state[k].shape != expected[k].shape for k in state):
            raise ArtifactError(
                f"probe weights do not match a {probe_config.probe_type} probe of input "
                f"dimension {input_dim}: got {{{', '.join(f'{k}: {tuple(v.shape)}' for k, v in state.items())}}}"
            )
        for key in ("input_mean", "input_std"):
            if key not in tensors or tuple(tensors[key].shape) != (input_dim,):
                raise ArtifactError(f"probe artifact lacks {key!r} of shape ({input_dim},)")
        fit.probe.load_state_dict(state)
        fit.probe.eval()
        fit.mean, fit.std = tensors["input_mean"].float(), tensors["input_std"].float()
        if config.get("metrics"):
            fit.metrics = ProbeMetrics(**config["metrics"])
        return fit

    def check_fits(self, backend: Any) -> None:
        super().check_fits(backend)
        # A state site is probed flattened, so only a token site's dimension is the input's.
        fit = self.fitted_on
        if (
            fit is not None
            and backend.site_info(fit.site).kind == "token"
            and fit.dim != self.input_dim
        ):
            raise ArtifactError(
                f"probe artifact: input dimension {self.input_dim} differs from "
                f"its fit record's {fit.site} dimension {fit.dim}"
            )

    def __repr__(self) -> str:
        where = f" on {self.fitted_on.backend}:{self.fitted_on.site}" if self.fitted_on else ""
        return f"<ProbeFit {self.config.probe_type} d={self.input_dim}{where}>"


# -- activations of a backend ---------------------------------------------------------------
def default_site(backend: Backend) -> str:
    """The main site of the middle layer (probes default to it)."""
    names = backend.layer_names()
    if not names:
        raise ParameterError(f"backend {backend.name!r} lists no per-layer sites; pass site=")
    return names[len(names) // 2]


def pooled_activations(
    backend: Backend,
    data: Any,
    sites: Sequence[str],
    *,
    pool: str = "mean",
    batch_size: int = 32,
    tokenizer: Any = None,
) -> dict[str, torch.Tensor]:
    """One pooled vector per text for each site, from one pass of ``data`` through the model
    (``archscope.collect``; padding never counts)."""
    import torch

    from ..collect import collect

    if pool not in POOLS:
        raise ParameterError(f"pool must be 'mean' or 'last', got {pool!r}")
    got = collect(
        backend,
        data,
        list(sites),
        pool=pool,  # type: ignore[arg-type]
        batch_size=batch_size,
        tokenizer=tokenizer,
        dtype=torch.float32,
    )
    return {name: got.activations[name] for name in got.activations}


def _labelled(data: Any, tokenizer: Any = None) -> tuple[Dataset, torch.Tensor]:
    from ..data import as_dataset

    dataset = as_dataset(data, tokenizer)
    labels = dataset.label_tensor
    if labels is None:
        raise InputError(
            "probing needs labelled data: give a Dataset with labels (0/1 per text;"
            " a JSONL file with 'text' and 'label', or Dataset.from_texts(texts, "
            "labels, tokenizer))"
        )
    if not bool(((labels == 0) | (labels == 1)).all()):
        raise InputError(f"probe labels must be 0/1, got {sorted(set(labels.tolist()))[:6]}")
    return dataset, labels


def fit_probe(
    model: Any,
    inputs_pos: Any = None,
    inputs_neg: Any = None,
    layer_name: str = "",
    backend_hint: str | None = None,
    config: ProbeConfig | None = None,
    device: str = "cpu",
    *,
    tokenizer: Any = None,
    pos_texts: list[str] | None = None,
    neg_texts: list[str] | None = None,
    max_length: int = 32,
    epochs: int = 50,
    lr: float = 0.001,
    batch_size: int = 64,
    val_split: float = 0.2,
) -> ProbeFit:
    """Fit a probe separating positive from negative inputs at one site of ``model`` (a model or
    an `archscope.Backend`) and return the trained `ProbeFit` (``.metrics`` holds train and
    held-out AUROC). Inputs are tokenized dicts (``inputs_pos``/``inputs_neg``, padded on either
    side) or texts with a tokenizer (``pos_texts``/``neg_texts``, cut to ``max_length``)."""
    import torch

    from ..data import as_dataset

    backend = as_backend(model, backend_hint)
    config = dataclasses.replace(config) if config is not None else ProbeConfig()
    site = layer_name or config.layer_name or default_site(backend)
    config.layer_name = backend.site_info(site).name
    given_dicts = inputs_pos is not None or inputs_neg is not None
    given_texts = pos_texts is not None or neg_texts is not None
    if given_dicts == given_texts:
        raise ParameterError(
            "fit_probe takes either inputs_pos and inputs_neg (tokenized "
            "dicts) or pos_texts and neg_texts with tokenizer=, exactly one pair"
        )
    if given_texts:
        if pos_texts is None or neg_texts is None or tokenizer is None:
            raise ParameterError("fit_probe with texts needs pos_texts, neg_texts and tokenizer=")
        pos = Dataset.from_texts(pos_texts, tokenizer=tokenizer, max_length=max_length).ids()
        neg = Dataset.from_texts(neg_texts, tokenizer=tokenizer, max_length=max_length).ids()
    else:
        if inputs_pos is None or inputs_neg is None:
            raise ParameterError("fit_probe needs both inputs_pos and inputs_neg")
        pos = as_dataset(inputs_pos, tokenizer).ids()
        neg = as_dataset(inputs_neg, tokenizer).ids()
    data = Dataset.from_ids(pos + neg, labels=[1] * len(pos) + [0] * len(neg))
    acts = pooled_activations(backend, data, [config.layer_name], pool=config.pool)
    x = acts[config.layer_name]
    fitted = ProbeFit(config, x.shape[1], device=device)
    labels = torch.tensor([1] * len(pos) + [0] * len(neg))
    fitted.train(x, labels, epochs=epochs, lr=lr, batch_size=batch_size, val_split=val_split)
    fitted.fitted_on = ArtifactFit.of(backend, config.layer_name)
    return fitted


def cross_validate(
    activations: torch.Tensor,
    labels: torch.Tensor,
    config: ProbeConfig,
    *,
    folds: int = 5,
    epochs: int = 100,
    lr: float = 0.01,
    batch_size: int = 64,
) -> tuple[list[float], list[float]]:
    """Stratified k-fold: per fold, the training AUROC and the held-out AUROC of a probe
    trained on the other folds."""
    import torch

    x, y, parts = _folds_of(activations, labels, config, folds)
    if config.solver == "newton":
        _check_training("cross_validate", epochs, lr, batch_size)
        folded = _NewtonFolds(x, y, config, parts)
        return folded.scores(_newton_many(*folded.inputs(), config.weight_decay, epochs))
    train_scores, test_scores = [], []
    for k, test in enumerate(parts):
        train = torch.cat([p for j, p in enumerate(parts) if j != k])
        fit = ProbeFit(config, x.shape[1])
        m = fit.train(
            x[train],
            y[train],
            epochs=epochs,
            lr=lr,
            batch_size=batch_size,
            held_out=(x[test], y[test]),
        )
        train_scores.append(m.train_auroc)
        test_scores.append(m.val_auroc)
    return train_scores, test_scores


def cross_validate_many(
    problems: Sequence[tuple[torch.Tensor, torch.Tensor, ProbeConfig]],
    *,
    folds: int = 5,
    epochs: int = 100,
    lr: float = 0.01,
    batch_size: int = 64,
) -> list[tuple[list[float], list[float]]]:
    """`cross_validate` of several ``(activations, labels, config)`` problems (e.g. one per
    site, or true and shuffled labels): one result per problem, each equal to its own
    `cross_validate` call. With the Newton solver, the folds of all problems of one shape and
    penalty are solved in one `_newton_many` call (each problem steps and stops on its own
    there) instead of one call per problem."""
    import torch

    results: list[tuple[list[float], list[float]] | None] = [None] * len(problems)
    groups: dict[tuple[Any, ...], list[tuple[int, _NewtonFolds]]] = {}
    for i, (activations, labels, config) in enumerate(problems):
        if config.solver != "newton":
            results[i] = cross_validate(
                activations,
                labels,
                config,
                folds=folds,
                epochs=epochs,
                lr=lr,
                batch_size=batch_size,
            )
            continue
        x, y, parts = _folds_of(activations, labels, config, folds)
        _check_training("cross_validate", epochs, lr, batch_size)
        folded = _NewtonFolds(x, y, config, parts)
        key = (tuple(folded.z.shape), float(config.weight_decay))
        groups.setdefault(key, []).append((i, folded))
    for (_, weight_decay), members in groups.items():
        z, mask, target = (torch.cat([f.inputs()[k] for _, f in members]) for k in range(3))
        w = _newton_many(z, mask, target, weight_decay, epochs)
        for j, (i, folded) in enumerate(members):
            results[i] = folded.scores(w[j * folds : (j + 1) * folds])
    return [r for r in results if r is not None]


def _folds_of(
    activations: Any, labels: Any, config: ProbeConfig, folds: int
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """The checked rows and labels and their stratified folds."""
    x, y = _check_xy(activations, labels, "cross_validate")
    if folds < 2:
        raise ParameterError(f"folds must be >= 2, got {folds}")
    if folds > len(y):
        raise InputError(f"{folds} folds need at least {folds} examples; got {len(y)}")
    return x, y, stratified_folds(y, folds, config.seed)


class _NewtonFolds:
    """`cross_validate` with the Newton solver, in two halves: the folds' standardised
    training rows padded into one batch of problems (`inputs`, for `_newton_many`), then each
    fold's probe set from its solution and measured as `ProbeFit.train` with ``held_out``
    measures it (`scores`)."""

    def __init__(
        self, x: torch.Tensor, y: torch.Tensor, config: ProbeConfig, parts: list[torch.Tensor]
    ) -> None:
        import torch

        self.fits, self.splits, inputs = [], [], []
        for k, test in enumerate(parts):
            train = torch.cat([p for j, p in enumerate(parts) if j != k])
            fit = ProbeFit(config, x.shape[1])
            xt, yt = x[train], y[train]
            _warn_if_one_class(yt, stacklevel=3)
            inputs.append((fit._standardise(xt).double(), yt.double()))
            self.fits.append(fit)
            self.splits.append((xt, yt, x[test], y[test]))
        width = max(len(t) for _, t in inputs)
        self.z = torch.zeros(len(parts), width, x.shape[1], dtype=torch.float64)
        self.target = torch.zeros(len(parts), width, dtype=torch.float64)
        self.mask = torch.zeros(len(parts), width, dtype=torch.float64)
        for k, (zk, yk) in enumerate(inputs):
            self.z[k, : len(yk)], self.target[k, : len(yk)] = zk.cpu(), yk
            self.mask[k, : len(yk)] = 1.0

    def inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.z, self.mask, self.target

    def scores(self, w: torch.Tensor) -> tuple[list[float], list[float]]:
        """Per fold, training and held-out AUROC of the probe with weights ``w[fold]``."""
        train_scores, test_scores = [], []
        for fit, wk, split in zip(self.fits, w, self.splits, strict=True):
            fit._set_linear(wk)
            m = fit._measure(*split)
            train_scores.append(m.train_auroc)
            test_scores.append(m.val_auroc)
        return train_scores, test_scores


# -- methods ------------------------------------------------------------------------------------
@dataclass
class ProbeReport(Result):
    """A probe on one site: k-fold held-out AUROC next to training AUROC, and the probe fitted on
    every example (``.probe``, an Artifact)."""

    backend: str
    site: str
    pool: str
    probe_type: str
    n_examples: int
    n_positive: int
    folds: int
    train_auroc: float
    heldout_auroc: float
    heldout_auroc_std: float
    heldout_auroc_folds: list[float] = field(default_factory=list)
    _probe: ProbeFit | None = field(default=None, repr=False, compare=False)

    @property
    def probe(self) -> ProbeFit:
        assert self._probe is not None
        return self._probe

    def to_markdown(self) -> str:
        return "\n".join(
            [
                f"## Probe on {self.site} ({self.backend})",
                "",
                "| probe | pool | examples (pos) | folds | train AUROC | held-out AUROC |",
                "|---|---|---|---|---|---|",
                f"| {self.probe_type} | {self.pool} | {self.n_examples} ({self.n_positive}) | "
                f"{self.folds} | {self.train_auroc:.3f} | {self.heldout_auroc:.3f} "
                f"± {self.heldout_auroc_std:.3f} |",
            ]
        )


def _std(values: Sequence[float]) -> float:
    import torch

    return float(torch.tensor(values, dtype=torch.float64).std(unbiased=False)) if values else 0.0


def _report(
    backend: Backend,
    site: str,
    x: torch.Tensor,
    y: torch.Tensor,
    options: ProbeOptions,
    *,
    fit_final: bool = True,
) -> ProbeReport:
    """The k-fold AUROCs of a probe on ``x``, and (``fit_final``) the probe fitted on every
    example; without it the report holds no probe (``_probe`` None)."""
    return _reports(backend, [(site, x, y)], options, fit_final=fit_final)[0]


def _reports(
    backend: Backend,
    problems: Sequence[tuple[str, torch.Tensor, torch.Tensor]],
    options: ProbeOptions,
    *,
    fit_final: bool = True,
) -> list[ProbeReport]:
    """`_report` of each ``(site, x, y)``, the k-fold probes of all cross-validated together
    (`cross_validate_many`): the same reports as one `_report` call each."""
    scores = cross_validate_many(
        [(x, y, options.config(site)) for site, x, y in problems],
        folds=options.folds,
        epochs=options.epochs,
        lr=options.lr,
        batch_size=options.batch_size,
    )
    return [
        _one_report(backend, site, x, y, options, train, held, fit_final)
        for (site, x, y), (train, held) in zip(problems, scores, strict=True)
    ]


def _one_report(
    backend: Backend,
    site: str,
    x: torch.Tensor,
    y: torch.Tensor,
    options: ProbeOptions,
    train: list[float],
    held: list[float],
    fit_final: bool,
) -> ProbeReport:
    config = options.config(site)
    final = None
    if fit_final:
        final = ProbeFit(config, x.shape[1])
        # The returned probe uses every example; its quality is the k-fold estimate above.
        final._fit_rows(x, y, options.epochs, options.lr, options.batch_size)
        final.fitted_on = ArtifactFit.of(backend, site)
    return ProbeReport(
        backend=backend.name,
        site=site,
        pool=config.pool,
        probe_type=config.probe_type,
        n_examples=len(y),
        n_positive=int(y.sum()),
        folds=options.folds,
        train_auroc=sum(train) / len(train),
        heldout_auroc=sum(held) / len(held),
        heldout_auroc_std=_std(held),
        heldout_auroc_folds=held,
        _probe=final,
    )


@method(
    "probe",
    "Linear or MLP probe on one site of a labelled dataset; k-fold held-out AUROC",
    requires={"residual"},
    input="dataset",
    quick={"folds": 2, "epochs": 5},
    options=ProbeParams,
)
def probe_method(backend: Backend, data: Dataset, options: ProbeParams) -> ProbeReport:
    """``probe``: fit a probe on one site (default: the middle layer's main site) of a
    labelled dataset; held-out AUROC by stratified k-fold."""
    dataset, labels = _labelled(data)
    name = backend.site_info(options.site or default_site(backend)).name
    x = pooled_activations(backend, dataset, [name], pool=options.pool)[name]
    return _report(backend, name, x, labels, options)


@dataclass
class ProbeSweep(Result):
    """One probe per site (layer), all fitted from one pass of the data through the model."""

    backend: str
    pool: str
    probe_type: str
    folds: int
    layers: list[ProbeReport] = field(default_factory=list)

    @property
    def best(self) -> ProbeReport:
        """The site with the highest held-out AUROC."""
        return max(self.layers, key=lambda r: r.heldout_auroc)

    def aurocs(self) -> dict[str, float]:
        return {r.site: r.heldout_auroc for r in self.layers}

    def to_markdown(self) -> str:
        rows = [
            f"| {r.site} | {r.train_auroc:.3f} | {r.heldout_auroc:.3f} ± "
            f"{r.heldout_auroc_std:.3f} |"
            for r in self.layers
        ]
        return "\n".join(
            [
                f"## Probe sweep ({self.backend}, {self.probe_type}, pool={self.pool}, "
                f"{self.folds}-fold)",
                "",
                "| site | train AUROC | held-out AUROC |",
                "|---|---|---|",
                *rows,
            ]
        )

    def figure(self) -> Any:
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * len(self.layers) + 2), 3.2))
        xs = list(range(len(self.layers)))
        held = [r.heldout_auroc for r in self.layers]
        ax.errorbar(
            xs,
            held,
            yerr=[r.heldout_auroc_std for r in self.layers],
            marker="o",
            capsize=3,
            label=f"held-out ({self.folds}-fold)",
        )
        ax.plot(
            xs,
            [r.train_auroc for r in self.layers],
            marker=".",
            linestyle="--",
            alpha=0.6,
            label="train",
        )
        ax.axhline(0.5, color="grey", linewidth=0.8, linestyle=":")
        ax.set_xticks(xs, [r.site for r in self.layers], rotation=45, ha="right")
        ax.set_ylim(0.0, 1.02)
        ax.set_ylabel("AUROC")
        ax.set_title(f"{self.probe_type} probe per layer ({self.backend})")
        ax.legend(loc="lower right")
        fig.tight_layout()
        return fig


@method(
    "probe-sweep",
    "A probe per layer from one pass of the data; held-out AUROC per layer",
    requires={"residual"},
    input="dataset",
    quick={"folds": 2, "epochs": 5},
    options=ProbeSweepParams,
)
def probe_sweep(backend: Backend, data: Dataset, options: ProbeSweepParams) -> ProbeSweep:
    """``probe-sweep``: a probe per layer (default: every layer's main site), every site
    captured in the same forward pass of each batch; held-out AUROC per layer."""
    dataset, labels = _labelled(data)
    names = [backend.site_info(s).name for s in (options.sites or backend.layer_names())]
    if not names:
        raise ParameterError(f"backend {backend.name!r} lists no per-layer sites; pass sites=")
    acts = pooled_activations(backend, dataset, names, pool=options.pool)
    out = ProbeSweep(
        backend=backend.name, pool=options.pool, probe_type=options.probe_type, folds=options.folds
    )
    # the k-fold probes of every site solved together: the same reports as one site at a time
    out.layers.extend(_reports(backend, [(n, acts[n], labels) for n in names], options))
    return out


def __getattr__(name: str) -> Any:
    # `Probe` is an nn.Module, so defining it imports torch; it is built on first use.
    if name == "Probe":
        from ._probe_net import Probe

        return Probe
    raise AttributeError(f"module 'archscope.methods.probes' has no attribute {name!r}")
