"""Batches: turning inputs into a validated token batch, which side it is padded on, where
each row's last real token is, pooling over real tokens, and regrouping rows by length."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

from .errors import InputError
from .guards import int_range

if TYPE_CHECKING:
    import torch

__all__ = [
    "Pool",
    "TextInputError",
    "broadcast_rows",
    "last_real_index",
    "length_groups",
    "padding_side",
    "pool",
    "prepare_inputs",
    "prepared",
    "real_tokens",
    "scatter_rows",
]

Pool = Literal["mean", "last"]


class TextInputError(InputError, TypeError):
    """Text given where token ids are needed."""


def prepare_inputs(
    inputs: Any, device: Any = None, side: Literal["left", "right"] = "right"
) -> dict[str, Any]:
    """Token ids (tensor, list of lists, a mapping with ``input_ids`` and optionally
    ``attention_mask``, or an `archscope.data.Dataset`, whose items are padded on ``side``) →
    a batch dict of 2-D tensors on ``device``."""
    return prepared(inputs, device, side)[0]


def prepared(
    inputs: Any, device: Any = None, side: Literal["left", "right"] = "right"
) -> tuple[dict[str, Any], bool | None]:
    """`prepare_inputs`, and whether the checks already saw that every token is real (True:
    the batch has no padding; None: not known without another reduction, see
    `padding_side`)."""
    import torch

    if type(inputs) is dict:  # the common case first: a plain dict
        batch = _from_mapping(inputs)
    else:
        batch = _as_batch(inputs, side)
    for key in ("input_ids", "attention_mask"):
        if key in batch and not isinstance(batch[key], torch.Tensor):
            try:
                batch[key] = torch.tensor(batch[key], dtype=torch.long)
            except (ValueError, TypeError) as exc:
                raise InputError(
                    f"could not make a tensor of {key}: {exc}. Sequences of different lengths "
                    "must be padded (make_tokenize_fn pads) and come with an attention_mask"
                ) from None
    full = None
    if batch.get("input_ids") is not None:
        batch["input_ids"], batch["attention_mask"], full = _checked_ids(
            batch["input_ids"], batch.get("attention_mask")
        )
    if device is not None:
        for key, value in batch.items():
            if isinstance(value, torch.Tensor) and value.device != device:
                batch[key] = value.to(device)
    return batch, full


def _as_batch(inputs: Any, side: Literal["left", "right"] = "right") -> dict[str, Any]:
    from .data import Dataset, pad_batch

    if isinstance(inputs, Dataset):  # every item, padded into one batch
        pad_id = int(getattr(inputs.tokenizer, "pad_token_id", None) or 0)
        return dict(pad_batch(inputs.ids(), side, pad_id))
    if isinstance(inputs, str) or (
        isinstance(inputs, (list, tuple)) and inputs and isinstance(inputs[0], str)
    ):
        raise TextInputError(
            "run/extract take token ids, not text: tokenize first, e.g. "
            "archscope.make_tokenize_fn(tokenizer)(texts), or pass {'input_ids': ..., "
            "'attention_mask': ...}"
        )
    if not isinstance(inputs, Mapping):
        return {"input_ids": inputs}
    return _from_mapping(inputs)


def _from_mapping(inputs: Mapping[str, Any]) -> dict[str, Any]:
    batch = {k: v for k, v in inputs.items() if v is not None}
    if "input_ids" not in batch and "inputs_embeds" not in batch:
        raise InputError(
            f"input mapping needs 'input_ids' (and optionally 'attention_mask'); got keys "
            f"{sorted(inputs)}"
        )
    return batch


def _refuse_meta(ids: torch.Tensor, mask: torch.Tensor | None) -> None:
    """Ids or a mask on the meta device hold shapes, no values: nothing to run."""
    for name, tensor in (("input_ids", ids), ("attention_mask", mask)):
        if tensor is not None and tensor.is_meta:
            raise InputError(
                f"{name} is on the meta device (a shape without values), so there are no token "
                f"ids to run; give a tensor that holds the ids (e.g. torch.tensor(ids)) on the "
                "model's device"
            )


def _mask_values(mask: torch.Tensor) -> bool | None:
    """Refuse a non-boolean mask holding anything but 0 and 1 (a soft mask, or -1, would be
    taken as a real token silently). Returns whether every token is real when the check
    already tells (integer masks: one min/max reduction), else None."""
    odd = None
    full = None
    if mask.dtype.is_floating_point or mask.dtype.is_complex or mask.numel() == 0:
        odd = mask[(mask != 0) & (mask != 1)]
    else:
        low, high = int_range(mask)
        if low < 0 or high > 1:
            odd = mask[(mask != 0) & (mask != 1)]
        full = low == 1
    if odd is not None and odd.numel():
        raise InputError(
            f"attention_mask must hold 0 and 1 (1 = real token, 0 = padding), got values "
            f"such as {float(odd[0]):g} (dtype {mask.dtype}); archscope runs take a hard "
            "0/1 mask: threshold or round a soft one, and mark padding with 0"
        )
    return full


def _checked_ids(
    ids: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, bool | None]:
    """The ids and mask, checked, as (batch, seq) tensors (the mask as int64), and whether
    every token is real (None = not known without another reduction)."""
    import torch

    if ids.dtype.is_floating_point:
        raise InputError(f"input_ids must be integer token ids, got dtype {ids.dtype}")
    _refuse_meta(ids, mask)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2:
        raise InputError(f"input_ids must be (batch, seq) or (seq,), got shape {tuple(ids.shape)}")
    if ids.shape[1] == 0:
        raise InputError("input_ids is empty: give at least one token")
    if mask is None:  # every token is real: nothing to check
        return ids, torch.ones_like(ids), True
    if mask.dim() == 1:
        mask = mask.unsqueeze(0)
    full = None if mask.dtype == torch.bool else _mask_values(mask)
    if mask.shape != ids.shape:
        raise InputError(
            f"attention_mask shape {tuple(mask.shape)} does not match input_ids "
            f"shape {tuple(ids.shape)}"
        )
    if full is None:
        full = bool(mask.all())  # the cheap common case
    if not full and bool((mask.sum(-1) == 0).any()):
        raise InputError("a row of attention_mask has no real token")
    return ids, mask if mask.dtype == torch.long else mask.long(), full


def padding_side(mask: torch.Tensor) -> Literal["none", "left", "right", "mixed"]:
    """Which side a (batch, seq) attention mask pads on."""
    if bool(mask.all()):
        return "none"
    if bool((mask[:, 1:] <= mask[:, :-1]).all()):
        return "right"
    if bool((mask[:, 1:] >= mask[:, :-1]).all()):
        return "left"
    return "mixed"


def last_real_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token, for left or right padding."""
    import torch

    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, torch.full_like(positions, -1)).max(dim=1).values


