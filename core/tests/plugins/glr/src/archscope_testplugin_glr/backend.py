"""Where the sites of a GLRLM live."""

from __future__ import annotations

from typing import Any

from archscope.detection import Confidence
from archscope.engine import HookBackend, Hookpoint, RunContext, SiteTable


class GLRBackend(HookBackend):
    name = "glr"
    description = "gated linear recurrence LMs (GLRLM)"
    capabilities = frozenset(
        {"residual", "components", "recurrent_state", "state_patch", "unembed", "logits", "edit"}
    )
    padding = "right"  # the recurrence is causal; the model ignores attention masks
    regroup_states = True  # the model's states are the ones after the padding

    @classmethod
    def can_handle(cls, model: Any) -> float | None:
        return Confidence.EXACT if type(model).__name__ == "GLRLM" else None

    def site_table(self) -> SiteTable:
        m = self.model
        d = m.embed.embedding_dim
        table = SiteTable()
        table.add("embed", Hookpoint(m.embed), dim=d)
        for i, block in enumerate(m.blocks):
            table.add(f"layer_{i}.mixer", Hookpoint(block.mixer), dim=d)
            table.add(f"layer_{i}.residual", Hookpoint(block), dim=d)
            table.add(f"layer_{i}.state", Hookpoint(block, index=1), dim=d)
        table.add("final_norm", Hookpoint(m.norm), dim=d)
        table.add("logits", Hookpoint(m.head), dim=m.vocab_size)
        return table

    def forward(self, ctx: RunContext) -> Any:
        start = ctx.initial_state or {}
        states = [start.get(f"layer_{i}.state") for i in range(len(self.model.blocks))]
        return self.model(ctx.batch["input_ids"], states=states)

    def unembed(self, residual: Any) -> Any:
        return self.model.head(self.model.norm(residual))
