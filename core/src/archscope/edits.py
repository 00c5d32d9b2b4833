"""Edits: a change to a site's value during a run (`Edit`), and `apply_edit`, the one
implementation of what an edit does to a tensor (positions, units, shape checks)."""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from .batch import last_real_index
from .errors import SiteError
from .sites import Site, SiteInfo

if TYPE_CHECKING:
    import torch

__all__ = ["Edit", "EditError", "EditOp", "Positions", "apply_edit"]


class EditError(SiteError, TypeError):
    """A malformed edit (unknown op, positions that are not indices, a value of the wrong
    type); also a `TypeError`, as 0.2 raised for some of these."""


EditOp = Literal["replace", "add", "scale", "fn"]


def _is_index(value: Any) -> bool:
    """An integer index (int, numpy or 0-d torch integer), not a bool."""
    if isinstance(value, bool):
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


Positions = None | int | slice | Sequence[int]


def _check_finite(value: Any, where: str) -> None:
    """Refuse a NaN or infinite number, or a tensor / array holding one: an edit with such a
    value turns every later activation and the logits into NaN without an error."""
    bad: Any = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            bad = value
    elif hasattr(value, "dtype") and hasattr(value, "shape"):
        import torch

        tensor = torch.as_tensor(value)
        from .guards import all_finite

        if tensor.is_floating_point() and tensor.device.type != "meta" and not all_finite(tensor):
            finite = torch.isfinite(tensor)
            if not bool(finite.all()):
                bad = tensor[~finite].flatten()[0].item()
                count = int((~finite).sum())
                raise EditError(
                    f"{where}: the value holds {count} non-finite number(s) (such as {bad}) of "
                    f"{tensor.numel()}; edit values must be finite (a NaN or infinity spreads to "
                    "every later activation and the logits)"
                )
    if bad is not None:
        raise EditError(
            f"{where}: the value {bad} is not finite; edit values must be finite numbers (a "
            "NaN or infinity spreads to every later activation and the logits)"
        )


@dataclass(frozen=True)
class Edit:
    """A change to a site's value during a run.

    ``op``: ``replace`` (patch), ``add`` (steer), ``scale`` (multiply; 0 ablates) or ``fn``
    (call ``value(tensor) -> tensor``). ``positions`` selects sequence positions of token sites
    (None = all), counted among each row's real tokens whatever side the batch is padded on:
    ``0`` is a row's first real token, ``-1`` its last, a slice selects real tokens only; a
    position some row does not have is refused. (A slice that selects different numbers of
    tokens in different rows selects a flat (tokens, ...) part: its value is then a number or
    a vector over the units.) ``units`` selects feature indices (neurons) of
    the last axis (None = all). Numbers and tensors must be finite (no NaN or infinity).
    A tensor ``value`` must have exactly the selected shape, or be a vector over the selected
    units, which is then applied at every selected position; anything else is an error.
    """

    site: str
    op: EditOp
    value: Any
    positions: Positions = None
    units: Sequence[int] | None = None

    def __post_init__(self) -> None:
        where = f"Edit of {self.site!r}"
        if self.op not in ("replace", "add", "scale", "fn"):
            raise EditError(
                f"{where}: unknown op {self.op!r}; use replace, add, scale or fn "
                "(Edit.replace / add / scale / apply)"
            )
        if self.op == "fn" and not callable(self.value):
            raise EditError(
                f"{where}: Edit.apply needs a function tensor -> tensor, got "
                f"{type(self.value).__name__}"
            )
        if self.op != "fn" and (isinstance(self.value, (str, bytes)) or callable(self.value)):
            raise EditError(
                f"{where}: the value of a {self.op} edit is a number or a tensor, "
                f"got {type(self.value).__name__}"
            )
        if self.op != "fn":
            _check_finite(self.value, f"{where} ({self.op})")
        for field_name in ("positions", "units"):  # tensors / arrays of indices -> lists
            value = getattr(self, field_name)
            if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
                object.__setattr__(self, field_name, value.tolist())
        pos = self.positions
        ok = (
            pos is None
            or pos == "last"
            or isinstance(pos, slice)
            or _is_index(pos)
            or (
                isinstance(pos, Sequence)
                and not isinstance(pos, str)
                and all(_is_index(p) for p in pos)
            )
        )
        if not ok:
            raise EditError(
                f"{where}: positions must be None (all), an int, a slice, a list of "
                f"ints or 'last' (each row's last real token); got {pos!r}"
            )
        if self.units is not None and (
            isinstance(self.units, str) or not all(_is_index(u) for u in self.units)
        ):
            raise EditError(
                f"{where}: units must be a list of feature indices (ints), got {self.units!r}"
            )

    @classmethod
    def replace(
        cls,
        site: str | Site,
        value: Any,
        positions: Positions = None,
        units: Sequence[int] | None = None,
    ) -> Edit:
        return cls(str(site), "replace", value, positions, units)

    @classmethod
    def add(
        cls,
        site: str | Site,
        value: Any,
        positions: Positions = None,
        units: Sequence[int] | None = None,
    ) -> Edit:
        return cls(str(site), "add", value, positions, units)

    @classmethod
    def scale(
        cls,
        site: str | Site,
        factor: Any,
        positions: Positions = None,
        units: Sequence[int] | None = None,
    ) -> Edit:
        return cls(str(site), "scale", factor, positions, units)

    @classmethod
    def apply(
        cls,
        site: str | Site,
        fn: Callable[[Any], Any],
        positions: Positions = None,
        units: Sequence[int] | None = None,
    ) -> Edit:
        return cls(str(site), "fn", fn, positions, units)


