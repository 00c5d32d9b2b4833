"""The `hybrid` backend: language models that mix recurrent sequence mixers with attention.

Found by structure: a block list in which some blocks hold a gated delta net (a depthwise
``conv1d``, a decay ``A_log`` and head sizes: Qwen3-Next, Qwen3.5, OLMo-hybrid; or the decay in a
``forget_gate``: Kimi-Linear's KDA), a gated short convolution (``in_proj`` -> depthwise ``conv``
-> ``out_proj``: LFM2, LFM2-MoE) or lightning attention (``qkv_proj``, ``output_gate``, a per-head
decay ``slope_rate``: MiniMax), and the others softmax attention (``self_attn``). Recurrent states
are read from the model's own cache after the same forward pass, so reading them runs the
model's own kernels.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, cast

from archscope import BackendError, Edit, SiteInfo
from archscope.detection import Confidence
from archscope.engine import (
    HookBackend,
    Hookpoint,
    RunContext,
    RunRequest,
    SiteTable,
    View,
    apply_edit,
)
from archscope.recurrence import WRITE_ROLES, write_sites_of

from .continuing import Plan
from .freeze import CANNOT_FREEZE, FREEZES, unfreezable
from .freeze import frozen_run as _frozen_run
from .structure import (
    ATTENTION,
    EMBED_NAMES,
    FINAL_NORM_NAMES,
    GATED_DELTA,
    LIGHTNING,
    OPERATOR_POST_NORMS,
    POST_NORMS,
    SHORT_CONV,
    STACK_PATHS,
    Layer,
    base_of,
    describe,
    find_stack,
    first_child,
    get,
)
from .writes import (
    declare_layer_writes,
    frozen_write_sites,
    layer_runs,
    variant_of,
    write_hooks,
)

if TYPE_CHECKING:
    import torch

#: The first transformers release that fills a cache for a stack without attention layers (it
#: takes the per-layer-type mask mapping, see `HybridBackend.mask_argument`); below it such a
#: stack's recurrent states cannot be read.
CACHE_WITHOUT_ATTENTION = (5, 25)

#: Attributes transformers sets on a model once it has installed its output-capturing hooks.
_LIBRARY_HOOK_FLAGS = ("_output_capturing_hooks_installed",)


class StepView(View):
    """Token sites; during a run continued from a state the model is fed one token at a time,
    so the hook holds one step of the site, and an edit is placed on the whole suffix first."""

    def __init__(self, plan_of: Any) -> None:
        self.plan_of = plan_of

    def edit(
        self, value: torch.Tensor, edit: Edit, info: SiteInfo, run: RunRequest
    ) -> torch.Tensor:
        plan: Plan = self.plan_of(run)
        if not plan.stepping:
            return apply_edit(value, edit, info, run.attention_mask)
        import torch

        whole = value.new_zeros((value.shape[0], plan.steps, *value.shape[2:]))
        whole[:, plan.step] = value[:, 0]
        mask = torch.ones(whole.shape[:2], dtype=torch.long, device=value.device)
        return apply_edit(whole, edit, info, mask)[:, plan.step : plan.step + 1]


_MIXER_NAMES = {
    GATED_DELTA: "gated delta net",
    SHORT_CONV: "short convolution",
    LIGHTNING: "lightning attention",
}


class HybridBackend(HookBackend):
    """Sites of gated-delta-net and short-convolution hybrids (with or without attention)."""

    name = "hybrid"
    description = (
        "recurrent/attention hybrids found by structure: gated delta nets (Qwen3-Next, "
        "Qwen3.5, OLMo-hybrid, Kimi-Linear), short convolutions (LFM2, LFM2-MoE, LFM3) and "
        "lightning attention (MiniMax)"
    )
    capabilities = frozenset(
        {
            "residual",
            "components",
            "unembed",
            "logits",
            "recurrent_state",
            "state_patch",
            "attention_patterns",
            "edit",
            "freeze",
        }
    )
    priority = 10
    padding = "both"
    #: What `frozen_run` holds and what it cannot (`archscope_hybrid.freeze`).
    freezes = FREEZES
    cannot_freeze = CANNOT_FREEZE
    # A right-padded row's state keeps evolving over the pads (the decay of a gated delta net
    # applies at every position): the core reads states from passes trimmed to each length.
    regroup_states = True
    #: The write sites (``layer_i.state_write`` ...) have no hookpoint; their edits are applied
    #: while the mixer runs (`archscope_hybrid.writes`).
    edits_unhooked = True

    def frozen_run(self, values: Any) -> contextlib.AbstractContextManager[None]:
        """Runs with the recurrent mixers' factors (gated delta nets, KDA, lightning attention:
        decays, β, queries, keys, gates; LFM2 short convolutions: the B and C gates), attention
        patterns, MLP gates, expert routing and norm scales held at ``values`` (`archscope.freeze`;
        `archscope_hybrid.freeze`)."""
        return _frozen_run(self, values)

    @classmethod
    def can_handle(cls, model: Any) -> float | None:
        try:
            if find_stack(model) is None:
                return None
            # Above what the transformer backend claims for a decoder with a layer list.
            return Confidence.KNOWN
        except Exception:
            return None

    def __init__(self, model: Any) -> None:
        stack = find_stack(model)
        if stack is None:
            raise BackendError(
                f"{type(model).__name__} has no block list ({', '.join(STACK_PATHS)}) with a "
                "gated delta net (conv1d, A_log, head sizes) or a short convolution (in_proj, "
                "conv, out_proj); pass hint=<another backend> for other models"
            )
        self.stack_path, blocks = stack
        self.layers: list[Layer] = [describe(i, b) for i, b in enumerate(blocks)]
        self.base = base_of(model, self.stack_path)
        self.embed_name, self.embedding = first_child(self.base, EMBED_NAMES)
        self.norm_name, self.final_norm = first_child(self.base, FINAL_NORM_NAMES)
        self.lm_head = get(model, "lm_head")
        if self.lm_head is None and hasattr(model, "get_output_embeddings"):
            self.lm_head = model.get_output_embeddings()
        super().__init__(model)
        caps = set(type(self).capabilities)
        if all(layer.recurrent for layer in self.layers):
            caps.discard("attention_patterns")
        if any(not layer.recurrent or layer.kind == LIGHTNING for layer in self.layers):
            # Continuing from a state would also need every attention layer's key/value cache,
            # which is not a site: state patching is offered on all-recurrent stacks only (and
            # not for lightning attention, whose state lives in a cache class of its own).
            caps.discard("state_patch")
        if self.lm_head is None:
            caps -= {"logits", "unembed"}
        self.frozen_unavailable = unfreezable(self)
        if self.frozen_unavailable:
            caps.discard("freeze")
        self.capabilities = frozenset(caps)

    # -- sites ---------------------------------------------------------------------------------
    @property
    def d_model(self) -> int:
        weight = get(self.embedding, "weight")
        if weight is not None:
            return int(weight.shape[-1])
        return int(self.model.config.hidden_size)

    @property
    def all_recurrent(self) -> bool:
        return all(layer.recurrent for layer in self.layers)

    def site_table(self) -> SiteTable:
        """Per layer, in forward order: the mixer's (or attention's) output, the attention
        pattern, the MLP output, the residual stream after the block, then the recurrent states
        (read from the cache, so without a hookpoint)."""
        d = self.d_model
        view = StepView(self._plan)
        table = SiteTable(self.model)
        prefix = self.stack_path

        def token(name: str, path: str, description: str, **kw: Any) -> None:
            table.add(name, Hookpoint(path, view=view, **kw), d, description=description)

        if self.embedding is not None:
            token("embed", _join(prefix, "..", self.embed_name), "token embeddings")
        else:
            token("embed", f"{prefix}.0", "residual stream before block 0", io="input")
        for layer in self.layers:
            i, block = layer.index, f"{prefix}.{layer.index}"
            if layer.kind == ATTENTION:
                post = layer.mixer_out != layer.mixer
                token(
                    f"layer_{i}.attn",
                    f"{block}.{layer.mixer_out}",
                    "attention output added to the residual",
                    clone=post,
                )
                table.add(
                    f"layer_{i}.attn_pattern",
                    Hookpoint(f"{block}.{layer.mixer}", index=1),
                    0,
                    shape=("batch", "head", "seq", "key"),
                    writable=False,
                    description="attention probabilities per head (eager attention for the run)",
                )
            else:
                what = _MIXER_NAMES[layer.kind]
                post = layer.mixer_out != layer.mixer
                token(
                    f"layer_{i}.mixer", f"{block}.{layer.mixer_out}", f"{what} output", clone=post
                )
            if layer.mlp is not None and layer.mlp_out is not None:
                arg = _first_param(getattr(layer.block, layer.mlp).forward)
                token(
                    f"layer_{i}.mlp_in",
                    f"{block}.{layer.mlp}",
                    "MLP / MoE input (its normalised residual)",
                    io="input",
                    arg=arg,
                )
            if layer.mlp_out is not None:
                post = layer.mlp_out in (*POST_NORMS, *OPERATOR_POST_NORMS)
                token(f"layer_{i}.mlp", f"{block}.{layer.mlp_out}", "MLP / MoE output", clone=post)
            token(f"layer_{i}.residual", block, "residual stream after the block")
            if layer.state_shape is not None:
                value_dim = layer.state_shape[2]
                table.add(
                    f"layer_{i}.ssm_state",
                    None,
                    value_dim,
                    shape=("batch", "heads", "key_dim", "value_dim"),
                    description="matrix state per head after the last real token",
                    size=layer.state_shape,
                )
                variant = variant_of(layer.block.get_submodule(layer.mixer))
                if variant is not None:
                    declare_layer_writes(table, i, layer.state_shape, variant)
            if layer.conv_shape is not None:
                table.add(
                    f"layer_{i}.conv_state",
                    None,
                    layer.conv_shape[1],
                    description="causal-conv input window after the last real token",
                    size=layer.conv_shape,
                )
        if self.final_norm is not None:
            token("final_norm", _join(prefix, "..", self.norm_name), "final norm output")
        if self.lm_head is not None:
            table.add("logits", None, int(self.lm_head.weight.shape[0]), description="logits")
        return table

    @functools.cached_property
    def state_sites(self) -> list[str]:
        return self.table.names(kind="state")

    # -- unembedding ---------------------------------------------------------------------------
    def unembed(self, residual: torch.Tensor) -> torch.Tensor:
        if self.final_norm is None or self.lm_head is None:
            raise BackendError(
                f"{type(self.model).__name__}: cannot unembed, no final norm "
                f"({', '.join(FINAL_NORM_NAMES)}) or no lm_head was found; wrap a model with a "
                "language-model head (a ...ForCausalLM class)"
            )
        from archscope.guards import check_width

        check_width(residual, self.d_model, f"backend {self.name!r} unembed")
        return cast("torch.Tensor", self.lm_head(self.final_norm(residual)))

    # -- running -------------------------------------------------------------------------------
    def _plan(self, ctx: RunContext) -> Plan:
        plan: Plan | None = ctx.extra.get("hybrid_plan")
        if plan is None:
            states = set(self.state_sites)
            plan = Plan(wants_state=ctx.return_state or any(n in states for n in ctx.capture))
            if ctx.initial_state is not None:
                if ctx.padding_side == "left":
                    raise BackendError(
                        "a run from initial_state continues each row from its state, so the "
                        "suffix may only be right-padded; got a left-padded attention_mask"
                    )
                plan.stepping = True
                plan.steps = int(ctx.batch["input_ids"].shape[1])
            ctx.extra["hybrid_plan"] = plan
        return plan

    def mask_argument(self, mask: Any, cached: bool = True) -> Any:
        """The attention mask as the model takes it. A stack without attention layers that fills
        a cache (``cached``) gets the per-layer-type mapping the models accept in place of a mask
        (transformers' causal-mask code needs an attention layer in the cache): the 2D padding
        mask for the recurrent layers, or None when nothing is padded. Without a cache the 2D
        mask is passed as it is (older transformers, 5.6 among them, take no mapping)."""
        if not (self.all_recurrent and cached):
            return mask
        padded = mask if mask is not None and not bool(mask.all()) else None
        config = self.model.config
        config = getattr(config, "text_config", None) or config
        kinds = set(getattr(config, "layer_types", None) or ())
        return {kind: padded for kind in kinds}

    def _check_cache_without_attention(self) -> None:
        """Refuse, before the model runs, a run that must fill a cache for a stack without
        attention layers on a transformers release that cannot (`CACHE_WITHOUT_ATTENTION`)."""
        from archscope.compat import transformers_release

        if transformers_release() >= CACHE_WITHOUT_ATTENTION:
            return
        import transformers

        floor = ".".join(map(str, CACHE_WITHOUT_ATTENTION))
        raise BackendError(
            f"backend 'hybrid': this model has no attention layer, and transformers "
            f"{transformers.__version__} cannot fill a cache for such a stack (from {floor} on it "
            "can), so its recurrent states cannot be read; capture token sites only (no "
            f"ssm_state / conv_state, no return_state), or use transformers {floor} or later"
        )

    def forward(self, ctx: RunContext) -> Any:
        plan = self._plan(ctx)
        if plan.stepping:
            from .continuing import continue_from_state

            return continue_from_state(self, ctx, plan)
        if self.all_recurrent and plan.wants_state:
            self._check_cache_without_attention()
        inputs = dict(ctx.batch)
        mask = self.mask_argument(inputs.get("attention_mask"), cached=plan.wants_state)
        if mask is None:
            inputs.pop("attention_mask", None)
        else:
            inputs["attention_mask"] = mask
        output = self.model(**inputs, use_cache=plan.wants_state)
        if plan.wants_state:
            plan.cache = getattr(output, "cache", None) or getattr(output, "past_key_values", None)
        return output

    def read_unhooked(self, ctx: RunContext, output: Any, names: list[str]) -> dict[str, Any]:
        values: dict[str, Any] = {}
        if "logits" in names and output is not None:
            logits = self.logits_of(output)
            if logits is not None:
                values["logits"] = logits if ctx.grad else logits.detach()
        for name in names:  # the write hooks stored these while the mixers ran
            if name in ctx.store and name.partition(".")[2] in WRITE_ROLES:
                values[name] = ctx.store[name]
        states = [n for n in names if n != "logits" and n.partition(".")[2] not in WRITE_ROLES]
        if states:
            read = self.read_states(self._plan(ctx).cache, states)
            values.update(self._edited_states(ctx, read))
        return values

    def read_states(self, cache: Any, names: list[str]) -> dict[str, torch.Tensor]:
        """The recurrent states ``names`` from the cache a run left."""
        from .states import read_state

        if cache is None:
            raise BackendError(
                f"backend 'hybrid': the forward pass returned no cache, so {names} cannot be read"
            )
        out = {}
        for name in names:
            site = self.table.info(name).site
            assert site.layer is not None
            layer = self.layers[site.layer]
            out[name] = read_state(cache, layer.cache_index, site.role == "conv_state", name)
        return out

    def final_state(self, ctx: RunContext, output: Any) -> dict[str, torch.Tensor]:
        self.require("state_patch")
        return self._edited_states(ctx, self.read_states(self._plan(ctx).cache, self.state_sites))

    # -- state writes --------------------------------------------------------------------------
    def execute(self, request: RunContext) -> Any:
        # An edited write changes everything after its layer: such runs go to the end.
        if request.stop_early and write_sites_of(request.edits):
            request = dataclasses.replace(request, stop_early=False)
        return super().execute(request)

    def _edited_states(
        self, ctx: RunContext, states: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """``states`` with the effect of edited writes on the state after the last position."""
        out = dict(states)
        for index, layer_run in layer_runs(ctx).items():
            name = f"layer_{index}.ssm_state"
            if name in out and layer_run.delta_state is not None:
                out[name] = out[name] + layer_run.delta_state.to(out[name].dtype)
        return out

    def run_settings(self, ctx: RunContext) -> contextlib.AbstractContextManager[Any]:
        """Eager attention when attention patterns are captured; hooks that compute the write
        sites (and carry their edits) while the mixers run."""
        stack = contextlib.ExitStack()
        if any(name.endswith(".attn_pattern") for name in ctx.capture):
            stack.enter_context(self._eager_attention())
        if write_sites_of([*ctx.capture, *ctx.edits]):
            if self._plan(ctx).stepping:
                raise BackendError(
                    "the write sites (state_write, write_value, write_key, write_decay, "
                    "ssm_states, effective_attention) are computed over a whole sequence, not "
                    "in a run continued from initial_state; run the prefix and suffix together "
                    "instead"
                )
            if self.frozen_writes is not None:
                stack.enter_context(frozen_write_sites(self, ctx, self.frozen_writes))
            else:
                stack.enter_context(write_hooks(self, ctx))
        return stack

    #: Inside `frozen_run`: each layer's write sites of the current run, which the frozen
    #: recomputation of its gated delta net reads (`archscope_hybrid.writes.frozen_write_sites`);
    #: None outside a frozen run.
    frozen_writes: dict[int, Any] | None = None

    @contextlib.contextmanager
    def _eager_attention(self) -> Iterator[None]:
        """Eager attention (the only kind that returns probabilities) for one run, and
        afterwards exactly the hooks the model had."""
        from archscope.guards import restore_hooks

        model = self.model
        previous = getattr(model.config, "_attn_implementation", None)
        with restore_hooks(model, _LIBRARY_HOOK_FLAGS):
            if previous in (None, "eager"):
                yield
                return
            model.set_attn_implementation("eager")
            try:
                yield
            finally:
                model.set_attn_implementation(previous)


def _first_param(fn: Any) -> str:
    """The name of ``fn``'s first parameter (how a caller may pass it by keyword)."""
    try:
        names = [p for p in inspect.signature(fn).parameters if p != "self"]
    except (TypeError, ValueError):
        return "hidden_states"
    return names[0] if names else "hidden_states"


def _join(stack_path: str, up: str, name: str | None) -> str:
    """The path of ``name`` beside the block list ``stack_path`` (``up`` = one level up)."""
    assert up == ".." and name is not None
    parent = stack_path.rsplit(".", 1)[0] if "." in stack_path else ""
    return f"{parent}.{name}" if parent else name
