"""logit-lens: every layer's residual stream read through the model's own unembedding."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from ..engine import last_real_index
from ..results import Result


@dataclass
class LensLayer(Result):
    layer_name: str
    top_ids: list[list[int]]
    entropy: list[float]
    kl_to_final: list[float]


@dataclass
class LogitLensRun(Result):
    backend: str
    layers: list[LensLayer] = field(default_factory=list)

    def to_markdown(self) -> str:
        rows = [f"| {ly.layer_name} | {ly.top_ids[0]} | {ly.entropy[0]:.3f} | {ly.kl_to_final[0]:.3f} |"
                for ly in self.layers]
        return "\n".join([f"## Logit lens ({self.backend}), first sequence", "",
                          "| layer | top ids | entropy | KL to final |", "|---|---|---|---|", *rows])


def logit_lens_run(backend: Any, inputs: Any, *, top_k: int = 5,
                   position: int | Literal["last"] = "last") -> LogitLensRun:
    import torch

    names = backend.layer_names()
    result = backend.run(inputs, capture=[*names, "logits"])
    mask = result.attention_mask
    rows = torch.arange(mask.shape[0], device=mask.device)
    cols = last_real_index(mask) if position == "last" else torch.full_like(rows, int(position))
    final = torch.log_softmax(result.logits[rows, cols].float(), -1)
    out = LogitLensRun(backend=backend.name)
    for name in names:
        logits = backend.unembed(result[name][rows, cols]).float()
        logp = torch.log_softmax(logits, -1)
        entropy = -(logp.exp() * logp).sum(-1)
        kl = (final.exp() * (final - logp)).sum(-1)
        out.layers.append(LensLayer(layer_name=name,
                                    top_ids=logits.topk(min(top_k, logits.shape[-1])).indices.tolist(),
                                    entropy=entropy.tolist(), kl_to_final=kl.tolist()))
    return out
