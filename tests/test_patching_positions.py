"""Patching parameters that say where to patch without counting: `activation_patch` on sites
alone (no layer list), and state patching after an absolute real-token position, each checked
against plain runs with `Edit.replace` / `initial_state`."""

from __future__ import annotations

import pytest
import torch
from archs import arch

from archscope import Edit
from archscope.data import pad_batch
from archscope.errors import InputError
from archscope.methods.attribute import activation_patch, state_patch_sweep

TOL = 1e-5


def _pair(n: int, seed: int) -> tuple[list[int], list[int]]:
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(4, 100, (n,), generator=g).tolist()
    corrupted = list(clean)
    corrupted[1] = 4 + (clean[1] + 17) % 96
    return clean, corrupted


def _logprob7(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return logits[:, -1].log_softmax(-1)[:, 7] - logits[:, -1].log_softmax(-1)[:, 11]


def test_embed_patch_needs_no_layer_indices() -> None:
    a = arch("gpt2")
    clean, corrupted = _pair(6, seed=1)
    result = activation_patch(
        a.backend,
        torch.tensor([clean]),
        torch.tensor([corrupted]),
        sites=["embed"],
        metric_fn=_logprob7,
    )
    assert result.sites == ["embed"]
    # by hand: the clean embedding output replaces the corrupted one everywhere
    source = a.backend.run(torch.tensor([clean]), capture=["embed"])["embed"]
    patched = a.backend.run(
        torch.tensor([corrupted]), capture=["logits"], edits=[Edit.replace("embed", source)]
    )["logits"][0, -1]
    plain = a.backend.run(torch.tensor([clean]), capture=["logits"])["logits"][0, -1]
    # the embedding is all that differs, so the patched run is the clean run
    torch.testing.assert_close(patched, plain, atol=TOL, rtol=0)
    assert result.gap_restored == pytest.approx(1.0, abs=1e-4)
    assert result.patched_metric == pytest.approx(
        float(_logprob7(plain[None, None], None)),  # type: ignore[arg-type]
        abs=TOL,
    )
    # layers default to every layer when neither layers nor sites are given
    every = activation_patch(
        a.backend, torch.tensor([clean]), torch.tensor([corrupted]), metric_fn=_logprob7
    )
    assert every.layer_range == (0, a.backend.n_layers - 1)
    with pytest.raises(InputError, match="either layer_indices .* or sites"):
        activation_patch(
            a.backend, torch.tensor([clean]), torch.tensor([corrupted]), [0], None, sites=["embed"]
        )


@pytest.mark.parametrize("name", ["lstm", "mamba"])
def test_state_patch_after_an_absolute_position(name: str) -> None:
    a = arch(name)
    backend = a.backend
    pairs = [_pair(7, seed=s) for s in (3, 4)]
    c_rows, r_rows = [p[0] for p in pairs], [p[1] for p in pairs]
    after = 2  # swap the state after real token 2: prefix = tokens 0..2, suffix = 3..6
    result = state_patch_sweep(
        backend, pad_batch(c_rows), pad_batch(r_rows), after=after, metric_fn=_logprob7
    )
    assert result.after == after and result.suffix_tokens == 7 - after - 1
    assert "after real token 2" in result.to_markdown()
    # the same split counted from the end gives the same numbers
    from_end = state_patch_sweep(
        backend, pad_batch(c_rows), pad_batch(r_rows), suffix_tokens=4, metric_fn=_logprob7
    )
    assert result.gap_restored == from_end.gap_restored
    # every state swapped: the run of the clean prefix followed by the corrupted suffix
    values = []
    for c, r in zip(c_rows, r_rows, strict=True):
        source = backend.run(torch.tensor([c[: after + 1]]), return_state=True, stop_early=False)
        run = backend.run(
            torch.tensor([r[after + 1 :]]), capture=["logits"], initial_state=source.state
        )
        values.append(float(_logprob7(run["logits"], None)))  # type: ignore[arg-type]
    assert result.all_states_metric == pytest.approx(sum(values) / len(values), abs=TOL)


def test_state_patch_position_errors() -> None:
    a = arch("lstm")
    c, r = _pair(6, seed=5)
    clean, corrupted = torch.tensor([c]), torch.tensor([r])
    with pytest.raises(InputError, match="not both"):
        state_patch_sweep(a.backend, clean, corrupted, suffix_tokens=2, after=1)
    with pytest.raises(InputError, match="after=-1"):
        state_patch_sweep(a.backend, clean, corrupted, after=-1)
    with pytest.raises(InputError, match="at least one token after it"):
        state_patch_sweep(a.backend, clean, corrupted, after=5)
    c2, r2 = _pair(8, seed=6)
    with pytest.raises(InputError, match="different corrupted rows"):
        state_patch_sweep(a.backend, pad_batch([c, c2]), pad_batch([r, r2]), after=2)
