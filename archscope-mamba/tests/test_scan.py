"""The own selective scan of HF Mamba-1 mixers (`archscope_mamba.scan`): transformers' PyTorch
path's values bit for bit, the kept states / writes / decays equal to a float64 unroll written
here, used by runs only where its conditions hold, and nothing left patched afterwards."""

from __future__ import annotations

import functools
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from archscope import Backend
from archscope.compat import transformers_release
from archscope.testing import padded_batch
from archscope_mamba import scan
from archscope_mamba.backend import MambaBackend
from archscope_mamba.testing import make_model, random_ids

warnings.filterwarnings("ignore", message=".*falling back to its reference PyTorch.*")
mm = pytest.importorskip("transformers.models.mamba.modeling_mamba")


def _current() -> bool:
    return transformers_release() >= scan.FIRST_RELEASE


#: The own scan replaces the CPU scan of the transformers release it was written against and
#: later ones; on older releases (the packages' floor) it stands aside, as the last test checks.
needs_current = pytest.mark.skipif(
    not _current(), reason="the own scan runs from transformers 5.25 on (older: it stands aside)"
)
ROLES = ("state_write", "write_value", "write_key", "write_decay", "ssm_states")


@functools.cache
def _model() -> Any:
    return make_model("mamba")


def _backend(own: bool = True) -> MambaBackend:
    backend = Backend.for_model(_model())
    assert isinstance(backend, MambaBackend)
    backend.use_own_scan = own
    return backend


def _inputs(batch: int, channels: int, seq: int, n: int, seed: int = 0) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    return {
        "x": r(batch, channels, seq),
        "time_step": r(batch, channels, seq),
        "A": -torch.rand(channels, n, generator=gen) * 4 - 0.1,
        "B": r(batch, seq, n),
        "C": r(batch, seq, n),
        "D": r(channels),
        "gate": r(batch, channels, seq),
        "dt_bias": r(channels),
    }


