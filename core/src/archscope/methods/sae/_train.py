"""Training: shuffled minibatches from a buffer fed by a tensor or any iterable of activation
chunks, input normalisation, dead-feature tracking, AuxK, and fast steps for the TopK
variants (their encoder gradient and decoder touch only the active features)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F

from ...artifacts import ArtifactFit
from ...errors import InputError, ParameterError
from ._models import SAE, BatchTopKSAE, SAEConfig, build_sae, power_of_two_scale

#: what `fit_sae` trains on: one (n, d) tensor, an iterable of (n, d) chunks (re-iterable for
#: several epochs), or a function returning a fresh iterable on each call
ActivationSource = torch.Tensor | Iterable[Any] | Callable[[], Iterable[Any]]


# -- data -------------------------------------------------------------------------------------
def _as_rows(chunk: Any, dim: int) -> torch.Tensor:
    """An (n, dim) float tensor from a chunk: a tensor of any leading shape, or an object with
    a tensor ``activations`` mapping holding exactly one site (e.g. a `Collected` batch)."""
    if not isinstance(chunk, torch.Tensor):
        acts = getattr(chunk, "activations", None)
        if isinstance(acts, dict) and len(acts) == 1:
            chunk = next(iter(acts.values()))
        else:
            raise ParameterError(
                f"activation chunks must be tensors (n, {dim}); got {type(chunk).__name__}"
            )
    if chunk.shape[-1] != dim:
        raise ParameterError(
            f"activation chunks must end in the SAE's input_dim {dim}; got "
            f"shape {tuple(chunk.shape)}"
        )
    rows: torch.Tensor = chunk.reshape(-1, dim)
    if rows.is_floating_point():
        bad = int((~torch.isfinite(rows)).sum())
        if bad:
            n_rows = int((~torch.isfinite(rows)).any(-1).sum())
            raise InputError(
                f"the activations hold {bad} non-finite values (NaN or inf) in {n_rows} of "
                f"{len(rows)} rows: an SAE trained on them has NaN weights. Find where they "
                "come from (an fp16 overflow, an edit) or drop those rows before fitting"
            )
    return rows


def _epochs_of(source: ActivationSource, epochs: int) -> Iterator[Iterable[Any]]:
    """One iterable of chunks per epoch; a one-shot iterator allows one epoch only."""
    if callable(source) and not isinstance(source, torch.Tensor):
        for _ in range(epochs):
            yield source()
        return
    if isinstance(source, torch.Tensor):
        for _ in range(epochs):
            yield [source]
        return
    if iter(source) is source and epochs > 1:
        raise ParameterError(
            f"epochs={epochs} needs the activations several times, but a one-shot iterator "
            "was given; pass epochs=1, a list of chunks, or a function returning a fresh "
            "iterator (e.g. lambda: archscope.iter_collect(...))"
        )
    for _ in range(epochs):
        yield source


def _shuffled_batches(
    chunks: Iterable[Any], dim: int, batch_size: int, buffer_size: int, gen: torch.Generator
) -> Iterator[torch.Tensor]:
    """Minibatches drawn from a shuffled buffer of up to ``buffer_size`` rows; half the
    buffer is emitted whenever it fills, so rows of one chunk are spread over many batches."""
    pending: list[torch.Tensor] = []
    held = 0
    for chunk in chunks:
        rows = _as_rows(chunk, dim)
        if len(rows) == 0:
            continue
        pending.append(rows)
        held += len(rows)
        if held >= buffer_size:
            buf = torch.cat(pending)
            buf = buf[torch.randperm(len(buf), generator=gen)]
            n_out = max(batch_size, (len(buf) // 2) // batch_size * batch_size)
            for start in range(0, n_out, batch_size):
                yield buf[start : start + batch_size]
            pending, held = [buf[n_out:]], len(buf) - n_out
    if held:
        buf = torch.cat(pending)
        buf = buf[torch.randperm(len(buf), generator=gen)]
        for start in range(0, len(buf), batch_size):
            yield buf[start : start + batch_size]


def _tensor_batches(
    x: torch.Tensor, batch_size: int, gen: torch.Generator
) -> Iterator[torch.Tensor]:
    perm = torch.randperm(len(x), generator=gen)
    for start in range(0, len(x), batch_size):
        yield x.index_select(0, perm[start : start + batch_size].to(x.device))


# -- sparse pieces of the TopK steps --------------------------------------------------------
class _GatherPre(torch.autograd.Function):
    """Pre-activations at chosen features, ``pre[b, idx[b, j]]``, where
    ``pre = (x - b_dec) @ W_enc + b_enc``; the backward adds into only those columns of
    ``W_enc`` and entries of ``b_enc`` (a sparse product instead of a dense
    (batch x features) one)."""

    @staticmethod
    def forward(
        ctx: Any,
        pre: torch.Tensor,
        idx: torch.Tensor,
        xc: torch.Tensor,
        w_enc: torch.Tensor,
        b_enc: torch.Tensor,
        b_dec: torch.Tensor,
    ) -> torch.Tensor:
        ctx.save_for_backward(idx, xc, w_enc)
        return pre.gather(1, idx)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> Any:
        (grad,) = grads
        idx, xc, w_enc = ctx.saved_tensors
        n_feat = w_enc.shape[1]
        flat_idx = idx.reshape(-1)
        g = grad.reshape(-1).contiguous()
        grad_w = None
        if ctx.needs_input_grad[3]:
            rows = torch.arange(idx.shape[0], device=idx.device).repeat_interleave(idx.shape[1])
            sparse = torch.sparse_coo_tensor(
                torch.stack([flat_idx, rows]), g, (n_feat, idx.shape[0]), check_invariants=False
            )
            grad_w = torch.sparse.mm(sparse, xc).t()  # (d, features), feature-major like W_enc
        per_feature = torch.zeros(n_feat, dtype=g.dtype, device=g.device).index_add_(0, flat_idx, g)
        grad_b_dec = -(w_enc @ per_feature) if ctx.needs_input_grad[5] else None
        return None, None, None, grad_w, per_feature, grad_b_dec


def _sparse_decode(idx: torch.Tensor, vals: torch.Tensor, w_dec: torch.Tensor) -> torch.Tensor:
    """``sum_j vals[b, j] * W_dec[idx[b, j]]`` without a dense (batch x features) matrix."""
    return F.embedding_bag(idx, w_dec, per_sample_weights=vals, mode="sum")


# -- the trainer ------------------------------------------------------------------------------
class _Adam:
    """Adam (Kingma & Ba), updating the parameters in place. The few SAE tensors need none of
    `torch.optim`'s machinery, whose first import costs seconds."""

    def __init__(
        self,
        params: list[torch.nn.Parameter],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        self.params = params
        self.lr, (self.b1, self.b2), self.eps = lr, betas, eps
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.t = 0

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        step_size = self.lr * math.sqrt(1 - self.b2**self.t) / (1 - self.b1**self.t)
        eps = self.eps * math.sqrt(1 - self.b2**self.t)
        for p, m, v in zip(self.params, self.m, self.v, strict=True):
            if p.grad is None:
                continue
            m.lerp_(p.grad, 1 - self.b1)
            v.mul_(self.b2).addcmul_(p.grad, p.grad, value=1 - self.b2)
            p.addcdiv_(m, v.sqrt().add_(eps), value=-step_size)


class _Trainer:
    """Holds the optimizer and running statistics of one `fit_sae` call."""

    def __init__(self, sae: SAE, device: torch.device) -> None:
        self.sae = sae
        self.cfg = sae.cfg
        self.device = device
        self.opt = _Adam(list(sae.parameters()), float(self.cfg.learning_rate))
        self.since_fired = torch.zeros(sae.n_features, dtype=torch.long, device=device)
        self.dead_window = self.cfg.dead_window()
        self.aux_k = int(self.cfg.aux_k) if self.cfg.aux_k else max(1, sae.input_dim // 2)
        self.sparse = sae.sae_type in ("topk", "batchtopk")
        self.reset_stats()

    def reset_stats(self) -> None:
        self.stats = torch.zeros(5, dtype=torch.float64, device=self.device)
        # sse, centred sum of squares, l1, active count, inputs

    def step(self, x: torch.Tensor, record: bool) -> None:
        sae = self.sae
        xn = x.to(device=self.device, dtype=sae.W_dec.dtype, non_blocking=True) * sae.input_scale
        for p in self.opt.params:
            p.grad = None
        target = sae.training_target(xn)  # xn itself, except for a transcoder's rows
        if self.sparse:
            loss, recon, fired, l1, l0 = self._sparse_forward(xn)
        else:
            loss, recon, fired, l1, l0 = self._dense_forward(xn, target)
        loss.backward()
        if sae.unit_decoder:
            with torch.no_grad():  # no gradient along a row: it would only change its norm
                w, g = sae.W_dec, sae.W_dec.grad
                if g is not None:
                    g.sub_((g * w).sum(1, keepdim=True) * w)
        self.opt.step()
        if sae.unit_decoder:
            sae.normalize_decoder()
        with torch.no_grad():
            self.since_fired.add_(len(x))
            self.since_fired.masked_fill_(fired, 0)
            if record:
                err = (recon - target).pow(2).sum()
                centred = (target - target.mean(0)).pow(2).sum()
                self.stats += torch.stack(
                    [
                        err.double(),
                        centred.double(),
                        l1.double(),
                        l0.double(),
                        torch.tensor(float(len(x)), dtype=torch.float64),
                    ]
                )

    def _dense_forward(self, xn: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, ...]:
        sae = self.sae
        z = sae.activate(sae.pre_activations(xn))  # relu for the dense and rank-1 SAEs
        recon = sae.decode_normalized(z)
        mse = (recon - target).pow(2).sum(-1).mean()
        l1 = z @ sae.W_dec.norm(dim=1)
        loss = mse + self.cfg.sparsity * l1.mean()
        active = z > 0
        return (loss, recon.detach(), active.any(0), z.detach().sum(), active.sum())

    def _sparse_forward(self, xn: torch.Tensor) -> tuple[torch.Tensor, ...]:
        sae = self.sae
        with torch.no_grad():
            xc = xn - sae.b_dec
            pre = torch.addmm(sae.b_enc, xc, sae.W_enc)
        enc = (xc, sae.W_enc, sae.b_enc, sae.b_dec)
        if isinstance(sae, BatchTopKSAE):
            idx, keep = self._batch_topk(pre)
            vals = _GatherPre.apply(pre, idx, *enc).relu() * keep
        else:
            k = min(int(self.cfg.k), sae.n_features)
            idx = pre.topk(k, dim=1, sorted=False).indices
            vals = _GatherPre.apply(pre, idx, *enc).relu()
        recon = _sparse_decode(idx, vals, sae.W_dec) + sae.b_dec
        loss = (recon - xn).pow(2).sum(-1).mean()
        with torch.no_grad():
            active = vals > 0
            fired = torch.zeros(sae.n_features, dtype=torch.bool, device=xn.device)
            fired[idx[active]] = True
            dead = self.since_fired >= self.dead_window
            n_dead = int(dead.sum())
        if n_dead and self.cfg.aux_coefficient > 0:
            # AuxK: the most active dead features reconstruct what the live ones missed
            k_aux = min(self.aux_k, n_dead)
            with torch.no_grad():  # top k_aux among the dead columns only
                dead_idx = dead.nonzero().squeeze(1)
                top = pre.index_select(1, dead_idx).topk(k_aux, dim=1, sorted=False).indices
                aux_idx = dead_idx[top]
                residual = (xn - recon).detach()
            aux_vals = _GatherPre.apply(pre, aux_idx, *enc).relu()
            aux = (_sparse_decode(aux_idx, aux_vals, sae.W_dec) - residual).pow(2).sum(-1).mean()
            loss = loss + self.cfg.aux_coefficient * aux
        return loss, recon.detach(), fired, vals.detach().sum(), active.sum()

    def _batch_topk(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices (n, m) and a keep-mask of the ``k * n`` largest positive pre-activations of
        the batch. Candidates are each row's top ``4k``; when a row might hold more of the
        batch's top than that, all features are candidates (so the result is exact)."""
        sae = self.sae
        assert isinstance(sae, BatchTopKSAE)
        n, n_feat = pre.shape
        n_keep = min(n * n_feat, max(1, round(float(self.cfg.k) * n)))
        m = min(n_feat, max(1, math.ceil(4 * float(self.cfg.k))))
        cand, idx = pre.topk(m, dim=1, sorted=False)
        kth = cand.relu().flatten().topk(n_keep, sorted=False).values.min()
        if m < n_feat and bool((cand.min(1).values >= kth).any()):
            cand, idx = pre, torch.arange(n_feat, device=pre.device).expand(n, n_feat)
        keep = (cand >= kth) & (cand > 0)
        if float(kth) > 0:  # running estimate of the inference threshold
            lr = float(self.cfg.threshold_lr)
            sae.threshold.mul_(1 - lr).add_(lr * kth)
        return idx, keep

    def metrics(self) -> dict[str, float]:
        sse, centred, l1, l0, n = (float(v) for v in self.stats)
        n = max(n, 1.0)
        scale2 = float(self.sae.input_scale) ** 2
        dead = float((self.since_fired >= self.dead_window).float().mean())
        return {
            "recon": sse / n / self.sae.input_dim / scale2,
            "mse": sse / n / self.sae.input_dim / scale2,
            "explained_variance": 1.0 - sse / centred if centred > 0 else float("nan"),
            "l1": l1 / n,
            "n_active": l0 / n,
            "l0": l0 / n,
            "dead_fraction": dead,
        }


@torch.no_grad()
def _initialise(sae: SAE, sample: torch.Tensor) -> None:
    """Input scale (a power of two) and decoder bias from a sample of activations."""
    sample = sample.to(sae.W_dec.device, sae.W_dec.dtype)
    if sae.cfg.normalize and len(sample):
        sae.input_scale.fill_(power_of_two_scale(float(sample.pow(2).sum(-1).mean())))
    if sae.has_biases and len(sample):
        sae.b_dec.copy_(sample.mean(0) * sae.input_scale)


def fit_sae(
    activations: ActivationSource,
    config: SAEConfig,
    epochs: int = 100,
    device: str = "cpu",
    *,
    sae: SAE | None = None,
    progress: Callable[[int, dict[str, float]], None] | None = None,
    fitted_on: ArtifactFit | None = None,
) -> SAE:
    """Train an SAE of ``config.sae_type`` on activations and return it.

    ``activations``: an (n, input_dim) tensor (any leading shape is flattened), an iterable of
    such chunks (e.g. `archscope.iter_collect` batches of one site, or an activation store),
    or a function returning a fresh iterable per epoch. Chunks pass through a shuffle buffer
    of ``config.buffer_size`` rows, so the whole data never has to be in memory. ``sae``:
    continue training an existing SAE instead of a new one. ``progress(epoch, metrics)`` is
    called after each epoch. The returned SAE's ``last_metrics`` summarise the last epoch:
    recon (= mse, per element, raw activation space), l1, n_active (= l0, mean active
    features per input), explained_variance, dead_fraction.

    ``fitted_on`` (`archscope.ArtifactFit.of(backend, site)`) records where the activations
    come from, so that the saved SAE refuses another model on load; a `StoreReader` of an
    activation store records it by itself. Non-finite activations are refused.
    """
    if not isinstance(epochs, int) or epochs < 1:
        raise ParameterError(f"epochs must be an int >= 1, got {epochs!r}")
    if config.batch_size < 1:
        raise ParameterError(f"batch_size must be >= 1, got {config.batch_size}")
    dev = torch.device(device)
    model = sae if sae is not None else build_sae(config)
    model.to(dev)
    model.train()
    gen = torch.Generator().manual_seed(int(config.seed))
    dim = model.input_dim
    epoch_sources = _epochs_of(activations, epochs)
    first = next(epoch_sources)
    # the first buffer-full of rows initialises scale and bias; it is then trained on as usual
    if isinstance(activations, torch.Tensor):
        rows = _as_rows(activations, dim)
        pick = torch.randperm(len(rows), generator=gen)[: config.buffer_size].to(rows.device)
        sample = rows.index_select(0, pick)
        first_chunks: Iterable[Any] = first
    else:
        it = iter(first)
        head: list[torch.Tensor] = []
        for chunk in it:
            head.append(_as_rows(chunk, dim))
            if sum(len(h) for h in head) >= config.buffer_size:
                break
        sample = torch.cat(head) if head else torch.zeros(0, dim)
        first_chunks = itertools.chain(head, it)
    if len(sample) == 0:
        raise ParameterError("fit_sae got no activations (an empty tensor or iterable)")
    if sae is None:
        _initialise(model, sample)
    trainer = _Trainer(model, dev)
    for epoch in range(epochs):
        chunks = first_chunks if epoch == 0 else next(epoch_sources)
        record = epoch == epochs - 1
        trainer.reset_stats()
        if isinstance(activations, torch.Tensor):
            batches = _tensor_batches(_as_rows(activations, dim), config.batch_size, gen)
        else:
            batches = _shuffled_batches(chunks, dim, config.batch_size, config.buffer_size, gen)
        for batch in batches:
            trainer.step(batch, record)
        if progress is not None:
            progress(epoch, trainer.metrics())
    model.last_metrics = trainer.metrics()
    model.eval()
    _record_fit(model, fitted_on if fitted_on is not None else _store_fit(activations, dim))
    return model


def _record_fit(model: SAE, fit: ArtifactFit | None) -> None:
    if fit is not None:
        model.fitted_on = fit
        model.site = fit.site


def _store_fit(activations: Any, dim: int) -> ArtifactFit | None:
    """Where the activations of a `StoreReader` were extracted (None for other sources)."""
    store, site = getattr(activations, "store", None), getattr(activations, "site", None)
    manifest = getattr(store, "manifest", None)
    record = getattr(manifest, "model", None)
    if not isinstance(record, dict) or not isinstance(site, str) or not record.get("backend"):
        return None
    model = {k: record.get(k) for k in ("class", "config_hash", "n_params")}
    return ArtifactFit(backend=str(record["backend"]), site=site, dim=dim, model=model)
