"""The ``write-sae`` method: train a write SAE on one layer's (and head's) state writes over a
dataset, measure it on held-out texts (reconstruction, next-token loss with the writes
replaced by their reconstructions), run the substitution test with its closed-form
prediction, and install the most-firing atom into prompts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Literal

from ...params import Param
from ...registry import method
from ...results import Result
from ..splits import held_out_split

if TYPE_CHECKING:  # torch is imported when the method runs: `archscope info` stays light
    from ..sae._metrics import SAEMetrics
    from ._effects import InstallResult, SubstitutionResult
    from ._fit import WriteLoss
    from ._model import WriteSAE


@dataclass
class WriteSAEOptions:
    """Which layer's and head's writes, what dictionary, and how far to test it."""

    layer: Annotated[
        int | None, Param(min=0, help="layer whose state_write to read (default: the first)")
    ] = None
    head: Annotated[int, Param(min=0, help="head of the write (0 where the layer has none)")] = 0
    sae_type: Literal["topk", "l1"] = "topk"
    n_features: Annotated[int | None, Param(min=1, help="default: 4 x (d_value + d_key)")] = None
    k: Annotated[int, Param(min=1, help="active atoms per write (topk)")] = 4
    sparsity: Annotated[float, Param(min=0, help="L1 coefficient (l1)")] = 0.05
    epochs: Annotated[int, Param(min=1)] = 10
    batch_size: Annotated[int, Param(min=1, help="writes per training step")] = 1024
    learning_rate: Annotated[float, Param(min=0)] = 1e-3
    eval_fraction: Annotated[float, Param(min=0, max=0.9, help="share of texts held out")] = 0.2
    max_firings: Annotated[int, Param(min=0, help="substitution test size (0: skip it)")] = 256
    per_text: Annotated[int, Param(min=1, help="firings tested per held-out text")] = 16
    firings: Literal["top", "all"] = "top"
    closed_form: Literal["auto", "state", "decay", "none"] = "auto"
    install_k: Annotated[int, Param(min=0, help="positions the install writes (0: skip)")] = 3
    install_scale: Annotated[float, Param(min=0, help="install at this x the write's norm")] = 3.0
    max_new_tokens: Annotated[int, Param(min=1, help="greedy tokens after the install")] = 8
    text_batch_size: Annotated[int, Param(min=1, help="texts per forward pass")] = 16
    seed: int = 0
    save: Annotated[str | None, Param(help="folder to save the write SAE to")] = None


@dataclass
class WriteSAEReport(Result):
    """What the ``write-sae`` method found."""

    backend: str
    site: str | None
    head: int
    sae_type: str
    n_features: int
    write_shape: tuple[int, int]
    n_train_writes: int
    eval: SAEMetrics | None
    loss: WriteLoss | None
    substitution: SubstitutionResult | None
    installed: InstallResult | None
    train_metrics: dict[str, float] = field(default_factory=dict)
    saved_to: str | None = None
    #: Why nothing was trained (a backend without state-write sites); None otherwise.
    note: str | None = None
    _sae: Any = field(default=None, repr=False)

    @property
    def sae(self) -> WriteSAE:
        """The trained write SAE."""
        sae: WriteSAE = self._sae
        return sae

    def to_markdown(self) -> str:
        m = self.eval
        if m is None:
            return f"## Write SAE ({self.backend})\n\nNothing trained: {self.note}"
        rows = [
            ("explained variance", f"{m.explained_variance:.4f}"),
            ("L0 (active atoms per write)", f"{m.l0:.2f}"),
            ("dead fraction", f"{m.dead_fraction:.3f}"),
        ]
        if self.loss is not None:
            rows += [
                ("next-token loss, clean", f"{self.loss.clean:.4f}"),
                ("next-token loss, writes reconstructed", f"{self.loss.spliced:.4f}"),
                ("next-token loss, writes deleted", f"{self.loss.deleted:.4f}"),
            ]
        dv, dk = self.write_shape
        lines = [
            f"## Write SAE on {self.site} head {self.head} ({self.backend}): {self.sae_type}, "
            f"{self.n_features} rank-1 atoms of {dv} × {dk}",
            "",
            f"Trained on {self.n_train_writes} writes; evaluated on {m.n_inputs} held-out writes.",
            "",
            "| metric | value |",
            "|---|---|",
            *[f"| {a} | {b} |" for a, b in rows],
        ]
        for part in (self.substitution, self.installed):
            if part is not None:
                lines += ["", part.to_markdown()]
        return "\n".join(lines)

    def figure(self) -> Any:
        """Win-rate histogram (per atom) and closed-form vs measured logit shifts."""
        return write_sae_figure(self.substitution)


def write_sae_figure(result: SubstitutionResult | None) -> Any:
    """A two-panel matplotlib figure of a substitution test (None without one)."""
    if result is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    rates = [v[2] for v in result.per_atom.values()]
    left.hist(rates, bins=10, range=(0, 1), color="tab:blue")
    left.axvline(result.win_rate, color="k", linestyle="--", label="all firings")
    left.set_xlabel("atom beats deletion (per-atom rate)")
    left.set_ylabel("atoms")
    left.legend()
    if result.predicted:
        right.scatter(result.measured, result.predicted, s=6, alpha=0.5)
        low = min(min(result.measured), min(result.predicted))
        high = max(max(result.measured), max(result.predicted))
        right.plot([low, high], [low, high], color="k", linewidth=0.8)
        right.set_title(f"R² = {result.closed_form_r2:.3f}")
    right.set_xlabel("measured logit shift")
    right.set_ylabel("closed-form prediction")
    fig.suptitle(f"Substitution test, {result.site} head {result.head}")
    fig.tight_layout()
    return fig


@method(
    "write-sae",
    "Write SAE: rank-1 atoms on a layer's recurrent state writes; substitution test against "
    "deleting the write, closed-form logit shifts, installing an atom",
    input="dataset",
    requires={"logits", "edit"},
    arity=1,
    quick={
        "n_features": 16,
        "k": 2,
        "epochs": 2,
        "batch_size": 256,
        "max_firings": 8,
        "per_text": 4,
        "max_new_tokens": 2,
    },
    options=WriteSAEOptions,
)
def write_sae_method(backend: Any, data: Any, options: WriteSAEOptions) -> WriteSAEReport:
    """Train a write SAE on ``layer``'s ``state_write`` (head ``head``) over the training texts
    of ``data``, then test it on the held-out texts. A backend without state-write sites gets
    a report that says so (and a warning), so that sweeps over every method run through."""
    o = options
    from ...artifacts import ArtifactFit
    from ...data import as_dataset
    from ._effects import install, substitution_test
    from ._fit import collect_writes, fit_write_sae, write_layout, write_loss, write_metrics
    from ._fit import write_site as find_site

    data = as_dataset(data)
    if o.layer is None and not any(n.endswith(".state_write") for n in backend.sites()):
        import warnings

        from ...errors import SiteError

        try:
            find_site(backend, None)
        except SiteError as exc:
            warnings.warn(f"archscope: write-sae: {exc}", stacklevel=2)
            return WriteSAEReport(
                backend=backend.name,
                site=None,
                head=o.head,
                sae_type=o.sae_type,
                n_features=0,
                write_shape=(0, 0),
                n_train_writes=0,
                eval=None,
                loss=None,
                substitution=None,
                installed=None,
                note=str(exc),
            )
    site = find_site(backend, o.layer)
    ids = data.ids()
    train_rows, eval_rows = held_out_split(len(ids), o.eval_fraction, o.seed)
    if not eval_rows:
        eval_rows = train_rows = list(range(len(ids)))
    train = [ids[i] for i in train_rows]
    held = [ids[i] for i in eval_rows]
    layout = write_layout(backend, site, o.head, ids[0])
    writes = collect_writes(backend, train, layout, o.text_batch_size)
    sae = fit_write_sae(
        writes,
        layout,
        write_type=o.sae_type,
        n_features=o.n_features,
        k=o.k,
        sparsity=o.sparsity,
        epochs=o.epochs,
        batch_size=o.batch_size,
        learning_rate=o.learning_rate,
        seed=o.seed,
        device=str(backend.device),
        fitted_on=ArtifactFit.of(backend, site),
    )
    metrics = write_metrics(sae, collect_writes(backend, held, layout, o.text_batch_size))
    scorable = [r for r in held if len(r) > 1]
    loss = write_loss(sae, backend, scorable, o.text_batch_size) if scorable else None
    substitution = None
    if o.max_firings and scorable:
        substitution = substitution_test(
            sae,
            backend,
            scorable,
            max_firings=o.max_firings,
            per_text=o.per_text,
            batch_size=o.text_batch_size,
            firings=o.firings,
            closed_form=o.closed_form,
            seed=o.seed,
        )
    installed = None
    if o.install_k and substitution is not None:
        counts: dict[int, int] = {}
        for a in substitution.atom_of:
            counts[a] = counts.get(a, 0) + 1
        atom = max(counts, key=lambda a: (counts[a], -a))
        prompts = [r for r in scorable if len(r) >= o.install_k][:8]
        if prompts:
            installed = install(
                sae,
                backend,
                prompts,
                atom,
                k=o.install_k,
                scale=o.install_scale,
                max_new_tokens=o.max_new_tokens,
            )
    saved = str(sae.save(o.save)) if o.save else None
    return WriteSAEReport(
        backend=backend.name,
        site=site,
        head=o.head,
        sae_type=o.sae_type,
        n_features=sae.n_features,
        write_shape=(layout.d_value, layout.d_key),
        n_train_writes=len(writes),
        eval=metrics,
        loss=loss,
        substitution=substitution,
        installed=installed,
        train_metrics=dict(sae.last_metrics),
        saved_to=saved,
        _sae=sae,
    )
