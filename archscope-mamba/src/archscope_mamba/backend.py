"""The `mamba` backend: Mamba, Mamba-2 and hybrid state-space/attention stacks.

Hugging Face models (Mamba, Mamba-2, Falcon-Mamba, Jamba, Bamba, Zamba2, Falcon-H1,
GraniteMoeHybrid, Nemotron-H) and native ``mamba_ssm`` models (``MambaLMHeadModel``) are found
by structure: a block list whose blocks hold an SSM mixer (a module with ``A_log``, ``conv1d``
and ``dt_bias`` or ``dt_proj``). Each layer exposes the sites it really has; recurrent states
are read from the model's own cache, so reading them runs the same kernels as a plain forward.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from archscope import BackendError, Edit, Site, SiteError, SiteInfo
from archscope.compat import cache_argument
from archscope.detection import Confidence
from archscope.engine import (
    HookBackend,
    Hookpoint,
    RunContext,
    StopForward,
    apply_edit,
    padding_side,
)

if TYPE_CHECKING:
    import torch
    from torch import nn

# -- where things live -------------------------------------------------------------------------
#: Block lists: Mamba-style ``backbone.layers``, hybrids ``model.layers``, base models ``layers``.
STACK_PATHS = ("backbone.layers", "model.layers", "layers")
#: The SSM mixer inside a block (Zamba2's hybrid layers keep theirs one level down).
SSM_PATHS = ("mixer", "mamba", "mamba_decoder.mamba")
#: Attention inside a block. Zamba2's hybrid layers add the shared transformer's output through
#: their own ``linear`` (into the mixer input), which is the per-layer attention contribution.
ATTN_PATHS = ("self_attn", "mixer", "linear")
#: MLP / MoE inside a block (Nemotron-H's MLP layers call theirs ``mixer``).
MLP_PATHS = ("feed_forward", "mlp", "mixer", "shared_mlp")
EMBED_PATHS = ("embeddings", "embed_tokens", "embedding")
FINAL_NORM_PATHS = ("norm_f", "final_layernorm", "norm")

#: Site order inside layer i is ``1 + 10 * i + offset`` (forward order, for stopping early).
_ORDER = {"attn_first": 1, "mixer": 2, "attn": 3, "mlp": 4, "residual": 5, "ssm_state": 6,
          "conv_state": 7}


def _get(obj: Any, path: str) -> Any:
    for part in path.split("."):
        try:
            obj = getattr(obj, part, None)
        except Exception:  # an object whose attribute access raises is not ours
            return None
        if obj is None:
            return None
    return obj


def is_ssm_mixer(module: Any) -> bool:
    """A selective-SSM mixer: ``A_log`` and ``conv1d``, and ``dt_bias`` (Mamba-2) or
    ``dt_proj`` (Mamba)."""
    return (_get(module, "A_log") is not None and _get(module, "conv1d") is not None
            and (_get(module, "dt_bias") is not None or _get(module, "dt_proj") is not None))


def _is_attention(module: Any) -> bool:
    if module is None or is_ssm_mixer(module):
        return False
    if any(_get(module, a) is not None for a in ("q_proj", "qkv_proj", "Wqkv", "k_proj")):
        return True
    name = type(module).__name__
    return "Attention" in name or name == "MHA"


def _is_mlp(module: Any) -> bool:
    if module is None or is_ssm_mixer(module) or _is_attention(module):
        return False
    return callable(module)


def find_stack(model: Any) -> tuple[str, Any] | None:
    """(path, block list) of the first block list holding at least one SSM mixer."""
    for path in STACK_PATHS:
        blocks = _get(model, path)
        try:
            items = list(blocks) if blocks is not None and not isinstance(blocks, str) else []
        except TypeError:
            continue
        if items and any(_ssm_path(b) is not None for b in items):
            return path, blocks
    return None


def _ssm_path(block: Any) -> str | None:
    for path in SSM_PATHS:
        if is_ssm_mixer(_get(block, path)):
            return path
    return None


def is_native(model: Any) -> bool:
    """A native ``mamba_ssm`` stack: ``backbone.embedding`` and blocks that return
    ``(hidden_states, residual)`` (they carry ``fused_add_norm``)."""
    stack = find_stack(model)
    if stack is None:
        return False
    first = next(iter(stack[1]))
    return (type(model).__module__.startswith("mamba_ssm")
            or (_get(model, "backbone.embedding") is not None
                and hasattr(first, "fused_add_norm")))


# -- per-layer description ---------------------------------------------------------------------
@dataclass
class LayerMap:
    """What one block has: paths (relative to the block) of its sub-layers, if any."""

    index: int
    block: Any
    ssm: str | None = None
    attn: str | None = None
    mlp: str | None = None
    cache_index: int = 0
    #: ("mamba", d_inner, d_state) or ("mamba2", heads, head_dim, d_state)
    state_shape: tuple[Any, ...] = ()
    conv_shape: tuple[int, int] = (0, 0)


def describe_layer(i: int, block: Any) -> LayerMap:
    layer = LayerMap(index=i, block=block, ssm=_ssm_path(block))
    used = {layer.ssm}
    if _get(block, "shared_transformer") is not None and _get(block, "linear") is not None:
        layer.attn = "linear"  # Zamba2 hybrid layer
    else:
        layer.attn = next((p for p in ATTN_PATHS if p not in used and p != "linear"
                           and _is_attention(_get(block, p))), None)
    used.add(layer.attn)
    if _get(block, "block_sparse_moe") is None:  # GraniteMoeHybrid with experts: no one module
        layer.mlp = next((p for p in MLP_PATHS if p not in used and _is_mlp(_get(block, p))),
                         None)
    if layer.ssm is not None:
        mixer = _get(block, layer.ssm)
        layer.cache_index = int(getattr(mixer, "layer_idx", i))
        kernel = int(mixer.conv1d.kernel_size[0])
        layer.conv_shape = (int(mixer.conv1d.in_channels), kernel)
        d_state = int(_first_attr(mixer, ("ssm_state_size", "d_state")))
        if _get(mixer, "dt_bias") is not None:  # Mamba-2: one dt per head
            heads = int(mixer.A_log.shape[0])
            head_dim = int(_first_attr(mixer, ("head_dim", "headdim")))
            layer.state_shape = ("mamba2", heads, head_dim, d_state)
        else:
            layer.state_shape = ("mamba", int(mixer.A_log.shape[0]), d_state)
    return layer


def _first_attr(obj: Any, names: tuple[str, ...]) -> Any:
    for name in names:
        value = getattr(obj, name, None)
        if value is not None:
            return value
    raise BackendError(f"{type(obj).__name__} has none of the attributes {names}")


@dataclass
class NativeInferenceParams:
    """The cache object native ``mamba_ssm`` mixers read and write (same fields as
    ``mamba_ssm.utils.generation.InferenceParams``; mixers keep ``(conv_state, ssm_state)``
    per layer in ``key_value_memory_dict``)."""

    max_seqlen: int
    max_batch_size: int
    seqlen_offset: int = 0
    batch_size_offset: int = 0
    key_value_memory_dict: dict[int, Any] = field(default_factory=dict)
    lengths_per_sample: Any = None


@dataclass
class _Plan:
    """How one run is carried out (decided once per run, before hooks are attached)."""

    wants_state: bool
    #: Per-row right shift that turns a right-padded batch into a left-padded one.
    shift: torch.Tensor | None = None
    original_mask: torch.Tensor | None = None
    stepping: bool = False
    step: int = 0
    steps: int = 0
    cache: Any = None


class MambaBackend(HookBackend):
    """Sites of Mamba / Mamba-2 stacks and hybrid SSM/attention stacks."""

    name = "mamba"
    description = ("state-space and hybrid models: HF Mamba, Mamba-2, Falcon-Mamba, Jamba, Bamba, "
                   "Zamba2, Falcon-H1, GraniteMoeHybrid, Nemotron-H; native mamba_ssm")
    capabilities = frozenset({"residual", "components", "unembed", "logits", "recurrent_state",
                              "state_patch", "edit"})
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
        self.base = _get(model, self.stack_path.rsplit(".", 1)[0]) if "." in self.stack_path \
            else model
        self.layers = [describe_layer(i, b) for i, b in enumerate(self.blocks)]
        self.lm_head = _get(model, "lm_head")
        if self.lm_head is None and hasattr(model, "get_output_embeddings"):
            self.lm_head = model.get_output_embeddings()
        self.final_norm = next((m for m in (_get(self.base, p) for p in FINAL_NORM_PATHS)
                                if m is not None), None)
        self.embedding = next((m for m in (_get(self.base, p) for p in EMBED_PATHS)
                               if m is not None), None)
        super().__init__(model)
        # Continuing from a swapped state needs every layer's state; attention layers would
        # also need their key/value cache, which is not a site (and HF hybrids' caches do not
        # decode step by step without one).
        if any(layer.ssm is None or layer.attn is not None for layer in self.layers):
            self.capabilities = type(self).capabilities - {"state_patch"}
        if self.native:
            self.padding = "right"  # native models take no attention mask

    @property
    def d_model(self) -> int:
        weight = _get(self.embedding, "weight")
        if weight is not None:
            return int(weight.shape[-1])
        return int(_first_attr(getattr(self.model, "config", None), ("hidden_size", "d_model")))

    def site_table(self) -> dict[str, tuple[SiteInfo, Hookpoint | None]]:
        d = self.d_model
        tok = ("batch", "seq", "d_model")
        table: dict[str, tuple[SiteInfo, Hookpoint | None]] = {}

        def add(name: str, kind: str, shape: tuple[str, ...], dim: int, order: float,
                hp: Hookpoint | None, writable: bool = True, desc: str = "",
                **extra: Any) -> None:
            info = SiteInfo(Site.parse(name), kind, shape, dim, writable=writable,
                            order=order, description=desc, extra=extra)
            table[name] = (info, hp)

        config = getattr(self.model, "config", None)
        scaled_embedding = float(getattr(config, "embedding_multiplier", 1.0) or 1.0) != 1.0
        if self.embedding is not None and not scaled_embedding and not self.native:
            embed_hp = Hookpoint(self.embedding)
        else:  # the embedding is scaled (or native): read the stream where block 0 takes it
            embed_hp = Hookpoint(self.layers[0].block, io="input", index=0, arg="hidden_states")
        add("embed", "token", tok, d, 0, embed_hp, desc="residual stream before block 0")

        for layer in self.layers:
            i, base = layer.index, 1 + 10 * layer.index
            if layer.attn is not None:
                offset = _ORDER["attn_first"] if layer.attn == "linear" else _ORDER["attn"]
                add(f"layer_{i}.attn", "token", tok, d, base + offset,
                    Hookpoint(_get(layer.block, layer.attn)), desc="attention sub-layer output")
            if layer.ssm is not None:
                add(f"layer_{i}.mixer", "token", tok, d, base + _ORDER["mixer"],
                    Hookpoint(_get(layer.block, layer.ssm)), desc="SSM mixer output")
            if layer.mlp is not None:
                add(f"layer_{i}.mlp", "token", tok, d, base + _ORDER["mlp"],
                    Hookpoint(_get(layer.block, layer.mlp)), desc="MLP / MoE output")
            add(f"layer_{i}.residual", "token", tok, d, base + _ORDER["residual"],
                Hookpoint(layer.block, index=0), desc="residual stream after the block")
            if layer.ssm is not None:
                kind, *sizes = layer.state_shape
                shape = (("batch", "d_inner", "d_state") if kind == "mamba"
                         else ("batch", "heads", "head_dim", "d_state"))
                # States are set through run(initial_state=...) / state_patch, not edits.
                add(f"layer_{i}.ssm_state", "state", shape, sizes[-1], base + _ORDER["ssm_state"],
                    None, writable=False, desc="SSM state after the last real token", size=tuple(sizes))
                add(f"layer_{i}.conv_state", "state", ("batch", "channels", "kernel"),
                    layer.conv_shape[1], base + _ORDER["conv_state"], None, writable=False,
                    desc="causal-conv input window after the last real token",
                    size=layer.conv_shape)

        end = 1 + 10 * len(self.layers)
        if self.native and self.lm_head is not None:
            # The fused add+norm path calls a kernel, not norm_f: read the head's input instead.
            add("final_norm", "token", tok, d, end, Hookpoint(self.lm_head, io="input", arg="input"))
        elif self.final_norm is not None:
            add("final_norm", "token", tok, d, end, Hookpoint(self.final_norm))
        if self.lm_head is not None:
            vocab = int(self.lm_head.weight.shape[0])
            add("logits", "token", ("batch", "seq", "vocab"), vocab, end + 1, None,
                writable=False, desc="output logits")
        return table

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
        plan: _Plan | None = ctx.extra.get("mamba_plan")
        if plan is not None:
            return plan
        import torch

        states = set(self.state_sites)
        plan = _Plan(wants_state=ctx.return_state or any(n in states for n in ctx.capture))
        mask = ctx.attention_mask
        side = padding_side(mask) if mask is not None else "none"
        if ctx.initial_state is not None:
            plan.stepping = True
            plan.steps = int(ctx.batch["input_ids"].shape[1])
            if side == "left":  # (rows padded on both sides are refused before this)
                raise BackendError(
                    "a run from initial_state continues each row from its state, so the "
                    "suffix may only be right-padded; got a left-padded attention_mask"
                )
            if side == "right" and plan.wants_state:
                raise BackendError(
                    "the state after a right-padded suffix would include the pads: give "
                    "suffixes of equal length when asking for states from a continued run"
                )
        elif self.native and side != "none":
            if side == "left":
                raise BackendError(
                    "native mamba_ssm models take no attention mask, so only right padding "
                    "keeps real tokens exact; got a left-padded batch"
                )
            if plan.wants_state and ctx.edits:
                raise BackendError(
                    "native mamba_ssm models take no attention mask, so the state of a "
                    "right-padded row is re-computed from its real tokens alone, which cannot "
                    "carry edits: run rows of equal length when editing and reading states"
                )
        elif plan.wants_state and side == "right":
            # HF models keep updating the state over right pads: run the rows left-padded
            # (pads are masked to zero inputs, so the state stays at zero until the first real
            # token) and give token sites back in the caller's layout.
            assert mask is not None
            plan.original_mask = mask
            plan.shift = (mask.shape[1] - mask.sum(-1)).to(torch.long)
        ctx.extra["mamba_plan"] = plan
        return plan

    def _attach(self, name: str, ctx: RunContext) -> Any:
        plan = self._plan(ctx)
        info = self._table[name][0]
        original = ctx.edits.get(name)
        if original and info.kind == "token" and (plan.shift is not None or plan.stepping):
            ctx.edits[name] = [self._wrap_edit(e, info, plan) for e in original]
        try:
            if self.native and info.site.role == "residual":
                return self._attach_native_residual(name, ctx)
            return super()._attach(name, ctx)
        finally:
            if original is not None:
                ctx.edits[name] = original

    def _wrap_edit(self, edit: Edit, info: SiteInfo, plan: _Plan) -> Edit:
        """The same edit, expressed on the tensor the hook really sees (shifted rows, or one
        decoding step), as a function of that tensor."""
        if plan.shift is not None:
            shift, mask = plan.shift, plan.original_mask

            def shifted(value: torch.Tensor) -> torch.Tensor:
                edited = apply_edit(roll_rows(value, -shift), edit, info, mask)
                return roll_rows(edited, shift)

            return Edit.apply(edit.site, shifted)

        def one_step(value: torch.Tensor) -> torch.Tensor:
            import torch

            full = value.new_zeros((value.shape[0], plan.steps, *value.shape[2:]))
            full[:, plan.step] = value[:, 0]
            mask = torch.ones(full.shape[:2], dtype=torch.long, device=value.device)
            return apply_edit(full, edit, info, mask)[:, plan.step: plan.step + 1]

        return Edit.apply(edit.site, one_step)

    def _attach_native_residual(self, name: str, ctx: RunContext) -> Any:
        """Native blocks return ``(hidden_states, residual)``; the stream is their sum. An edit
        returns ``(zeros, edited sum)`` so the next block's ``hidden + residual`` is exact."""
        info, hookpoint = self._table[name]
        assert hookpoint is not None
        edits = ctx.edits.get(name, [])
        capture = name in ctx.capture
        stop = name == ctx.stop_after

        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            hidden, residual = output
            value = hidden + residual if residual is not None else hidden
            for edit in edits:
                value = apply_edit(value, edit, info, ctx.attention_mask)
            if capture:
                ctx.store[name] = value if ctx.grad else value.detach()
            if stop:
                raise StopForward
            if not edits:
                return None
            kept = residual if residual is not None else hidden
            return (hidden.new_zeros(hidden.shape), value.to(kept.dtype))

        return hookpoint.module.register_forward_hook(hook)

    def forward(self, ctx: RunContext) -> Any:
        plan = self._plan(ctx)
        if plan.stepping:
            return self._continue_from_state(ctx, plan)
        if self.native:
            ids = ctx.batch["input_ids"]
            if not plan.wants_state:
                return self.model(ids)
            plan.cache = NativeInferenceParams(max_seqlen=int(ids.shape[1]),
                                               max_batch_size=int(ids.shape[0]))
            output = self.model(ids, inference_params=plan.cache)
            self._native_states_of_padded_rows(ctx, plan)
            return output

        batch = ctx.batch
        if plan.shift is not None:
            ctx.batch = {k: roll_rows(v, plan.shift) if k in ("input_ids", "attention_mask")
                         else v for k, v in batch.items()}
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

    def _native_states_of_padded_rows(self, ctx: RunContext, plan: _Plan) -> None:
        """Native models run pads like tokens: give each right-padded row the state its real
        tokens reach alone (one extra pass per padded row, its captures discarded)."""
        mask = ctx.attention_mask
        if mask is None or bool(mask.all()):
            return
        lengths = mask.sum(-1).tolist()
        store = ctx.store
        try:
            for row, n in enumerate(lengths):
                if n == mask.shape[1]:
                    continue
                ctx.store = {}
                alone = NativeInferenceParams(max_seqlen=int(n), max_batch_size=1)
                self.model(ctx.batch["input_ids"][row: row + 1, : int(n)], inference_params=alone)
                for index, states in alone.key_value_memory_dict.items():
                    for full, single in zip(plan.cache.key_value_memory_dict[index], states, strict=True):
                        full[row] = single[0]
        finally:
            ctx.store = store

    def _continue_from_state(self, ctx: RunContext, plan: _Plan) -> Any:
        """Decode the batch token by token from ``ctx.initial_state`` (the only way the models'
        caches reproduce a full run); token sites and logits are concatenated over steps."""
        import torch

        self.require("state_patch")
        ids = ctx.batch["input_ids"]
        plan.cache = self._cache_from_state(ctx.initial_state or {}, int(ids.shape[0]),
                                            int(ids.shape[1]))
        token_sites = [n for n in ctx.capture if self._table[n][0].kind == "token"
                       and self._table[n][1] is not None]
        collected: dict[str, list[torch.Tensor]] = {n: [] for n in token_sites}
        logits: list[torch.Tensor] = []
        for t in range(plan.steps):
            plan.step = t
            try:
                if self.native:
                    out = self.model(ids[:, t: t + 1], inference_params=plan.cache)
                    plan.cache.seqlen_offset += 1
                else:
                    out = self.model(input_ids=ids[:, t: t + 1], use_cache=True,
                                     **{cache_argument(self.model): plan.cache})
                    plan.cache = output_cache(out) or plan.cache
                step_logits = self.logits_of(out)
                if step_logits is not None:
                    logits.append(step_logits)
            except StopForward:
                pass
            for name in token_sites:
                if name in ctx.store:
                    collected[name].append(ctx.store.pop(name))
        for name, parts in collected.items():
            if len(parts) == plan.steps:
                ctx.store[name] = torch.cat(parts, dim=1)
        return _Continued(torch.cat(logits, dim=1) if len(logits) == plan.steps else None,
                          plan.cache)

    def _cache_from_state(self, state: Mapping[str, torch.Tensor], batch: int,
                          steps: int) -> Any:
        names = self.state_sites
        given = {str(Site.parse(k)): v for k, v in state.items()}
        unknown = sorted(set(given) - set(names))
        missing = [n for n in names if n not in given]
        if unknown or missing:
            raise SiteError(
                "initial_state must give every recurrent state of the model: "
                + (f"missing {missing}; " if missing else "")
                + (f"not state sites: {unknown}; " if unknown else "")
                + f"state sites are {names}. Take them from run(..., return_state=True).state"
            )
        for name in names:
            expected = (batch, *cast("tuple[int, ...]", self._table[name][0].extra["size"]))
            if tuple(given[name].shape) != expected:
                raise SiteError(f"initial_state[{name!r}] has shape {tuple(given[name].shape)}; "
                                f"expected {expected} (batch of the suffix, then the site shape)")
        device = self.device
        if self.native:
            cache = NativeInferenceParams(max_seqlen=steps, max_batch_size=batch,
                                          seqlen_offset=1)
            for layer in self.ssm_layers:
                i = layer.index
                cache.key_value_memory_dict[layer.cache_index] = (
                    given[f"layer_{i}.conv_state"].to(device).clone(),
                    given[f"layer_{i}.ssm_state"].to(device).clone())
            return cache
        from transformers import DynamicCache

        hf_cache = DynamicCache(config=self.model.config)
        for layer in self.ssm_layers:
            i = layer.index
            hf_cache.update_conv_state(given[f"layer_{i}.conv_state"].to(device).clone(),
                                       layer.cache_index)
            hf_cache.update_recurrent_state(given[f"layer_{i}.ssm_state"].to(device).clone(),
                                            layer.cache_index)
        return hf_cache

    def _states(self, plan: _Plan, names: list[str]) -> dict[str, torch.Tensor]:
        if plan.cache is None:
            raise BackendError(f"backend {self.name!r}: the forward pass returned no cache, so "
                               f"{names} cannot be read")
        out = {}
        for name in names:
            layer = self._layer_of_state(name)
            conv = Site.parse(name).role == "conv_state"
            if self.native:
                value = plan.cache.key_value_memory_dict[layer.cache_index][0 if conv else 1]
            else:
                value = read_cache_state(plan.cache, layer.cache_index, conv)
            if value is None:
                raise BackendError(f"the cache holds no value for {name}")
            out[name] = value.detach().clone()
        return out

    def read_unhooked(self, ctx: RunContext, output: Any, names: list[str]) -> dict[str, Any]:
        plan = self._plan(ctx)
        values: dict[str, Any] = {}
        if "logits" in names:
            values["logits"] = self.logits_of(output) if output is not None else None
        states = [n for n in names if n != "logits"]
        if states:
            values.update(self._states(plan, states))
        return {k: v for k, v in values.items() if v is not None}

    def final_state(self, ctx: RunContext, output: Any) -> dict[str, torch.Tensor]:
        self.require("state_patch")
        return self._states(self._plan(ctx), self.state_sites)


