"""Probe transfer: a known linear map is recovered and a probe keeps its AUROC through it;
evaluate_transfer runs between a transformer, a Mamba, a hybrid and an LSTM, with different
tokenizers and either padding side; the 0.2 calls; typed errors."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch
from archs import Arch, arch, words

import archscope
from archscope.data import Dataset
from archscope.errors import InputError, ParameterError, SiteError
from archscope.methods.probes import ProbeConfig, ProbeFit, auroc
from archscope.methods.transfer import (
    Alignment,
    TransferResult,
    auroc_from_scores,
    evaluate_transfer,
    fit_alignment,
    learn_alignment,
    transfer_probe,
)
from archscope.testing import MethodContract

torch.set_num_threads(1)


class KnownMap:
    """Target activations T and source activations S = T @ M + c (an exact linear relation),
    with labels planted along a direction of the source space."""

    def __init__(self, n: int = 400, d_target: int = 24, d_source: int = 16, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.t = torch.randn(n, d_target, generator=g) * 2.0 + 1.0
        self.m = torch.randn(d_target, d_source, generator=g) / d_target**0.5
        self.c = torch.randn(d_source, generator=g)
        self.s = self.t @ self.m + self.c
        u = torch.randn(d_source, generator=g)
        proj = (self.s - self.s.mean(0)) @ u
        keep = proj.abs() > 0.2 * proj.std()
        self.t, self.s, proj = self.t[keep], self.s[keep], proj[keep]
        self.y = (proj > 0).long()
        half = len(self.y) // 2
        self.train, self.test = slice(0, half), slice(half, None)


def test_alignment_recovers_a_known_linear_map() -> None:
    k = KnownMap()
    alignment = fit_alignment(k.s, k.t, ridge=1e-3)
    assert isinstance(alignment, Alignment) and alignment.shape == k.m.shape
    torch.testing.assert_close(alignment.matrix, k.m, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(alignment(k.t), k.s, atol=1e-3, rtol=1e-3)
    assert alignment.r2 > 0.9999


def test_transported_probe_keeps_its_auroc() -> None:
    k = KnownMap()
    source = ProbeFit(ProbeConfig(seed=0), k.s.shape[1])
    metrics = source.train(
        k.s[k.train], k.y[k.train], epochs=60, lr=0.01, held_out=(k.s[k.test], k.y[k.test])
    )
    assert metrics.val_auroc >= 0.95
    alignment = fit_alignment(k.s[k.train], k.t[k.train])
    w, b = transfer_probe(source.direction, source.bias, alignment)
    assert w.shape == (k.t.shape[1],)
    # The transported probe reads target activations as the source probe reads their sources.
    torch.testing.assert_close(
        k.t[k.test] @ w + b, source.logits(k.s[k.test]), atol=1e-3, rtol=1e-3
    )
    transferred = auroc_from_scores(k.t[k.test] @ w + b, k.y[k.test])
    assert transferred == pytest.approx(metrics.val_auroc, abs=1e-3)


def test_mispaired_texts_destroy_the_transfer() -> None:
    """The control: the same activations, but rows not matched text by text."""
    k = KnownMap()
    source = ProbeFit(ProbeConfig(), k.s.shape[1])
    source.train(
        k.s[k.train], k.y[k.train], epochs=60, lr=0.01, held_out=(k.s[k.test], k.y[k.test])
    )
    perm = torch.randperm(len(k.y), generator=torch.Generator().manual_seed(1))
    alignment = fit_alignment(k.s, k.t[perm])
    assert alignment.r2 < 0.15
    w, b = transfer_probe(source.direction, source.bias, alignment)
    assert auroc(k.t[k.test] @ w + b, k.y[k.test]) < 0.75


def test_bare_matrix_alignment_of_0_2() -> None:
    """0.2's bare matrix is (d_source, d_target): source = target @ M.T."""
    g = torch.Generator().manual_seed(4)
    t = torch.randn(50, 6, generator=g)
    m = torch.randn(3, 6, generator=g)
    w, b = torch.randn(3, generator=g), torch.tensor(0.3)
    w_t, b_t = transfer_probe(w, b, m)
    torch.testing.assert_close(t @ w_t + b_t, (t @ m.T) @ w + b, atol=1e-5, rtol=1e-5)
    with pytest.raises(InputError, match="pass its transpose"):
        transfer_probe(w, b, m.T)


