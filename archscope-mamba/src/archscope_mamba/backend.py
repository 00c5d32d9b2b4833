"""The `mamba` backend: Mamba, Mamba-2 and hybrid state-space/attention stacks.

Hugging Face models (Mamba, Mamba-2, Falcon-Mamba, Jamba, Bamba, Zamba2, Falcon-H1,
GraniteMoeHybrid, Nemotron-H) and native ``mamba_ssm`` models (``MambaLMHeadModel``) are found
by structure: a block list whose blocks hold an SSM mixer (a module with ``A_log``, ``conv1d``
and ``dt_bias`` or ``dt_proj``). Each layer exposes the sites it really has; recurrent states
are read from the model's own cache, so reading them runs the same kernels as a plain forward.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import TYPE_CHECKING, Any, cast

from archscope import BackendError
from archscope.detection import Confidence
from archscope.engine import HookBackend, Hookpoint, RunContext, SiteTable

from .continuing import continue_from_state
from .freeze import CANNOT_FREEZE, FREEZES, unfreezable
from .freeze import frozen_run as _frozen_run
from .native import NativeInferenceParams, NativeResidualView, native_states_of_padded_rows
from .plan import RowsView, RunPlan, roll_rows, run_plan
from .scan import SCAN_EXTRA, own_scan, scan_keeps
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
    describe_layer,
    find_stack,
    is_native,
    is_ssm_mixer,
)
from .writes import (
    WRITE_ROLES,
    declare_write_sites,
    frozen_write_sites,
    layer_runs,
    mixer_kind,
    write_hooks,
    write_sites_of,
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
        {
            "residual",
            "components",
            "unembed",
            "logits",
            "recurrent_state",
            "state_patch",
            "edit",
            "freeze",
        }
    )
    priority = 10
    #: What `frozen_run` holds and what it cannot (`archscope_mamba.freeze`).
    freezes = FREEZES
    cannot_freeze = CANNOT_FREEZE
    padding = "both"
    #: The write sites (``layer_i.state_write`` ...) have no hookpoint; their edits are applied
    #: while the mixer runs (`archscope_mamba.writes`).
    edits_unhooked = True

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

    # -- freezing ------------------------------------------------------------------------------
    def frozen_run(self, values: Any) -> contextlib.AbstractContextManager[None]:
        """Runs with Δ, B, C, gates, the convolution's SiLU and norm scales held at
        ``values`` (`archscope.freeze`; `archscope_mamba.freeze`)."""
        return _frozen_run(self, values)

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
        self.frozen_unavailable = unfreezable(self)
        if self.frozen_unavailable:
            self.capabilities = self.capabilities - {"freeze"}

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

    def site_table(self) -> SiteTable:
        """Each layer's sub-layers, its residual stream and its recurrent states (read from the
        cache, so without a hookpoint), in forward order. Token sites are read through the
        run's plan (`RowsView`)."""
        d = self.d_model
        rows = RowsView(self._plan)
        table = SiteTable(self.model)

        def token(name: str, module: Any, description: str, **kw: Any) -> None:
            table.add(name, Hookpoint(module, view=rows, **kw), d, description=description)

        config = getattr(self.model, "config", None)
        scaled_embedding = float(getattr(config, "embedding_multiplier", 1.0) or 1.0) != 1.0
        if self.embedding is not None and not scaled_embedding and not self.native:
            token("embed", self.embedding, "residual stream before block 0")
        else:  # the embedding is scaled (or native): read the stream where block 0 takes it
            token("embed", self.layers[0].block, "residual stream before block 0", io="input")
        for layer in self.layers:
            i, block = layer.index, layer.block
            # Zamba2's hybrid layers add the shared transformer's output (``linear``) into the
            # mixer's input: there the attention comes first.
            attn = (f"layer_{i}.attn", layer.attn, "attention sub-layer output")
            mixer = (f"layer_{i}.mixer", layer.ssm, "SSM mixer output")
            mlp = (f"layer_{i}.mlp", layer.mlp, "MLP / MoE output")
            steps = [attn, mixer, mlp] if layer.attn == "linear" else [mixer, attn, mlp]
            for name, path, description in steps:
                if path is not None:
                    token(name, _get(block, path), description)
            if self.native:
                where = Hookpoint(block, index=None, view=NativeResidualView(self._plan))
                table.add(
                    f"layer_{i}.residual", where, d, description="residual stream after the block"
                )
            else:
                token(f"layer_{i}.residual", block, "residual stream after the block")
            if layer.ssm is not None:
                kind, *sizes = layer.state_shape
                shape = (
                    ("batch", "d_inner", "d_state")
                    if kind == "mamba"
                    else ("batch", "heads", "head_dim", "d_state")
                )
                # States are set through run(initial_state=...) / state_patch, not edits.
                table.add(
                    f"layer_{i}.ssm_state",
                    None,
                    sizes[-1],
                    shape=shape,
                    description="SSM state after the last real token",
                    size=tuple(sizes),
                )
                table.add(
                    f"layer_{i}.conv_state",
                    None,
                    layer.conv_shape[1],
                    description="causal-conv input window after the last real token",
                    size=layer.conv_shape,
                )
                if not self.native and mixer_kind(_get(block, layer.ssm)) is not None:
                    declare_write_sites(table, i, layer.state_shape)
        if self.native and self.lm_head is not None:
            # The fused add+norm path calls a kernel, not norm_f: read the head's input instead.
            token("final_norm", self.lm_head, "", io="input", arg="input")
        elif self.final_norm is not None:
            token("final_norm", self.final_norm, "")
        if self.lm_head is not None:
            vocab = int(self.lm_head.weight.shape[0])
            table.add("logits", None, vocab, description="output logits")
        return table

    @property
    def ssm_layers(self) -> list[LayerMap]:
        return [layer for layer in self.layers if layer.ssm is not None]

    @functools.cached_property
    def state_sites(self) -> list[str]:
        return self.table.names(kind="state")

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
    def _plan(self, ctx: RunContext) -> RunPlan:
        return run_plan(self, ctx)

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
            native_states_of_padded_rows(self.model, ctx, plan)
            return output

        inputs = dict(ctx.batch)
        if plan.shift is not None:  # the hooks' views show token sites in the caller's layout
            for key in ("input_ids", "attention_mask"):
                if key in inputs:
                    inputs[key] = roll_rows(inputs[key], plan.shift)
        mask = inputs.get("attention_mask")
        if mask is not None and bool(mask.all()):
            # An all-ones mask changes nothing but costs two multiplications per SSM layer.
            del inputs["attention_mask"]
        output = self.model(**inputs, use_cache=plan.wants_state)
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
        for name in names:  # the write hooks stored these while the mixers ran
            if name in ctx.store and name.partition(".")[2] in WRITE_ROLES:
                values[name] = ctx.store[name]
        states = [n for n in names if n != "logits" and n.partition(".")[2] not in WRITE_ROLES]
        if states:
            values.update(self._edited_states(ctx, read_states(self, plan, states)))
        return {k: v for k, v in values.items() if v is not None}

    def final_state(self, ctx: RunContext, output: Any) -> dict[str, torch.Tensor]:
        self.require("state_patch")
        return self._edited_states(ctx, read_states(self, self._plan(ctx), self.state_sites))

    # -- state writes --------------------------------------------------------------------------
    def execute(self, request: RunContext) -> Any:
        # An edited write changes everything after its layer: such runs go to the end.
        if request.stop_early and write_sites_of(request.edits):
            request = dataclasses.replace(request, stop_early=False)
        return super().execute(request)

    def run_settings(self, ctx: RunContext) -> contextlib.AbstractContextManager[Any]:
        """The own selective scan on the Mamba-1 mixers (`archscope_mamba.scan`, where it gives
        transformers' values exactly) and hooks that compute the write sites (and carry their
        edits) while the mixers run."""
        settings = contextlib.ExitStack()
        writes = write_sites_of([*ctx.capture, *ctx.edits])
        plan = self._plan(ctx)
        if writes and plan.stepping:
            raise BackendError(
                "the write sites (state_write, write_value, write_key, write_decay, ssm_states, "
                "effective_attention) are computed over a whole sequence, not in a run "
                "continued from initial_state; run the prefix and suffix together instead"
            )
        frozen = self.frozen_writes
        mixers = self._scan_mixers if self.use_own_scan and not plan.stepping else {}
        if mixers:
            # a frozen run's write sites come from the frozen recomputation, not the scan
            captured = write_sites_of(ctx.capture) if frozen is None else {}
            keep = {i: scan_keeps(captured.get(i, set())) for i in mixers}
            ctx.extra[SCAN_EXTRA] = settings.enter_context(own_scan(mixers, keep))
        if writes and frozen is not None:
            settings.enter_context(frozen_write_sites(self, ctx, plan.shift, roll_rows, frozen))
        elif writes:
            settings.enter_context(write_hooks(self, ctx, plan.shift, roll_rows))
        return settings

    #: Inside `frozen_run`: each layer's write sites of the current run, which the frozen
    #: recomputation of its mixer reads (`archscope_mamba.writes.frozen_write_sites`); None
    #: outside a frozen run.
    frozen_writes: dict[int, Any] | None = None

    #: Whether HF Mamba-1 mixers run `archscope_mamba.scan.selective_scan` (transformers' CPU
    #: values bit for bit, faster) where its conditions hold; set False to run transformers'
    #: own function in every case.
    use_own_scan = True

    @functools.cached_property
    def _scan_mixers(self) -> dict[int, Any]:
        """The HF Mamba-1 mixers by layer index (native models and Mamba-2 have none)."""
        if self.native:
            return {}
        out = {}
        for layer in self.ssm_layers:
            mixer = _get(layer.block, cast("str", layer.ssm))
            if mixer_kind(mixer) == "mamba":
                out[layer.index] = mixer
        return out

    def _edited_states(
        self, ctx: RunContext, states: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """``states`` with the effect of edited writes on the state after the last position."""
        seen = layer_runs(ctx)
        if not seen:
            return states
        out = dict(states)
        for index, layer_run in seen.items():
            name = f"layer_{index}.ssm_state"
            if name in out and layer_run.delta_state is not None:
                delta = layer_run.delta_state
                if self.layers[index].state_shape[0] == "mamba":
                    delta = delta[:, :, 0]  # (b, d_inner, 1, d_state) -> (b, d_inner, d_state)
                out[name] = out[name] + delta.to(out[name].dtype)
        return out