def pool(acts: torch.Tensor, mask: torch.Tensor | None, how: Pool = "mean") -> torch.Tensor:
    """Mean over real tokens, or the last real token, of a token site; padding never counts.

    A (batch, features) tensor (a state site, one value per sequence) passes through.
    """
    import torch

    if acts.dim() == 2:
        return acts
    if mask is None:
        mask = torch.ones(acts.shape[:2], dtype=torch.long, device=acts.device)
    if mask.shape != acts.shape[:2]:
        raise InputError(
            f"attention mask {tuple(mask.shape)} does not match activations {tuple(acts.shape[:2])}"
        )
    if how == "mean":
        weights = mask.to(acts.dtype).unsqueeze(-1)
        return (acts * weights).sum(1) / weights.sum(1).clamp_min(1.0)
    if how == "last":
        rows = torch.arange(acts.shape[0], device=acts.device)
        return acts[rows, last_real_index(mask)]
    raise InputError(f"unknown pooling {how!r}: use 'mean' or 'last'")


def real_tokens(acts: torch.Tensor, mask: torch.Tensor | None, seq_axis: int = 1) -> torch.Tensor:
    """All real-token values of a token site, stacked: (n_real_tokens, d) for a (batch, seq,
    d) site. ``seq_axis`` is where the site keeps positions (2 for an attention pattern
    (batch, heads, seq, key)); the other axes of each token are flattened into one vector."""
    if acts.dim() < 2 or not 0 < seq_axis < acts.dim():
        raise InputError(
            f"real_tokens takes (batch, seq, ...) activations with the positions on axis "
            f"{seq_axis}; got shape {tuple(acts.shape)}"
        )
    acts = acts.movedim(seq_axis, 1)
    if mask is not None and tuple(mask.shape) != tuple(acts.shape[:2]):
        raise InputError(
            f"attention mask {tuple(mask.shape)} does not match the (batch, seq) axes "
            f"{tuple(acts.shape[:2])} of the activations (positions on axis {seq_axis})"
        )
    tokens = acts.reshape(-1, *acts.shape[2:]) if mask is None else acts[mask.bool()]
    return tokens.reshape(tokens.shape[0], -1) if tokens.dim() > 2 else tokens


def length_groups(mask: torch.Tensor) -> list[tuple[torch.Tensor, int]]:
    """The rows of a right-padded (batch, seq) mask grouped by their number of real tokens:
    ``[(row indices, length), ...]`` in increasing length. Running ``ids[rows, :length]`` of each
    group gives, for every row, the values after its own last real token."""
    import torch

    lengths = mask.sum(-1)
    return [(torch.nonzero(lengths == n).flatten(), int(n)) for n in torch.unique(lengths).tolist()]


def scatter_rows(parts: list[tuple[torch.Tensor, torch.Tensor]], n_rows: int) -> torch.Tensor:
    """Reassemble per-group tensors ``[(row indices, value), ...]`` (each value's first axis is
    its group's rows) into one tensor of ``n_rows`` rows in the original order."""
    import torch

    first = parts[0][1]
    out = torch.zeros((n_rows, *first.shape[1:]), dtype=first.dtype, device=first.device)
    for rows, value in parts:
        out[rows.to(value.device)] = value
    return out


def broadcast_rows(
    batches: Mapping[str, Mapping[str, Any]], call: str
) -> dict[str, dict[str, Any]]:
    """Prepared batches (name → batch) that must have one row count: batches of one row are
    repeated to the others' count; any other difference is refused, naming every count. A
    batch-shaped result of ``call`` then has one row per row of the largest batch."""
    rows = {name: int(next(iter(b.values())).shape[0]) for name, b in batches.items()}
    counts = set(rows.values())
    n = max(counts)
    if counts - {1, n}:
        given = ", ".join(f"{name} {count}" for name, count in rows.items())
        raise InputError(
            f"{call}: the inputs have different numbers of rows ({given}); give each the same "
            f"number of rows, or one row to use with every row of the others"
        )
    return {
        name: {
            k: v.repeat(n, *([1] * (v.dim() - 1))) if rows[name] == 1 and n > 1 else v
            for k, v in b.items()
        }
        for name, b in batches.items()
    }
