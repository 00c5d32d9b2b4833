"""State patching: swap one layer's recurrent state after a prefix, continue, measure the gap.

For backends with the ``state_patch`` capability (SSM/conv states, RNN hidden/cell states,
block states). Each input pair is split into a prefix and a shared suffix (the corrupted
input's last ``suffix_tokens`` real tokens, or everything after real token ``after``); the
corrupted prefix's state, with chosen sites replaced by the clean prefix's, starts the suffix
run. All swaps run as one batched suffix run.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ...errors import InputError
from ._align import real_index
from ._engine import backend_of
from ._metric import LogitDiff, MetricFn, as_metric, gap_fraction, mean_value, metric_name
from ._patch import _layers
from ._results import StatePatchResult

if TYPE_CHECKING:
    import torch

    from ...backends import Backend


def _rows(batch: dict[str, Any]) -> list[list[int]]:
    """Each row's real token ids, in order."""
    index, counts = real_index(batch["attention_mask"])
    ids = batch["input_ids"]
    return [ids[r, index[r, : int(counts[r])]].tolist() for r in range(ids.shape[0])]


def _pad(rows: list[list[int]], device: Any) -> dict[str, torch.Tensor]:
    """Right-padded batch (every backend with state_patch continues right-padded rows)."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def _suffix_logits(backend: Backend, rows: list[list[int]], k: int) -> torch.Tensor:
    """Logits at each row's last ``k`` real positions, (rows, k, vocab)."""
    import torch

    batch = _pad(rows, backend.device)
    run = backend.run(batch, capture=["logits"])
    logits = run["logits"]
    n = batch["attention_mask"].sum(1)
    cols = n[:, None] - k + torch.arange(k, device=n.device)[None]
    return logits.gather(1, cols[..., None].expand(-1, -1, logits.shape[-1]))


