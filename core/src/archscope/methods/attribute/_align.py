"""Pairs clean and corrupted batches position by position, counting real tokens only.

Every patching method asks the same question: which position of the corrupted run receives
which position of the clean run? Positions are counted among each row's real tokens (padding
never counts, whichever side it is on), so the answer is a pair of absolute-index tables.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ...errors import InputError, SiteError

if TYPE_CHECKING:
    import torch

#: ``"all"`` (every real token), ``"last"`` (each row's last real token), or real-token
#: indices (``0`` = first real token, ``-1`` = last), the same in every row.
PositionSpec = str | int | Sequence[int]


def real_index(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(absolute index of each row's k-th real token, -1 past the row's end; real counts)."""
    import torch

    seq = mask.shape[1]
    positions = torch.arange(seq, device=mask.device).expand_as(mask)
    # Real tokens sort before pads (key seq + p), keeping their order.
    key = torch.where(mask.bool(), positions, positions + seq)
    counts = mask.long().sum(1)
    width = int(counts.max())
    ordered = key.sort(dim=1).values[:, :width]
    return torch.where(ordered < seq, ordered, torch.full_like(ordered, -1)), counts


@dataclass
class Columns:
    """The positions a patch or sweep addresses: one column per label. ``corrupted`` and
    ``clean`` hold (rows, columns) absolute indices; -1 where a row has no such position."""

    labels: list[int | str]
    corrupted: torch.Tensor
    clean: torch.Tensor

    @property
    def valid(self) -> torch.Tensor:
        return self.corrupted >= 0

    def __len__(self) -> int:
        return len(self.labels)


def parse_positions(spec: Any) -> PositionSpec:
    """Normalise a position spec (also from text: ``"all"``, ``"last"``, ``"0,3,-1"``)."""
    from ...errors import ParameterError

    if isinstance(spec, str):
        text = spec.strip()
        if text in ("all", "last"):
            return text
        try:
            return [int(p) for p in text.split(",") if p.strip()]
        except ValueError:
            raise ParameterError(
                f"positions {spec!r}: use 'all', 'last' or real-token indices "
                "such as '0,3,-1' (counted among real tokens; -1 = last)"
            ) from None
    if hasattr(spec, "tolist"):
        spec = spec.tolist()
    if isinstance(spec, bool) or spec is None:
        raise ParameterError(f"positions {spec!r}: use 'all', 'last' or a list of ints")
    if isinstance(spec, int):
        return [spec]
    if isinstance(spec, Sequence) and all(
        isinstance(p, int) and not isinstance(p, bool) for p in spec
    ):
        return [int(p) for p in spec]
    raise ParameterError(f"positions {spec!r}: use 'all', 'last' or a list of ints")


def columns(spec: Any, clean_mask: torch.Tensor, corrupted_mask: torch.Tensor) -> Columns:
    """Resolve ``spec`` against both batches; raise `InputError` when they cannot align."""
    import torch

    spec = parse_positions(spec)
    if clean_mask.shape[0] != corrupted_mask.shape[0]:
        raise InputError(
            f"clean and corrupted inputs must pair up row by row: got "
            f"{clean_mask.shape[0]} clean and {corrupted_mask.shape[0]} corrupted "
            "rows; give the same number of each"
        )
    clean_idx, clean_n = real_index(clean_mask)
    corr_idx, corr_n = real_index(corrupted_mask)
    rows = torch.arange(len(clean_n), device=clean_n.device)
    if spec == "last":
        return Columns(
            ["last"], corr_idx[rows, corr_n - 1][:, None], clean_idx[rows, clean_n - 1][:, None]
        )
    if spec == "all":
        differ = (clean_n != corr_n).nonzero().flatten().tolist()
        if differ:
            r = differ[0]
            raise InputError(
                f"cannot patch all positions: row {r} has {int(clean_n[r])} real tokens in the "
                f"clean input but {int(corr_n[r])} in the corrupted one (rows differing: "
                f"{differ[:8]}); give inputs of equal real length per row, or patch "
                "positions='last' or a list of real-token indices that exist in both"
            )
        width = clean_idx.shape[1]
        return Columns(list(range(width)), corr_idx, clean_idx)
    assert isinstance(spec, list)
    if not spec:
        raise InputError("positions is an empty list: give at least one real-token index")
    corr_cols, clean_cols = [], []
    for p in spec:
        for name, n in (("clean", clean_n), ("corrupted", corr_n)):
            bad = ((p >= n) | (p < -n)).nonzero().flatten().tolist()
            if bad:
                raise InputError(
                    f"position {p} (counted among real tokens) does not exist in {name} row "
                    f"{bad[0]}, which has {int(n[bad[0]])} real tokens; valid positions there "
                    f"are {-int(n[bad[0]])}..{int(n[bad[0]]) - 1}"
                )
        corr_cols.append(corr_idx[rows, p % corr_n])
        clean_cols.append(clean_idx[rows, p % clean_n])
    return Columns(list(spec), torch.stack(corr_cols, 1), torch.stack(clean_cols, 1))


def aligned_source(clean_value: torch.Tensor, cols: Columns, corrupted_len: int) -> torch.Tensor:
    """The clean activations laid out on the corrupted run's positions (zeros elsewhere):
    (rows, corrupted_len, ...) with ``out[n, cols.corrupted[n, c]] = clean[n, cols.clean[n, c]]``."""

    out = clean_value.new_zeros((clean_value.shape[0], corrupted_len, *clean_value.shape[2:]))
    rows, col = cols.valid.nonzero(as_tuple=True)
    out[rows, cols.corrupted[rows, col]] = clean_value[rows, cols.clean[rows, col]]
    return out


def check_token_site(backend: Any, site: str) -> None:
    """Patching reads and writes token sites; a state site holds one value per sequence."""
    info = backend.site_info(site)
    if info.kind == "token" and tuple(info.shape[:2]) != ("batch", "seq"):
        raise SiteError(
            f"{info.name!r} has axes {info.shape}; patching needs a token site "
            "laid out (batch, seq, ...)"
        )
    if info.kind != "token":
        raise SiteError(
            f"{info.name!r} is a {info.kind} site (one value per sequence, after the last real "
            "token), so it cannot be patched position by position; patch its per-step site "
            "instead, or swap states with archscope.methods.attribute.state_patch_sweep"
        )


def replicate(batch: dict[str, Any], times: int) -> dict[str, Any]:
    """The batch with every row repeated ``times`` times, block after block."""
    import torch

    return {
        k: v.repeat(times, *([1] * (v.dim() - 1))) if isinstance(v, torch.Tensor) else v
        for k, v in batch.items()
    }
