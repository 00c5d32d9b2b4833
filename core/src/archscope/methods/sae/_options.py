"""The ``sae`` method's parameters: its one schema. `SAEConfig` takes its training defaults
(sparsity, learning rate, batch size, k, seed) from here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from ...params import Param


@dataclass
class SAEOptions:
    """What SAE to train on which site, and how to measure it."""

    site: Annotated[str | None, Param(help="token site (default: the middle layer's)")] = None
    sae_type: Literal["dense", "rank1", "topk", "batchtopk"] = "topk"
    n_features: Annotated[int | None, Param(min=1, help="default: 8 x site dimension")] = None
    k: Annotated[int, Param(min=1, help="active features per token (topk, batchtopk)")] = 32
    sparsity: Annotated[float, Param(min=0, help="L1 coefficient (dense, rank1)")] = 0.1
    epochs: Annotated[int, Param(min=1)] = 10
    batch_size: Annotated[int, Param(min=1, help="tokens per training step")] = 4096
    learning_rate: Annotated[float, Param(min=0)] = 1e-3
    eval_fraction: Annotated[float, Param(min=0, max=0.9, help="share of texts held out")] = 0.2
    stream: Annotated[
        bool, Param(help="re-run the model each epoch instead of keeping activations in memory")
    ] = False
    text_batch_size: Annotated[int, Param(min=1, help="texts per forward pass")] = 32
    seed: int = 0
    save: Annotated[str | None, Param(help="folder to save the SAE artifact to")] = None
    saelens_dir: Annotated[str | None, Param(help="folder to export SAELens's layout to")] = None
    pool: Annotated[
        Literal["mean", "last"] | None,
        Param(help="one vector per text (mean or last real token) instead of every token"),
    ] = None
    positions: Annotated[
        str,
        Param(
            help="real-token positions to train on: all, last, or indices such as 0,-1 "
            "(negative from each text's last token)"
        ),
    ] = "all"
