"""Backend for language models whose sequence mixing is a torch ``nn.RNN`` / ``nn.GRU`` /
``nn.LSTM``: `RecurrentLM` and any model built as embedding → one RNN module → [norm] → head.

torch returns only the last layer's per-step outputs, so the backend runs the stack one layer
at a time with single-layer modules that share the original parameters (same cost as the
stacked call). LSTM cell states are only exposed per step when a ``cell`` site is captured or
edited: then the layer is stepped one time step at a time.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from archscope import Site, SiteError, SiteInfo
from archscope.backends import Backend, BackendError, Edit, RunRequest, RunResult
from archscope.batch import last_real_index
from archscope.detection import Confidence
from archscope.edits import apply_edit
from archscope.errors import CapabilityError
from archscope.guards import InputLimits, unembed_input
from archscope.hookpoints import SiteTable

from .freeze import CANNOT_FREEZE, FREEZES
from .freeze import frozen_run as _frozen_run
from .lstm_step import CellEdits, check_cell_edit_mode, hidden_from_cell

if TYPE_CHECKING:
    import torch
    from torch import nn

_NORM_TYPES = ("LayerNorm", "RMSNorm")
_NEUTRAL_TYPES = ("Dropout", "Identity")


@dataclass
class RNNParts:
    """The four pieces the backend runs: ``head(norm(rnn(embed(ids))))``."""

    embed: nn.Embedding
    rnn: nn.RNNBase
    norm: nn.Module | None
    head: nn.Linear


def find_parts(model: Any) -> RNNParts | None:
    """The embedding, RNN, optional norm and head of ``model``, found by structure; None when
    the model has anything else (another mixer, several RNNs, extra projections).
    Uses torch only if it is already imported (never imports it)."""
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(model, torch.nn.Module):
        return None
    nn = torch.nn
    embeds, rnns, norms, linears = [], [], [], []
    for module in model.modules():
        if isinstance(module, nn.RNNBase):
            rnns.append(module)
        elif next(iter(module.children()), None) is not None:
            continue  # a container: judged by its leaves
        elif isinstance(module, nn.Embedding):
            embeds.append(module)
        elif isinstance(module, nn.Linear):
            linears.append(module)
        elif type(module).__name__ in _NORM_TYPES:
            norms.append(module)
        elif not any(n in type(module).__name__ for n in _NEUTRAL_TYPES):
            return None
    if len(embeds) != 1 or len(rnns) != 1 or len(linears) != 1 or len(norms) > 1:
        return None
    if type(rnns[0]) not in (nn.RNN, nn.GRU, nn.LSTM):
        return None
    head, rnn = linears[0], rnns[0]
    out = (rnn.proj_size or rnn.hidden_size) * (2 if rnn.bidirectional else 1)
    if head.in_features != out or rnn.input_size != embeds[0].embedding_dim:
        return None
    return RNNParts(embeds[0], rnn, norms[0] if norms else None, head)


def _is_reference_model(model: Any) -> bool:
    cls = type(model)
    return cls.__name__ == "RecurrentLM" and cls.__module__.startswith("archscope_recurrent")


class RNNBackend(Backend):
    """torch RNN/GRU/LSTM language models.

    Sites: ``embed``; ``layer_i.hidden`` (every step, every layer; (batch, seq, dirs*hidden));
    ``layer_i.cell`` for LSTM (every step; needs step-by-step unrolling, done only when asked);
    ``layer_i.hidden_state`` / ``layer_i.cell_state`` (state after each row's last real token,
    (batch, dirs*dim) — the layer's ``h_n`` / ``c_n`` with directions concatenated);
    ``final_norm`` (when the model has a norm); ``logits``.

    Editing ``layer_i.hidden`` / ``layer_i.cell`` at step t replaces the recurrent state there:
    the rest of the sequence is recomputed from the edited state (bidirectional layers: the
    edit changes the layer's output only; their cells are read-only). Editing a ``*_state``
    site changes the state after the last token (captured / returned). ``initial_state`` takes
    the ``*_state`` sites (missing ones start at zero). Right padding only.
    """

    name = "recurrent"
    description = "torch nn.RNN/GRU/LSTM language models (RecurrentLM, embedding → RNN → head)"
    capabilities = frozenset(
        {"residual", "logits", "unembed", "recurrent_state", "state_patch", "edit", "freeze"}
    )
    padding = "right"
    primary_role = "hidden"
    #: What `frozen_run` holds and what it cannot (`archscope_recurrent.freeze`).
    freezes = FREEZES
    cannot_freeze = CANNOT_FREEZE

    def __init__(self, model: Any) -> None:
        super().__init__(model)
        parts = find_parts(model)
        if parts is None:
            raise BackendError(
                f"{type(model).__qualname__} is not an embedding → nn.RNN/GRU/LSTM → [norm] → "
                "Linear head model; describe it with archscope_recurrent.ModelSpec and the "
                "'custom' backend instead"
            )
        self.parts = parts
        rnn = parts.rnn
        self.kind = type(rnn).__name__.lower()  # rnn | gru | lstm
        self.num_dirs = 2 if rnn.bidirectional else 1
        self.out_size = (rnn.proj_size or rnn.hidden_size) * self.num_dirs
        self.cell_size = rnn.hidden_size * self.num_dirs
        self._layers: list[Any] = []
        self._directions: dict[int, tuple[Any, Any]] = {}
        self._cell_edits: CellEdits = "keep_hidden"
        self._freezing = False  # set inside `frozen_run` (archscope_recurrent.freeze)
        if self.num_dirs == 2:  # the backward direction reads the future: no continuation
            self.capabilities = type(self).capabilities - {"state_patch"}
        self.frozen_unavailable = CANNOT_FREEZE["bidirectional"] if self.num_dirs == 2 else None
        if self.frozen_unavailable:
            self.capabilities = self.capabilities - {"freeze"}
        if not _is_reference_model(model):
            self._check_structure()

    @property
    def cell_edits(self) -> CellEdits:
        """What an edit of ``layer_i.cell`` at step t does to ``h_t`` (LSTM only):
        ``"keep_hidden"`` (default) keeps the hidden state the step computed from the unedited
        cell, so the edit reaches the outputs from step t + 1 on; ``"recompute_hidden"`` sets
        ``h_t = o_t·tanh(edited c_t)`` with the step's own output gate (see
        `archscope_recurrent.lstm_step`). Set it on the backend: ``backend.cell_edits = ...``."""
        return self._cell_edits

    @cell_edits.setter
    def cell_edits(self, mode: str) -> None:
        self._cell_edits = check_cell_edit_mode(mode)

    @classmethod
    def can_handle(cls, model: Any) -> float | None:
        try:
            if getattr(model, "archscope_spec", None) is not None:
                return None  # described explicitly: the custom adapter's
            if _is_reference_model(model):
                return Confidence.KNOWN
            return Confidence.FALLBACK if find_parts(model) is not None else None
        except Exception:
            return None

    # -- sites ---------------------------------------------------------------------------------
    def site_table(self) -> SiteTable:
        """Every site (the backend computes them all itself: no hookpoints), in forward order."""
        p = self.parts
        table = SiteTable(self.model)
        table.add(
            "embed", None, p.embed.embedding_dim, description="embedding output (input of layer 0)"
        )
        bidirectional = self.num_dirs == 2
        lstm = self.kind == "lstm"
        for i in range(p.rnn.num_layers):
            table.add(
                f"layer_{i}.hidden",
                None,
                self.out_size,
                description="hidden output at every step (directions concatenated)",
            )
            if lstm:
                table.add(
                    f"layer_{i}.cell",
                    None,
                    self.cell_size,
                    shape=("batch", "seq", "d_cell"),
                    writable=not bidirectional,
                    description="LSTM cell state at every step (stepped one time step at a time)",
                )
            table.add(
                f"layer_{i}.hidden_state",
                None,
                self.out_size,
                shape=("batch", "d_hidden"),
                writable=True,
                description="hidden state after the last real token (start from one: initial_state=)",
            )
            if lstm:
                table.add(
                    f"layer_{i}.cell_state",
                    None,
                    self.cell_size,
                    shape=("batch", "d_cell"),
                    writable=True,
                    description="cell state after the last real token (start from one: initial_state=)",
                )
        if p.norm is not None:
            table.add(
                "final_norm",
                None,
                self.out_size,
                shape=("batch", "seq", "d_hidden"),
                description="normalised output of the last layer",
            )
        table.add("logits", None, p.head.out_features, writable=True, description="output logits")
        return table

    @property
    def device(self) -> torch.device:
        return self.parts.embed.weight.device

    def input_limits(self) -> InputLimits:
        # the embedding found by structure is the vocabulary; a recurrence has no position limit
        return InputLimits(vocab_size=self.parts.embed.num_embeddings)

    def unembed(self, residual: torch.Tensor) -> torch.Tensor:
        residual = unembed_input(
            residual, self.out_size, f"backend {self.name!r} unembed (the RNN output)", self.model
        )
        y = self.parts.norm(residual) if self.parts.norm is not None else residual
        return cast("torch.Tensor", self.parts.head(y))

    # -- single-layer modules that share the stack's parameters -------------------------------
    def _make_layer(self, i: int, bidirectional: bool, suffix: str = "") -> Any:
        from torch import nn

        rnn = self.parts.rnn
        input_size = rnn.input_size if i == 0 else self.out_size
        kwargs: dict[str, Any] = {
            "num_layers": 1,
            "bias": rnn.bias,
            "batch_first": True,
            "bidirectional": bidirectional,
            "device": "meta",
        }
        if isinstance(rnn, nn.LSTM):
            layer: nn.RNNBase = nn.LSTM(
                input_size, rnn.hidden_size, proj_size=rnn.proj_size, **kwargs
            )
        elif isinstance(rnn, nn.GRU):
            layer = nn.GRU(input_size, rnn.hidden_size, **kwargs)
        else:
            layer = nn.RNN(input_size, rnn.hidden_size, nonlinearity=rnn.nonlinearity, **kwargs)
        for name in layer._flat_weights_names:
            source = name.replace("_l0", f"_l{i}", 1)
            if suffix and not source.endswith(suffix):
                source += suffix
            setattr(layer, name, getattr(rnn, source))
        return layer

    def _shared(self, layer: Any, i: int, suffix: str = "") -> bool:
        rnn = self.parts.rnn
        return all(
            getattr(layer, n)
            is getattr(
                rnn,
                n.replace("_l0", f"_l{i}", 1)
                + (suffix if suffix and not n.endswith(suffix) else ""),
            )
            for n in layer._flat_weights_names
        )

    def _layer(self, i: int) -> Any:
        if len(self._layers) != self.parts.rnn.num_layers or not self._shared(self._layers[i], i):
            # (re)built when the stack's parameters were replaced since the last run
            self._layers = [
                self._make_layer(j, bool(self.parts.rnn.bidirectional))
                for j in range(self.parts.rnn.num_layers)
            ]
        return self._layers[i]

    def _direction_layers(self, i: int) -> tuple[Any, Any]:
        pair = self._directions.get(i)
        if pair is None or not (self._shared(pair[0], i) and self._shared(pair[1], i, "_reverse")):
            pair = (self._make_layer(i, False), self._make_layer(i, False, "_reverse"))
            self._directions[i] = pair
        return pair

    # -- running -------------------------------------------------------------------------------
    def check_request(
        self,
        capture: Iterable[str | Site],
        edits: Iterable[Edit],
        initial_state: Mapping[str, torch.Tensor] | None = None,
        return_state: bool = False,
    ) -> tuple[list[str], dict[str, list[Edit]]]:
        if (initial_state is not None or return_state) and "state_patch" not in self.capabilities:
            raise CapabilityError(
                f"backend {self.name!r}: initial_state / return_state need the 'state_patch' "
                "capability, which a bidirectional model lacks (its backward direction reads "
                "the future, so a run cannot continue from a state); capture the "
                "layer_i.hidden_state / cell_state sites instead"
            )
        return super().check_request(capture, edits, initial_state, return_state)

    def execute(self, request: RunRequest) -> RunResult:  # noqa: C901 - one pass over the layers that edits, captures and carries the state together
        import torch

        table = self.sites()
        wanted, edit_map, batch = request.capture, request.edits, request.batch
        stop_early, grad = request.stop_early, request.grad
        initial_state, return_state = request.initial_state, request.return_state
        mask = batch["attention_mask"] if "attention_mask" in batch else None
        padded = request.padding_side == "right"
        start = self._initial_hx(initial_state, batch)

        n_layers = self.parts.rnn.num_layers
        need_logits = return_state or not (stop_early and wanted and "logits" not in wanted)
        if need_logits:
            last_layer = n_layers - 1
        else:
            layers = [table[n].site.layer for n in wanted]
            last_layer = max((x for x in layers if x is not None), default=-1)
            if "final_norm" in wanted:
                last_layer = n_layers - 1
        store: dict[str, torch.Tensor] = {}
        states: dict[str, torch.Tensor] = {}

        def site_value(name: str, value: torch.Tensor) -> torch.Tensor:
            for edit in edit_map.get(name, []):
                value = apply_edit(value, edit, table[name], mask)
            if name in wanted:
                store[name] = value if grad else value.detach()
            return value

        with torch.set_grad_enabled(grad), warnings.catch_warnings():
            # cuDNN warns that the shared weights are not one flat buffer; flattening them
            # would move the model's own parameters, so the (correct) slower path is kept
            warnings.filterwarnings("ignore", message="RNN module weights are not part")
            if "input_ids" in batch:
                x = self.parts.embed(batch["input_ids"])
            else:
                x = batch["inputs_embeds"]
            x = site_value("embed", x)
            if mask is None:
                mask = torch.ones(x.shape[:2], dtype=torch.long, device=x.device)
            for i in range(last_layer + 1):
                x, cells, h_n, c_n = self._run_layer(
                    i, x, mask, padded, start.get(i), edit_map, f"layer_{i}.cell" in wanted
                )
                if self.num_dirs == 2:  # no single recurrence order: edit the layer's output
                    for edit in edit_map.get(f"layer_{i}.hidden", []):
                        x = apply_edit(x, edit, table[f"layer_{i}.hidden"], mask)
                for role, value in (("hidden", x), ("cell", cells)):
                    name = f"layer_{i}.{role}"
                    if name in wanted and value is not None:
                        store[name] = value if grad else value.detach()
                states[f"layer_{i}.hidden_state"] = h_n
                if c_n is not None:
                    states[f"layer_{i}.cell_state"] = c_n
            logits = None
            if need_logits or "final_norm" in wanted:
                if self.parts.norm is not None:
                    x = site_value("final_norm", self.parts.norm(x))
                if need_logits:
                    logits = site_value("logits", self.parts.head(x))
        for name in states:  # edits of a state site change the state after the last token
            for edit in edit_map.get(name, []):
                states[name] = apply_edit(states[name], edit, table[name], mask)
        for name in wanted:
            if table[name].kind == "state":
                store[name] = states[name] if grad else states[name].detach()
        state = None
        if return_state:
            state = {n: v if grad else v.detach() for n, v in states.items()}
        return RunResult(
            logits=logits if grad or logits is None else logits.detach(),
            activations={n: store[n] for n in wanted},
            attention_mask=batch.get("attention_mask"),
            state=state,
        )

    def frozen_run(self, values: Any) -> contextlib.AbstractContextManager[None]:
        """Runs with the gates, activation slopes and norm scale held at ``values``
        (`archscope.freeze`; `archscope_recurrent.freeze`)."""
        return _frozen_run(self, values)

    def read_only_reason(self, info: SiteInfo) -> str:
        if info.site.role == "cell":
            return "the cell state of a bidirectional layer has no single recomputation order"
        return ""

    def padding_message(self, side: str) -> str:
        return (
            f"backend {self.name!r} supports right padding only (real tokens first, then "
            f"pads); this attention_mask is {side}-padded. Pad on the right, e.g. "
            "tokenizer.padding_side = 'right'"
        )

    def _initial_hx(
        self, initial_state: Mapping[str, torch.Tensor] | None, batch: dict[str, Any]
    ) -> dict[int, tuple[torch.Tensor, torch.Tensor | None]]:
        """``initial_state`` → per layer (h0, c0) shaped (dirs, batch, dim); missing → zeros."""
        import torch

        if not initial_state:
            return {}
        state_sites = [n for n, i in self.table.infos().items() if i.kind == "state"]
        unknown = sorted(set(initial_state) - set(state_sites))
        if unknown:
            raise SiteError(
                f"initial_state has {unknown}, which are not state sites of backend "
                f"{self.name!r}; state sites: {', '.join(state_sites)}"
            )
        b = int(batch["input_ids" if "input_ids" in batch else "inputs_embeds"].shape[0])
        dtype = self.parts.embed.weight.dtype
        out: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        for i in range(self.parts.rnn.num_layers):
            pair: list[torch.Tensor | None] = []
            for role, dim in (("hidden_state", self.out_size), ("cell_state", self.cell_size)):
                name = f"layer_{i}.{role}"
                if name not in self.table:
                    pair.append(None)
                    continue
                value = initial_state.get(name)
                if value is None:
                    value = torch.zeros(b, dim, dtype=dtype, device=self.device)
                value = torch.as_tensor(value).to(device=self.device, dtype=dtype)
                if tuple(value.shape) != (b, dim):
                    raise SiteError(
                        f"initial_state[{name!r}] must have shape (batch, {dim}) = "
                        f"{(b, dim)}, got {tuple(value.shape)}"
                    )
                pair.append(value.reshape(b, self.num_dirs, -1).transpose(0, 1).contiguous())
            h0 = pair[0]
            assert h0 is not None
            out[i] = (h0, pair[1])
        return out

    def _run_layer(
        self,
        i: int,
        x: torch.Tensor,
        mask: torch.Tensor,
        padded: bool,
        hx: tuple[torch.Tensor, torch.Tensor | None] | None,
        edit_map: dict[str, list[Edit]],
        want_cells: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """One layer over the whole sequence → (outputs, per-step cells or None, h_n, c_n) with
        h_n / c_n (batch, dirs*dim) taken after each row's last real token."""
        import torch

        lstm = self.kind == "lstm"
        h_edits = edit_map.get(f"layer_{i}.hidden", []) if self.num_dirs == 1 else []
        c_edits = edit_map.get(f"layer_{i}.cell", [])
        stepping = want_cells or bool(c_edits)
        b = x.shape[0]
        if hx is None:
            hx_arg: Any = None
        else:
            hx_arg = (hx[0], hx[1]) if lstm else hx[0]

        # inside a frozen run an edited layer is stepped straight away: the fast path would
        # replay the layer's held factors once more than the prompt's run recorded them
        frozen_edit = self._freezing and bool(h_edits or c_edits)
        if not want_cells and not frozen_edit:  # fast path: one call for the whole layer
            fast = self._whole_layer(i, x, mask, padded, hx_arg)
            # edits that leave every value as it is (identity edits) keep the fused call's
            # result: stepping would give the same values up to rounding, not bit for bit
            if not self._changes(fast[0], h_edits, mask, f"layer_{i}.hidden") and not (
                c_edits
                and self._changes(self._cells(i, x, hx_arg, mask), c_edits, mask, f"layer_{i}.cell")
            ):
                return fast
        last = last_real_index(mask)
        rows = torch.arange(b, device=x.device)
        info_h = self.table.info(f"layer_{i}.hidden")
        info_c = self.table.infos().get(f"layer_{i}.cell")
        if self.num_dirs == 1:
            # with padding, an LSTM's final cell state is read per row, so it is stepped
            out, cells, c_last = self._unroll(
                self._layer(i),
                x,
                hx_arg,
                mask,
                stepping or (padded and lstm),
                h_edits,
                c_edits,
                info_h,
                info_c,
            )
            h_n = out[rows, last]
            if lstm:
                c_n = cells[rows, last] if cells is not None else c_last
        else:  # bidirectional, cells wanted: step each direction (no edits: read-only)
            fwd, bwd = self._direction_layers(i)
            split: list[Any] = [None, None]
            if hx is not None:
                h0, c0 = hx
                split = [
                    (h0[d : d + 1], c0[d : d + 1]) if c0 is not None else h0[d : d + 1]
                    for d in (0, 1)
                ]
            positions = torch.arange(x.shape[1], device=x.device).expand(b, -1)
            reverse = torch.where(positions <= last[:, None], last[:, None] - positions, positions)

            def flip(t: torch.Tensor) -> torch.Tensor:  # reverse each row's real tokens
                return t.gather(1, reverse[..., None].expand(-1, -1, t.shape[-1]))

            out_f, cells_f, _ = self._unroll(fwd, x, split[0], mask, True, [], [], info_h, info_c)
            out_b, cells_b, _ = self._unroll(
                bwd, flip(x), split[1], mask, True, [], [], info_h, info_c
            )
            out_b, cells_b = flip(out_b), flip(cells_b) if cells_b is not None else None
            out = torch.cat([out_f, out_b], -1)
            h_n = torch.cat([out_f[rows, last], out_b[:, 0]], -1)
            if lstm:
                assert cells_f is not None and cells_b is not None
                cells = torch.cat([cells_f, cells_b], -1)
                c_n = torch.cat([cells_f[rows, last], cells_b[:, 0]], -1)
        if padded:  # pads hold zeros, as in the packed fast path
            keep = mask[..., None].to(out.dtype)
            out = out * keep
            cells = cells * keep if cells is not None else None
        return out, cells if stepping else None, h_n, c_n if lstm else None

    def _whole_layer(
        self, i: int, x: torch.Tensor, mask: torch.Tensor, padded: bool, hx_arg: Any
    ) -> tuple[torch.Tensor, None, torch.Tensor, torch.Tensor | None]:
        """Layer ``i`` over the whole sequence in one call (packed when padded)."""
        from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

        b = x.shape[0]
        lstm = self.kind == "lstm"
        layer = self._layer(i)
        if padded:
            lengths = mask.sum(-1).cpu()
            packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
            out, state = layer(packed, hx_arg)
            out = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])[0]
        else:
            out, state = layer(x, hx_arg)
        h_n, c_n = state if lstm else (state, None)

        def flat(s: torch.Tensor) -> torch.Tensor:  # (dirs, batch, d) → (batch, dirs*d)
            return s.transpose(0, 1).reshape(b, -1)

        return out, None, flat(h_n), flat(c_n) if c_n is not None else None

    def _changes(
        self, value: torch.Tensor, edits: list[Edit], mask: torch.Tensor, site: str
    ) -> bool:
        """Whether ``edits`` change the unedited per-step ``value`` of ``site`` anywhere. An
        edit whose value needs a gradient always counts: a zero ``add`` is how gradients with
        respect to a site are taken, and it must stay in the graph; so does a function edit in
        a gradient run (it may add such a tensor, which equal values would hide)."""
        import torch

        if any(isinstance(e.value, torch.Tensor) and e.value.requires_grad for e in edits):
            return True
        if torch.is_grad_enabled() and any(e.op == "fn" for e in edits):
            return True
        edited = value
        for edit in edits:
            edited = apply_edit(edited, edit, self.table.info(site), mask)
        return not torch.equal(edited, value)

    def _cells(self, i: int, x: torch.Tensor, hx_arg: Any, mask: torch.Tensor) -> torch.Tensor:
        """Layer ``i``'s unedited LSTM cell state at every step (stepped)."""
        info_h, info_c = self.table.info(f"layer_{i}.hidden"), self.table.info(f"layer_{i}.cell")
        cells = self._unroll(self._layer(i), x, hx_arg, mask, True, [], [], info_h, info_c)[1]
        assert cells is not None
        return cells

    def _unroll(
        self,
        layer: Any,
        x: torch.Tensor,
        hx: Any,
        mask: torch.Tensor,
        stepping: bool,
        h_edits: list[Edit],
        c_edits: list[Edit],
        info_h: SiteInfo,
        info_c: SiteInfo | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Run a unidirectional layer in segments that end at edited steps (or one step at a
        time), editing the recurrent state there and continuing from the edited state.
        Returns (outputs, per-step cells when stepping, the cell state after the last step)."""
        import torch

        b, seq = x.shape[:2]
        lstm = self.kind == "lstm"
        steps = set(range(seq)) if stepping else set()
        edited = self._edited_steps(h_edits, info_h, b, seq, mask) | (
            self._edited_steps(c_edits, info_c, b, seq, mask) if info_c is not None else set()
        )
        bounds = sorted(steps | edited | {seq - 1})
        outs: list[torch.Tensor] = []
        cells: list[torch.Tensor] = []
        begin = 0
        for end in bounds:
            h_before = hx[0] if lstm and hx is not None else None
            out, state = layer(x[:, begin : end + 1], hx)
            h, c = state if lstm else (state, None)
            if end in edited:
                if c_edits and c is not None and info_c is not None:
                    new_c = self._edit_step(
                        [*cells, c[0][:, None]], c_edits, info_c, end, seq, mask
                    )
                    if self.cell_edits == "recompute_hidden":
                        out = _recompute_hidden(layer, x[:, end], out, h_before, c[0], new_c)
                        h = out[:, -1][None].contiguous()
                    c = new_c[None].contiguous()
                if h_edits:
                    new_h = self._edit_step([*outs, out], h_edits, info_h, end, seq, mask)
                    out = torch.cat([out[:, :-1], new_h[:, None]], 1)
                    h = new_h[None].contiguous()  # cuDNN wants contiguous states
            outs.append(out)
            if lstm and stepping:
                assert c is not None
                cells.append(c[0][:, None])
            hx = (h, c) if lstm else h
            begin = end + 1
        c_last = hx[1][0] if lstm else None
        return torch.cat(outs, 1), torch.cat(cells, 1) if cells else None, c_last

    @staticmethod
    def _edited_steps(
        edits: list[Edit], info: SiteInfo | None, b: int, seq: int, mask: torch.Tensor
    ) -> set[int]:
        """The time steps an edit list touches (any row), found by applying each edit's
        position selection to a probe."""
        import torch

        steps: set[int] = set()
        for edit in edits:
            assert info is not None
            probe = apply_edit(
                torch.zeros(b, seq, 1),
                Edit.replace(edit.site, 1.0, edit.positions),
                info,
                mask.cpu(),
            )
            steps |= set(probe[..., 0].any(0).nonzero().flatten().tolist())
        return steps

    @staticmethod
    def _edit_step(
        parts: list[torch.Tensor],
        edits: list[Edit],
        info: SiteInfo,
        t: int,
        seq: int,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """Apply ``edits`` to step ``t`` of a site whose steps 0..t are known (later steps are
        zeros here and are recomputed afterwards); returns the edited step (batch, dim)."""
        import torch

        known = torch.cat(parts, 1)
        full = torch.cat(
            [known, known.new_zeros(known.shape[0], seq - known.shape[1], known.shape[2])], 1
        )
        for edit in edits:
            full = apply_edit(full, edit, info, mask)
        return full[:, t]

    # -- structure check for models detected by structure --------------------------------------
    def _check_structure(self) -> None:
        """Models found by structure are assumed to compute head(norm(rnn(embed(ids)))); check
        that once on a short input so a model doing something else is not silently misread."""
        import torch

        if self.model.training:
            return
        ids = torch.arange(min(4, self.parts.embed.num_embeddings), device=self.device)[None]
        try:
            with torch.no_grad():
                output = self.model(ids)
        except Exception:
            return  # the forward needs other arguments: nothing to compare against
        logits = output if isinstance(output, torch.Tensor) else getattr(output, "logits", None)
        if logits is None and isinstance(output, (tuple, list)) and output:
            logits = output[0]
        if not isinstance(logits, torch.Tensor):
            return
        with torch.no_grad():
            ours = self.run(ids, capture=["logits"])["logits"]
        if logits.shape == ours.shape and not torch.allclose(logits, ours, atol=1e-4, rtol=1e-4):
            raise BackendError(
                f"{type(self.model).__qualname__} looks like embedding → "
                f"{type(self.parts.rnn).__name__} → head, but its forward computes something else "
                f"(max logit difference {float((logits - ours).abs().max()):.3g}). Describe it "
                "with archscope_recurrent.ModelSpec and the 'custom' backend instead"
            )


def _recompute_hidden(
    layer: Any,
    x_t: torch.Tensor,
    out: torch.Tensor,
    h_before: torch.Tensor | None,
    old_c: torch.Tensor,
    new_c: torch.Tensor,
) -> torch.Tensor:
    """``out`` (one segment's outputs, ending at the edited step) with its last step's hidden
    state recomputed from the edited cell ``new_c`` in the rows whose cell the edit changed."""
    import torch

    if out.shape[1] > 1:
        h_prev = out[:, -2]
    elif h_before is not None:
        h_prev = h_before[0]
    else:
        h_prev = out.new_zeros(out.shape[0], out.shape[-1])
    changed = (new_c != old_c).any(-1, keepdim=True)
    h_t = torch.where(changed, hidden_from_cell(layer, x_t, h_prev, new_c), out[:, -1])
    return torch.cat([out[:, :-1], h_t[:, None]], 1)
