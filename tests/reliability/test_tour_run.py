"""Runs, edits and states from the hostile tour (issue "Reliability III", section 2): results
that were silently wrong (a dropped state-patch row, edit positions on padding, a -1 mask,
non-finite values) and errors that were unclear (dtype, memory, early stop, attention-pattern
statistics, datasets, empty data, gradients under no_grad, meta ids, a hinted backend that
cannot build its sites). Each test asserts the corrected value against an independent
computation, or the message, on the zoo models and tiny Hugging Face models."""

from __future__ import annotations

import copy
import math
import warnings
from functools import cache
from typing import Any

import pytest
import torch
from archs import arch

import archscope
from archscope import Edit
from archscope.errors import ArchscopeError, BackendError, InputError, SiteError
from archscope.testing import unchanged


@cache
def zoo(name: str) -> tuple[Any, Any, Any]:
    """(model, tokenizer, backend) of a zoo model (trained, 307-word vocabulary)."""
    return archscope.load_model(f"zoo:{name}")


def tk(name: str, texts: list[str]) -> dict[str, torch.Tensor]:
    return archscope.make_tokenize_fn(zoo(name)[1])(texts)


class NoForward:
    """Records whether ``model`` ran (a pre-hook on the root module), removed on exit."""

    def __init__(self, model: Any) -> None:
        self.model, self.calls = model, 0

    def __enter__(self) -> NoForward:
        self.handle = self.model.register_forward_pre_hook(lambda *a: self._count())
        return self

    def _count(self) -> None:
        self.calls += 1

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()


# -- silently wrong --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mamba", "lstm"])
def test_state_patch_uses_a_one_row_input_with_every_row(name: str) -> None:
    _, _, b = zoo(name)
    prefix, source, suffix = tk(name, ["the good", "a"]), tk(name, ["a bad"]), tk(name, [" day"])
    patched = b.state_patch(prefix, source, suffix, capture=["logits"])
    assert patched.logits is not None and patched.logits.shape[0] == 2
    for row, text in enumerate(["the good", "a"]):  # each prefix row on its own
        alone = b.state_patch(tk(name, [text]), source, suffix, capture=["logits"])
        assert torch.allclose(patched.logits[row], alone.logits[0], atol=1e-5)
    # the source state replaces every state site, so both rows continue from "a bad"
    assert torch.allclose(patched.logits[0], patched.logits[1], atol=1e-5)


@pytest.mark.parametrize("name", ["mamba", "lstm"])
def test_state_patch_refuses_row_counts_that_do_not_pair(name: str) -> None:
    _, _, b = zoo(name)
    with pytest.raises(InputError, match=r"prefix 2, source_prefix 3, suffix 1.*one row"):
        b.state_patch(
            tk(name, ["the good", "a"]), tk(name, ["a", "a bad", "the"]), tk(name, [" day"])
        )


def _padded(ids: list[int], width: int, side: str) -> dict[str, torch.Tensor]:
    pad = [0] * (width - len(ids))
    row, mask = (
        (ids + pad, [1] * len(ids) + pad) if side == "right" else (pad + ids, pad + [1] * len(ids))
    )
    return {"input_ids": torch.tensor([row]), "attention_mask": torch.tensor([mask])}


POSITION_ARCHS = ["zoo:transformer", "zoo:mamba", "gpt2", "mamba", "hybrid"]


def _backend(spec: str) -> Any:
    return zoo(spec[4:])[2] if spec.startswith("zoo:") else arch(spec).backend


@pytest.mark.parametrize("spec", POSITION_ARCHS)
@pytest.mark.parametrize("positions", [[0], [-1], [0, 2], 1, slice(1, None), slice(None, -1)])
def test_edit_positions_count_real_tokens_on_either_padding_side(spec: str, positions: Any) -> None:
    b = _backend(spec)
    site = b.layer_names()[0]
    ids = [5, 6, 7]
    edit = Edit.add(site, 3.0, positions=positions)
    # reference: the unpadded row, where positions are plainly the columns
    alone = b.run(torch.tensor([ids]), capture=["logits"], edits=[edit]).logits[0]
    unedited = b.run(torch.tensor([ids]), capture=["logits"]).logits[0]
    assert not torch.allclose(alone, unedited)  # the edit does something
    for side in ("left", "right"):
        batch = _padded(ids, 5, side)
        real = batch["attention_mask"][0].bool()
        got = b.run(batch, capture=["logits"], edits=[edit]).logits[0][real]
        assert torch.allclose(got, alone, atol=1e-4), (side, (got - alone).abs().max())


