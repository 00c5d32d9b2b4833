"""Training a write SAE on a model's writes, and how well it reconstructs them: explained
variance, L0 and dead fraction over held-out writes, and the next-token loss with the head's
writes replaced by their reconstructions (an `Edit` of the ``state_write`` site, carried
through the recurrence by the backend)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ...edits import Edit
from ...errors import ParameterError, SiteError
from ...recurrence import write_sites_of
from ...results import Result
from ..sae._metrics import SAEMetrics, reconstruction_metrics
from ..sae._models import SAEConfig
from ..sae._train import fit_sae
from ._model import WriteLayout, WriteSAE, build_write_sae

__all__ = [
    "WriteLoss",
    "collect_writes",
    "fit_write_sae",
    "write_layout",
    "write_loss",
    "write_site",
]


def write_site(backend: Any, layer: int | None = None) -> str:
    """The ``state_write`` site of ``layer`` (None: the first layer that has one); a clear error
    when the backend declares none."""
    layers = {
        i: roles for i, roles in write_sites_of(backend.sites()).items() if "state_write" in roles
    }
    if not layers:
        raise SiteError(
            f"backend {backend.name!r} declares no state-write sites (layer_i.state_write); "
            "write SAEs need a layer whose recurrence adds a per-token write to a matrix state "
            "(Mamba, Mamba-2, or a backend that declares them with "
            "archscope.recurrence.declare_write_sites)"
        )
    if layer is None:
        layer = min(layers)
    if layer not in layers:
        raise SiteError(f"layer {layer} has no state-write site; layers with one: {sorted(layers)}")
    return f"layer_{layer}.state_write"


def _batches(
    backend: Any, rows: Sequence[Sequence[int]], batch_size: int
) -> Iterator[dict[str, torch.Tensor]]:
    from ...data import pad_batch, padding_for

    side = padding_for(backend)
    for start in range(0, len(rows), batch_size):
        yield pad_batch(rows[start : start + batch_size], side)


def write_layout(backend: Any, site: str, head: int, sample_ids: Sequence[int]) -> WriteLayout:
    """The `WriteLayout` of ``site`` and ``head``, its sizes read from one short run."""
    value = backend.run(torch.tensor([list(sample_ids)[:2]]), capture=[site])[site]
    return WriteLayout.of(site, tuple(backend.site_info(site).shape), value, head)


def collect_writes(
    backend: Any, rows: Sequence[Sequence[int]], layout: WriteLayout, batch_size: int = 32
) -> torch.Tensor:
    """The head's writes at every real token of ``rows`` (token-id lists), flattened:
    (tokens, d_value·d_key), float32 on the CPU."""
    out = []
    for batch in _batches(backend, rows, batch_size):
        value = backend.run(batch, capture=[layout.site])[layout.site]
        real = batch["attention_mask"].bool().to(value.device)
        out.append(
            layout.take(value)[real].reshape(-1, layout.d_value * layout.d_key).float().cpu()
        )
    return torch.cat(out)


def fit_write_sae(
    writes: torch.Tensor,
    layout: WriteLayout,
    *,
    write_type: str = "topk",
    n_features: int | None = None,
    k: int = 4,
    sparsity: float = 0.1,
    epochs: int = 20,
    batch_size: int = 1024,
    learning_rate: float = 1e-3,
    seed: int = 0,
    device: str = "cpu",
    fitted_on: Any = None,
) -> WriteSAE:
    """Train a write SAE of ``write_type`` ("topk", "l1") on ``writes`` (tokens, d_value·d_key)
    of ``layout``'s head, with the SAE training loop (`fit_sae`). ``n_features``: default 4 ×
    (d_value + d_key)."""
    dim = layout.d_value * layout.d_key
    if writes.dim() != 2 or writes.shape[1] != dim:
        raise ParameterError(
            f"writes must be (tokens, {dim}) = (tokens, d_value·d_key) of {layout.site}; got "
            f"{tuple(writes.shape)}"
        )
    config = SAEConfig(
        input_dim=dim,
        n_features=n_features or 4 * (layout.d_value + layout.d_key),
        sparsity=sparsity,
        sae_type="topk" if write_type == "topk" else "dense",
        learning_rate=learning_rate,
        batch_size=batch_size,
        k=k,
        seed=seed,
    )
    sae = build_write_sae(write_type, config, layout)
    sae.initialise_from(writes)
    fit_sae(writes, config, epochs=epochs, device=device, sae=sae, fitted_on=fitted_on)
    sae.normalize_decoder(exact=True)  # exactly rank-1 atoms
    sae.site = layout.site
    return sae


@dataclass
class WriteLoss(Result):
    """Next-token loss (mean cross-entropy over real next tokens) with the head's writes:
    as they are (``clean``), replaced by the SAE's reconstruction at every position
    (``spliced``), and deleted (``deleted``); ``loss_recovered`` = (deleted − spliced) /
    (deleted − clean)."""

    clean: float
    spliced: float
    deleted: float
    loss_recovered: float
    n_tokens: int


def _replace_head(layout: WriteLayout, fn: Any) -> Any:
    def edit(value: torch.Tensor) -> torch.Tensor:
        return layout.put(value, fn(layout.take(value)))

    return edit


@torch.no_grad()
def write_loss(
    sae: WriteSAE, backend: Any, rows: Sequence[Sequence[int]], batch_size: int = 32
) -> WriteLoss:
    """`WriteLoss` of ``sae`` on ``rows`` (token-id lists with two tokens or more)."""
    layout = sae.layout
    shape = (layout.d_value, layout.d_key)

    def reconstruct(head: torch.Tensor) -> torch.Tensor:
        flat = head.reshape(-1, shape[0] * shape[1]).to(sae.W_dec.device, sae.W_dec.dtype)
        return sae.reconstruct(flat).reshape(head.shape).to(head.dtype)

    variants = {
        "clean": [],
        "spliced": [Edit.apply(layout.site, _replace_head(layout, reconstruct))],
        "deleted": [Edit.apply(layout.site, _replace_head(layout, torch.zeros_like))],
    }
    totals = dict.fromkeys(variants, 0.0)
    count = 0
    for batch in _batches(backend, [r for r in rows if len(r) > 1], batch_size):
        ids, mask = batch["input_ids"], batch["attention_mask"].bool()
        # next-token targets: positions whose next position is also real
        scored = mask[:, :-1] & mask[:, 1:]
        target = ids[:, 1:][scored]
        for name, edits in variants.items():
            logits = backend.run(batch, capture=["logits"], edits=edits).logits
            picked = logits[:, :-1].to(target.device)[scored].float()
            totals[name] += float(F.cross_entropy(picked, target, reduction="sum"))
        count += int(scored.sum())
    if count == 0:
        raise ParameterError("write_loss needs texts of two tokens or more (a next token)")
    clean, spliced, deleted = (totals[n] / count for n in ("clean", "spliced", "deleted"))
    gap = deleted - clean
    return WriteLoss(
        clean=clean,
        spliced=spliced,
        deleted=deleted,
        loss_recovered=(deleted - spliced) / gap if gap != 0 else float("nan"),
        n_tokens=count,
    )


def write_metrics(sae: WriteSAE, writes: torch.Tensor) -> SAEMetrics:
    """Reconstruction metrics (explained variance, L0, dead fraction) over ``writes``."""
    return reconstruction_metrics(sae, writes)
