"""The ``sae`` method: train an SAE on one site's per-token activations of a dataset, then
report reconstruction metrics and the spliced next-token loss on held-out texts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ...registry import method
from ...results import Result
from ..splits import held_out_split
from ._options import SAEOptions

if TYPE_CHECKING:  # torch is imported when the method runs: `archscope info` stays light
    from ._metrics import SAEMetrics, SplicedLoss
    from ._models import SAE


@dataclass
class SAEReport(Result):
    """What the ``sae`` method found: the SAE's quality on held-out texts (``eval``), the
    spliced next-token loss there (None when the backend cannot give logits or edit the
    site), the last epoch's training metrics, and where the SAE was saved."""

    backend: str
    site: str
    sae_type: str
    n_features: int
    k: int | None
    n_train_tokens: int
    eval: SAEMetrics
    loss: SplicedLoss | None
    train_metrics: dict[str, float] = field(default_factory=dict)
    saved_to: str | None = None
    saelens_dir: str | None = None
    #: "held-out" texts, or "training" when none were held out (eval_fraction=0, one text)
    eval_on: str = "held-out"
    #: What the SAE was trained on: "tokens" (every selected real token), "mean" or "last"
    #: (one pooled vector per text), and the real-token positions selected.
    pool: str = "tokens"
    positions: Any = "all"
    #: With labelled data: per label, the single feature that best separates that label's
    #: held-out texts from the others, ``{"feature", "auroc", "direction", "n_texts"}``
    #: (``auroc`` >= 0.5: "higher" = the feature is larger on the label's texts). Feature
    #: values per text: the pooled vector's code, or the mean code over the text's tokens.
    feature_auroc: dict[str, dict[str, Any]] = field(default_factory=dict)
    _sae: Any = field(default=None, repr=False)

    @property
    def sae(self) -> SAE:
        """The trained SAE."""
        sae: SAE = self._sae
        return sae

    def to_markdown(self) -> str:
        m = self.eval
        rows = [
            ("MSE", f"{m.mse:.4g}"),
            ("explained variance", f"{m.explained_variance:.4f}"),
            ("L0 (active per token)", f"{m.l0:.2f}"),
            ("dead fraction", f"{m.dead_fraction:.3f}"),
        ]
        if self.loss is not None:
            rows += [
                ("next-token loss, clean", f"{self.loss.clean:.4f}"),
                ("next-token loss, SAE spliced in", f"{self.loss.spliced:.4f}"),
                ("next-token loss, site zeroed", f"{self.loss.zero_ablated:.4f}"),
                ("loss recovered", f"{self.loss.loss_recovered:.4f}"),
            ]
        k = f", k={self.k}" if self.k is not None else ""
        head = (
            f"## SAE on {self.site} ({self.backend}): {self.sae_type}, "
            f"{self.n_features} features{k}"
        )
        unit = "tokens" if self.pool == "tokens" else f"texts ({self.pool}-pooled)"
        where = "" if self.positions == "all" else f" at positions {self.positions}"
        evaluated = (
            f"{m.n_inputs} held-out {unit}."
            if self.eval_on == "held-out"
            else f"the same {m.n_inputs} training {unit} (no texts were held out: these are "
            "training-set metrics, not a test of generalisation)."
        )
        lines = [
            head,
            "",
            f"Trained on {self.n_train_tokens} {unit}{where}; evaluated on {evaluated}",
            "",
            "| metric | value |",
            "|---|---|",
            *[f"| {a} | {b} |" for a, b in rows],
        ]
        if self.feature_auroc:
            lines += [
                "",
                "| label | best single feature | AUROC | direction | texts |",
                "|---|---|---|---|---|",
                *[
                    f"| {label} | {v['feature']} | {v['auroc']:.3f} | {v['direction']} | "
                    f"{v['n_texts']} |"
                    for label, v in self.feature_auroc.items()
                ],
            ]
        return "\n".join(lines)


