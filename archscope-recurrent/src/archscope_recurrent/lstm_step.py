"""What an edit of an LSTM's cell state does to the hidden state of the same step.

An LSTM step computes ``c_t = f·c_{t-1} + i·g`` and then ``h_t = o·tanh(c_t)`` (times the
projection ``W_hr`` when the layer has ``proj_size``). Editing ``layer_i.cell`` at step t can
either keep ``h_t`` as computed from the unedited cell ("keep_hidden", the default: the edit
reaches the output from step t + 1 on, through ``c_t``) or recompute ``h_t`` from the edited
cell with the step's own output gate ("recompute_hidden": the edit also changes ``h_t``, as if
the step had produced that cell itself).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from archscope.errors import BackendError

if TYPE_CHECKING:
    import torch
    from torch import nn

CellEdits = Literal["keep_hidden", "recompute_hidden"]
CELL_EDIT_MODES: tuple[str, ...] = ("keep_hidden", "recompute_hidden")


def check_cell_edit_mode(mode: str) -> CellEdits:
    """``mode`` if it is one of `CELL_EDIT_MODES`, else a `BackendError` naming them."""
    if mode not in CELL_EDIT_MODES:
        raise BackendError(
            f"cell_edits={mode!r}: use 'keep_hidden' (an edited cell changes the following "
            "steps only) or 'recompute_hidden' (h = o·tanh(c) of the same step is recomputed)"
        )
    return mode  # type: ignore[return-value]


def hidden_from_cell(
    layer: nn.LSTM, x_t: torch.Tensor, h_prev: torch.Tensor, cell: torch.Tensor
) -> torch.Tensor:
    """``o·tanh(cell)`` (projected when the layer has ``proj_size``) for one step of a
    single-layer, unidirectional ``layer``: ``x_t`` (batch, input), ``h_prev`` the hidden state
    before the step (batch, hidden or proj), ``cell`` the (edited) cell state of the step
    (batch, hidden). The output gate ``o = σ(W_io x_t + b_io + W_ho h_prev + b_ho)`` is the
    step's own, computed from the same inputs the step saw."""
    import torch

    def weight(name: str) -> torch.Tensor:
        value = getattr(layer, name)
        assert isinstance(value, torch.Tensor)
        return value

    n = layer.hidden_size
    rows = slice(3 * n, 4 * n)  # torch orders the gates i, f, g, o
    gate = x_t @ weight("weight_ih_l0")[rows].T + h_prev @ weight("weight_hh_l0")[rows].T
    if layer.bias:
        gate = gate + weight("bias_ih_l0")[rows] + weight("bias_hh_l0")[rows]
    h = torch.sigmoid(gate) * torch.tanh(cell)
    if layer.proj_size:
        h = h @ weight("weight_hr_l0").T
    return h
