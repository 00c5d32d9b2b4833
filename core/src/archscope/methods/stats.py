"""activation-stats: mean norm and variance of each site over real tokens."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..batch import real_tokens
from ..registry import method
from ..results import Result


@dataclass
class SiteStats(Result):
    site: str
    mean_norm: float
    variance: float
    n_vectors: int


@dataclass
class ActivationStats(Result):
    backend: str
    sites: list[SiteStats] = field(default_factory=list)

    def to_markdown(self) -> str:
        rows = [
            f"| {s.site} | {s.mean_norm:.4g} | {s.variance:.4g} | {s.n_vectors} |"
            for s in self.sites
        ]
        return "\n".join(
            [
                f"## Activation statistics ({self.backend})",
                "",
                "| site | mean L2 norm | variance | vectors |",
                "|---|---|---|---|",
                *rows,
            ]
        )


@method(
    "activation-stats",
    "Per-site mean norm and variance over real tokens (a first look at any model)",
    requires={"residual"},
)
def activation_stats(
    backend: Any, inputs: Any, *, sites: list[str] | None = None
) -> ActivationStats:
    """Mean L2 norm and variance of each site (default: every layer's main site)."""
    names = sites if sites is not None else backend.layer_names()
    result = backend.run(inputs, capture=names)
    out = ActivationStats(backend=backend.name)
    for name in names:
        acts = result[name].float()
        info = backend.site_info(name)
        vectors = (
            real_tokens(acts, result.attention_mask, info.shape.index("seq"))
            if info.kind == "token"
            else acts.flatten(1)
        )
        out.sites.append(
            SiteStats(
                site=str(name),
                mean_norm=float(vectors.norm(dim=-1).mean()),
                variance=float(vectors.var(dim=0).mean()) if len(vectors) > 1 else 0.0,
                n_vectors=len(vectors),
            )
        )
    return out
