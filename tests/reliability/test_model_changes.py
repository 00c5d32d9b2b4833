"""What a backend keeps between runs (site table, module list, input limits, resolved captures)
is rebuilt when the model changes in a way that matters: a module replaced, a module added in
training mode, the vocabulary resized. Every check compares with the model's own forward pass
run without archscope."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from reliability.support import small_gpt2, token_ids

import archscope
from archscope.errors import InputError, SiteError


def _block_outputs(model: Any, ids: torch.Tensor) -> list[torch.Tensor]:
    """Each block's hidden-state output from the model's own forward, read with plain hooks."""
    out: list[torch.Tensor] = []

    def keep(module: Any, args: Any, output: Any) -> None:
        out.append((output[0] if isinstance(output, tuple) else output).detach().clone())

    handles = [block.register_forward_hook(keep) for block in model.transformer.h]
    with torch.no_grad():
        model(ids, use_cache=False)
    for handle in handles:
        handle.remove()
    return out


def test_replaced_block_is_the_one_captured_and_edited() -> None:
    model = small_gpt2()
    backend = archscope.Backend.for_model(model)
    ids = token_ids()
    backend.run(ids, capture=["layer_1.residual"])  # everything cached now
    new_block = copy.deepcopy(model.transformer.h[1])
    with torch.no_grad():
        for p in new_block.parameters():
            p.add_(0.1)
    model.transformer.h[1] = new_block
    expected = _block_outputs(model, ids)
    result = backend.run(ids, capture=["layer_1.residual", "logits"])
    torch.testing.assert_close(result["layer_1.residual"], expected[1], rtol=0, atol=0)
    # an edit of the replaced block's output reaches the output: zeroing it gives the logits of
    # the final norm and head applied to zeros
    zeroed = backend.run(
        ids, capture=["logits"], edits=archscope.Edit.scale("layer_1.residual", 0.0)
    )
    with torch.no_grad():
        reference = model.lm_head(model.transformer.ln_f(torch.zeros_like(expected[1])))
    torch.testing.assert_close(zeroed.logits, reference)


def test_replaced_head_is_the_one_unembed_uses() -> None:
    model = small_gpt2()
    backend = archscope.Backend.for_model(model)
    ids = token_ids()
    backend.run(ids, capture=["logits"])
    model.lm_head = torch.nn.Linear(32, 100, bias=True)
    residual = backend.run(ids, capture=["layer_1.residual"])["layer_1.residual"]
    with torch.no_grad():
        expected = model.lm_head(model.transformer.ln_f(residual))
        plain = model(ids, use_cache=False).logits
    torch.testing.assert_close(backend.unembed(residual), expected)
    torch.testing.assert_close(backend.run(ids, capture=["logits"]).logits, plain)


def test_resized_vocabulary_moves_the_limit_and_the_logits_site() -> None:
    model = small_gpt2()
    backend = archscope.Backend.for_model(model)
    high = torch.tensor([[3, 110, 5]])
    with pytest.raises(InputError, match="outside the vocabulary of 100"):
        backend.run(high, capture=["logits"])
    assert backend.sites()["logits"].dim == 100
    model.resize_token_embeddings(120, mean_resizing=False)
    result = backend.run(high, capture=["logits"])
    with torch.no_grad():
        plain = model(high, use_cache=False).logits
    torch.testing.assert_close(result.logits, plain)
    assert backend.sites()["logits"].dim == 120
    with pytest.raises(InputError, match="outside the vocabulary of 120"):
        backend.run(torch.tensor([[3, 120]]), capture=["logits"])


def test_module_added_in_training_mode_runs_in_eval_mode() -> None:
    model = small_gpt2()
    backend = archscope.Backend.for_model(model)
    ids = token_ids()
    first = backend.run(ids, capture=["logits"]).logits
    # a new dropout (in training mode, as new modules are) in block 0's MLP: a run must switch
    # it off like every module
    model.transformer.h[0].mlp.dropout = torch.nn.Dropout(0.9)
    a = backend.run(ids, capture=["logits"]).logits
    b = backend.run(ids, capture=["logits"]).logits
    assert model.transformer.h[0].mlp.dropout.training, "the module's own mode is restored"
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, first, rtol=0, atol=0)  # dropout off: the same function


def test_removed_layer_is_refused_by_name_after_a_cached_request() -> None:
    model = small_gpt2()
    backend = archscope.Backend.for_model(model)
    ids = token_ids()
    backend.run(ids, capture=["layer_1.residual"])  # the capture list is remembered
    del model.transformer.h[1]
    model.config.n_layer = 1
    with pytest.raises(SiteError, match="layer_1.residual"):
        backend.run(ids, capture=["layer_1.residual"])
    assert backend.n_layers == 1


def test_repeated_requests_give_fresh_results() -> None:
    model = small_gpt2()
    backend = archscope.Backend.for_model(model)
    ids = token_ids()
    capture = ["layer_0.residual", "logits"]
    first = backend.run(ids, capture=capture)
    capture.append("layer_1.residual")  # the same list object, changed: not the cached request
    second = backend.run(ids, capture=capture)
    assert list(second.activations) == ["layer_0.residual", "logits", "layer_1.residual"]
    assert list(first.activations) == ["layer_0.residual", "logits"]
    torch.testing.assert_close(second["layer_1.residual"], _block_outputs(model, ids)[1])
    second.activations.clear()
    assert list(backend.run(ids, capture=capture).activations) == [*capture]
