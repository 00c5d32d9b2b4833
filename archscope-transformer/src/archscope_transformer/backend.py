"""The archscope backend for Hugging Face decoder-only language models.

The site map is built from the structure `archscope_transformer.structure` finds (block list,
final norm, unembedding, attention and MLP of each block); the core's hook engine does the
rest. torch and transformers are imported only inside functions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, cast

from archscope.detection import Confidence
from archscope.engine import HookBackend, Hookpoint, RunContext, apply_edit, padding_side
from archscope.sites import Site, SiteInfo

from .structure import (
    Port,
    Structure,
    StructureError,
    accepts,
    find_structure,
    first_param,
    is_hf_causal_lm,
    recurrent_layers,
)

if TYPE_CHECKING:
    import torch

TOKEN = ("batch", "seq")


def _hookpoint(port: Port) -> Hookpoint:
    return Hookpoint(port.module, io=port.io, index=port.index, arg=port.arg, clone=port.clone)


#: Attributes transformers sets on a model once it has installed its output-capturing hooks.
_LIBRARY_HOOK_FLAGS = ("_output_capturing_hooks_installed",)


class _TokenView:
    """Some blocks flatten (batch, seq) into one axis around their MLP (OPT). Hooks around the
    engine's own hook give it the (batch, seq, ...) view and restore the flat layout after."""

    def __init__(self, hp: Hookpoint, engine_handle: Any, ctx: RunContext) -> None:
        ids = ctx.batch["input_ids"] if "input_ids" in ctx.batch else ctx.batch["inputs_embeds"]
        batch, seq = int(ids.shape[0]), int(ids.shape[1])
        module = hp.module

        def unflat(value: Any) -> Any:
            if hasattr(value, "dim") and value.dim() == 2 and value.shape[0] == batch * seq:
                return value.view(batch, seq, value.shape[-1])
            return value

        def flat(value: Any) -> Any:
            if hasattr(value, "dim") and value.dim() == 3 and self.flattened:
                return value.reshape(batch * seq, value.shape[-1])
            return value

        self.flattened = False
        self.engine_handle = engine_handle
        if hp.io == "output":

            def before(m: Any, args: Any, output: Any) -> Any:
                new = unflat(output) if not isinstance(output, tuple) else output
                self.flattened = new is not output
                return new if self.flattened else None

            def after(m: Any, args: Any, output: Any) -> Any:
                return flat(output) if self.flattened else None

            first = module.register_forward_hook(before, prepend=True)
            last = module.register_forward_hook(after)
        else:

            def before_pre(m: Any, args: Any) -> Any:
                if args and not isinstance(args[0], tuple):
                    new = unflat(args[0])
                    self.flattened = new is not args[0]
                    return (new, *args[1:]) if self.flattened else None
                return None

            def after_pre(m: Any, args: Any) -> Any:
                if self.flattened and args:
                    return (flat(args[0]), *args[1:])
                return None

            first = module.register_forward_pre_hook(before_pre, prepend=True)
            last = module.register_forward_pre_hook(after_pre)
        self.handles = [first, last]

    def remove(self) -> None:
        self.engine_handle.remove()
        for handle in self.handles:
            handle.remove()