def apply_edit(
    value: torch.Tensor, edit: Edit, info: SiteInfo, mask: torch.Tensor | None
) -> torch.Tensor:
    """``value`` with ``edit`` applied (a new tensor): the one implementation of edit semantics,
    for the engine's hooks and for backends that apply edits themselves. Positions count each
    row's real tokens in ``mask`` (see `Edit`)."""
    if edit.positions is not None and info.kind != "token":
        raise SiteError(
            f"edit of {edit.site!r}: positions apply only to token sites; "
            f"{edit.site} is a {info.kind} site"
        )
    axis = info.shape.index("seq") if "seq" in info.shape else 1
    if edit.positions is not None and axis not in (1, value.dim() - 1) and value.dim() > axis:
        # e.g. an attention pattern (batch, heads, seq, key): positions index the seq axis
        moved = apply_edit(value.movedim(axis, 1), edit, _seq_second(info, axis), mask)
        return moved.movedim(1, axis)
    import torch

    out = value.clone()
    units = _unit_index(edit, value)
    index = _position_index(edit, value, mask)  # rows x positions, then units
    selected = out[index]
    target = selected[..., units] if units is not None else selected
    new = _edited(edit, target, value)
    if units is None and edit.positions is None:
        # the whole value is the edit's result: written into a fresh tensor rather than into
        # the copy of ``value``, it depends on ``value`` only through what the edit computed
        # from it, so a backward pass does not carry zeros through whatever produced a value
        # that was replaced (the same numbers, the same gradients)
        return torch.empty_like(value).copy_(new)
    if units is not None:
        selected[..., units] = new.to(selected.dtype)
    else:
        selected = new.to(selected.dtype)
    out[index] = selected
    return out


def _seq_second(info: SiteInfo, axis: int) -> SiteInfo:
    from dataclasses import replace

    shape = list(info.shape)
    shape.insert(1, shape.pop(axis))
    return replace(info, shape=tuple(shape))


def _unit_index(edit: Edit, value: torch.Tensor) -> torch.Tensor | None:
    import torch

    if edit.units is None:
        return None
    units = torch.as_tensor(list(edit.units), dtype=torch.long, device=value.device)
    if units.numel() and (units.max() >= value.shape[-1] or units.min() < -value.shape[-1]):
        raise SiteError(
            f"edit of {edit.site!r}: unit index out of range for dimension {value.shape[-1]}"
        )
    return units


def _position_index(edit: Edit, value: torch.Tensor, mask: torch.Tensor | None) -> tuple[Any, ...]:
    """The index of the selected positions in ``value`` (batch, seq, ...): rows x positions,
    counted among each row's real tokens."""
    import torch

    pos = edit.positions
    if pos == "last":
        if mask is None:
            raise SiteError("positions='last' needs an attention mask")
        return (torch.arange(value.shape[0], device=value.device), last_real_index(mask))
    if pos is None:
        return (slice(None),)
    if mask is not None and tuple(mask.shape) == tuple(value.shape[:2]) and not bool(mask.all()):
        return _real_token_index(edit, value, mask)
    if isinstance(pos, slice):
        if not range(value.shape[1])[pos]:  # as a list beyond the sequence raises
            raise SiteError(
                f"edit of {edit.site!r}: positions {pos} select no position of a "
                f"sequence of length {value.shape[1]}; give a slice that overlaps "
                f"0..{value.shape[1] - 1}"
            )
        return (slice(None), pos)
    seq = value.shape[1]
    pos_list = _listed(pos)
    bad = [p for p in pos_list if not -seq <= p < seq]
    if bad:
        raise SiteError(
            f"edit of {edit.site!r}: positions {bad} out of range for a sequence of length {seq}"
        )
    return (slice(None), torch.tensor(pos_list, dtype=torch.long, device=value.device))


