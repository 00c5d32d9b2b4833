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
        return "\n".join(
            [
                head,
                "",
                f"Trained on {self.n_train_tokens} tokens; evaluated on "
                + (
                    f"{m.n_inputs} held-out tokens."
                    if self.eval_on == "held-out"
                    else f"the same {m.n_inputs} training tokens (no texts were held out: "
                    "these are training-set metrics, not a test of generalisation)."
                ),
                "",
                "| metric | value |",
                "|---|---|",
                *[f"| {a} | {b} |" for a, b in rows],
            ]
        )


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
    from ...progress import bar
    from ._metrics import reconstruction_metrics, spliced_loss
    from ._models import SAEConfig
    from ._saelens import export_saelens
    from ._train import fit_sae

    data = as_dataset(data)
    names = backend.layer_names()
    info = backend.site_info(site if site is not None else names[len(names) // 2])
    train_rows, eval_rows = held_out_split(len(data), o.eval_fraction, seed)
    eval_set = data.subset(eval_rows) if eval_rows else data
    train_set = data.subset(train_rows) if eval_rows else data

    def chunks(dataset: Any) -> Any:
        return (
            c.activations[info.name]
            for c in iter_collect(
                backend, dataset, [info.name], pool=None, batch_size=text_batch_size, progress=False
            )
        )

    for name, folder in (("save", o.save), ("saelens_dir", o.saelens_dir)):
        if folder:
            _check_save_folder(name, folder)
    config = SAEConfig(
        input_dim=info.dim,
        n_features=o.n_features or 8 * info.dim,
        sparsity=o.sparsity,
        sae_type=o.sae_type,
        learning_rate=o.learning_rate,
        batch_size=o.batch_size,
        k=o.k,
        seed=seed,
    )
    source: Any = (lambda: chunks(train_set)) if stream else torch.cat(list(chunks(train_set)))
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
    metrics = reconstruction_metrics(sae, lambda: chunks(eval_set))
    loss = None
    scorable = any(len(ids) > 1 for ids in eval_set.ids())  # a next token to predict
    if {"logits", "edit"} <= set(backend.capabilities) and info.writable and scorable:
        loss = spliced_loss(sae, backend, eval_set, info.name, batch_size=text_batch_size)
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


def _counting(make: Any, counted: list[int]) -> Any:
    """Wrap a chunk-iterable factory so the rows it yields are counted."""

    def fresh() -> Any:
        for chunk in make():
            counted.append(len(chunk))
            yield chunk

    return fresh