def test_edit_at_position_0_of_a_left_padded_row_edits_its_first_token() -> None:
    # the tour's case: [[0, 0, 5, 6, 7]] with Edit.add(residual, 3, positions=[0]) edited a pad
    _, _, b = zoo("transformer")
    edit = Edit.add("layer_0.residual", 3.0, positions=[0])
    left = b.run(_padded([5, 6, 7], 5, "left"), capture=["layer_0.residual"], edits=[edit])
    clean = b.run(_padded([5, 6, 7], 5, "left"), capture=["layer_0.residual"])
    diff = left["layer_0.residual"][0] - clean["layer_0.residual"][0]
    assert torch.allclose(diff[2], torch.full_like(diff[2], 3.0), atol=1e-5)
    assert bool((diff[:2] == 0).all()) and bool((diff[3:] == 0).all())


@pytest.mark.parametrize("spec", ["zoo:transformer", "zoo:mamba", "zoo:lstm"])
def test_a_position_some_row_lacks_is_refused(spec: str) -> None:
    b = _backend(spec)
    batch = tk(spec[4:], ["the good day is", "a"])
    site = b.layer_names()[0]
    with pytest.raises(SiteError, match=r"positions \[2\] fall on padding in rows \[1\].*real"):
        b.run(batch, capture=["logits"], edits=[Edit.add(site, 1.0, positions=[2])])
    with pytest.raises(SiteError, match=r"positions \[9\] out of range .* length 4"):
        b.run(batch, capture=["logits"], edits=[Edit.add(site, 1.0, positions=[9])])


@pytest.mark.parametrize("value", [-1, 2])
def test_attention_mask_values_other_than_0_and_1_are_refused(any_arch: Any, value: int) -> None:
    ids = torch.tensor([[5, 6, 7]])
    mask = torch.tensor([[1, value, 1]])
    with unchanged(any_arch.model):
        with NoForward(any_arch.model) as ran:
            with pytest.raises(InputError, match=rf"attention_mask must hold 0 and 1.*{value}"):
                any_arch.backend.run({"input_ids": ids, "attention_mask": mask}, capture=["logits"])
        assert ran.calls == 0


@pytest.mark.parametrize(
    "make",
    [
        lambda: Edit.add("layer_0.residual", float("nan")),
        lambda: Edit.scale("layer_0.residual", float("inf")),
        lambda: Edit.replace("layer_0.residual", -math.inf),
        lambda: Edit.add("layer_0.residual", torch.tensor([0.0, float("nan"), 1.0])),
    ],
)
def test_non_finite_edit_values_are_refused(make: Any) -> None:
    with pytest.raises(ArchscopeError, match=r"not finite|non-finite"):
        make()


@pytest.mark.parametrize("name", ["mamba", "lstm"])
def test_non_finite_initial_state_is_refused(name: str) -> None:
    model, _, b = zoo(name)
    ids = tk(name, ["the good"])
    state = b.run(ids, return_state=True).state
    assert state is not None
    site = sorted(state)[0]
    bad = {**state, site: torch.full_like(state[site], float("nan"))}
    b.run(tk(name, [" day"]), initial_state=state)  # a finite state runs
    with NoForward(model) as ran:
        with pytest.raises(InputError, match=rf"initial_state\['{site}'\].*non-finite"):
            b.run(tk(name, [" day"]), initial_state=bad)
    assert ran.calls == 0


def _half(name: str, dtype: torch.dtype) -> Any:
    model = copy.deepcopy(arch(name).model).to(dtype)
    return archscope.Backend.for_model(model)


