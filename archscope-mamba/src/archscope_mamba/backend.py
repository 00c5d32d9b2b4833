"""The `mamba` backend: Mamba, Mamba-2 and hybrid state-space/attention stacks.

Hugging Face models (Mamba, Mamba-2, Falcon-Mamba, Jamba, Bamba, Zamba2, Falcon-H1,
GraniteMoeHybrid, Nemotron-H) and native ``mamba_ssm`` models (``MambaLMHeadModel``) are found
by structure: a block list whose blocks hold an SSM mixer (a module with ``A_log``, ``conv1d``
and ``dt_bias`` or ``dt_proj``). Each layer exposes the sites it really has; recurrent states
are read from the model's own cache, so reading them runs the same kernels as a plain forward.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from archscope import BackendError, Site, SiteInfo
from archscope.detection import Confidence
from archscope.engine import HookBackend, Hookpoint, RunContext

from .continuing import continue_from_state
from .native import NativeInferenceParams, attach_native_residual, native_states_of_padded_rows
from .plan import _Plan, roll_rows, run_plan, wrap_edit
from .states import output_cache, read_cache_state, read_states
from .structure import (
    ATTN_PATHS,
    EMBED_PATHS,
    FINAL_NORM_PATHS,
    MLP_PATHS,
    SSM_PATHS,
    STACK_PATHS,
    LayerMap,
    _first_attr,
    _get,
    build_site_table,
    describe_layer,
    find_stack,
    is_native,
    is_ssm_mixer,
)

if TYPE_CHECKING:
    import torch

# Names that lived here before the backend was split by concept (kept importable from here).
__all__ = [
    "ATTN_PATHS",
    "EMBED_PATHS",
    "FINAL_NORM_PATHS",
    "MLP_PATHS",
    "SSM_PATHS",
    "STACK_PATHS",
    "LayerMap",
    "MambaBackend",
    "NativeInferenceParams",
    "describe_layer",
    "find_stack",
    "is_native",
    "is_ssm_mixer",
    "output_cache",
    "read_cache_state",
    "roll_rows",
]


class MambaBackend(HookBackend):
    """Sites of Mamba / Mamba-2 stacks and hybrid SSM/attention stacks."""

    name = "mamba"
    description = (
        "state-space and hybrid models: HF Mamba, Mamba-2, Falcon-Mamba, Jamba, Bamba, "
        "Zamba2, Falcon-H1, GraniteMoeHybrid, Nemotron-H; native mamba_ssm"
    )
    capabilities = frozenset(
        {"residual", "components", "unembed", "logits", "recurrent_state", "state_patch", "edit"}
    )
    priority = 10
    padding = "both"

    # -- detection -----------------------------------------------------------------------------
    @classmethod
    def can_handle(cls, model: Any) -> float | None:
        try:
            if find_stack(model) is None:
                return None
            # Above what a transformer backend claims for a decoder with a layer list, so that
            # hybrids (attention + SSM layers) come here.
            return Confidence.KNOWN
        except Exception:
            return None

    # -- structure -----------------------------------------------------------------------------
    def __init__(self, model: Any) -> None:
        stack = find_stack(model)
        if stack is None:
            raise BackendError(
                f"{type(model).__name__} has no block list with an SSM mixer (looked for "
                f"{', '.join(STACK_PATHS)} holding modules with A_log, conv1d and dt_bias/"
                "dt_proj); pass hint=<another backend> for non-SSM models"
            )
        self.stack_path, self.blocks = stack
        self.native = is_native(model)
        self.base = (
            _get(model, self.stack_path.rsplit(".", 1)[0]) if "." in self.stack_path else model
        )
        self.layers = [describe_layer(i, b) for i, b in enumerate(self.blocks)]
        self.lm_head = _get(model, "lm_head")
        if self.lm_head is None and hasattr(model, "get_output_embeddings"):
            self.lm_head = model.get_output_embeddings()
        self.final_norm = next(
            (m for m in (_get(self.base, p) for p in FINAL_NORM_PATHS) if m is not None), None
        )
        self.embedding = next(
            (m for m in (_get(self.base, p) for p in EMBED_PATHS) if m is not None), None
        )
        super().__init__(model)
        # Continuing from a swapped state needs every layer's state; attention layers would
        # also need their key/value cache, which is not a site (and HF hybrids' caches do not
        # decode step by step without one).
        if any(layer.ssm is None or layer.attn is not None for layer in self.layers):
            self.capabilities = type(self).capabilities - {"state_patch"}
        if self.native:
            self.padding = "right"  # native models take no attention mask

    def input_limits(self) -> Any:
        """The default limits; a native model (no Hugging Face embedding accessor, its embed
        site read at the first block's input) takes its vocabulary from its embedding."""
        from archscope.guards import InputLimits

        limits = super().input_limits()
        rows = getattr(self.embedding, "num_embeddings", None)
        if limits.vocab_size is None and isinstance(rows, int):
            return InputLimits(rows, limits.max_positions)
        return limits

    @property
    def d_model(self) -> int:
        weight = _get(self.embedding, "weight")
        if weight is not None:
            return int(weight.shape[-1])
        return int(_first_attr(getattr(self.model, "config", None), ("hidden_size", "d_model")))

    def site_table(self) -> dict[str, tuple[SiteInfo, Hookpoint | None]]:
        return build_site_table(self)

    @property
    def ssm_layers(self) -> list[LayerMap]:
        return [layer for layer in self.layers if layer.ssm is not None]

    @property
    def state_sites(self) -> list[str]:
        return [n for n, (info, _) in self._table.items() if info.kind == "state"]

    def _layer_of_state(self, name: str) -> LayerMap:
        layer = Site.parse(name).layer
        assert layer is not None
        return self.layers[layer]

    # -- unembedding ---------------------------------------------------------------------------
    def unembed(self, residual: torch.Tensor) -> torch.Tensor:
        if self.final_norm is None or self.lm_head is None:
            raise BackendError(
                f"{type(self.model).__name__}: cannot unembed, no final norm "
                f"({', '.join(FINAL_NORM_PATHS)}) or no lm_head was found; wrap a model with a "
                "language-model head (e.g. MambaForCausalLM, not MambaModel)"
            )
        from archscope.guards import unembed_input

        residual = unembed_input(
            residual,
            self.site_info(self.layer_names()[-1]).dim,
            f"backend {self.name!r} unembed",
            self.model,
        )
        normed = self.final_norm(residual.to(dtype=self.final_norm.weight.dtype))
        logits = self.lm_head(normed)
        scale = getattr(self.base, "lm_head_multiplier", None)  # Falcon-H1
        if scale is not None:
            logits = logits * scale
        divisor = getattr(self.model, "logits_scaling", None)  # GraniteMoeHybrid
        if divisor is not None:
            logits = logits / divisor
        return cast("torch.Tensor", logits)

    # -- running -------------------------------------------------------------------------------
    def _plan(self, ctx: RunContext) -> _Plan:
        return run_plan(self, ctx)

    # Not hookpoint views: what an edit is applied to depends on the run (rows shifted from right
    # to left padding, or one decoding step of a continued run), while the views live in the site
    # table built once per backend; and a native block's residual stream is the sum of both
    # elements of its output tuple, while a view sees one element.
    def _attach(self, name: str, ctx: RunContext) -> Any:
        plan = self._plan(ctx)
        info = self._table[name][0]
        original = ctx.edits.get(name)
        if original and info.kind == "token" and (plan.shift is not None or plan.stepping):
            ctx.edits[name] = [wrap_edit(e, info, plan) for e in original]
        try:
            if self.native and info.site.role == "residual":
                return attach_native_residual(self, name, ctx)
            return super()._attach(name, ctx)
        finally:
            if original is not None:
                ctx.edits[name] = original

    def forward(self, ctx: RunContext) -> Any:
        plan = self._plan(ctx)
        if plan.stepping:
            return continue_from_state(self, ctx, plan)
        if self.native:
            ids = ctx.batch["input_ids"]
            if not plan.wants_state:
                return self.model(ids)
            plan.cache = NativeInferenceParams(
                max_seqlen=int(ids.shape[1]), max_batch_size=int(ids.shape[0])
            )
            output = self.model(ids, inference_params=plan.cache)
            native_states_of_padded_rows(self, ctx, plan)
            return output

        batch = ctx.batch
        if plan.shift is not None:
            ctx.batch = {
                k: roll_rows(v, plan.shift) if k in ("input_ids", "attention_mask") else v
                for k, v in batch.items()
            }
        inputs = dict(ctx.batch)
        mask = inputs.get("attention_mask")
        if mask is not None and bool(mask.all()):
            # An all-ones mask changes nothing but costs two multiplications per SSM layer.
            del inputs["attention_mask"]
        try:
            output = self.model(**inputs, use_cache=plan.wants_state)
        finally:
            ctx.batch = batch
            if plan.shift is not None:
                for key, value in ctx.store.items():
                    if self._table[key][0].kind == "token":
                        ctx.store[key] = roll_rows(value, -plan.shift)
        if plan.shift is not None and getattr(output, "logits", None) is not None:
            output.logits = roll_rows(output.logits, -plan.shift)
        if plan.wants_state:
            plan.cache = output_cache(output)
        return output

    def read_unhooked(self, ctx: RunContext, output: Any, names: list[str]) -> dict[str, Any]:
        plan = self._plan(ctx)
        values: dict[str, Any] = {}
        if "logits" in names:
            values["logits"] = self.logits_of(output) if output is not None else None
        states = [n for n in names if n != "logits"]
        if states:
            values.update(read_states(self, plan, states))
        return {k: v for k, v in values.items() if v is not None}

    def final_state(self, ctx: RunContext, output: Any) -> dict[str, torch.Tensor]:
        self.require("state_patch")
        return read_states(self, self._plan(ctx), self.state_sites)
