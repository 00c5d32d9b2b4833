"""Training: shuffled minibatches from a buffer fed by a tensor or any iterable of activation
chunks, input normalisation, dead-feature tracking, AuxK, and fast steps for the TopK
variants (their encoder gradient and decoder touch only the active features)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

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


def _site_rows(chunk: Any, site: str | None, dim: int) -> torch.Tensor:
    """The (n, dim) rows of ``site`` in a chunk; ``site`` None: the chunk is one site's
    activations (a tensor, or a one-site `Collected`)."""
    if site is None:
        return _as_rows(chunk, dim)
    acts = getattr(chunk, "activations", chunk)
    if not isinstance(acts, Mapping) or site not in acts:
        held = sorted(acts) if isinstance(acts, Mapping) else type(chunk).__name__
        raise ParameterError(
            f"a dictionary reads site {site!r}, but a chunk of the activations holds {held}; "
            "collect every site the dictionaries read (e.g. iter_collect(backend, data, "
            "sites)) or give a mapping site -> tensor"
        )
    return _as_rows(acts[site], dim)


class _Feed:
    """One job's minibatches: its own seeded generator and shuffle buffer, so what a job is
    fed does not depend on which other jobs train beside it.

    From chunks, rows gather in a buffer of up to ``buffer_size`` rows; half the buffer is
    emitted whenever it fills, so rows of one chunk are spread over many batches. From whole
    tensors, each epoch is one permutation of all rows."""

    def __init__(self, job: DictionaryJob) -> None:
        self.job = job
        self.gen = torch.Generator().manual_seed(int(job.seed))
        self.pending: list[tuple[torch.Tensor, ...]] = []
        self.held = 0

    def rows(self, chunk: Any) -> tuple[torch.Tensor, ...]:
        rows = tuple(
            _site_rows(chunk, site, dim)
            for site, dim in zip(self.job.reads, self.job.dims, strict=True)
        )
        if len({len(r) for r in rows}) > 1:
            raise ParameterError(
                f"a dictionary reading {list(self.job.reads)} needs as many rows of each site "
                f"per chunk, got {[len(r) for r in rows]}: read sites of the same kind "
                "(token sites with token sites)"
            )
        return rows

    def push(self, rows: tuple[torch.Tensor, ...]) -> Iterator[tuple[torch.Tensor, ...]]:
        if len(rows[0]) == 0:
            return
        self.pending.append(rows)
        self.held += len(rows[0])
        size, batch = self.job.buffer_size, self.job.batch_size
        if self.held >= size:
            buf = self._shuffled()
            n_out = max(batch, (len(buf[0]) // 2) // batch * batch)
            for start in range(0, n_out, batch):
                yield tuple(b[start : start + batch] for b in buf)
            self.pending = [tuple(b[n_out:] for b in buf)]
            self.held = len(buf[0]) - n_out

    def flush(self) -> Iterator[tuple[torch.Tensor, ...]]:
        if self.held:
            buf = self._shuffled()
            for start in range(0, len(buf[0]), self.job.batch_size):
                yield tuple(b[start : start + self.job.batch_size] for b in buf)
        self.pending, self.held = [], 0

    def _shuffled(self) -> tuple[torch.Tensor, ...]:
        buf = tuple(torch.cat(parts) for parts in zip(*self.pending, strict=True))
        perm = torch.randperm(len(buf[0]), generator=self.gen)
        return tuple(b[perm] for b in buf)

    def sample(self, rows: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """Up to ``buffer_size`` random rows of whole tensors (the initialisation sample)."""
        pick = torch.randperm(len(rows[0]), generator=self.gen)[: self.job.buffer_size]
        return tuple(r.index_select(0, pick.to(r.device)) for r in rows)

    def permuted(self, rows: tuple[torch.Tensor, ...]) -> Iterator[tuple[torch.Tensor, ...]]:
        """One epoch over whole tensors: a permutation of all rows, in minibatches."""
        perm = torch.randperm(len(rows[0]), generator=self.gen)
        for start in range(0, len(rows[0]), self.job.batch_size):
            part = perm[start : start + self.job.batch_size]
            yield tuple(r.index_select(0, part.to(r.device)) for r in rows)


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


@runtime_checkable
class DictionaryJob(Protocol):
    """One dictionary that `train_dictionaries` trains: what it reads and how it steps.

    ``reads`` names the sites a batch holds, in order (None: the activations are one site's,
    unnamed), ``dims`` their widths; a batch is a tuple of aligned (batch_size, dim) tensors,
    one per read site (a transcoder reads its input and its output site). ``batch_size``,
    ``buffer_size`` and ``seed`` fix the job's own minibatches: the trainer shuffles each job's
    rows with a generator seeded by ``seed``, so a job gets the same batches whether it trains
    alone or beside others. ``start(sample, device)`` is called once, before any step, with
    up to ``buffer_size`` rows (initialise scales and biases from it); ``begin_epoch()`` at the
    start of each epoch; ``step(batch, record)`` per minibatch (``record``: the last epoch,
    whose statistics ``metrics()`` reports); ``finish()`` once at the end returns the
    trained dictionary."""

    @property
    def reads(self) -> tuple[str | None, ...]: ...

    @property
    def dims(self) -> tuple[int, ...]: ...

    batch_size: int
    buffer_size: int
    seed: int

    def start(self, sample: tuple[torch.Tensor, ...], device: torch.device) -> None: ...

    def begin_epoch(self) -> None: ...

    def step(self, batch: tuple[torch.Tensor, ...], record: bool) -> None: ...

    def metrics(self) -> dict[str, float]: ...

    def finish(self) -> Any: ...


class SAEJob:
    """An SAE of ``config`` on ``site`` (None: unnamed activations) as a `DictionaryJob`;
    ``sae`` continues training an existing SAE (its own hyper-parameters train it, ``config``
    gives the batches)."""

    def __init__(
        self,
        site: str | None,
        config: SAEConfig,
        *,
        sae: SAE | None = None,
        fitted_on: ArtifactFit | None = None,
    ) -> None:
        if not isinstance(config, SAEConfig):
            raise ParameterError(
                f"an SAE job takes an SAEConfig, got {type(config).__name__}; build one with "
                "SAEConfig(input_dim=..., n_features=..., ...)"
            )
        self.site = site
        self.config = config
        self.continued = sae is not None
        self.sae = sae if sae is not None else build_sae(config)
        self.fitted_on = fitted_on
        self.reads: tuple[str | None, ...] = (site,)
        self.dims: tuple[int, ...] = (self.sae.input_dim,)
        self.batch_size = int(config.batch_size)
        self.buffer_size = int(config.buffer_size)
        self.seed = int(config.seed)
        self.trainer: _Trainer | None = None

    def start(self, sample: tuple[torch.Tensor, ...], device: torch.device) -> None:
        self.sae.to(device)
        self.sae.train()
        if not self.continued:
            _initialise(self.sae, sample[0])
        self.trainer = _Trainer(self.sae, device)

    def _running(self) -> _Trainer:
        if self.trainer is None:
            raise ParameterError(
                "SAEJob.start(sample, device) must be called before its steps (train_dictionaries "
                "does so); a job cannot train before it is initialised"
            )
        return self.trainer

    def begin_epoch(self) -> None:
        self._running().reset_stats()

    def step(self, batch: tuple[torch.Tensor, ...], record: bool) -> None:
        self._running().step(batch[0], record)

    def metrics(self) -> dict[str, float]:
        return self._running().metrics()

    def finish(self) -> SAE:
        self.sae.last_metrics = self.metrics()
        self.sae.eval()
        _record_fit(self.sae, self.fitted_on)
        return self.sae


_END = object()


def _whole(source: Any) -> Any:
    """``source`` when it holds all activations at once (a tensor, a mapping site -> tensor,
    a `Collected`), else None (an iterable of chunks or a function returning one)."""
    if isinstance(source, torch.Tensor):
        return source
    acts = getattr(source, "activations", source)
    if isinstance(acts, Mapping) and all(isinstance(v, torch.Tensor) for v in acts.values()):
        return source
    return None


def train_dictionaries(
    source: Any,
    jobs: Sequence[DictionaryJob],
    epochs: int = 1,
    device: str | torch.device = "cpu",
    *,
    progress: Callable[[int, list[dict[str, float]]], None] | None = None,
) -> list[Any]:
    """Train every job from one pass over ``source`` per epoch; one result per job, in order.

    ``source``: all activations at once (a tensor for jobs reading unnamed activations, a
    mapping site -> tensor or a `Collected` for jobs naming sites) or chunks of them (an
    iterable, re-iterable for several epochs, or a function returning a fresh one per epoch),
    each chunk a tensor, a mapping site -> tensor or a `Collected` batch. Each chunk is read
    once and handed to every job; each job shuffles and batches its rows with its own seeded
    generator, so its result equals training it alone on the same source.
    ``progress(epoch, [metrics per job])`` is called after each epoch."""
    jobs = _checked_jobs(jobs, epochs)
    dev = torch.device(device)
    feeds = [_Feed(job) for job in jobs]
    whole = _whole(source)
    if whole is not None:
        rows = [feed.rows(whole) for feed in feeds]
        samples = [feed.sample(r) for feed, r in zip(feeds, rows, strict=True)]
    else:
        epoch_sources = _epochs_of(source, epochs)
        samples, first_chunks = _head(iter(next(epoch_sources)), feeds)
    for job, sample in zip(jobs, samples, strict=True):
        if len(sample[0]) == 0:
            where = "" if job.reads == (None,) else f" of {', '.join(map(str, job.reads))}"
            raise ParameterError(
                f"a dictionary got no activations{where} (an empty tensor or iterable)"
            )
        job.start(sample, dev)
    for epoch in range(epochs):
        for job in jobs:
            job.begin_epoch()
        if whole is not None:
            _epoch(feeds, rows, None, record=epoch == epochs - 1)
        else:
            chunks = first_chunks if epoch == 0 else next(epoch_sources)
            _epoch(feeds, None, chunks, record=epoch == epochs - 1)
        if progress is not None:
            progress(epoch, [job.metrics() for job in jobs])
    return [job.finish() for job in jobs]


def _epoch(
    feeds: list[_Feed],
    rows: list[tuple[torch.Tensor, ...]] | None,
    chunks: Iterable[Any] | None,
    record: bool,
) -> None:
    """One epoch of every job: over whole tensors (``rows`` per job), or over ``chunks``,
    each chunk read once and handed to every job."""
    if rows is not None:
        for feed, r in zip(feeds, rows, strict=True):
            for batch in feed.permuted(r):
                feed.job.step(batch, record)
        return
    assert chunks is not None
    for chunk in chunks:
        for feed in feeds:
            for batch in feed.push(feed.rows(chunk)):
                feed.job.step(batch, record)
    for feed in feeds:
        for batch in feed.flush():
            feed.job.step(batch, record)


def _checked_jobs(jobs: Sequence[DictionaryJob], epochs: int) -> list[DictionaryJob]:
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ParameterError(f"epochs must be an int >= 1, got {epochs!r}")
    jobs = list(jobs)
    if not jobs:
        raise ParameterError("no dictionary jobs were given: pass at least one (e.g. SAEJob)")
    for job in jobs:
        if not isinstance(job, DictionaryJob):
            raise ParameterError(
                f"{type(job).__name__} is not a dictionary job: it needs reads, dims, "
                "batch_size, buffer_size, seed and start/begin_epoch/step/metrics/finish "
                "(see DictionaryJob)"
            )
        if job.batch_size < 1:
            raise ParameterError(f"batch_size must be >= 1, got {job.batch_size}")
    return jobs


def _head(
    it: Iterator[Any], feeds: list[_Feed]
) -> tuple[list[tuple[torch.Tensor, ...]], Iterable[Any]]:
    """Each job's initialisation sample (the rows of the first chunks that give it
    ``buffer_size`` rows), and the first epoch's chunks, those read here included."""
    head: list[Any] = []
    parts: list[list[tuple[torch.Tensor, ...]]] = [[] for _ in feeds]
    counts = [0] * len(feeds)
    while any(c < feed.job.buffer_size for c, feed in zip(counts, feeds, strict=True)):
        chunk = next(it, _END)
        if chunk is _END:
            break
        head.append(chunk)
        for i, feed in enumerate(feeds):
            if counts[i] < feed.job.buffer_size:
                got = feed.rows(chunk)
                parts[i].append(got)
                counts[i] += len(got[0])
    samples = [
        tuple(torch.cat(p) for p in zip(*part, strict=True))
        if part
        else tuple(torch.zeros(0, d) for d in feed.job.dims)
        for part, feed in zip(parts, feeds, strict=True)
    ]
    return samples, itertools.chain(head, it)


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
    activation store records it by itself. Non-finite activations are refused. This is
    `train_dictionaries` with one job; several SAEs over one pass: `train_saes`.
    """
    if not isinstance(epochs, int) or epochs < 1:
        raise ParameterError(f"epochs must be an int >= 1, got {epochs!r}")
    if config.batch_size < 1:
        raise ParameterError(f"batch_size must be >= 1, got {config.batch_size}")
    job = SAEJob(None, config, sae=sae)
    job.fitted_on = (
        fitted_on if fitted_on is not None else _store_fit(activations, job.sae.input_dim)
    )
    each = None if progress is None else (lambda epoch, metrics: progress(epoch, metrics[0]))
    trained: SAE = train_dictionaries(activations, [job], epochs, device, progress=each)[0]
    return trained


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
