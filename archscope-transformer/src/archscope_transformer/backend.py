"""The archscope backend for Hugging Face decoder-only language models.

The site map is built from the structure `archscope_transformer.structure` finds (block list,
final norm, unembedding, attention and MLP of each block); the core's hook engine does the
rest. torch and transformers are imported only inside functions.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any, cast

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
from archscope.modules import accepts

from .freeze import CANNOT_FREEZE, FREEZES, unfreezable
from .freeze import frozen_run as _frozen_run
from .structure import (
    Structure,
    StructureError,
    find_structure,
    first_param,
    is_hf_causal_lm,
    recurrent_layers,
)

if TYPE_CHECKING:
    import torch


#: Attributes transformers sets on a model once it has installed its output-capturing hooks.
_LIBRARY_HOOK_FLAGS = ("_output_capturing_hooks_installed",)


class TokenView(View):
    """Some blocks flatten (batch, seq) into one axis around their MLP (OPT): the site sees
    the run's (batch, seq, ...) layout and edits are written back flat."""

    def read(self, raw: Any, run: RunRequest) -> torch.Tensor:
        batch, seq = run.batch_size, run.seq_len
        if hasattr(raw, "dim") and raw.dim() == 2 and raw.shape[0] == batch * seq:
            return cast("torch.Tensor", raw.view(batch, seq, raw.shape[-1]))
        return cast("torch.Tensor", raw)

    def write(self, value: torch.Tensor, raw: Any, run: RunRequest) -> Any:
        if hasattr(raw, "dim") and raw.dim() == 2 and value.dim() == 3:
            return value.reshape(raw.shape[0], value.shape[-1])
        return value


_TOKEN_VIEW = TokenView()
#: The settings of a run without attention patterns: none (reusable, it holds no state).
_NO_SETTINGS = contextlib.nullcontext()