def _transformers(i: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        out, last = mm.mamba_selective_scan(
            i["x"],
            i["time_step"],
            i["A"],
            i["B"].transpose(1, 2),
            i["C"].transpose(1, 2),
            D=i["D"],
            z=i["gate"],
            delta_bias=i["dt_bias"],
            delta_softplus=True,
            return_last_state=True,
        )
    return out, last


def _unroll64(i: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The recurrence token by token in float64, from the definitions."""
    x, ts, A = i["x"].double(), i["time_step"].double(), i["A"].double()
    B, C = i["B"].double(), i["C"].double()
    dt = F.softplus(ts + i["dt_bias"].double()[:, None])  # (b, d, t)
    state = torch.zeros(x.shape[0], x.shape[1], A.shape[1], dtype=torch.float64)
    states, writes, decays, ys = [], [], [], []
    for t in range(x.shape[2]):
        decay = torch.exp(dt[:, :, t, None] * A)
        write = (dt[:, :, t] * x[:, :, t])[:, :, None] * B[:, t, None, :]
        state = decay * state + write
        y = (state * C[:, t, None, :]).sum(-1) + i["D"].double() * x[:, :, t]
        states.append(state), writes.append(write), decays.append(decay), ys.append(y)
    y = torch.stack(ys, -1) * F.silu(i["gate"].double())
    return {
        "out": y,
        "states": torch.stack(states, 1),
        "writes": torch.stack(writes, 1),
        "decays": torch.stack(decays, 1),
    }


@needs_current
@pytest.mark.parametrize(
    ("batch", "seq", "chunk"),
    [(2, 37, 16), (1, 17, 16), (3, 5, 16), (2, 1, 16), (4, 20, 1), (1, 33, 7)],
)
def test_the_scan_is_transformers_path_bit_for_bit_and_keeps_the_unrolled_values(
    batch: int, seq: int, chunk: int
) -> None:
    i = _inputs(batch, 24, seq, 8, seed=seq)
    ref_out, ref_last = _transformers(i)
    keep = frozenset({"states", "writes", "decays"})
    for kept in (frozenset(), keep):
        with torch.no_grad():
            out, record = scan.selective_scan(**i, keep=kept, chunk=chunk)
        assert torch.equal(out, ref_out)
        assert torch.equal(record.last, ref_last)
    unrolled = _unroll64(i)
    assert (out.double() - unrolled["out"]).abs().max() < 1e-4
    for name in ("states", "writes", "decays"):
        kept_value = getattr(record, name)
        assert kept_value.shape == (batch, seq, 24, 8)
        assert (kept_value.double() - unrolled[name]).abs().max() < 1e-5, name
    assert torch.equal(record.states[:, -1], ref_last)


def test_the_scan_says_what_it_can_keep() -> None:
    i = _inputs(1, 4, 3, 2)
    with pytest.raises(ValueError, match=r"keep takes \['decays', 'states', 'writes'\], got"):
        scan.selective_scan(**i, keep={"state"})
    with pytest.raises(ValueError, match=r"chunk is a number of tokens ≥ 1, got 0"):
        scan.selective_scan(**i, chunk=0)


def _count_scans(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = scan.selective_scan

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(scan, "selective_scan", counted)
    return calls


@needs_current
def test_a_run_with_the_own_scan_equals_the_model_bit_for_bit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = _model()
    ids = random_ids(3, 21)
    with torch.no_grad():
        ref = model(ids, output_hidden_states=True, use_cache=True)
    original = mm.mamba_scan_forward
    calls = _count_scans(monkeypatch)
    backend = _backend()
    n = len(backend.layers)
    sites = [f"layer_{i}.{r}" for i in range(n) for r in ("residual", "ssm_state")]
    result = backend.run(ids, capture=[*sites, "logits"])
    assert len(calls) == n  # every layer ran the own scan
    assert torch.equal(result["logits"], ref.logits)
    for i in range(n):
        # (transformers' hidden states: each block's output, then the final norm's)
        assert torch.equal(result[f"layer_{i}.residual"], ref.hidden_states[i])
        assert torch.equal(result[f"layer_{i}.ssm_state"], ref.cache.get_recurrent_state(i))
    assert mm.mamba_scan_forward is original  # transformers' own function again
    assert not scan._active and not scan._installed


@needs_current
@pytest.mark.parametrize("side", [None, "left", "right"])
def test_write_sites_from_the_own_scan_equal_those_from_the_hooks(
    side: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = random_ids(2, 9, seed=5)
    batch: Any = ids if side is None else padded_batch(ids, [9, 5], side)
    sites = [f"layer_1.{r}" for r in (*ROLES, "ssm_state", "mixer")]
    hooks = _backend(own=False).run(batch, capture=sites)
    calls = _count_scans(monkeypatch)
    own = _backend().run(batch, capture=sites)
    assert calls
    for name in sites:
        assert own[name].shape == hooks[name].shape, name
        assert (own[name] - hooks[name]).abs().max() <= 1e-6, name
    assert torch.equal(own["layer_1.ssm_states"][:, -1], own["layer_1.ssm_state"]) or side


@needs_current
def test_the_own_scan_stands_aside_where_it_would_not_be_exact(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = _count_scans(monkeypatch)
    backend = _backend()
    ids = random_ids(2, 6)
    # gradients: transformers' path (the own scan writes into its buffers in place)
    backend.run(ids, capture=["layer_0.residual"], grad=True)
    # continuing from a state: the cache already holds one
    state = backend.run(ids[:, :3], return_state=True).state
    backend.run(ids[:, 3:], capture=["layer_0.residual"], initial_state=state)
    # switched off
    _backend(own=False).run(ids, capture=["layer_0.residual"])
    assert calls == [1] * len(backend.layers)  # only the prefix run used it
    # another model calling transformers' function during a run is passed through
    other = make_model("mamba", seed=3)
    with torch.no_grad():
        alone = other(ids).logits
    mixers = {i: layer.mixer for i, layer in enumerate(_model().backbone.layers)}
    with scan.own_scan(mixers, {}), torch.no_grad():
        assert torch.equal(other(ids).logits, alone)
    assert len(calls) == len(backend.layers)


def test_bfloat16_runs_transformers_own_path(monkeypatch: pytest.MonkeyPatch) -> None:
    i = _inputs(1, 4, 3, 2)
    mixer = _model().backbone.layers[0].mixer
    assert scan.scan_applies(mixer, i["x"], i["time_step"], None) is False  # grad enabled
    with torch.no_grad():
        assert scan.scan_applies(mixer, i["x"], i["time_step"], None)
        half = i["x"].bfloat16()
        assert not scan.scan_applies(mixer, half, i["time_step"], None)
        monkeypatch.setattr(mixer, "use_mambapy", True)
        assert not scan.scan_applies(mixer, i["x"], i["time_step"], None)


def test_linear_scan_without_autograd_is_the_autograd_path_bit_for_bit() -> None:
    from archscope.recurrence import linear_scan

    gen = torch.Generator().manual_seed(7)
    decay = torch.rand(3, 11, 4, 1, 1, generator=gen)
    write = torch.randn(3, 11, 4, 5, 6, generator=gen)
    initial = torch.randn(3, 4, 5, 6, generator=gen)
    ref = torch.zeros(3, 4, 5, 6, dtype=torch.float64) + initial.double()
    unrolled = []
    for t in range(11):
        ref = decay[:, t].double() * ref + write[:, t].double()
        unrolled.append(ref)
    with torch.no_grad():
        fast = linear_scan(decay, write, initial)
        zero = linear_scan(decay, write)
    tracked = write.clone().requires_grad_(True)
    slow = linear_scan(decay, tracked, initial)
    assert fast.is_contiguous() and fast.shape == write.shape
    assert torch.equal(fast, slow.detach())
    assert (fast.double() - torch.stack(unrolled, 1)).abs().max() < 1e-5
    assert torch.equal(zero[:, 0], write[:, 0])
    slow.sum().backward()  # the autograd path still carries gradients
    assert tracked.grad is not None and bool(tracked.grad[:, -1].eq(1).all())


def test_older_transformers_and_kernelized_functions_keep_transformers_scan(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import transformers

    calls = _count_scans(monkeypatch)
    backend = _backend()
    ids = random_ids(2, 6)
    mixer = _model().backbone.layers[0].mixer
    if not _current():  # this transformers is older than the scan: its own scan runs
        assert scan.scan_module(mixer) is None
        backend.run(ids, capture=["logits"])
        assert not calls
        return
    assert scan.scan_module(mixer) is mm
    with monkeypatch.context() as patched:
        patched.setattr(transformers, "__version__", "5.24.0")
        assert scan.scan_module(mixer) is None
        backend.run(ids, capture=["logits"])
    assert not calls
    original = mm.mamba_scan_forward
    if isinstance(original, torch.nn.Module):  # kernels' wrapper: a kernel given by kernelize
        seen: list[int] = []
        default = type(original).forward

        def kernel(*args: Any, **kwargs: Any) -> Any:
            seen.append(1)
            return default(original, *args, **kwargs)

        monkeypatch.setattr(original, "forward", kernel, raising=False)
        assert scan._kernelized(original)
        backend.run(ids, capture=["logits"])
        assert not calls and len(seen) == len(backend.layers)


def test_the_release_parser_reads_every_transformers_version_form() -> None:
    """The one (major, minor) parser the packages compare transformers releases with: dev,
    rc and post suffixes and a missing minor; a version without a leading number is refused."""
    from archscope import ParameterError
    from archscope.compat import release

    cases = {
        "5.25.0": (5, 25),
        "5.26.0.dev0": (5, 26),
        "5.25rc1": (5, 25),
        "5.6.0.post1": (5, 6),
        "10.0": (10, 0),
        "6": (6, 0),
    }
    for version, expected in cases.items():
        assert release(version) == expected, version
    assert release("5.6.0") < release("5.25.0") < (5, 26)
    with pytest.raises(ParameterError, match=r"cannot read a release from version 'dev'"):
        release("dev")
    import transformers

    assert transformers_release() == release(transformers.__version__)
