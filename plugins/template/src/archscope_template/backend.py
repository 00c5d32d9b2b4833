"""The backend: which models it serves, and where each site lives in them.

The core's hook engine does the rest (capture, early stop, edits, hook removal). Torch is not
imported here at module level, so discovery stays fast.
"""

from __future__ import annotations

from typing import Any

from archscope import Site, SiteInfo
from archscope.engine import HookBackend, Hookpoint


class MinGRUBackend(HookBackend):
    name = "mingru"
    description = "MinGRULM language models (template plugin)"
    capabilities = frozenset({"residual", "components", "unembed", "logits", "edit"})
    # The recurrence is causal: right-padded rows are exact at real tokens; left padding is not,
    # so the engine refuses left-padded batches with a clear error.
    padding = "right"

    @classmethod
    def can_handle(cls, model: Any) -> float | None:
        # Decide from the class and its attributes only: never import torch here, never raise.
        if type(model).__name__ == "MinGRULM" and hasattr(model, "blocks"):
            return 1.0
        return None

    def site_table(self) -> dict[str, tuple[SiteInfo, Hookpoint | None]]:
        model = self.model
        d = model.embed.embedding_dim
        tokens = ("batch", "seq", "d_model")
        table: dict[str, tuple[SiteInfo, Hookpoint | None]] = {
            "embed": (SiteInfo(Site("embed"), "token", tokens, d, order=0),
                      Hookpoint(model.embed)),
        }
        for i, block in enumerate(model.blocks):
            base = 10 * (i + 1)
            table[f"layer_{i}.mixer"] = (SiteInfo(Site("mixer", i), "token", tokens, d,
                                                  order=base + 1), Hookpoint(block.mixer))
            table[f"layer_{i}.mlp"] = (SiteInfo(Site("mlp", i), "token", tokens, d,
                                                order=base + 2), Hookpoint(block.mlp))
            table[f"layer_{i}.residual"] = (SiteInfo(Site("residual", i), "token", tokens, d,
                                                     order=base + 3), Hookpoint(block))
        end = 10 * (len(model.blocks) + 1)
        table["final_norm"] = (SiteInfo(Site("final_norm"), "token", tokens, d, order=end),
                               Hookpoint(model.norm))
        table["logits"] = (SiteInfo(Site("logits"), "token", ("batch", "seq", "vocab"),
                                    model.vocab_size, writable=False, order=end + 1),
                           Hookpoint(model.head))
        return table

    def unembed(self, residual: Any) -> Any:
        return self.model.head(self.model.norm(residual))