class TransformerBackend(HookBackend):
    """Hugging Face decoder-only LMs (GPT-2, Llama, Qwen, Gemma, ...), mapped by structure."""

    name = "transformer"
    edits_unhooked = True  # logits edits are applied in _forward
    description = "Hugging Face decoder-only language models, mapped by structure"
    capabilities = frozenset(
        {"residual", "components", "mlp_hidden", "unembed", "logits", "attention_patterns", "edit"}
    )
    padding = "both"

    def __init__(self, model: Any) -> None:
        try:
            self.structure: Structure = find_structure(model)
        except StructureError as exc:
            raise StructureError(
                f"archscope-transformer cannot map {type(model).__name__}: {exc}"
            ) from None
        if not all(p.mlp_hidden for p in self.structure.parts):
            # e.g. a mixture of experts: no single MLP output projection to read neurons from
            self.capabilities = TransformerBackend.capabilities - {"mlp_hidden"}
        self._takes_positions = accepts(model.forward, "position_ids")
        self._takes_use_cache = accepts(model.forward, "use_cache")
        super().__init__(model)

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
    def site_table(self) -> dict[str, tuple[SiteInfo, Hookpoint | None]]:
        s = self.structure
        d = s.d_model
        table: dict[str, tuple[SiteInfo, Hookpoint | None]] = {}

        def add(
            site: Site,
            dim: int,
            order: float,
            port: Port | None,
            desc: str,
            shape: tuple[str, ...] = (*TOKEN, "d_model"),
            writable: bool = True,
        ) -> None:
            info = SiteInfo(
                site,
                "token",
                shape,
                dim,
                writable=writable,
                order=order,
                description=desc + (f" ({port.path})" if port else ""),
            )
            table[str(site)] = (info, _hookpoint(port) if port else None)

        block0 = s.blocks[0]
        add(
            Site("embed"),
            d,
            0.0,
            Port(block0, f"{s.blocks_path}.0", io="input", arg=first_param(block0.forward)),
            "input of block 0",
        )
        for i, parts in enumerate(s.parts):
            block = f"{s.blocks_path}.{i}"
            pattern = (
                f"layer_{i}.attn_pattern",
                parts.attn_pattern,
                ("batch", "head", "seq", "key"),
            )
            attn = (f"layer_{i}.attn", parts.attn, None)
            # Sites in the order the forward pass produces them (stop-early depends on it).
            # (Read inside the attention module, the attn value comes before the pattern.)
            inside = parts.attn.path.startswith(parts.attn_pattern.path + ".")
            first = [attn, pattern] if inside else [pattern, attn]
            steps: list[tuple[str, Port | None, Any]] = [*first]
            if parts.mlp_hidden is not None:
                steps.append((f"layer_{i}.mlp_hidden", parts.mlp_hidden, ("batch", "seq", "d_mlp")))
            steps.append((f"layer_{i}.mlp", parts.mlp, None))
            for k, (name, port, shape) in enumerate(steps):
                site = Site.parse(name)
                order = i + (k + 1) / 10
                if site.role == "attn_pattern":
                    add(
                        site,
                        0,
                        order,
                        port,
                        "attention probabilities per head; needs eager "
                        "attention, switched on for the run",
                        shape=shape,
                        writable=False,
                    )
                elif site.role == "mlp_hidden":
                    add(
                        site,
                        parts.d_mlp or 0,
                        order,
                        port,
                        "MLP hidden units (input of the output projection)",
                        shape=shape,
                    )
                else:
                    add(site, d, order, port, f"{site.role} output added to the residual")
            add(
                Site("residual", i),
                d,
                i + 1.0,
                Port(parts.block, block, index=0),
                f"output of block {i}",
            )
        add(
            Site("final_norm"),
            d,
            len(s.parts) + 0.5,
            Port(s.final_norm, s.final_norm_path),
            "final norm output",
        )
        add(
            Site("logits"),
            s.vocab,
            len(s.parts) + 1.0,
            None,
            "the model's output logits",
            shape=(*TOKEN, "vocab"),
        )
        return table

    # -- running -------------------------------------------------------------------------------
    def forward(self, ctx: RunContext) -> Any:
        batch = dict(ctx.batch)
        mask = batch.get("attention_mask")
        if (
            self._takes_positions
            and mask is not None
            and "position_ids" not in batch
            and padding_side(mask) in ("left", "mixed")
        ):
            # Absolute position embeddings (GPT-2) count from the first real token.
            batch["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
        if self._takes_use_cache:
            batch.setdefault("use_cache", False)
        if any(name.endswith(".attn_pattern") for name in ctx.capture):
            # Some modelling files (OPT before transformers 5.4) drop the probabilities
            # inside the attention module unless asked for them.
            batch.setdefault("output_attentions", True)
        output = self.model(**batch)
        edits = ctx.edits.get("logits")
        if edits:
            logits = output.logits
            for edit in edits:
                logits = apply_edit(logits, edit, self._table["logits"][0], mask)
            output.logits = logits
        return output

    def read_unhooked(self, ctx: RunContext, output: Any, names: list[str]) -> dict[str, Any]:
        logits = output.logits
        return {"logits": logits if ctx.grad else logits.detach()}

    def run_settings(self, ctx: RunContext) -> contextlib.AbstractContextManager[Any]:
        if any(name.endswith(".attn_pattern") for name in ctx.capture):
            return self._attention_patterns()
        return contextlib.nullcontext()

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

    # Not a hookpoint view: unflattening needs this run's (batch, seq), which a view (fixed in
    # the site table built once per backend) cannot see; views would need the run context.
    def _attach(self, name: str, ctx: RunContext) -> Any:
        handle = super()._attach(name, ctx)
        hookpoint = self._table[name][1]
        if hookpoint is not None and name.endswith((".attn", ".mlp", ".mlp_hidden")):
            return _TokenView(hookpoint, handle, ctx)
        return handle

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