class TransformerBackend(HookBackend):
    """Hugging Face decoder-only LMs (GPT-2, Llama, Qwen, Gemma, ...), mapped by structure."""

    name = "transformer"
    edits_unhooked = True  # logits edits are applied in _forward
    description = "Hugging Face decoder-only language models, mapped by structure"
    capabilities = frozenset(
        {
            "residual",
            "components",
            "mlp_hidden",
            "unembed",
            "logits",
            "attention_patterns",
            "edit",
            "freeze",
        }
    )
    padding = "both"
    #: What `frozen_run` holds and what it cannot (`archscope.freeze`).
    freezes = FREEZES
    cannot_freeze = CANNOT_FREEZE

    def __init__(self, model: Any) -> None:
        self._map(model)
        super().__init__(model)

    def model_changed(self) -> None:
        """The model's modules changed (a block replaced, the vocabulary resized): find its
        structure again, then forget the site table built from the old one."""
        self._map(self.model)
        super().model_changed()

    def _map(self, model: Any) -> None:
        try:
            self.structure: Structure = find_structure(model)
        except StructureError as exc:
            raise StructureError(
                f"archscope-transformer cannot map {type(model).__name__}: {exc}"
            ) from None
        if not all(p.mlp_hidden for p in self.structure.parts):
            # e.g. a mixture of experts: no single MLP output projection to read neurons from
            self.capabilities = TransformerBackend.capabilities - {"mlp_hidden"}
        self.frozen_unavailable = unfreezable(self.structure)
        if self.frozen_unavailable:
            self.capabilities = self.capabilities - {"freeze"}
        self._takes_positions = accepts(model.forward, "position_ids", declared=True)
        self._takes_use_cache = accepts(model.forward, "use_cache", declared=True)

    # -- detection -----------------------------------------------------------------------------
    @classmethod
    def can_handle(cls, model: Any) -> float | None:
        try:
            if not is_hf_causal_lm(model) or recurrent_layers(model):
                return None
            find_structure(model)
        except StructureError:
            return (
                Confidence.LAST_RESORT
            )  # an HF decoder LM we cannot map: constructing says what is missing
        except Exception:
            return None
        return Confidence.STRUCTURAL

    # -- the site map --------------------------------------------------------------------------
    def site_table(self) -> SiteTable:
        s = self.structure
        d = s.d_model
        table = SiteTable(self.model)

        def add(name: str, dim: int, where: Hookpoint | None, desc: str, **kw: Any) -> None:
            path = f" ({where.module})" if where else ""
            if where is not None and name.endswith((".attn", ".mlp", ".mlp_hidden", ".mlp_in")):
                where = replace(where, view=_TOKEN_VIEW)  # may be stored (batch * seq, ·)
            kw.setdefault("writable", True)
            table.add(name, where, dim, description=desc + path, **kw)

        block0 = s.blocks[0]
        embed = Hookpoint(f"{s.blocks_path}.0", io="input", arg=first_param(block0.forward))
        add("embed", d, embed, "input of block 0")
        for i, parts in enumerate(s.parts):
            # Sites in the order the forward pass produces them (stop-early depends on it).
            # (Read inside the attention module, the attn value comes before the pattern.)
            attn: tuple[str, int, Hookpoint, str, dict[str, Any]] = (
                f"layer_{i}.attn",
                d,
                parts.attn,
                "attn output added to the residual",
                {},
            )
            pattern = (
                f"layer_{i}.attn_pattern",
                0,
                parts.attn_pattern,
                "attention probabilities per head; needs eager attention, switched on for the run",
                {"shape": ("batch", "head", "seq", "key"), "writable": False},
            )
            inside = str(parts.attn.module).startswith(f"{parts.attn_pattern.module}.")
            steps = [attn, pattern] if inside else [pattern, attn]
            if parts.mlp_in is not None:
                steps.append((f"layer_{i}.mlp_in", d, parts.mlp_in, "MLP input", {}))
            if parts.mlp_hidden is not None:
                hidden = "MLP hidden units (input of the output projection)"
                steps.append(
                    (f"layer_{i}.mlp_hidden", parts.d_mlp or 0, parts.mlp_hidden, hidden, {})
                )
            steps.append((f"layer_{i}.mlp", d, parts.mlp, "mlp output added to the residual", {}))
            for name, dim, port, desc, kw in steps:
                add(name, dim, port, desc, **kw)
            add(
                f"layer_{i}.residual",
                d,
                Hookpoint(f"{s.blocks_path}.{i}"),
                f"output of block {i}",
            )
        add("final_norm", d, Hookpoint(s.final_norm_path), "final norm output")
        add("logits", s.vocab, None, "the model's output logits")
        return table

    # -- running -------------------------------------------------------------------------------
    def forward(self, ctx: RunContext) -> Any:
        batch = dict(ctx.batch)
        mask = batch.get("attention_mask")
        if (
            self._takes_positions
            and mask is not None
            and "position_ids" not in batch
            and ctx.padding_side in ("left", "mixed")
        ):
            # Absolute position embeddings (GPT-2) count from the first real token.
            batch["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
        if self._takes_use_cache:
            batch.setdefault("use_cache", False)
        if not self._pattern_sites.isdisjoint(ctx.capture):
            # Some modelling files (OPT before transformers 5.4) drop the probabilities
            # inside the attention module unless asked for them.
            batch.setdefault("output_attentions", True)
        output = self.model(**batch)
        edits = ctx.edits.get("logits")
        if edits:
            logits = output.logits
            for edit in edits:
                logits = apply_edit(logits, edit, self.table.info("logits"), mask)
            output.logits = logits
        return output

    def read_unhooked(self, ctx: RunContext, output: Any, names: list[str]) -> dict[str, Any]:
        logits = output.logits
        return {"logits": logits.detach() if not ctx.grad and logits.requires_grad else logits}

    @functools.cached_property
    def _pattern_sites(self) -> frozenset[str]:
        """The attention-pattern sites (forgotten with the site table when the model changes)."""
        return frozenset(n for n in self.table if n.endswith(".attn_pattern"))

    def run_settings(self, ctx: RunContext) -> contextlib.AbstractContextManager[Any]:
        if not self._pattern_sites.isdisjoint(ctx.capture):
            return self._attention_patterns()
        return _NO_SETTINGS

    @contextlib.contextmanager
    def _attention_patterns(self) -> Iterator[None]:
        """Eager attention for one run, and afterwards exactly the hooks the model had:
        transformers 5 installs output-capturing hooks on first use of output_attentions and
        marks the model; both are undone, so the library installs them again when asked."""
        from archscope.guards import restore_hooks

        with restore_hooks(self.model, _LIBRARY_HOOK_FLAGS), self._eager_attention():
            yield

    @contextlib.contextmanager
    def _eager_attention(self) -> Iterator[None]:
        """Eager attention (the only kind that returns probabilities) for one run."""
        config = self.model.config
        previous = config._attn_implementation
        if previous == "eager":
            yield
            return
        self._set_attention(previous, "eager")
        try:
            yield
        finally:
            self._set_attention("eager", previous)

    def _set_attention(self, current: str | None, wanted: str | None) -> None:
        model = self.model
        if wanted is not None and getattr(model, "_can_set_attn_implementation", lambda: False)():
            model.set_attn_implementation(wanted)
        else:  # older modelling files read the config at every call
            model.config._attn_implementation = wanted

    # -- freezing ------------------------------------------------------------------------------
    def frozen_run(self, values: Any) -> contextlib.AbstractContextManager[None]:
        """Runs with attention patterns, norm scales and MLP nonlinearities held at the values
        in ``values`` (`archscope.freeze`; `archscope_transformer.freeze`)."""
        return _frozen_run(self, values)

    # -- unembedding ---------------------------------------------------------------------------
    def unembed(self, residual: torch.Tensor) -> torch.Tensor:
        """Logits from a residual stream: the model's final norm, then its unembedding (and the
        final logit soft-capping of Gemma-2 style configs), as the model itself computes them."""
        from archscope.guards import unembed_input

        residual = unembed_input(
            residual,
            self.site_info(self.layer_names()[-1]).dim,
            f"backend {self.name!r} unembed",
            self.model,
        )
        s = self.structure
        x = s.final_norm(residual)
        if s.output_projection is not None:
            x = s.output_projection(x)
        logits = s.head(x)
        if s.softcap:
            import torch

            logits = torch.tanh(logits / s.softcap) * s.softcap
        return cast("torch.Tensor", logits)
