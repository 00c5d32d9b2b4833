"""Probe transfer between architectures: a closed-form ridge map between two models'
activations on the same texts, the transport of a linear probe through it, and the comparison of
in-architecture against transferred held-out AUROC."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal

from ..backends import Backend
from ..data import Dataset
from ..errors import InputError, ParameterError
from ..legacy import as_backend
from ..params import Param
from ..registry import method
from ..results import Result
from .probes import (
    ProbeConfig,
    ProbeFit,
    _labelled,
    auroc,
    default_site,
    pooled_activations,
    stratified_split,
)

if TYPE_CHECKING:  # torch is imported when something is computed: `archscope info` stays light
    import torch


@dataclass
class Alignment:
    """An affine map from target activations into the source space, fitted by ridge
    regression: ``source ≈ (target - target_mean) @ matrix + source_mean``. ``matrix`` is
    (d_target, d_source); ``r2`` the fraction of source variance it explains on its fit data."""

    matrix: torch.Tensor
    source_mean: torch.Tensor
    target_mean: torch.Tensor
    ridge: float
    r2: float

    def __call__(self, target_acts: torch.Tensor) -> torch.Tensor:
        """Target activations (N, d_target) mapped into the source space (N, d_source)."""
        import torch

        t = torch.as_tensor(target_acts).float()
        if t.dim() != 2 or t.shape[1] != self.matrix.shape[0]:
            raise InputError(
                f"this alignment maps (n, {self.matrix.shape[0]}) target "
                f"activations; got shape {tuple(t.shape)}"
            )
        return (t - self.target_mean) @ self.matrix + self.source_mean

    @property
    def shape(self) -> torch.Size:
        return self.matrix.shape


def _pair(src_acts: Any, tgt_acts: Any) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    s = torch.as_tensor(src_acts)
    t = torch.as_tensor(tgt_acts)
    if s.dim() != 2 or t.dim() != 2:
        raise InputError(
            f"alignment needs (n_texts, features) activations on both sides; got "
            f"{tuple(s.shape)} and {tuple(t.shape)} (pool token sites first)"
        )
    if s.shape[0] != t.shape[0]:
        raise InputError(
            f"alignment needs the same texts on both sides: {s.shape[0]} source rows"
            f" but {t.shape[0]} target rows"
        )
    if s.shape[0] < 2:
        raise InputError("alignment needs at least two texts")
    if not (bool(torch.isfinite(s).all()) and bool(torch.isfinite(t).all())):
        raise InputError("alignment: activations contain NaN or infinite values")
    return s.double().cpu(), t.double().cpu()


def fit_alignment(
    src_acts: torch.Tensor, tgt_acts: torch.Tensor, ridge: float = 0.001
) -> Alignment:
    """Ridge regression of source activations on target activations of the same texts (row i
    of each is text i), in closed form: ``(Tc'Tc + ridge·I)⁻¹ Tc'Sc`` on centred data. The
    result maps target activations into the source space, which is the direction a source
    probe needs in order to read target activations (`transfer_probe`)."""
    import torch

    if not ridge >= 0:
        raise ParameterError(f"ridge must be >= 0, got {ridge}")
    s, t = _pair(src_acts, tgt_acts)
    s_mean, t_mean = s.mean(0), t.mean(0)
    sc, tc = s - s_mean, t - t_mean
    gram = tc.T @ tc + ridge * torch.eye(tc.shape[1], dtype=tc.dtype)
    try:
        matrix = torch.linalg.solve(gram, tc.T @ sc)
    except RuntimeError:  # singular with ridge=0 (fewer texts than features): least squares
        matrix = torch.linalg.lstsq(tc, sc).solution
    residual = sc - tc @ matrix
    total = float((sc**2).sum())
    r2 = 1.0 - float((residual**2).sum()) / total if total > 0 else 1.0
    return Alignment(
        matrix=matrix.float(),
        source_mean=s_mean.float(),
        target_mean=t_mean.float(),
        ridge=float(ridge),
        r2=r2,
    )


def learn_alignment(
    src_acts: torch.Tensor, tgt_acts: torch.Tensor, ridge: float = 0.001
) -> torch.Tensor:
    """0.2's alignment: the (d_source, d_target) matrix ``M`` of the ridge regression of source
    activations on target activations of the same texts, without offsets, so that
    ``tgt_acts @ M.T`` approximates ``src_acts``: ``M.T = (T'T + ridge·I)⁻¹ T'S``. Pass it to
    `transfer_probe` as it is. `fit_alignment` fits the affine map (with means) and returns it
    as an `Alignment`."""
    import torch

    if not ridge >= 0:
        raise ParameterError(f"ridge must be >= 0, got {ridge}")
    s, t = _pair(src_acts, tgt_acts)
    gram = t.T @ t + ridge * torch.eye(t.shape[1], dtype=t.dtype)
    try:
        m_t = torch.linalg.solve(gram, t.T @ s)
    except RuntimeError:  # singular with ridge=0 (fewer texts than features): least squares
        m_t = torch.linalg.lstsq(t, s).solution
    matrix: torch.Tensor = m_t.T.float().contiguous()
    return matrix


def transfer_probe(
    probe_weights_source: torch.Tensor,
    probe_bias_source: torch.Tensor,
    alignment: Alignment | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A source-space linear probe (logit = s·w + b) as a target-space probe (logit = t·w' + b')
    through ``alignment``: an `Alignment` (`fit_alignment`), or 0.2's (d_source, d_target)
    matrix ``M`` (`learn_alignment`: source ≈ target @ M.T, no offsets). Returns ``(weights,
    bias)``."""
    import torch

    w = torch.as_tensor(probe_weights_source).float().flatten().cpu()
    b = torch.as_tensor(probe_bias_source).float().reshape(-1).cpu()
    if b.numel() != 1:
        raise InputError(f"probe bias must be one number, got shape {tuple(b.shape)}")
    if isinstance(alignment, Alignment):
        matrix, s_mean, t_mean = alignment.matrix, alignment.source_mean, alignment.target_mean
    else:
        given = torch.as_tensor(alignment).float().cpu()
        if given.dim() != 2:
            raise InputError(
                f"alignment must be an Alignment or a (d_source, d_target) matrix, "
                f"got shape {tuple(given.shape)}"
            )
        if given.shape[0] != w.numel() and given.shape[1] == w.numel():
            raise InputError(
                f"a bare alignment matrix is (d_source, d_target) as learn_alignment returns "
                f"it (source ≈ target @ M.T); got {tuple(given.shape)} for a probe with "
                f"{w.numel()} weights: pass its transpose"
            )
        matrix = given.T  # (d_target, d_source), as Alignment.matrix
        s_mean = torch.zeros(matrix.shape[1])
        t_mean = torch.zeros(matrix.shape[0])
    if matrix.shape[1] != w.numel():
        raise InputError(
            f"the probe has {w.numel()} weights but the alignment maps into a "
            f"{matrix.shape[1]}-dimensional source space"
        )
    # logit = w·((t - μt) M + μs) + b = (M w)·t + (b + w·μs - (M w)·μt)
    w_target = matrix @ w
    b_target = b[0] + w @ s_mean - w_target @ t_mean
    return w_target, b_target


def auroc_from_scores(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """AUROC of ``scores`` for 0/1 ``labels`` (ties count half; one class: 0.5 with a
    warning)."""
    return auroc(scores, labels)


@dataclass
class TransferResult(Result):
    """In-architecture against transferred held-out AUROC. ``transfer_drop`` is the source
    probe's own held-out AUROC minus its AUROC once transported to the target;
    ``target_gap`` is a probe trained on the target minus the transported one."""

    source_arch: str
    target_arch: str
    source_layer: str
    target_layer: str
    n_align_pairs: int
    baseline_source_auroc: float
    baseline_target_auroc: float
    transfer_auroc: float
    transfer_drop: float
    target_gap: float = 0.0
    alignment_r2: float = 0.0
    n_train: int = 0
    n_test: int = 0
    pool: str = "mean"

    def to_markdown(self) -> str:
        return "\n".join(
            [
                f"## Probe transfer {self.source_arch}:{self.source_layer} → "
                f"{self.target_arch}:{self.target_layer}",
                "",
                "| source probe on source | target probe on target | source probe transported "
                "| drop | alignment R² |",
                "|---|---|---|---|---|",
                f"| {self.baseline_source_auroc:.3f} | {self.baseline_target_auroc:.3f} | "
                f"{self.transfer_auroc:.3f} | {self.transfer_drop:+.3f} | {self.alignment_r2:.3f} |",
                "",
                f"{self.n_align_pairs} alignment texts, {self.n_train} training and "
                f"{self.n_test} held-out texts, pooling: {self.pool}.",
            ]
        )


def _compare(
    source_name: str,
    target_name: str,
    source_site: str,
    target_site: str,
    s_align: torch.Tensor,
    t_align: torch.Tensor,
    s_train: torch.Tensor,
    t_train: torch.Tensor,
    y_train: torch.Tensor,
    s_test: torch.Tensor,
    t_test: torch.Tensor,
    y_test: torch.Tensor,
    *,
    ridge: float,
    seed: int,
    epochs: int,
    lr: float,
    batch_size: int,
    pool: str,
) -> TransferResult:
    """The transfer comparison on pooled activations (rows of a side's tensors are texts)."""
    config = ProbeConfig(probe_type="linear", pool=pool, seed=seed)
    source = ProbeFit(
        ProbeConfig(**{**config.__dict__, "layer_name": source_site}), s_train.shape[1]
    )
    source.train(
        s_train, y_train, epochs=epochs, lr=lr, batch_size=batch_size, held_out=(s_test, y_test)
    )
    target = ProbeFit(
        ProbeConfig(**{**config.__dict__, "layer_name": target_site}), t_train.shape[1]
    )
    target.train(
        t_train, y_train, epochs=epochs, lr=lr, batch_size=batch_size, held_out=(t_test, y_test)
    )
    alignment = fit_alignment(s_align, t_align, ridge=ridge)
    w, b = transfer_probe(source.direction, source.bias, alignment)
    transferred = auroc(t_test.float() @ w + b, y_test)
    assert source.metrics is not None and target.metrics is not None
    return TransferResult(
        source_arch=source_name,
        target_arch=target_name,
        source_layer=source_site,
        target_layer=target_site,
        n_align_pairs=int(s_align.shape[0]),
        baseline_source_auroc=source.metrics.val_auroc,
        baseline_target_auroc=target.metrics.val_auroc,
        transfer_auroc=transferred,
        transfer_drop=source.metrics.val_auroc - transferred,
        target_gap=target.metrics.val_auroc - transferred,
        alignment_r2=alignment.r2,
        n_train=len(y_train),
        n_test=len(y_test),
        pool=pool,
    )


def _token_rows(texts: Sequence[str], tokenize: Any, max_length: int | None) -> list[list[int]]:
    """Each text's own token ids, from a tokenizer or from a ``texts -> batch`` function (its
    padding, on either side, is removed through the attention mask)."""
    from ..data import as_dataset

    if not texts:
        raise InputError("give at least one text")
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise InputError("texts must be a list of strings")
    if tokenize is None:
        raise InputError("texts need a tokenizer or tokenize function for each model")
    if hasattr(tokenize, "convert_ids_to_tokens") or hasattr(tokenize, "pad_token_id"):
        return Dataset.from_texts(list(texts), tokenizer=tokenize, max_length=max_length).ids()
    if not callable(tokenize):
        raise InputError(
            f"a tokenize function maps texts to {{'input_ids', 'attention_mask'}};"
            f" got {type(tokenize).__name__}"
        )
    batch = tokenize(list(texts))
    if not isinstance(batch, Mapping):
        raise InputError(
            f"the tokenize function returned {type(batch).__name__}; it must "
            "return a mapping with 'input_ids' and 'attention_mask'"
        )
    rows = as_dataset(batch).ids()
    if len(rows) != len(texts):
        raise InputError(f"the tokenize function returned {len(rows)} rows for {len(texts)} texts")
    return rows


def _texts_acts(
    backend: Backend,
    texts: Sequence[str],
    tokenize: Any,
    site: str,
    pool: str,
    max_length: int | None,
) -> torch.Tensor:
    data = Dataset.from_ids(_token_rows(texts, tokenize, max_length))
    return pooled_activations(backend, data, [site], pool=pool)[site]


def evaluate_transfer(
    source_model: Any,
    target_model: Any,
    source_backend: Any,
    target_backend: Any,
    source_tokenize: Callable[..., Any] | Any,
    target_tokenize: Callable[..., Any] | Any,
    align_texts: list[str],
    train_pos: list[str],
    train_neg: list[str],
    test_pos: list[str],
    test_neg: list[str],
    source_layer: str,
    target_layer: str,
    source_arch_name: str = "source",
    target_arch_name: str = "target",
    *,
    pool: Literal["mean", "last"] = "mean",
    ridge: float = 0.001,
    seed: int = 0,
    epochs: int = 100,
    lr: float = 0.01,
    batch_size: int = 64,
    max_length: int | None = None,
) -> TransferResult:
    """Train a linear probe on the source model, transport it to the target through a ridge
    alignment learned on ``align_texts``, and compare held-out AUROC on the test texts with
    probes trained in each architecture. ``*_backend`` is a Backend, a backend hint or None
    (detected); ``*_tokenize`` a tokenizer or a ``texts -> batch`` function (the models may
    tokenize differently: activations are pooled per text, then matched text by text)."""
    import torch

    if pool not in ("mean", "last"):
        raise ParameterError(f"pool must be 'mean' or 'last', got {pool!r}")
    backends = []
    for model, given in ((source_model, source_backend), (target_model, target_backend)):
        if given is None or isinstance(given, str):
            backends.append(as_backend(model, given))
        elif hasattr(given, "run") and hasattr(given, "sites"):
            backends.append(given)
        else:
            raise ParameterError(
                f"a backend is an archscope.Backend, a backend hint (str) or "
                f"None; got {type(given).__name__}"
            )
    src, tgt = backends
    s_site, t_site = src.site_info(source_layer).name, tgt.site_info(target_layer).name
    for name, part in (
        ("train_pos", train_pos),
        ("train_neg", train_neg),
        ("test_pos", test_pos),
        ("test_neg", test_neg),
    ):
        if not part:
            raise InputError(f"{name} is empty: each class needs training and test texts")
    train = [*train_pos, *train_neg]
    test = [*test_pos, *test_neg]
    y_train = torch.tensor([1] * len(train_pos) + [0] * len(train_neg))
    y_test = torch.tensor([1] * len(test_pos) + [0] * len(test_neg))

    def acts(backend: Backend, texts: list[str], tok: Any, site: str) -> torch.Tensor:
        return _texts_acts(backend, texts, tok, site, pool, max_length)

    # One pass per model over all texts (align, train, test), split afterwards.
    everything = [*align_texts, *train, *test]
    s_all = acts(src, everything, source_tokenize, s_site)
    t_all = acts(tgt, everything, target_tokenize, t_site)
    a, n = len(align_texts), len(train)
    return _compare(
        source_arch_name,
        target_arch_name,
        s_site,
        t_site,
        s_all[:a],
        t_all[:a],
        s_all[a : a + n],
        t_all[a : a + n],
        y_train,
        s_all[a + n :],
        t_all[a + n :],
        y_test,
        ridge=ridge,
        seed=seed,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        pool=pool,
    )


def _tokens_for(backend: Backend, dataset: Dataset) -> Dataset:
    """The dataset as this backend reads it: re-tokenized with the backend's own tokenizer
    when it carries one and the data are texts; otherwise the dataset's token ids, which must
    fit the model's vocabulary."""
    own = getattr(backend, "tokenizer", None)
    if own is not None and dataset.texts is not None:
        return Dataset.from_texts(
            dataset.texts, dataset.labels, tokenizer=own, max_length=dataset.max_length
        )
    if "logits" in backend.sites():
        vocab = backend.site_info("logits").dim
        top = max(max(row) for row in dataset.ids())
        if top >= vocab:
            raise InputError(
                f"token id {top} is outside the vocabulary ({vocab}) of backend "
                f"{backend.name!r}: the two models tokenize differently. Use "
                "archscope.methods.transfer.evaluate_transfer with each model's tokenizer"
            )
    return dataset


@method(
    "transfer",
    "A probe trained on model A, transported to model B by ridge alignment",
    requires={"residual"},
    input="dataset",
    arity=2,
    quick={"epochs": 5},
)
def transfer_method(
    backend_a: Backend,
    backend_b: Backend,
    data: Dataset,
    *,
    site_a: str | None = None,
    site_b: str | None = None,
    pool: Literal["mean", "last"] = "mean",
    test_fraction: Annotated[
        float, Param(min=0.05, max=0.9, help="share of texts held out for AUROC")
    ] = 0.3,
    ridge: Annotated[float, Param(min=0.0, help="ridge penalty")] = 0.001,
    epochs: Annotated[int, Param(min=1)] = 100,
    lr: Annotated[float, Param(min=0.0)] = 0.01,
    batch_size: Annotated[int, Param(min=1)] = 64,
    seed: int = 0,
) -> TransferResult:
    """``transfer``: a linear probe trained on model A, transported to model B through a ridge
    alignment fitted on the training texts, against a probe trained on B (held-out AUROC).
    Both models read the same token ids of the dataset."""
    dataset, labels = _labelled(data)
    name_a = backend_a.site_info(site_a or default_site(backend_a)).name
    name_b = backend_b.site_info(site_b or default_site(backend_b)).name
    a = pooled_activations(backend_a, _tokens_for(backend_a, dataset), [name_a], pool=pool)[name_a]
    b = pooled_activations(backend_b, _tokens_for(backend_b, dataset), [name_b], pool=pool)[name_b]
    train, test = stratified_split(labels, test_fraction, seed)
    counts = [int((labels == c).sum()) for c in (0, 1)]
    if min(counts) < 2:
        warnings.warn(
            f"archscope: transfer needs two texts of each label to train and to hold "
            f"out; got {counts[0]} of label 0 and {counts[1]} of label 1, so the "
            "held-out AUROC is 0.5",
            stacklevel=2,
        )
    # The alignment sees only training texts, so held-out AUROC stays held out.
    result = _compare(
        backend_a.name,
        backend_b.name,
        name_a,
        name_b,
        a[train],
        b[train],
        a[train],
        b[train],
        labels[train],
        a[test],
        b[test],
        labels[test],
        ridge=ridge,
        seed=seed,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        pool=pool,
    )
    return result


__all__ = [
    "Alignment",
    "TransferResult",
    "auroc_from_scores",
    "evaluate_transfer",
    "fit_alignment",
    "learn_alignment",
    "transfer_probe",
]
