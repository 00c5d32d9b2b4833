"""How good an SAE is: reconstruction metrics over activations (MSE, explained variance, L0,
dead fraction) and, on a model, the next-token loss with the reconstruction spliced in at the
site against the clean and the zero-ablated loss."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ...errors import ParameterError, SiteError
from ...results import Result
from ._models import SAE
from ._train import ActivationSource, _as_rows, _epochs_of


@dataclass
class SAEMetrics(Result):
    """Reconstruction quality over a set of activations (raw activation space).

    ``mse``: mean squared error per element; ``explained_variance``: 1 - SSE / total sum of
    squares about the mean; ``l0``: mean active features per input; ``l1``: mean L1 norm of
    the codes; ``dead_fraction``: features that never fired on these inputs.
    """

    mse: float
    explained_variance: float
    l0: float
    l1: float
    dead_fraction: float
    n_inputs: int


@torch.no_grad()
def reconstruction_metrics(
    sae: SAE, activations: ActivationSource, batch_size: int = 4096
) -> SAEMetrics:
    """`SAEMetrics` of ``sae`` over activations (a tensor, an iterable of chunks or a function
    returning one), read in batches so the data need not fit in memory."""
    dim = sae.input_dim
    dev = sae.W_dec.device
    acc = torch.zeros(4, dtype=torch.float64)  # sse, sum |x|^2, l1, active count
    total = torch.zeros(dim, dtype=torch.float64)
    fired = torch.zeros(sae.n_features, dtype=torch.bool, device=dev)
    n = 0
    was_training = sae.training
    sae.eval()
    try:
        for chunks in _epochs_of(activations, 1):
            for chunk in chunks:
                rows = _as_rows(chunk, dim)
                for start in range(0, len(rows), batch_size):
                    x = rows[start : start + batch_size].to(dev, sae.W_dec.dtype)
                    z = sae.encode(x)
                    recon = sae.decode(z)
                    xd = x.double()
                    acc += torch.stack(
                        [
                            (recon.double() - xd).pow(2).sum(),
                            xd.pow(2).sum(),
                            z.double().abs().sum(),
                            (z != 0).sum().double(),
                        ]
                    ).cpu()
                    total += xd.sum(0).cpu()
                    fired |= (z != 0).any(0)
                    n += len(x)
    finally:
        sae.train(was_training)
    if n == 0:
        raise ParameterError("reconstruction_metrics got no activations")
    sse, sumsq, l1, active = (float(v) for v in acc)
    centred = sumsq - float(total.pow(2).sum()) / n
    return SAEMetrics(
        mse=sse / (n * dim),
        explained_variance=1.0 - sse / centred if centred > 0 else float("nan"),
        l0=active / n,
        l1=l1 / n,
        dead_fraction=float((~fired).float().mean()),
        n_inputs=n,
    )


@dataclass
class SplicedLoss(Result):
    """Mean next-token cross-entropy (nats per predicted real token) of the clean model, with
    the SAE's reconstruction spliced in at ``site``, and with the site zeroed.
    ``loss_recovered`` = (zero - spliced) / (zero - clean): 1 is perfect, 0 no better than
    zero-ablation."""

    site: str
    clean: float
    spliced: float
    zero_ablated: float
    loss_recovered: float
    n_tokens: int


def next_token_loss(
    logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor
) -> tuple[float, int]:
    """Summed cross-entropy of each real token predicting the next real token, and the count."""
    valid = (mask[:, :-1] & mask[:, 1:]).reshape(-1)
    logp = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    target = ids[:, 1:].reshape(-1).to(logits.device)
    losses = F.cross_entropy(
        logp[valid.to(logp.device)], target[valid.to(target.device)], reduction="sum"
    )
    return float(losses), int(valid.sum())


@torch.no_grad()
def spliced_loss(
    sae: SAE,
    backend: Any,
    data: Any,
    site: str | None = None,
    *,
    batch_size: int = 8,
    tokenizer: Any = None,
) -> SplicedLoss:
    """Next-token loss over ``data`` (a Dataset, texts with ``tokenizer``, token ids) with the
    SAE's reconstruction spliced in at ``site`` (default: the site it was fitted on) versus
    the clean and zero-ablated model. Only real tokens are edited and scored; padding is left
    as the model produced it, so results do not depend on how the texts were batched."""
    from ...backends import Edit
    from ...data import as_dataset, padding_for

    site = site or sae.site or (sae.fitted_on.site if sae.fitted_on is not None else None)
    if site is None:
        raise ParameterError(
            "spliced_loss needs the site the SAE reads (site=...); this SAE records none"
        )
    info = backend.site_info(site)
    if info.kind != "token" or info.dim != sae.input_dim:
        raise SiteError(
            f"site {info.name!r} of backend {backend.name!r} is a {info.kind} site "
            f"of dimension {info.dim}; the SAE reads token sites of dimension "
            f"{sae.input_dim}"
        )
    backend.require("logits")
    dataset = as_dataset(data, tokenizer)
    was_training = sae.training
    sae.eval()
    totals = [0.0, 0.0, 0.0]
    count = 0
    try:
        for _, batch in dataset.batches(batch_size, padding_for(backend)):
            ids, mask = batch["input_ids"], batch["attention_mask"].bool()

            def splice(t: torch.Tensor, mask: torch.Tensor = mask) -> torch.Tensor:
                real = mask.to(t.device).unsqueeze(-1)
                return torch.where(real, sae.reconstruct(t).to(t.dtype), t)

            def zero(t: torch.Tensor, mask: torch.Tensor = mask) -> torch.Tensor:
                return t.masked_fill(mask.to(t.device).unsqueeze(-1), 0)

            # "clean" passes the site through unchanged by an edit, so all three runs take
            # the same (edited) path through the backend, whose kernels may differ slightly
            # from an unedited run's
            for i, edits in enumerate(
                (
                    [Edit.apply(info.name, lambda t: t)],
                    [Edit.apply(info.name, splice)],
                    [Edit.apply(info.name, zero)],
                )
            ):
                logits = backend.run(batch, capture=["logits"], edits=edits).logits
                loss, n = next_token_loss(logits, ids, mask)
                totals[i] += loss
            count += n
    finally:
        sae.train(was_training)
    if count == 0:
        raise ParameterError("spliced_loss needs texts of at least two tokens")
    clean, spliced, zero_loss = (t / count for t in totals)
    gap = zero_loss - clean
    return SplicedLoss(
        site=info.name,
        clean=clean,
        spliced=spliced,
        zero_ablated=zero_loss,
        loss_recovered=(zero_loss - spliced) / gap if gap != 0 else float("nan"),
        n_tokens=count,
    )