@method(
    "sae",
    "Train a sparse autoencoder (dense, rank-1, TopK, BatchTopK) on one site; "
    "reconstruction metrics and next-token loss with it spliced in",
    input="dataset",
    arity=1,
    quick={"n_features": 64, "k": 4, "epochs": 2, "batch_size": 256},
    options=SAEOptions,
)
def sae_method(backend: Any, data: Any, options: SAEOptions) -> SAEReport:
    """Train an SAE on ``site`` over the real tokens of ``data`` (held-out texts excluded),
    then measure it on the held-out texts."""
    o = options
    site, seed, stream, text_batch_size = o.site, o.seed, o.stream, o.text_batch_size
    import torch

    from ...artifacts import ArtifactFit
    from ...collect import iter_collect
    from ...data import as_dataset
    from ...errors import ParameterError
    from ...progress import bar
    from ..lens import _real_positions
    from ._metrics import reconstruction_metrics, spliced_loss
    from ._models import SAEConfig
    from ._saelens import export_saelens
    from ._train import fit_sae

    data = as_dataset(data)
    names = backend.layer_names()
    info = backend.site_info(site if site is not None else names[len(names) // 2])
    pool, chosen = _selection(info, o.pool, o.positions)
    lengths = torch.tensor([len(r) for r in data.ids()], dtype=torch.long)
    train_rows, eval_rows = held_out_split(len(data), o.eval_fraction, seed)
    eval_index = eval_rows if eval_rows else list(range(len(data)))
    train_index = train_rows if eval_rows else list(range(len(data)))
    eval_set = data.subset(eval_index)
    train_set = data.subset(train_index)

    def parts(dataset: Any, index: list[int]) -> Any:
        """(activations, text index into ``data``) per batch, positions selected."""
        for c in iter_collect(
            backend, dataset, [info.name], pool=pool, batch_size=text_batch_size, progress=False
        ):
            acts, doc = c.activations[info.name], torch.tensor(index)[c.doc]
            if pool is None and chosen != "all":
                assert c.position is not None
                keep = _real_positions(chosen, lengths, c.position, doc)
                acts, doc = acts[keep], doc[keep]
            if len(acts):
                yield acts, doc

    def chunks(dataset: Any, index: list[int]) -> Any:
        return (acts for acts, _ in parts(dataset, index))

    for name, folder in (("save", o.save), ("saelens_dir", o.saelens_dir)):
        if folder:
            _check_save_folder(name, folder)
    source, first = _training_source(stream, lambda: chunks(train_set, train_index))
    if first is None:
        raise ParameterError(
            f"positions={o.positions!r} selects no token of the training texts; choose "
            "positions the texts have"
        )
    width = int(first.shape[-1])  # a state site: its flattened value
    config = SAEConfig(
        input_dim=width,
        n_features=o.n_features or 8 * width,
        sparsity=o.sparsity,
        sae_type=o.sae_type,
        learning_rate=o.learning_rate,
        batch_size=o.batch_size,
        k=o.k,
        seed=seed,
    )
    counted: list[int] = []
    with bar(total=o.epochs, desc=f"sae on {info.name}", unit="epoch") as shown:
        sae = fit_sae(
            source if not stream else _counting(source, counted),
            config,
            epochs=o.epochs,
            device=str(backend.device),
            progress=lambda epoch, metrics: shown.update(1),
            fitted_on=ArtifactFit.of(backend, info.name),
        )
    n_train = int(source.shape[0]) if isinstance(source, torch.Tensor) else sum(counted) // o.epochs
    sae.site = info.name
    metrics = reconstruction_metrics(sae, lambda: chunks(eval_set, eval_index))
    loss = None
    scorable = any(len(ids) > 1 for ids in eval_set.ids())  # a next token to predict
    if {"logits", "edit"} <= set(backend.capabilities) and info.writable and scorable:
        loss = spliced_loss(sae, backend, eval_set, info.name, batch_size=text_batch_size)
    feature_auroc = {}
    if data.label_tensor is not None:
        feature_auroc = _feature_aurocs(sae, parts(eval_set, eval_index), data.label_tensor)
    saved = str(sae.save(o.save)) if o.save else None
    exported = str(export_saelens(sae, o.saelens_dir)) if o.saelens_dir else None
    return SAEReport(
        backend=backend.name,
        site=info.name,
        sae_type=sae.sae_type,
        n_features=sae.n_features,
        k=o.k if sae.sae_type in ("topk", "batchtopk") else None,
        n_train_tokens=n_train,
        eval=metrics,
        loss=loss,
        train_metrics=dict(sae.last_metrics),
        saved_to=saved,
        saelens_dir=exported,
        eval_on="held-out" if eval_rows else "training",
        pool=pool or "tokens",
        positions=chosen,
        feature_auroc=feature_auroc,
        _sae=sae,
    )


def _check_save_folder(name: str, save: str) -> None:
    """Refuse a folder parameter whose path exists and is not a folder, before any training."""
    from pathlib import Path

    from ...errors import ParameterError

    path = Path(save)
    if path.exists() and not path.is_dir():
        raise ParameterError(
            f"{name}={save!r} is an existing file; the SAE is saved as a folder of files: "
            "give a new or existing folder path"
        )
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise ParameterError(
                f"{name}={save!r} lies under {str(parent)!r}, which is a file, not a folder"
            )


def _selection(info: Any, pool: Any, positions: Any) -> tuple[Any, Any]:
    """Checked ``(pool, positions)``: a state site (one value per text) is read as "last"."""
    from ...errors import ParameterError
    from ..lens import _check_positions

    chosen = _check_positions(positions)
    if pool not in (None, "mean", "last"):
        raise ParameterError(f"pool={pool!r}: use 'mean', 'last' or leave it out (every token)")
    if pool is not None and chosen != "all":
        raise ParameterError(
            f"pool={pool!r} with positions={positions!r}: pooling already picks what each text "
            "gives (mean or last token); use one of the two"
        )
    if info.kind == "state" and pool is None:
        pool = "last"  # a state site holds one value per text: nothing to choose
    return pool, chosen


def _feature_aurocs(sae: Any, parts: Any, labels: Any) -> dict[str, dict[str, Any]]:
    """Per label: the feature whose per-text value (mean code over the text's rows) best
    separates that label's texts from the rest (binary 0/1 labels: label 1 against 0)."""
    import torch

    from ..probes import auroc

    sums: dict[int, Any] = {}
    counts: dict[int, int] = {}
    with torch.no_grad():
        for acts, doc in parts:
            codes = sae.encode(acts.to(next(sae.parameters()).device).float()).cpu().double()
            for d in doc.unique().tolist():
                rows = codes[doc == d]
                sums[d] = sums.get(d, 0) + rows.sum(0)
                counts[d] = counts.get(d, 0) + len(rows)
    texts = sorted(sums)
    if not texts:
        return {}
    per_text = torch.stack([sums[d] / counts[d] for d in texts])  # (texts, features)
    y = labels[texts]
    classes = sorted(set(y.tolist()))
    targets = [1] if classes == [0, 1] else classes
    out: dict[str, dict[str, Any]] = {}
    for label in targets:
        hit = (y == label).long()
        if int(hit.sum()) in (0, len(hit)):
            continue  # this label has no held-out text (or only it): nothing to separate
        best = (-1.0, 0, 0.5)
        for f in range(per_text.shape[1]):
            a = auroc(per_text[:, f], hit)
            if abs(a - 0.5) > best[0]:
                best = (abs(a - 0.5), f, a)
        _, feature, value = best
        out[str(label)] = {
            "feature": feature,
            "auroc": max(value, 1.0 - value),
            "direction": "higher" if value >= 0.5 else "lower",
            "n_texts": len(texts),
        }
    return out


def _training_source(stream: bool, make: Any) -> tuple[Any, Any]:
    """What the SAE trains on, and its first chunk (None when nothing was selected): with
    ``stream`` the chunk factory itself (the model re-runs every epoch), else one tensor."""
    import torch

    if stream:
        return make, next(iter(make()), None)
    pieces = list(make())
    source = torch.cat(pieces) if pieces else None
    return source, source


def _counting(make: Any, counted: list[int]) -> Any:
    """Wrap a chunk-iterable factory so the rows it yields are counted."""

    def fresh() -> Any:
        for chunk in make():
            counted.append(len(chunk))
            yield chunk

    return fresh
