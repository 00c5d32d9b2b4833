"""Backend.for_model, hints, in-process registration, model sources and the info matrix."""

from __future__ import annotations

import json
import warnings

import pytest

import archscope
from archscope import Backend, CapabilityError, NoBackendError
from archscope.loader import ModelSourceError, load_model, make_tokenize_fn


def test_detects_the_plugin_backend_without_a_hint(with_plugins):
    from archscope_testplugin_good.backend import build_toy

    backend = Backend.for_model(build_toy())
    assert backend.name == "toy"
    assert type(backend).__module__.startswith("archscope_testplugin_")


def test_hint_and_alias_select_a_backend(with_plugins):
    from archscope_testplugin_good.backend import build_toy

    assert Backend.for_model(build_toy(), hint="toy-alias").name == "toy"


def test_unknown_hint_lists_registered_names(with_plugins):
    with pytest.raises(NoBackendError) as err:
        Backend.for_model(object(), hint="nope")
    message = str(err.value)
    assert "unknown backend hint 'nope'" in message
    assert "registered backends: " in message and "toy" in message
    assert "toy-alias->toy" in message


def test_no_match_names_class_module_installed_backends_and_package(with_plugins):
    class Opaque:
        pass

    with pytest.raises(NoBackendError) as err:
        Backend.for_model(Opaque())
    message = str(err.value)
    assert "Opaque" in message and __name__ in message
    assert "toy (archscope-testplugin-" in message
    assert "docs/plugin-authors.md" in message


def test_no_match_suggests_the_package_that_serves_the_family(monkeypatch):
    import archscope.plugins as plugins

    monkeypatch.setenv("ARCHSCOPE_PLUGINS", "none-at-all")
    plugins.refresh()
    try:
        FakeMamba = type(
            "MambaForCausalLM", (), {"__module__": "transformers.models.mamba.modeling_mamba"}
        )
        with pytest.raises(
            NoBackendError, match=r"install archscope-mamba \(pip install archscope-mamba\)"
        ):
            Backend.for_model(FakeMamba())
        FakeGPT = type(
            "GPT2LMHeadModel", (), {"__module__": "transformers.models.gpt2.modeling_gpt2"}
        )
        with pytest.raises(NoBackendError, match="install archscope-transformer"):
            Backend.for_model(FakeGPT())
    finally:
        monkeypatch.delenv("ARCHSCOPE_PLUGINS")
        plugins.refresh()


def test_in_process_registration_and_ties(with_plugins):
    from archscope_testplugin_good.backend import ToyBackend, build_toy

    @Backend.register("toy-twin")
    class TwinBackend(ToyBackend):
        name = "toy-twin"

        @classmethod
        def can_handle(cls, model):
            return 0.9 if type(model).__name__ == "ToyModel" else None

    try:
        assert "toy-twin" in Backend.registered()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            chosen = Backend.for_model(build_toy())
        # Equal confidence and priority: the name decides, and the user is told.
        assert chosen.name == "toy"
        assert any(
            "equally confident" in str(w.message) and "toy-twin" in str(w.message) for w in caught
        )
        TwinBackend.priority = 5
        assert Backend.for_model(build_toy()).name == "toy-twin"
    finally:
        archscope.plugins._manager._in_process.clear()
        archscope.plugins.refresh()


def test_can_handle_that_raises_is_ignored_with_a_warning(with_plugins):
    from archscope_testplugin_good.backend import ToyBackend, build_toy

    @Backend.register("explodes")
    class Explodes(ToyBackend):
        @classmethod
        def can_handle(cls, model):
            raise RuntimeError("bad detector")

    try:
        with pytest.warns(UserWarning, match="explodes.can_handle raised"):
            assert Backend.for_model(build_toy()).name == "toy"
    finally:
        archscope.plugins._manager._in_process.clear()
        archscope.plugins.refresh()


def test_register_rejects_non_backends():
    with pytest.raises(TypeError, match="expects a Backend subclass"):
        Backend.register("x")(int)  # type: ignore[arg-type]


def test_old_per_family_class_names_resolve_through_plugins(with_plugins):
    from archscope import backends

    assert backends.ToyBackend.name == "toy"
    with pytest.raises(AttributeError, match="no installed plugin registers a backend class"):
        backends.NoSuchBackend  # noqa: B018


def test_load_model_through_a_plugin_source(with_plugins):
    model, tokenizer, backend = load_model("toy:3")
    assert type(model).__name__ == "ToyModel" and tokenizer is None and backend.name == "toy"
    model2, _, _ = load_model("toy-seed-3")  # a bare spec the source claims
    assert type(model2).__name__ == "ToyModel"