def state_patch_sweep(
    model: Any,
    clean: Any,
    corrupted: Any,
    *,
    suffix_tokens: int | None = None,
    after: int | None = None,
    layers: Sequence[int] | None = None,
    metric_fn: MetricFn | None = None,
    batch_size: int = 64,
    backend_hint: str | None = None,
) -> StatePatchResult:
    """Gap restored by swapping each layer's state of each kind (``ssm_state``, ``conv_state``,
    ``hidden_state``, ``cell_state``, ``state``, ... as the backend names its state sites)
    from the clean prefix into the corrupted prefix, continuing on the corrupted input's last
    ``suffix_tokens`` real tokens (default 1).

    ``after``: an absolute real-token position instead: the states are swapped after real
    token ``after`` (0 = the first) of both inputs, and the run continues on the corrupted
    input's tokens from ``after + 1`` on; every corrupted row needs the same number of tokens
    after it. Give ``suffix_tokens`` or ``after``, not both.

    The reference metrics come from plain runs: clean = the clean prefix followed by the
    suffix, corrupted = the corrupted input. ``metric_fn(logits, mask)`` sees the suffix's
    logits; None = `LogitDiff` at the last token.
    """
    import torch

    backend = backend_of(model, backend_hint)
    backend.require("state_patch")
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    clean_rows = _rows(backend.prepare_inputs(clean))
    corr_rows = _rows(backend.prepare_inputs(corrupted))
    if len(clean_rows) != len(corr_rows):
        raise InputError(
            f"clean and corrupted inputs must pair up row by row: got "
            f"{len(clean_rows)} clean and {len(corr_rows)} corrupted rows"
        )
    k, clean_cut, corr_cut = _split_points(clean_rows, corr_rows, suffix_tokens, after)
    suffix = [r[c:] for r, c in zip(corr_rows, corr_cut, strict=True)]
    clean_prefix = [r[:c] for r, c in zip(clean_rows, clean_cut, strict=True)]
    corr_prefix = [r[:c] for r, c in zip(corr_rows, corr_cut, strict=True)]
    n = len(suffix)
    ones = torch.ones(n, k, dtype=torch.long, device=backend.device)
    clean_logits = _suffix_logits(
        backend, [p + s for p, s in zip(clean_prefix, suffix, strict=True)], k
    )
    corr_logits = _suffix_logits(backend, corr_rows, k)
    metric = (
        LogitDiff.between(clean_logits, ones, corr_logits, ones)
        if metric_fn is None
        else as_metric(metric_fn)
    )
    clean_metric = float(mean_value(metric(clean_logits, ones)))
    corr_metric = float(mean_value(metric(corr_logits, ones)))

    state_of = {}
    for name, prefix in (("clean", clean_prefix), ("corrupted", corr_prefix)):
        run = backend.run(_pad(prefix, backend.device), return_state=True, stop_early=False)
        assert run.state is not None
        state_of[name] = run.state
    chosen = _layers(backend, layers)
    table = backend.sites()
    state_sites = [s for s in state_of["corrupted"] if table[s].kind == "state"]
    kinds = list(dict.fromkeys(table[s].site.role for s in state_sites))
    by_cell = {(table[s].site.layer, table[s].site.role): s for s in state_sites}
    specs: list[list[str]] = []
    for i in chosen:
        specs += [[by_cell[(i, kind)]] for kind in kinds if (i, kind) in by_cell]
    specs += [[s for s in state_sites if table[s].site.layer == i] for i in chosen]
    specs.append(state_sites)

    values: list[float] = []
    per_forward = max(1, batch_size // n)
    suffix_batch = _pad(suffix, backend.device)
    for start in range(0, len(specs), per_forward):
        chunk = specs[start : start + per_forward]
        state = {}
        for name, value in state_of["corrupted"].items():
            blocks = [state_of["clean"][name] if name in spec else value for spec in chunk]
            state[name] = torch.cat(blocks, 0)
        reps = len(chunk)
        run = backend.run(
            {key: v.repeat(reps, 1) for key, v in suffix_batch.items()},
            capture=["logits"],
            initial_state=state,
            stop_early=False,
        )
        logits = run["logits"]
        values += [
            float(mean_value(metric(logits[j * n : (j + 1) * n], ones))) for j in range(reps)
        ]

    def frac(v: float) -> float:
        return gap_fraction(v, corr_metric, clean_metric)

    gap_fraction(clean_metric, corr_metric, clean_metric, "state_patch_sweep")
    it = iter(values)
    matrix = [[frac(next(it)) if (i, kind) in by_cell else None for kind in kinds] for i in chosen]
    per_layer = [frac(next(it)) for _ in chosen]
    all_states = next(it)
    return StatePatchResult(
        backend=backend.name,
        metric=metric_name(metric_fn if metric_fn is not None else metric),
        layers=chosen,
        kinds=kinds,
        gap_restored=matrix,
        per_layer=per_layer,
        all_states=frac(all_states),
        all_states_metric=all_states,
        clean_metric=clean_metric,
        corrupted_metric=corr_metric,
        suffix_tokens=k,
        after=after,
    )


def _split_points(
    clean_rows: list[list[int]],
    corr_rows: list[list[int]],
    suffix_tokens: int | None,
    after: int | None,
) -> tuple[int, list[int], list[int]]:
    """(suffix length, clean prefix lengths, corrupted prefix lengths) per row."""
    if suffix_tokens is not None and after is not None:
        raise InputError(
            f"give suffix_tokens ({suffix_tokens}, counted from the end) or after ({after}, an "
            "absolute real-token position), not both"
        )
    if after is None:
        k = 1 if suffix_tokens is None else suffix_tokens
        if k < 1:
            raise InputError(f"suffix_tokens must be >= 1, got {k}")
        short = [
            i
            for i, (a, b) in enumerate(zip(clean_rows, corr_rows, strict=True))
            if len(a) <= k or len(b) <= k
        ]
        if short:
            raise InputError(
                f"rows {short[:8]} have at most suffix_tokens={k} real tokens: every "
                "row needs a prefix of at least one token before the suffix"
            )
        return k, [len(r) - k for r in clean_rows], [len(r) - k for r in corr_rows]
    if after < 0:
        raise InputError(
            f"after={after}: give a real-token position >= 0 (0 = the first token); to count "
            "from the end use suffix_tokens"
        )
    short = [
        i
        for i, (a, b) in enumerate(zip(clean_rows, corr_rows, strict=True))
        if len(a) <= after or len(b) <= after + 1
    ]
    if short:
        raise InputError(
            f"rows {short[:8]} end at or before real token after={after}: every clean row needs "
            f"more than {after} real tokens and every corrupted row at least one token after it"
        )
    lengths = sorted({len(r) - after - 1 for r in corr_rows})
    if len(lengths) > 1:
        raise InputError(
            f"after={after} leaves suffixes of {lengths} tokens in different corrupted rows; "
            "the continuation is one batch of equal suffixes: give rows of equal length, or "
            "suffix_tokens"
        )
    cut = [after + 1] * len(corr_rows)
    return lengths[0], cut, list(cut)