def _listed(pos: Any) -> list[int]:
    return [int(p) for p in pos] if isinstance(pos, Sequence) else [operator.index(pos)]


def _real_token_index(edit: Edit, value: torch.Tensor, mask: torch.Tensor) -> tuple[Any, ...]:
    """Positions of a padded batch: counted among each row's real tokens (a row's real tokens
    are contiguous, `prepare_inputs` refuses gaps), negative ones from its last real token."""
    import torch

    device = value.device
    real = mask.to(device).bool()
    lengths = real.sum(1)
    first = real.long().argmax(1)  # the column of each row's first real token
    rows = torch.arange(value.shape[0], device=device)[:, None]
    pos = edit.positions
    if isinstance(pos, slice):
        chosen = [list(range(int(n))[pos]) for n in lengths.tolist()]
        if not any(chosen):
            raise SiteError(
                f"edit of {edit.site!r}: positions {pos} select no real token of rows with "
                f"{sorted(set(lengths.tolist()))} real tokens (positions count each row's real "
                "tokens, padding excluded); give a slice that overlaps them"
            )
        if len({len(c) for c in chosen}) == 1:
            local = torch.tensor(chosen, dtype=torch.long, device=device)
            return (rows, first[:, None] + local)
        selected = torch.zeros_like(real)  # rows select different numbers of tokens
        for r, cols in enumerate(chosen):
            selected[r, [int(first[r]) + c for c in cols]] = True
        return (selected,)
    given = torch.tensor(_listed(pos), dtype=torch.long, device=device)
    n = lengths[:, None]
    local = given[None, :] + torch.where(given[None, :] < 0, n, torch.zeros_like(n))
    outside = (local < 0) | (local >= n)
    if bool(outside.any()):
        longest = int(lengths.max())
        beyond = [p for p in _listed(pos) if not -longest <= p < longest]
        if beyond:
            raise SiteError(
                f"edit of {edit.site!r}: positions {beyond} out of range for a sequence of "
                f"length {longest} (the longest row's real tokens; positions count real "
                "tokens, padding excluded)"
            )
        bad_rows = outside.any(1).nonzero().flatten().tolist()
        raise SiteError(
            f"edit of {edit.site!r}: positions {_listed(pos)} fall on padding in rows "
            f"{bad_rows[:8]}, which have {sorted({int(lengths[r]) for r in bad_rows})} real "
            "tokens; positions count each row's real tokens (0 = first, -1 = last), so give "
            "positions every row has, positions='last', or edit those rows separately"
        )
    return (rows, first[:, None] + local)


def _edited(edit: Edit, target: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """The new value of the selected part ``target`` of a site's ``value``."""
    import torch

    if edit.op == "fn":
        new = edit.value(target)
        if not isinstance(new, torch.Tensor) or new.shape != target.shape:
            raise SiteError(
                f"edit of {edit.site!r}: the function must return a tensor of shape "
                f"{tuple(target.shape)}, got "
                f"{tuple(new.shape) if isinstance(new, torch.Tensor) else type(new)}"
            )
        return new
    operand = _operand(edit, target, value)
    if edit.op == "replace":
        return operand.expand_as(target)
    if edit.op == "add":
        return target + operand
    if edit.op == "scale":
        return target * operand
    raise SiteError(f"unknown edit op {edit.op!r}: use replace, add, scale or fn")


def _operand(edit: Edit, target: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    import torch

    operand = edit.value
    if isinstance(operand, (int, float)):
        if edit.op == "replace":
            return torch.full_like(target, float(operand))
        return torch.tensor(float(operand), dtype=target.dtype, device=target.device)
    operand = torch.as_tensor(operand).to(device=target.device, dtype=target.dtype)
    if operand.dim() == 0:  # a 0-d tensor is a number, as a float is
        return operand.expand_as(target) if edit.op == "replace" else operand
    vector = operand.dim() == 1 and operand.shape[0] == target.shape[-1]
    if operand.shape != target.shape and not vector:
        raise SiteError(
            f"edit of {edit.site!r}: value of shape {tuple(operand.shape)} does not fit the "
            f"selected part of the site, shape {tuple(target.shape)} (site shape "
            f"{tuple(value.shape)}); give exactly that shape or a vector of "
            f"{target.shape[-1]} to apply at every selected position"
        )
    return operand