def test_load_model_dtype_by_name(with_plugins):
    import torch

    model, _, _ = load_model("toy:1", dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    with pytest.raises(ModelSourceError, match="unknown dtype 'float33'"):
        load_model("toy:1", dtype="float33")


def test_load_model_errors_list_sources(with_plugins):
    with pytest.raises(ModelSourceError) as err:
        load_model("nosuch:thing")
    assert "no model source is registered for prefix 'nosuch'" in str(err.value)
    assert "toy: (archscope-testplugin-good)" in str(err.value)
    with pytest.raises(ModelSourceError, match="no model source claims 'plainname'"):
        load_model("plainname")
    with pytest.raises(ModelSourceError, match="non-empty string"):
        load_model("")


class _WordTokenizer:
    """A minimal tokenizer with the call signature of Hugging Face tokenizers."""

    pad_token = None
    eos_token = "<eos>"

    def __call__(
        self, texts, return_tensors=None, padding=False, truncation=False, max_length=None
    ):
        import torch

        ids = [[len(w) for w in t.split()][: max_length if truncation else None] for t in texts]
        if return_tensors is None:
            return {"input_ids": ids}
        width = max(map(len, ids))
        return {
            "input_ids": torch.tensor([r + [0] * (width - len(r)) for r in ids]),
            "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in ids]),
        }


def test_make_tokenize_fn_pads_truncates_and_sets_a_pad_token():
    tokenizer = _WordTokenizer()
    tokenize = make_tokenize_fn(tokenizer, max_length=3)
    assert tokenizer.pad_token == "<eos>"
    with pytest.warns(UserWarning, match="1 of 2 texts are longer than max_length=3 tokens"):
        batch = tokenize(["a bb ccc dddd", "ee"])
    assert batch["input_ids"].tolist() == [[1, 2, 3], [2, 0, 0]]
    whole = make_tokenize_fn(tokenizer)(["a bb ccc dddd", "ee"])  # no silent cut by default
    assert whole["input_ids"].tolist() == [[1, 2, 3, 4], [2, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert (
        make_tokenize_fn(tokenizer, attention_mask_bool=True)("a")[
            "attention_mask"
        ].dtype.is_floating_point
        is False
    )
    with pytest.raises(ValueError, match="needs a tokenizer"):
        make_tokenize_fn(None)


def test_info_matrix_comes_from_capabilities(with_plugins, run_cli, plugin_site):
    proc = run_cli("info", "--json", site=plugin_site)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    toy = next(b for b in data["backends"] if b["name"] == "toy")
    assert set(toy["capabilities"]) >= {"residual", "unembed"}
    assert data["matrix"]["logit-lens"]["toy"] is True
    assert data["matrix"]["needs-state"]["toy"] is False
    assert any(s["name"] == "toy" for s in data["sources"])


def test_info_table_and_version(run_cli, plugin_site):
    proc = run_cli("info", site=plugin_site, env={"COLUMNS": "300"})
    assert proc.returncode == 0, proc.stderr
    assert "methods x backends" in proc.stdout and "toy-norms" in proc.stdout
    version = run_cli("--version")
    assert version.returncode == 0 and archscope.__version__ in version.stdout


def test_run_command_runs_a_method_on_a_loaded_model(run_cli, plugin_site):
    proc = run_cli("run", "activation-stats", "toy:0", "--text", "x", site=plugin_site)
    assert proc.returncode != 0
    assert "loaded without a tokenizer" in proc.stderr  # the toy source has none
    assert "Traceback" not in proc.stderr
    proc = run_cli("run", "nosuch", "toy:0", "--text", "x", site=plugin_site)
    assert proc.returncode != 0 and "unknown method 'nosuch'" in proc.stderr


def test_method_refuses_a_backend_without_its_capabilities(with_plugins):
    from archscope_testplugin_good.backend import build_toy

    backend = Backend.for_model(build_toy())
    method = with_plugins.methods.get("needs-state").obj
    with pytest.raises(CapabilityError, match=r"lacks \['state_patch'\]"):
        method(backend, [[1, 2, 3]])
    result = with_plugins.methods.get("logit-lens").obj(backend, [[1, 2, 3]], top_k=2)
    assert len(result.layers) == 3 and json.loads(result.to_json())["backend"] == "toy"
    assert "Logit lens" in result.to_markdown()
