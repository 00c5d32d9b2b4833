"""The backend: which models it serves, and where each site lives in them.

The core does the rest (validating requests, capture, early stop, edits, hook removal). Torch
is not imported here at module level, so discovery stays fast.
"""

from __future__ import annotations

from typing import Any

from archscope.detection import Confidence
from archscope.engine import HookBackend, Hookpoint, SiteTable


class MinGRUBackend(HookBackend):
    name = "mingru"
    description = "MinGRULM language models (template plugin)"
    capabilities = frozenset({"residual", "components", "unembed", "logits", "edit"})
    # The recurrence is causal: right-padded rows are exact at real tokens; left padding is not,
    # so the core refuses left-padded batches with a clear error.
    padding = "right"

    @classmethod
    def can_handle(cls, model: Any) -> float | None:
        # Decide from the class and its attributes only: never import torch here, never raise.
        if type(model).__name__ == "MinGRULM" and hasattr(model, "blocks"):
            return Confidence.EXACT
        return None

    def site_table(self) -> SiteTable:
        # Add sites in forward order; kinds, shapes and descriptions come from the role names.
        model = self.model
        d = model.embed.embedding_dim
        table = SiteTable()
        table.add("embed", Hookpoint(model.embed), dim=d)
        for i, block in enumerate(model.blocks):
            table.add(f"layer_{i}.mixer", Hookpoint(block.mixer), dim=d)
            table.add(f"layer_{i}.mlp", Hookpoint(block.mlp), dim=d)
            table.add(f"layer_{i}.residual", Hookpoint(block), dim=d)
        table.add("final_norm", Hookpoint(model.norm), dim=d)
        table.add("logits", Hookpoint(model.head), dim=model.vocab_size)
        return table

    def unembed(self, residual: Any) -> Any:
        return self.model.head(self.model.norm(residual))
