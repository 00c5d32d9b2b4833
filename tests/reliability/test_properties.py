"""Property-based tests of `Backend.run` per backend family (transformer, SSM, hybrid,
recurrent): generated site names, edits (op, positions, units, value shape and dtype) and
batches (padding side, ragged lengths). Each case either raises a typed archscope error where
the request is invalid, or gives a result equal to an independent reference: the model's own
logits per row, unpadded, and the edit applied by hand to the unedited site value. After every
case no hook was added and the model's mode and weights are unchanged."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch
from archs import arch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from reliability.support import batch

from archscope import Edit
from archscope.errors import ArchscopeError
from archscope.testing import unchanged

MAX_EXAMPLES = 30
#: Recurrent roles: an edit at step t changes every later step of the same site.
RECURRENT_ROLES = {"hidden", "cell"}


def _gru() -> Any:
    import archscope
    from archscope_recurrent.testing import tiny_recurrent_lm

    model = tiny_recurrent_lm("gru")
    return model, archscope.Backend.for_model(model)


def _family(name: str) -> tuple[Any, Any]:
    if name == "gru":
        if not hasattr(_family, "gru"):
            _family.gru = _gru()  # type: ignore[attr-defined]
        return _family.gru  # type: ignore[attr-defined,no-any-return]
    a = arch(name)
    return a.model, a.backend


@dataclass
class Case:
    lengths: list[int]
    side: str
    site: str
    op: str
    positions: Any
    units: list[int] | None
    value: str  # float | zero_d | vector | wrong_vector | identity
    dtype: torch.dtype


def cases(backend: Any) -> st.SearchStrategy[Case]:
    writable = [
        n for n, i in backend.sites().items() if i.writable and i.kind == "token" and n != "logits"
    ]
    sites = st.sampled_from([*writable, "layer_9.residual", "layer_0.nope"])
    positions = st.one_of(
        st.none(),
        st.integers(-8, 8),
        st.lists(st.integers(-8, 8), min_size=1, max_size=2),
        st.builds(slice, st.integers(-8, 8) | st.none(), st.integers(-8, 8) | st.none()),
        st.just("last"),
    )
    units = st.none() | st.lists(st.integers(-40, 40), min_size=1, max_size=3, unique=True)
    return st.builds(
        Case,
        lengths=st.lists(st.integers(1, 6), min_size=1, max_size=3),
        side=st.sampled_from(["right", "left"]),
        site=sites,
        op=st.sampled_from(["replace", "add", "scale"]),
        positions=positions,
        units=units,
        value=st.sampled_from(["float", "zero_d", "vector", "wrong_vector", "identity"]),
        dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.int64]),
    )


def _selected_positions(case: Case, mask: torch.Tensor) -> list[list[int]] | None:
    """Per row, the columns the edit selects; None when the selection is invalid. Positions
    count each row's real tokens (negative ones from its last), whatever the padding side."""
    seq = mask.shape[1]
    p = case.positions
    if p is None:
        return [list(range(seq))] * mask.shape[0]
    real = [torch.nonzero(row).flatten().tolist() for row in mask]
    if p == "last":
        return [[cols[-1]] for cols in real]
    if isinstance(p, slice):
        chosen = [cols[p] for cols in real]
        return chosen if any(chosen) else None
    given_ = [p] if isinstance(p, int) else p
    if any(not -len(cols) <= i < len(cols) for cols in real for i in given_):
        return None
    return [sorted({cols[i] for i in given_}) for cols in real]


def _operand(case: Case, n_units: int) -> Any:
    if case.value == "identity":
        return {"replace": None, "add": 0.0, "scale": 1.0}[case.op]
    if case.value == "float":
        return 0.5
    if case.value == "zero_d":
        return (
            torch.tensor(2, dtype=case.dtype)
            if case.dtype == torch.int64
            else torch.tensor(0.5, dtype=case.dtype)
        )
    size = n_units if case.value == "vector" else n_units + 1
    return torch.arange(size, dtype=case.dtype) - size // 2