def test_non_finite_logits_warn() -> None:
    b = _half("gpt2", torch.float16)
    ids = torch.tensor([[5, 6, 7]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a finite run warns nothing
        b.run(ids, capture=["logits"])
    with pytest.warns(RuntimeWarning, match=r"logits hold \d+ non-finite values.*float16"):
        out = b.run(ids, capture=["logits"], edits=[Edit.add("layer_0.residual", 1e6)]).logits
    assert out is not None and not bool(torch.isfinite(out).all())


# -- unclear ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["gpt2", "llama", "mamba", "lstm"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_unembed_casts_a_float32_residual_to_the_model_dtype(name: str, dtype: torch.dtype) -> None:
    b = _half(name, dtype)
    width = b.site_info(b.layer_names()[-1]).dim
    residual = torch.randn(2, 3, width, generator=torch.Generator().manual_seed(0))
    logits = b.unembed(residual)
    assert logits.dtype == dtype or logits.dtype == torch.float32  # some heads upcast
    assert torch.equal(logits, b.unembed(residual.to(dtype)))  # the same as the model's dtype


def test_a_run_that_cannot_fit_in_memory_is_refused_before_it_starts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from archscope import guards

    model, _, b = zoo("transformer")
    monkeypatch.setattr(guards, "available_memory", lambda device: 8 * 2**30)
    ids = torch.full((200_000, 64), 5, dtype=torch.long)
    with NoForward(model) as ran:
        with pytest.raises(InputError) as info:
            b.run(ids, capture=["logits"])
    assert ran.calls == 0
    message = str(info.value)
    assert "200000 rows x 64 tokens" in message and "8.0 GiB of cpu memory is free" in message
    fits = int(message.split("at most about ")[1].split()[0])
    # the advised batch passes the same check, and a much larger one does not
    guards.check_memory(b, {"input_ids": ids[:fits]}, ["logits"], True)
    # the estimate is a lower bound: the logits alone are rows x seq x vocab x 4 bytes
    need = float(message.split("needs at least ")[1].split()[0])
    assert need >= 200_000 * 64 * 307 * 4 / 2**30


def test_small_runs_do_not_read_the_free_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    from archscope import guards

    def refuse(device: Any) -> int:
        raise AssertionError("small runs must not pay for a memory check")

    monkeypatch.setattr(guards, "available_memory", refuse)
    _, _, b = zoo("transformer")
    assert b.run(tk("transformer", ["the good day"]), capture=["logits"]).logits is not None


def test_available_memory_reads_the_kernel() -> None:
    from archscope.guards import available_memory

    free = available_memory(torch.device("cpu"))
    with open("/proc/meminfo") as meminfo:
        total = next(int(line.split()[1]) for line in meminfo if line.startswith("MemTotal"))
    assert free is not None and 0 < free <= total * 1024


def test_editing_logits_in_a_run_that_stops_early_says_how_to_keep_the_full_pass() -> None:
    _, _, b = zoo("transformer")
    ids = tk("transformer", ["the good day"])
    edit = Edit.replace("logits", 0.0)
    with pytest.raises(
        BackendError, match=r"stopped early after 'layer_1.residual'.*stop_early=False"
    ):
        b.run(ids, capture=["layer_1.residual"], edits=[edit])
    full = b.run(ids, capture=["layer_1.residual"], edits=[edit], stop_early=False)
    assert full.logits is not None and bool((full.logits == 0).all())


def test_activation_stats_of_an_attention_pattern() -> None:
    _, _, b = zoo("transformer")
    batch = tk("transformer", ["the good day is", "a bad"])
    stats = archscope.run_method("activation-stats", b, batch, sites=["layer_0.attn_pattern"])
    pattern = b.run(batch, capture=["layer_0.attn_pattern"])["layer_0.attn_pattern"].float()
    vectors = [  # by hand: one vector (heads x keys) per real query token
        pattern[r, :, q, :].flatten()
        for r in range(pattern.shape[0])
        for q in range(pattern.shape[2])
        if batch["attention_mask"][r, q]
    ]
    stacked = torch.stack(vectors)
    (site,) = stats.sites
    assert site.n_vectors == 6
    assert math.isclose(site.mean_norm, float(stacked.norm(dim=-1).mean()), rel_tol=1e-5)
    assert math.isclose(site.variance, float(stacked.var(dim=0).mean()), rel_tol=1e-5)


@pytest.mark.parametrize("method", ["logit-lens", "activation-stats"])
def test_a_dataset_given_to_a_batch_method_is_padded_into_a_batch(method: str) -> None:
    from archscope.data import Dataset

    _, tok, b = zoo("transformer")
    texts = ["the good day is", "a bad"]
    from_dataset = archscope.run_method(method, b, Dataset.from_texts(texts, tokenizer=tok))
    from_batch = archscope.run_method(method, b, tk("transformer", texts))
    assert from_dataset.to_dict() == from_batch.to_dict()


def test_extract_of_no_data_says_it_is_empty(tmp_path: Any) -> None:
    from archscope.apps.store import extract

    _, tok, b = zoo("transformer")
    with pytest.raises(InputError, match=r"empty list: give at least one text"):
        extract(b, [], ["layer_0.residual"], tmp_path / "x", tokenizer=tok)


@pytest.mark.parametrize("name", ["transformer", "lstm"])
def test_attribution_patch_under_no_grad_and_inference_mode(name: str) -> None:
    from archscope.methods.attribute import attribution_patch

    _, _, b = zoo(name)
    # pairs whose top next tokens differ, so the default metric has a gap to attribute
    texts = {
        "transformer": ("the cat is good", "the cat is bad"),
        "lstm": ("the day is", "the night is"),
    }
    clean, corrupted = (tk(name, [t]) for t in texts[name])
    reference = attribution_patch(b, clean, corrupted).attribution
    assert reference is not None
    values = [v for row in reference for v in row if v is not None]
    assert values and all(math.isfinite(v) for v in values) and any(v != 0 for v in values)
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            got = attribution_patch(b, clean, corrupted).attribution
        assert got == reference, mode.__name__


def test_input_ids_on_the_meta_device(any_arch: Any) -> None:
    ids = torch.tensor([[5, 6, 7]], device="meta")
    with pytest.raises(InputError, match=r"input_ids is on the meta device.*torch.tensor"):
        any_arch.backend.run(ids, capture=["logits"])


# -- states and vocabularies the core checks ----------------------------------------------------------
def test_initial_state_with_a_wrong_inner_axis_is_refused() -> None:
    from archscope_mamba.testing import make_model

    model = make_model("mamba2")
    b = archscope.Backend.for_model(model)
    ids = torch.tensor([[5, 6]])
    state = b.run(ids, return_state=True).state
    assert state is not None
    site = next(n for n, v in state.items() if v.dim() == 4)  # (batch, heads, head_dim, d_state)
    shape = list(state[site].shape)
    shape[1] -= 1  # one head too few, every other axis right
    wrong = {**state, site: torch.zeros(shape)}
    assert b.run(torch.tensor([[7]]), initial_state=state).logits is not None
    with NoForward(model) as ran:
        with pytest.raises(SiteError, match=rf"{site}.*heads is {shape[1]}, not {shape[1] + 1}"):
            b.run(torch.tensor([[7]]), initial_state=wrong)
    assert ran.calls == 0


def test_initial_state_axes_are_read_from_the_backends_own_state() -> None:
    # a backend that declares no axis sizes: they come from a one-token run, once
    from archscope.guards import state_sizes

    _, _, b = zoo("lstm")
    sizes = state_sizes(b)
    state = b.run(tk("lstm", ["the good"]), return_state=True).state
    assert state is not None
    assert sizes == {name: tuple(value.shape[1:]) for name, value in state.items()}


def test_plain_module_vocabulary_comes_from_the_embed_site() -> None:
    from archscope_template.model import MinGRULM

    model = MinGRULM(vocab_size=50).eval()
    b = archscope.Backend.for_model(model)
    assert not hasattr(model, "get_input_embeddings") and not hasattr(model, "config")
    assert b.input_limits().vocab_size == 50
    with NoForward(model) as ran:
        with pytest.raises(InputError, match=r"token id 50 is outside the vocabulary of 50"):
            b.run(torch.tensor([[1, 50, 2]]), capture=["logits"])
    assert ran.calls == 0


def test_hinted_backend_that_cannot_build_its_sites_names_those_that_can() -> None:
    model = arch("gpt2").model
    with pytest.raises(BackendError) as info:
        archscope.Backend.for_model(model, hint="mingru")
    message = str(info.value)
    assert "backend 'mingru' cannot serve GPT2LMHeadModel" in message
    assert "Backends that can: transformer" in message


def test_cli_forced_backend_that_cannot_serve_the_model(
    tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from archscope.apps.cli import main

    a = arch("gpt2")
    folder = tmp_path / "m"
    # a copy: save_pretrained writes into the model's config (architectures), and the shared
    # model's config hash must stay what other tests (the store's) expect
    copy.deepcopy(a.model).save_pretrained(folder)
    a.tokenizer.save_pretrained(folder)
    with pytest.raises(SystemExit) as code:
        main(["run", "logit-lens", str(folder), "--arch", "mingru", "--text", "w4 w5"])
    err = capsys.readouterr().err
    assert code.value.code == 1, err
    assert "Traceback" not in err
    assert "'mingru' cannot serve GPT2LMHeadModel" in err and "transformer" in err


def test_edit_positions_of_a_continued_run_count_the_suffix_real_tokens() -> None:
    # a run from initial_state steps through the suffix: -1 is each row's last real token
    _, _, b = zoo("mamba")
    prefix = tk("mamba", ["the good", "the bad"])
    state = b.run(prefix, return_state=True).state
    assert state is not None
    suffixes = ["day is good", "day"]
    suffix = tk("mamba", suffixes)
    edit = Edit.add("layer_0.residual", 2.0, positions=[-1])
    both = b.run(suffix, capture=["logits"], initial_state=state, edits=[edit]).logits
    for row, text in enumerate(suffixes):
        one = {k: v[row : row + 1] for k, v in state.items()}
        alone = b.run(tk("mamba", [text]), capture=["logits"], initial_state=one, edits=[edit])
        real = suffix["attention_mask"][row].bool()
        assert torch.allclose(both[row][real], alone.logits[0], atol=1e-4)
