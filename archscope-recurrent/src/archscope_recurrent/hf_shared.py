"""What the Hugging Face RWKV and xLSTM backends share: the `Family` table that says where a
model family keeps its parts and recurrent-state tensors, and the hook-engine backend driven by it.
Both models ignore ``attention_mask``, so only right padding is accepted (and a final state only
for rows of equal length, or through a run in segments).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar, cast

from archscope import SiteError
from archscope.backends import BackendError, RunRequest, RunResult
from archscope.detection import Confidence
from archscope.engine import (
    HookBackend,
    Hookpoint,
    RunContext,
    SiteTable,
    find_module,
    get_module,
)
from archscope.recurrence import WRITE_ROLES, write_sites_of

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class StateTensor:
    """One recurrent-state tensor per layer: its role and its shape after the batch axis."""

    role: str
    shape: tuple[str, ...]
    description: str


@dataclass(frozen=True)
class Family:
    """Where one model family keeps its parts (paths relative to the causal-LM model)."""

    name: str
    module: str
    blocks: str
    embeddings: str
    final_norm: str
    head: str
    mixer: str
    mlp: str
    states: tuple[StateTensor, ...]
    #: Whether the head's output is the model's logits (xLSTM soft-caps them afterwards).
    head_is_logits: bool


class _HFRecurrentBackend(HookBackend):
    """Shared engine of the RWKV and xLSTM backends; subclasses set ``family``."""

    family: ClassVar[Family]
    edits_unhooked = True  # state edits are applied to the cache's final states
    capabilities = frozenset(
        {"residual", "components", "unembed", "logits", "recurrent_state", "state_patch", "edit"}
    )
    padding = "right"

    def __init__(self, model: Any) -> None:
        missing = [
            p
            for p in (
                self.family.blocks,
                self.family.embeddings,
                self.family.final_norm,
                self.family.head,
            )
            if find_module(model, p) is None
        ]
        if missing:
            raise BackendError(
                f"{type(model).__qualname__} has no {', '.join(missing)}: backend "
                f"{self.family.name!r} serves {self.family.module} causal LMs"
            )
        super().__init__(model)

    @classmethod
    def can_handle(cls, model: Any) -> float | None:
        model_cls = type(model)
        if model_cls.__module__.startswith(cls.family.module) and model_cls.__name__.endswith(
            "ForCausalLM"
        ):
            return Confidence.KNOWN
        return None

    def _part(self, path: str) -> Any:
        return get_module(self.model, path)

    def site_table(self) -> SiteTable:
        f = self.family
        d = self._part(f.embeddings).embedding_dim
        table = SiteTable(self.model)
        table.add("embed", Hookpoint(f.embeddings), d, description="embedding output")
        state = self._state_example()
        for i in range(len(self._part(f.blocks))):
            block = f"{f.blocks}.{i}"
            mixer, mlp = f"{block}.{f.mixer}", f"{block}.{f.mlp}"
            table.add(
                f"layer_{i}.mixer",
                Hookpoint(mixer),
                d,
                description=f"sequence-mixer output added to the residual ({mixer})",
            )
            table.add(
                f"layer_{i}.mlp",
                Hookpoint(mlp),
                d,
                description=f"channel-mix / feed-forward output added to the residual ({mlp})",
            )
            table.add(
                f"layer_{i}.residual",
                Hookpoint(block),
                d,
                description=f"residual stream after block {i}",
            )
            for spec, value in zip(f.states, state[i], strict=True):
                table.add(
                    f"layer_{i}.{spec.role}",
                    None,
                    int(value.shape[-1]),
                    shape=spec.shape,
                    writable=True,
                    description=spec.description
                    + "; after the last token; start from one: initial_state=",
                )
            table.add(
                f"layer_{i}.state",
                None,
                sum(v[0].numel() for v in state[i]),
                description=f"the whole state ({', '.join(s.role for s in f.states)}) flattened "
                "and concatenated: one vector per sequence (read-only)",
            )
            self._declare_writes(table, i)
        table.add("final_norm", Hookpoint(f.final_norm), d, description="final normalised residual")
        table.add(
            "logits",
            Hookpoint(f.head) if f.head_is_logits else None,
            self._part(f.head).out_features,
            writable=f.head_is_logits,
            description="output logits"
            if f.head_is_logits
            else "output logits (soft-capped; read-only)",
        )
        return table

    # -- what each family does differently ---------------------------------------------------
    def _declare_writes(self, table: SiteTable, layer: int) -> None:
        """Add layer ``layer``'s write / effective-attention sites (`archscope.recurrence`)."""

    def _state_example(self) -> list[tuple[torch.Tensor, ...]]:
        """Zero per-layer state tensors for a batch of one (shapes for the site table)."""
        raise NotImplementedError

    def _state_from_output(self, output: Any) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _state_arguments(self, initial: Mapping[str, torch.Tensor], batch: int) -> dict[str, Any]:
        raise NotImplementedError

    # -- engine overrides ------------------------------------------------------------------------
    def padding_message(self, side: str) -> str:
        return (
            f"{self.family.name} ignores attention_mask, so archscope supports right padding "
            f"only (real tokens first, then pads); this batch is {side}-padded. Pad on the "
            "right (tokenizer.padding_side = 'right')"
        )

    def execute(self, request: RunRequest) -> RunResult:
        """The engine's execute; on a right-padded batch of unequal lengths the final state is
        computed per row by running the batch in segments that end at each row length."""
        request = self._run_to_the_end(request)
        capture, batch = request.capture, request.batch
        kinds = self.table.infos()
        states = [n for n in capture if kinds[n].kind == "state"]
        lengths = batch["attention_mask"].sum(-1)
        if not (states or request.return_state) or bool((lengths == lengths[0]).all()):
            return super().execute(request)
        state_edits = {n: e for n, e in request.edits.items() if kinds[n].kind == "state"}
        if len(state_edits) != len(request.edits):
            raise BackendError(
                f"{self.family.name} ignores attention_mask, so the state after each row's last "
                "real token of a right-padded batch is computed in a separate pass that cannot "
                "apply edits of token sites; run rows of equal length (or one row) when editing "
                f"and reading the state (row lengths {sorted(set(lengths.tolist()))})"
            )
        result = super().execute(
            replace(
                request,
                capture=[n for n in capture if n not in states],
                edits={},
                return_state=False,
            )
        )
        ctx = request.fresh(edits=state_edits, capture=states)  # write sites: first pass
        final = self._edited(ctx, self._ragged_final_state(ctx, lengths))
        every = self._with_combined(final)
        result.activations = {
            n: every[n] if n in states else result.activations[n] for n in capture
        }
        result.state = final if request.return_state else None
        return result

    def _ragged_final_state(
        self, ctx: RunContext, lengths: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Run the batch in segments ending at each distinct row length, carrying the state;
        each row's final state is taken at the end of its own last segment (continuing from a
        state is exact for both families)."""
        import torch

        ids = ctx.batch["input_ids"]
        current = dict(ctx.initial_state or {})
        final: dict[str, torch.Tensor] = {}
        begin = 0
        with self.run_settings(ctx), torch.set_grad_enabled(ctx.grad):
            for end in sorted(set(lengths.tolist())):
                output = self.model(
                    input_ids=ids[:, begin:end],
                    use_cache=True,
                    **self._state_arguments(current, ids.shape[0]),
                )
                current = {k: v.clone() for k, v in self._state_from_output(output).items()}
                rows = lengths == end
                for name, value in current.items():
                    kept = final.get(name, torch.zeros_like(value))
                    final[name] = torch.where(rows.view(-1, *[1] * (value.dim() - 1)), value, kept)
                begin = end
        return {k: v if ctx.grad else v.detach() for k, v in final.items()}

    def _edited(self, ctx: RunContext, states: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Edits of state sites change the state after the last token (what is captured and
        returned, and what a later run started from it sees)."""
        from archscope.engine import apply_edit

        for name, edits in ctx.edits.items():
            if name in states:
                for edit in edits:
                    states[name] = apply_edit(
                        states[name], edit, self.table.info(name), ctx.attention_mask
                    )
        return states

    def forward(self, ctx: RunContext) -> Any:
        need_state = (
            ctx.return_state
            or bool(ctx.initial_state)
            or any(self.table.info(n).kind == "state" for n in (*ctx.capture, *ctx.edits))
        )
        kwargs: dict[str, Any] = {"input_ids": ctx.batch["input_ids"]}
        if need_state:
            kwargs["use_cache"] = True
            kwargs.update(
                self._state_arguments(ctx.initial_state or {}, ctx.batch["input_ids"].shape[0])
            )
        elif ctx.grad:
            # The cache is updated in place layer by layer, which autograd cannot go through;
            # without one the logits are the same.
            kwargs["use_cache"] = False
        return self.model(**kwargs)

    def read_unhooked(self, ctx: RunContext, output: Any, names: list[str]) -> dict[str, Any]:
        values: dict[str, Any] = {}
        if "logits" in names:
            values["logits"] = output.logits
        # write sites and effective attention: stored by the mixer hooks during the run
        written = [n for n in names if n.partition(".")[2] in WRITE_ROLES]
        values.update({n: ctx.store[n] for n in written})
        states = [n for n in names if n != "logits" and n not in written]
        if states:
            state = self._with_combined(self._edited(ctx, self._state_from_output(output)))
            values.update({n: state[n] for n in states})
        return values

    def _run_to_the_end(self, request: RunRequest) -> RunRequest:
        """An edited write changes everything after its layer: such runs go to the end."""
        if request.stop_early and write_sites_of(request.edits):
            return replace(request, stop_early=False)
        return request

    def _with_combined(self, states: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Add ``layer_i.state``: the layer's state tensors flattened and concatenated."""
        import torch

        combined = {}
        for name, info in self.table.infos().items():
            if info.site.role == "state":
                parts = [states[f"layer_{info.site.layer}.{s.role}"] for s in self.family.states]
                combined[name] = torch.cat([p.reshape(p.shape[0], -1).float() for p in parts], -1)
        return {**states, **combined}

    def final_state(self, ctx: RunContext, output: Any) -> dict[str, torch.Tensor]:
        return self._edited(ctx, self._state_from_output(output))

    def _check_initial(self, initial: Mapping[str, torch.Tensor], batch: int) -> None:
        states = {
            n: i
            for n, i in self.table.infos().items()
            if i.kind == "state" and i.site.role != "state"
        }
        unknown = sorted(set(initial) - set(states))
        if unknown:
            raise SiteError(
                f"initial_state has {unknown}, which are not state sites of backend "
                f"{self.name!r}; state sites: {', '.join(states)}"
            )
        example = {
            f"layer_{i}.{s.role}": v
            for i, layer in enumerate(self._state_example())
            for s, v in zip(self.family.states, layer, strict=True)
        }
        for name, value in initial.items():
            want = (batch, *example[name].shape[1:])
            if tuple(value.shape) != want:
                raise SiteError(
                    f"initial_state[{name!r}] must have shape {want}, got {tuple(value.shape)}"
                )

    def unembed(self, residual: torch.Tensor) -> torch.Tensor:
        from archscope.guards import unembed_input

        residual = unembed_input(
            residual,
            self.site_info(self.layer_names()[-1]).dim,
            f"backend {self.name!r} unembed",
            self.model,
        )
        return cast(
            "torch.Tensor",
            self._part(self.family.head)(self._part(self.family.final_norm)(residual)),
        )