def _expected_valid(case: Case, backend: Any, mask: torch.Tensor) -> bool:
    if case.site not in backend.sites():
        return False
    if backend.padding == "right" and bool((mask[:, :1] == 0).any()):
        return False  # left padding on a right-padding backend
    d = backend.site_info(case.site).dim
    if case.units is not None and any(not -d <= u < d for u in case.units):
        return False
    return case.value != "wrong_vector" and _selected_positions(case, mask) is not None


def _hand_edit(
    clean: torch.Tensor, case: Case, operand: Any, rows: list[list[int]]
) -> torch.Tensor:
    out = clean.clone()
    d = clean.shape[-1]
    units = list(range(d)) if case.units is None else sorted({u % d for u in case.units})
    value = torch.as_tensor(operand).to(clean.dtype)
    for r, positions in enumerate(rows):
        for t in positions:
            target = out[r, t, ..., units]  # units index the last axis, whatever the rank
            if case.op == "replace":
                out[r, t, ..., units] = value.expand_as(target)
            elif case.op == "add":
                out[r, t, ..., units] = target + value
            else:
                out[r, t, ..., units] = target * value
    return out


def _row_logits(model: Any, ids: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """The model's own logits for each row alone, without padding."""
    out = []
    with torch.no_grad():
        for row, m in zip(ids, mask, strict=True):
            result = model(row[m.bool()][None])
            out.append((result if isinstance(result, torch.Tensor) else result.logits)[0])
    return out


def check(name: str, case: Case) -> str:
    model, backend = _family(name)
    inputs = batch(case.lengths, case.side, seed=len(case.lengths))
    mask = inputs["attention_mask"]
    valid = _expected_valid(case, backend, mask)
    d = backend.site_info(case.site).dim if case.site in backend.sites() else 1
    n_units = d if case.units is None else len(case.units)
    operand = _operand(case, n_units)
    if operand is None:  # an identity replace: the site's own value
        edit = Edit.apply(case.site, lambda t: t.clone(), case.positions, case.units)
    else:
        edit = Edit(case.site, case.op, operand, case.positions, case.units)  # type: ignore[arg-type]
    with unchanged(model):
        try:
            result = backend.run(
                inputs, capture=[case.site, "logits"], edits=[edit], stop_early=False
            )
        except ArchscopeError as exc:
            assert not valid, f"valid request refused: {type(exc).__name__}: {exc}"
            outcome = "error"
        else:
            assert valid, "invalid request accepted"
            outcome = "result"
            clean = backend.run(inputs, capture=[case.site, "logits"], stop_early=False)
            for r, ref in enumerate(_row_logits(model, inputs["input_ids"], mask)):
                assert torch.allclose(clean.logits[r][mask[r].bool()], ref, atol=1e-4)
            rows = _selected_positions(case, mask)
            assert rows is not None
            if case.value == "identity":
                assert torch.equal(result.logits, clean.logits), "an identity edit changed logits"
                assert torch.equal(result[case.site], clean[case.site])
            else:
                expected = _hand_edit(clean[case.site], case, operand, rows)
                recurrent = backend.site_info(case.site).site.role in RECURRENT_ROLES
                for r, positions in enumerate(rows):
                    real = mask[r].bool()
                    if not positions:  # a slice that selects none of this row's tokens
                        assert torch.equal(result.logits[r][real], clean.logits[r][real])
                        continue
                    first = min(positions)
                    upto = first + 1 if recurrent else mask.shape[1]
                    got, want = result[case.site][r, :upto], expected[r, :upto]
                    keep = real[:upto]
                    assert torch.allclose(got[keep], want[keep], atol=1e-5), "edited site differs"
                    keep_logits = real.clone()
                    keep_logits[first:] = False
                    assert torch.allclose(
                        result.logits[r][keep_logits], clean.logits[r][keep_logits], atol=1e-5
                    ), "logits before the first edited position changed"
    return outcome


COUNTS: dict[str, dict[str, int]] = {}


@pytest.mark.parametrize("name", ["gpt2", "mamba", "hybrid", "lstm", "gru"])
def test_run_is_a_typed_error_or_the_reference(name: str) -> None:
    _, backend = _family(name)
    counts = COUNTS.setdefault(name, {"error": 0, "result": 0})

    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: keeps failures fast
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(cases(backend))
    def prop(case: Case) -> None:
        counts[check(name, case)] += 1

    prop()
    assert counts["result"] > 0 and counts["error"] > 0
