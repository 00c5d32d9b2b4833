"""Class 3 of the reliability issue: inputs a model cannot take (ids outside the vocabulary,
sequences beyond the position limit, an empty batch, a model on the meta device, unembed of
the wrong width) get an `InputError` naming the limit, raised before the forward pass."""

from __future__ import annotations

import pytest
import torch
from archs import Arch, arch
from reliability.support import batch

import archscope
from archscope.errors import ArchscopeError, InputError
from archscope.testing import unchanged


def _refused_before_forward(a: Arch, inputs: object, pattern: str) -> None:
    """``inputs`` raise InputError matching ``pattern``; no module was called, nothing changed."""
    calls: list[str] = []
    with unchanged(a.model):
        handle = a.model.register_forward_pre_hook(lambda m, args: calls.append("called"))
        try:
            with pytest.raises(InputError, match=pattern):
                a.backend.run(inputs, capture=["logits"])
        finally:
            handle.remove()
        assert calls == [], "the forward pass ran before the input was refused"


def test_token_id_at_vocabulary_size(any_arch: Arch) -> None:
    ids = torch.tensor([[5, 6, 100, 7]])
    _refused_before_forward(any_arch, ids, r"token id 100.*vocabulary.*100")


def test_negative_token_id(any_arch: Arch) -> None:
    ids = torch.tensor([[5, -1, 7]])
    _refused_before_forward(any_arch, ids, r"negative token id -1")


def test_vocabulary_check_ignores_pad_positions(any_arch: Arch) -> None:
    # a pad id outside the vocabulary (e.g. -100) in a masked-out position is not a token
    ids = batch([4, 2])
    ids["input_ids"][1, 2:] = -100
    a = any_arch
    out = a.backend.run(ids, capture=["logits"]).logits
    assert out is not None and bool(torch.isfinite(out[0]).all())


def test_sequence_longer_than_position_limit() -> None:
    a = arch("gpt2")  # learned positions: config.n_positions = 64
    limit = a.model.config.n_positions
    ids = torch.full((1, limit + 1), 5)
    _refused_before_forward(a, ids, rf"{limit + 1} tokens.*{limit} positions")
    ok = a.backend.run(torch.full((1, limit), 5), capture=["logits"]).logits
    assert ok is not None and ok.shape[1] == limit


def test_position_limit_counts_padding_columns() -> None:
    # the model sees every column of a padded batch, so the width is what must fit
    a = arch("gpt2")
    limit = a.model.config.n_positions
    ids = batch([limit + 2, 3])
    _refused_before_forward(a, ids, rf"{limit + 2} tokens.*{limit} positions")


def test_input_limits_are_reported_per_backend(any_arch: Arch) -> None:
    limits = any_arch.backend.input_limits()
    assert limits.vocab_size == 100
    # learned positions (GPT-2's n_positions) and the context a config names (the hybrid's
    # max_position_embeddings); a pure SSM and an RNN have no position limit
    config = getattr(any_arch.model, "config", None)
    expected = {
        "gpt2": 64,
        "mamba": None,
        "lstm": None,
        "hybrid": getattr(config, "max_position_embeddings", -1),
    }[any_arch.name]
    assert limits.max_positions == expected


def test_empty_batch(any_arch: Arch) -> None:
    _refused_before_forward(any_arch, torch.zeros(0, 4, dtype=torch.long), r"no rows.*\(0, 4\)")


def test_meta_device_model() -> None:
    from archscope_transformer.testing import tiny_model

    with torch.device("meta"):
        model = tiny_model("gpt2")
    backend = archscope.Backend.for_model(model)
    with pytest.raises(InputError, match=r"meta device.*load the weights"):
        backend.run(torch.tensor([[1, 2, 3]]), capture=["logits"])


@pytest.mark.parametrize("name", ["gpt2", "mamba", "lstm"])
def test_unembed_of_wrong_width(name: str) -> None:
    a = arch(name)
    width = a.backend.site_info(a.backend.layer_names()[-1]).dim
    with pytest.raises(InputError, match=rf"width {width}.*got .*{width + 3}"):
        a.backend.unembed(torch.zeros(2, 3, width + 3))
    assert a.backend.unembed(torch.zeros(2, 3, width)).shape == (2, 3, 100)


def test_input_errors_are_archscope_errors() -> None:
    assert issubclass(InputError, ArchscopeError) and issubclass(InputError, ValueError)