@dataclass
class _Continued:
    """Output of a run continued from a state: logits over all steps and the final cache."""

    logits: Any
    cache: Any


def output_cache(output: Any) -> Any:
    """The cache an HF forward returned (``cache`` since transformers 5; ``cache_params`` /
    ``past_key_values`` in earlier releases)."""
    for name in ("cache", "cache_params", "past_key_values"):
        value = getattr(output, name, None)
        if value is not None:
            return value
    return None


def read_cache_state(cache: Any, index: int, conv: bool) -> Any:
    """A layer's conv or SSM state from an HF cache: ``get_conv_state`` /
    ``get_recurrent_state`` (transformers 5 caches) or ``conv_states`` / ``ssm_states`` (the
    ``MambaCache`` family of earlier releases)."""
    getter = getattr(cache, "get_conv_state" if conv else "get_recurrent_state", None)
    if getter is not None:
        return getter(index)
    layers = getattr(cache, "layers", None)
    if layers is not None:  # 5.x releases before the getters: a tensor or {0: tensor} per layer
        held = getattr(layers[index], "conv_states" if conv else "recurrent_states", None)
        return held.get(0) if isinstance(held, dict) else held
    states = getattr(cache, "conv_states" if conv else "ssm_states", None)
    return None if states is None else states[index]


def roll_rows(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate each row of ``x`` (batch, seq, ...) right along seq by ``shift[row]``."""
    import torch

    seq = x.shape[1]
    index = (torch.arange(seq, device=x.device)[None, :] - shift.to(x.device)[:, None]) % seq
    index = index.reshape(*index.shape, *([1] * (x.dim() - 2))).expand_as(x)
    return torch.gather(x, 1, index)
