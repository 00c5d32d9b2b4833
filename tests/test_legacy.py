"""archscope 0.2 compatibility (`archscope.legacy`): the 0.2 module paths import the moved
modules and warn once with the replacement and the removal version; `ProbeFit.metrics` is the
dict 0.2 returned; `learn_alignment` returns 0.2's tensor; a model or a Backend is accepted
through one coercion; 0.2's one-argument patching metrics still work, with a warning."""

from __future__ import annotations

import importlib
import json
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from archs import arch

import archscope
from archscope import legacy


@pytest.fixture
def fresh_legacy(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Forget which names have warned and drop the 0.2 aliases from sys.modules."""
    monkeypatch.setattr(legacy, "_warned", set())
    for name in list(sys.modules):
        if legacy.moved_module(name) is not None:
            monkeypatch.delitem(sys.modules, name)
    for old in legacy.MOVED_MODULES:  # the import system also sets them on the package
        if old.split(".")[1] in vars(archscope):
            monkeypatch.delattr(archscope, old.split(".")[1])
    yield


@pytest.mark.parametrize("old", sorted(legacy.MOVED_MODULES))
def test_0_2_module_path_is_the_moved_module_and_warns_once(old: str, fresh_legacy: None) -> None:
    new = legacy.MOVED_MODULES[old]
    namespace: dict[str, object] = {}
    with pytest.warns(DeprecationWarning) as record:  # an import statement in this file
        exec(compile(f"import {old} as module", __file__, "exec"), namespace)
    module = namespace["module"]
    messages = [str(w.message) for w in record if issubclass(w.category, DeprecationWarning)]
    assert len(messages) == 1, messages
    assert new in messages[0] and legacy.REMOVED_IN in messages[0] and old in messages[0]
    assert record[0].filename == __file__  # points at the caller, not at importlib
    assert module is importlib.import_module(new)
    assert isinstance(module, type(sys))
    assert module.__spec__ is not None
    assert module.__name__ == module.__spec__.name == new  # its own spec, not the alias's
    sys.modules.pop(old)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert importlib.import_module(old) is module  # once per name


def test_submodules_and_attribute_access_of_old_paths(fresh_legacy: None) -> None:
    with pytest.warns(DeprecationWarning, match=r"archscope\.methods\.sae\._models"):
        from archscope.sae._models import SAEConfig
    from archscope.methods.sae import SAEConfig as current

    assert SAEConfig is current  # one class: isinstance works across both paths
    with pytest.warns(DeprecationWarning, match=r"archscope\.apps\.bench"):
        bench = archscope.bench  # attribute access, as `import archscope; archscope.bench`
    assert bench is importlib.import_module("archscope.apps.bench")


def test_probe_metrics_are_the_0_2_dict(tmp_path: Path) -> None:
    from archscope.methods.probes import ProbeConfig, ProbeFit

    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 5, generator=g)
    y = (x[:, 0] > 0).long()
    fit = ProbeFit(ProbeConfig(seed=0), 5)
    metrics = fit.train(x, y, epochs=20, lr=0.05, batch_size=16)
    assert metrics is fit.metrics
    assert "train_auroc" in metrics and "nope" not in metrics
    assert set(metrics.keys()) == {
        "train_auroc",
        "val_auroc",
        "train_loss",
        "val_loss",
        "n_train",
        "n_val",
    }
    plain = dict(metrics)
    assert plain["val_auroc"] == metrics.val_auroc == metrics["val_auroc"]
    assert dict(metrics.items()) == plain and list(metrics.values()) == list(plain.values())
    assert json.loads(json.dumps(metrics)) == plain
    assert plain["n_train"] + plain["n_val"] == 40
    with pytest.raises(KeyError, match="val_auroc"):
        metrics["auroc"]  # the message lists the valid keys
    loaded = ProbeFit.load(fit.save(tmp_path / "probe"))
    assert loaded.metrics is not None and dict(loaded.metrics) == plain


def test_learn_alignment_is_0_2_tensor_through_the_old_path(fresh_legacy: None) -> None:
    with pytest.warns(DeprecationWarning):
        from archscope.transfer import Alignment, fit_alignment, learn_alignment
    g = torch.Generator().manual_seed(1)
    tgt = torch.randn(30, 4, generator=g)
    src = tgt @ torch.randn(4, 3, generator=g)
    m = learn_alignment(src, tgt)
    assert isinstance(m, torch.Tensor) and m.shape == (3, 4)
    torch.testing.assert_close(tgt @ m.T, src, atol=1e-3, rtol=1e-3)  # how 0.2 callers use it
    assert isinstance(fit_alignment(src, tgt), Alignment)


def test_as_backend_is_the_one_coercion() -> None:
    a = arch("gpt2")
    assert archscope.as_backend(a.backend) is a.backend
    made = archscope.as_backend(a.model)
    assert isinstance(made, archscope.Backend) and made.model is a.model
    with pytest.raises(archscope.NoBackendError):
        archscope.as_backend(torch.nn.Linear(2, 2), hint="no-such-backend")


def test_one_argument_metric_of_0_2_warns_and_works(fresh_legacy: None) -> None:
    from archscope.methods.attribute import activation_patch

    a = arch("gpt2")
    clean, corrupt = [[5, 6, 7, 8]], [[5, 9, 7, 8]]

    def logit_of_w10(outputs: Any) -> torch.Tensor:  # 0.2's form: metric(outputs)
        value: torch.Tensor = outputs.logits[:, -1, 10].mean()
        return value

    def two_args(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return logits[:, -1, 10].mean()

    with pytest.warns(DeprecationWarning, match=r"metric\(outputs\).*logits, mask"):
        old = activation_patch(a.backend, clean, corrupt, [0, 1], logit_of_w10)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        new = activation_patch(a.backend, clean, corrupt, [0, 1], two_args)
    assert old.gap_restored == pytest.approx(new.gap_restored)
    assert old.patched_metric == pytest.approx(new.patched_metric)


#: The names of archscope 0.2's public API per module (API-0.2.md), imported by their 0.2 path.
API_0_2 = {
    "archscope.probes": ["ProbeConfig", "Probe", "ProbeFit", "fit_probe"],
    "archscope.sae": ["SAEConfig", "DenseSAE", "Rank1FactoredSAE", "build_sae", "fit_sae"],
    "archscope.neurons": ["NeuronEditConfig", "NeuronEdit", "find_neurons"],
    "archscope.attribute": ["PatchResult", "DIMResult", "activation_patch", "dim_decompose"],
    "archscope.circuits": [
        "CircuitScore",
        "induction_head_score",
        "copy_score",
        "early_token_attention",
        "run_all_circuits",
    ],
    "archscope.lens": ["LayerPrediction", "LensResult", "logit_lens", "TunedLens"],
    "archscope.diff": ["LayerDrift", "CircuitDelta", "ModelDiff", "compare"],
    "archscope.transfer": [
        "TransferResult",
        "learn_alignment",
        "transfer_probe",
        "auroc_from_scores",
        "evaluate_transfer",
    ],
    "archscope.bench": ["InterpProfile", "benchmark", "profile_to_markdown"],
}


@pytest.mark.parametrize("old", sorted(API_0_2))
def test_every_0_2_name_imports_from_its_0_2_path(old: str, fresh_legacy: None) -> None:
    names = ", ".join(API_0_2[old])
    namespace: dict[str, object] = {}
    with pytest.warns(DeprecationWarning, match=legacy.MOVED_MODULES[old].replace(".", r"\.")):
        exec(f"from {old} import {names}", namespace)
    current = importlib.import_module(legacy.MOVED_MODULES[old])
    for name in API_0_2[old]:
        assert namespace[name] is getattr(current, name), name


def test_0_2_backend_class_names_warn_with_their_home(fresh_legacy: None) -> None:
    import archscope.backends as backends
    from archscope_transformer.backend import TransformerBackend

    with pytest.warns(DeprecationWarning, match=r"archscope_transformer\.backend\.Transformer"):
        old = backends.TransformerBackend  # type: ignore[attr-defined]
    assert old is TransformerBackend
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backends.TransformerBackend is TransformerBackend  # type: ignore[attr-defined]