def test_learn_alignment_returns_0_2_tensor() -> None:
    """0.2 callers write ``tgt @ M.T``: the matrix is the no-offset least-squares map, checked
    against torch.linalg.lstsq (ridge 0) and recovering a known linear map."""
    g = torch.Generator().manual_seed(5)
    t = torch.randn(80, 6, generator=g, dtype=torch.float64)
    m_true = torch.randn(4, 6, generator=g, dtype=torch.float64)
    s = t @ m_true.T + 0.01 * torch.randn(80, 4, generator=g, dtype=torch.float64)
    m = learn_alignment(s, t, ridge=0.0)
    assert isinstance(m, torch.Tensor) and m.shape == (4, 6)
    reference = torch.linalg.lstsq(t, s).solution.T
    torch.testing.assert_close(m.double(), reference, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(m.double(), m_true, atol=0.02, rtol=0.0)
    w, b = torch.randn(4, generator=g), torch.tensor(-0.2)
    w_t, b_t = transfer_probe(w, b, m)
    torch.testing.assert_close(t.float() @ w_t + b_t, (t.float() @ m.T) @ w + b)


def signal_texts(n: int, seed: int, positive: bool) -> list[str]:
    """Random word texts; positives carry three copies of ``w5``, negatives none."""
    rng = random.Random(seed)
    out = []
    for text in words(n, seed):
        tokens = [w for w in text.split() if w != "w5"]
        if positive:
            for _ in range(3):
                tokens.insert(rng.randrange(len(tokens) + 1), "w5")
        out.append(" ".join(tokens))
    return out


def reversed_tokenizer() -> Any:
    """A tokenizer with the same words but other ids (the models tokenize differently)."""
    from archscope_transformer.testing import tiny_tokenizer

    return tiny_tokenizer([f"w{i}" for i in reversed(range(4, 100))])


def tokenize_fn(side: str, tokenizer: Any = None) -> Any:
    from archscope_transformer.testing import tiny_tokenizer

    tok = tokenizer or tiny_tokenizer()  # a fresh one: the shared tokenizer must not change
    tok.pad_token = "<pad>"
    tok.padding_side = side
    return archscope.make_tokenize_fn(tok, max_length=64)


SPLITS = {
    "align_texts": signal_texts(40, 1, True) + signal_texts(40, 2, False),
    "train_pos": signal_texts(40, 3, True),
    "train_neg": signal_texts(40, 4, False),
    "test_pos": signal_texts(30, 5, True),
    "test_neg": signal_texts(30, 6, False),
}


def last_layer(a: Arch) -> str:
    return a.backend.layer_names()[-1]


@pytest.mark.parametrize(
    ("source", "target"), [("gpt2", "mamba"), ("mamba", "lstm"), ("lstm", "gpt2")]
)
def test_evaluate_transfer_between_architectures(source: str, target: str) -> None:
    a, b = arch(source), arch(target)
    # The target reads the texts through a tokenizer with other ids: alignment is per text.
    result = evaluate_transfer(
        a.model,
        b.model,
        a.backend,
        b.backend.name,
        a.tokenizer,
        reversed_tokenizer(),
        **SPLITS,
        source_layer=last_layer(a),
        target_layer=last_layer(b),
        source_arch_name=source,
        target_arch_name=target,
    )
    assert isinstance(result, TransferResult)
    assert (result.source_arch, result.target_arch) == (source, target)
    assert result.n_align_pairs == 80 and result.n_train == 80 and result.n_test == 60
    assert result.baseline_source_auroc >= 0.95 and result.baseline_target_auroc >= 0.95
    assert result.transfer_auroc >= 0.9, result.to_markdown()
    assert result.transfer_drop == pytest.approx(
        result.baseline_source_auroc - result.transfer_auroc
    )
    assert "transported" in result.to_markdown()


@pytest.mark.parametrize(("source", "target"), [("gpt2", "lstm"), ("mamba", "hybrid")])
def test_transfer_is_padding_invariant(source: str, target: str) -> None:
    """Tokenize functions padding left or right, and the tokenizer itself (texts one by one),
    give the same result."""
    a, b = arch(source), arch(target)
    results = []
    for src_tok, tgt_tok in (
        (tokenize_fn("left"), tokenize_fn("right")),
        (tokenize_fn("right"), tokenize_fn("left")),
        (a.tokenizer, b.tokenizer),
    ):
        r = evaluate_transfer(
            a.model,
            b.model,
            None,
            None,
            src_tok,
            tgt_tok,
            **SPLITS,
            source_layer=last_layer(a),
            target_layer=last_layer(b),
            epochs=30,
        )
        results.append(r.to_dict())
    for other in results[1:]:
        for key, value in results[0].items():
            if isinstance(value, float):
                assert other[key] == pytest.approx(value, abs=1e-5), key
            else:
                assert other[key] == value, key


def test_transfer_method_runs_with_two_backends() -> None:
    a, b = arch("hybrid"), arch("lstm")
    texts = [*SPLITS["train_pos"], *SPLITS["test_pos"], *SPLITS["train_neg"], *SPLITS["test_neg"]]
    labels = [1] * 70 + [0] * 70
    data = Dataset.from_texts(texts, labels, tokenizer=a.tokenizer)
    result = archscope.run_method("transfer", a.backend, b.backend, data, epochs=40)
    assert isinstance(result, TransferResult)
    assert result.target_layer == b.backend.layer_names()[len(b.backend.layer_names()) // 2]
    assert result.n_test == 42 and result.n_train == 98 and result.n_align_pairs == 98
    assert result.transfer_auroc >= 0.9, result.to_markdown()
    with pytest.raises(ParameterError, match="backend_a, backend_b, data"):
        archscope.run_method("transfer", a.backend, data)


class TestBadInputs:
    def test_alignment_and_transport(self) -> None:
        with pytest.raises(InputError, match="same texts"):
            learn_alignment(torch.zeros(5, 3), torch.zeros(4, 3))
        with pytest.raises(InputError, match="features"):
            learn_alignment(torch.zeros(5, 3, 2), torch.zeros(5, 3))
        with pytest.raises(ParameterError, match="ridge"):
            learn_alignment(torch.zeros(5, 3), torch.zeros(5, 3), ridge=-1.0)
        alignment = fit_alignment(torch.randn(6, 3), torch.randn(6, 4))
        with pytest.raises(InputError, match="3-dimensional source space"):
            transfer_probe(torch.zeros(5), torch.tensor(0.0), alignment)
        with pytest.raises(InputError, match=r"\(n, 4\)"):
            alignment(torch.zeros(2, 3))

    def test_evaluate_transfer(self) -> None:
        a, b = arch("gpt2"), arch("lstm")
        common = dict(source_layer=last_layer(a), target_layer=last_layer(b))
        splits = {**SPLITS, "test_neg": []}
        with pytest.raises(InputError, match="test_neg is empty"):
            evaluate_transfer(
                a.model, b.model, None, None, a.tokenizer, b.tokenizer, **splits, **common
            )
        with pytest.raises(ParameterError, match="backend hint"):
            evaluate_transfer(
                a.model, b.model, 3, None, a.tokenizer, b.tokenizer, **SPLITS, **common
            )
        with pytest.raises(InputError, match="mapping"):
            evaluate_transfer(
                a.model, b.model, None, None, lambda texts: texts, b.tokenizer, **SPLITS, **common
            )
        with pytest.raises(SiteError):
            evaluate_transfer(
                a.model,
                b.model,
                None,
                None,
                a.tokenizer,
                b.tokenizer,
                **SPLITS,
                source_layer="layer_7.residual",
                target_layer=last_layer(b),
            )
        with pytest.raises(InputError, match="labelled"):
            archscope.run_method(
                "transfer",
                a.backend,
                b.backend,
                Dataset.from_texts(words(10), tokenizer=a.tokenizer),
            )
        big = Dataset.from_ids([[5, 6], [7, 150], [8, 9], [10, 11]], [0, 1, 0, 1])
        with pytest.raises(InputError, match="outside the vocabulary"):
            archscope.run_method("transfer", a.backend, b.backend, big)
        with pytest.warns(UserWarning, match="two texts of each label"):
            few = archscope.run_method(
                "transfer",
                a.backend,
                b.backend,
                Dataset.from_texts(words(10), [1] + [0] * 9, tokenizer=a.tokenizer),
                epochs=2,
            )
        assert few.transfer_auroc == 0.5 and few.baseline_target_auroc == 0.5


def test_0_2_positional_call_with_hints_and_tokenize_functions() -> None:
    a, b = arch("gpt2"), arch("lstm")
    result = evaluate_transfer(
        a.model,
        b.model,
        "transformer",
        "recurrent",
        tokenize_fn("right"),
        tokenize_fn("left"),
        SPLITS["align_texts"],
        SPLITS["train_pos"],
        SPLITS["train_neg"],
        SPLITS["test_pos"],
        SPLITS["test_neg"],
        "layer_2.residual",
        "layer_1.hidden",
        "gpt2",
        "lstm",
    )
    assert (result.source_arch, result.target_layer) == ("gpt2", "layer_1.hidden")
    assert result.transfer_auroc >= 0.9


def test_0_2_signatures() -> None:
    """The parameters of the 0.2 functions, in order (API-0.2.md); later ones may be added."""
    import inspect

    import archscope.methods.probes as probes
    import archscope.methods.transfer as transfer

    expected = {
        transfer.learn_alignment: ["src_acts", "tgt_acts", "ridge"],
        transfer.transfer_probe: ["probe_weights_source", "probe_bias_source", "alignment"],
        transfer.auroc_from_scores: ["scores", "labels"],
        transfer.evaluate_transfer: [
            "source_model",
            "target_model",
            "source_backend",
            "target_backend",
            "source_tokenize",
            "target_tokenize",
            "align_texts",
            "train_pos",
            "train_neg",
            "test_pos",
            "test_neg",
            "source_layer",
            "target_layer",
            "source_arch_name",
            "target_arch_name",
        ],
        probes.fit_probe: [
            "model",
            "inputs_pos",
            "inputs_neg",
            "layer_name",
            "backend_hint",
            "config",
            "device",
            "tokenizer",
            "pos_texts",
            "neg_texts",
            "max_length",
        ],
        probes.ProbeFit.__init__: ["self", "config", "input_dim", "device"],
        probes.ProbeFit.train: [
            "self",
            "activations",
            "labels",
            "epochs",
            "lr",
            "batch_size",
            "val_split",
        ],
        probes.ProbeFit.score: ["self", "activations"],
        probes.Probe.__init__: ["self", "input_dim", "config"],
    }
    for function, names in expected.items():
        params = list(inspect.signature(function).parameters)
        assert params[: len(names)] == names, function.__qualname__
    assert [
        f
        for f in ("layer_name", "probe_type", "hidden_dim", "target")
        if f not in probes.ProbeConfig.__dataclass_fields__
    ] == []
    assert list(TransferResult.__dataclass_fields__)[:9] == [
        "source_arch",
        "target_arch",
        "source_layer",
        "target_layer",
        "n_align_pairs",
        "baseline_source_auroc",
        "baseline_target_auroc",
        "transfer_auroc",
        "transfer_drop",
    ]
    assert isinstance(probes.ProbeFit.direction, property)
    assert isinstance(probes.ProbeFit.bias, property)


class TestTransferMethodContract(MethodContract):
    method_name = "transfer"
    batch_shape = (8, 7)
