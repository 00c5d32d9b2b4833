"""Class 1 of the reliability issue: runs on one model from several threads are isolated.
N threads x M runs with mixed edits, captures and early stops, on one Backend and on two
Backend objects sharing a model; every result must equal its single-threaded reference."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch
from archs import ARCH_NAMES, arch
from reliability.support import batch

import archscope
from archscope import Edit
from archscope.testing import unchanged

N_THREADS, N_RUNS = 4, 6


def _requests(backend: Any) -> list[dict[str, Any]]:
    """Run requests that differ in edits (none, scale, add, replace), captures and stops."""
    names = backend.layer_names()
    first, last = names[0], names[-1]
    d = backend.site_info(first).dim
    steer = torch.linspace(-1, 1, d)
    return [
        {"capture": [first]},  # stops early after layer 0
        {"capture": [last, "logits"], "edits": [Edit.scale(first, 0.0, positions=[1])]},
        {"capture": ["logits"], "edits": [Edit.add(first, steer)]},
        {"capture": [first], "edits": [Edit.replace(first, 1.0, positions=[0])]},
        {"capture": [last], "edits": [Edit.scale(last, 3.0)]},
        {"capture": ["logits"]},
    ]


def _run(backend: Any, inputs: Any, request: dict[str, Any]) -> dict[str, torch.Tensor]:
    result = backend.run(inputs, capture=request["capture"], edits=request.get("edits", []))
    out = dict(result.activations)
    if result.logits is not None:
        out["logits"] = result.logits
    return out


def _stress(backends: list[Any], model: Any) -> None:
    inputs = batch([6, 4, 5], seed=3)
    jobs = [(i % len(backends), i % len(_requests(backends[0]))) for i in range(N_THREADS * N_RUNS)]
    reference = {r: _run(backends[0], inputs, req) for r, req in enumerate(_requests(backends[0]))}
    with unchanged(model):
        failures: list[str] = []
        barrier = threading.Barrier(N_THREADS)

        def worker(t: int) -> None:
            barrier.wait()
            for b_i, r in jobs[t::N_THREADS]:
                try:
                    got = _run(backends[b_i], inputs, _requests(backends[b_i])[r])
                except Exception as exc:  # collected: an exception in a thread must fail the test
                    failures.append(f"thread {t} request {r}: {type(exc).__name__}: {exc}")
                    continue
                want = reference[r]
                if set(got) != set(want) or not all(torch.equal(got[k], want[k]) for k in want):
                    failures.append(
                        f"thread {t} request {r}: result differs from the single-threaded reference"
                    )

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(N_THREADS)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert failures == []


@pytest.mark.parametrize("name", ARCH_NAMES)
def test_threads_on_one_backend(name: str) -> None:
    a = arch(name)
    _stress([a.backend], a.model)


@pytest.mark.parametrize("name", ["gpt2", "mamba"])
def test_threads_on_two_backends_of_one_model(name: str) -> None:
    a = arch(name)
    _stress([a.backend, archscope.Backend.for_model(a.model)], a.model)
