"""`BackendContract`: the tests every archscope backend must pass (see `archscope.testing`)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from typing import Any, ClassVar

import pytest

from .batches import HEAVY_MODULES, padded_batch
from .freezing import check_frozen
from .methods import method_data
from .untouched import hook_ids

__all__ = ["BackendContract"]


def _fix(message: str) -> None:
    pytest.fail(message, pytrace=False)


_STATE_ADVICE = (
    "To fix: the backend's forward(ctx) must start the model from ctx.initial_state (site "
    "name -> tensor; pass it to the model as its initial state or cache, and start sites left "
    "out from the model's own initial state), and final_state(ctx, output) (by default the "
    "values of the state sites) must be the state after each row's last real token"
)


def _padding_advice(kind: str, side: str, padding: str) -> str:
    """What to change when a padded row differs from the unpadded sequence."""
    if kind == "state":
        return (
            "A state site holds the state after each row's last real token. If the model's "
            "state outputs are the state after the whole padded row, set the class attribute "
            "regroup_states = True (the core then reads states from rows grouped by length); "
            f"otherwise declare padding={'right' if side == 'left' else 'left'!r} so "
            f"{side}-padded batches are refused"
        )
    return (
        f"The model must give real tokens the same values with {side} padding (pass the "
        "attention_mask it needs in forward(ctx)); if it cannot, declare only the side that is "
        f"exact (padding={'right' if side == 'left' else 'left'!r}, now {padding!r}) and the "
        "core refuses the other"
    )


class BackendContract:
    """Inherit from this class in a ``Test*`` class; fill in the names and factories."""

    #: The registry name of the backend under test (``hint=`` value).
    backend_name: ClassVar[str] = ""
    #: The distribution (pip name) whose entry point registers it.
    distribution: ClassVar[str] = ""
    #: Tolerance for comparisons with independent references.
    atol: ClassVar[float] = 1e-5
    #: Tolerance for ``unembed`` against logits and state patching against a source run.
    logits_atol: ClassVar[float] = 1e-4
    #: Batch used by the checks: (rows, tokens).
    batch_shape: ClassVar[tuple[int, int]] = (2, 6)
    #: Modules that plugin discovery and `can_handle` must not import (add your framework's).
    heavy_modules: ClassVar[tuple[str, ...]] = HEAVY_MODULES

    # -- what an author provides -------------------------------------------------------------
    def make_models(self) -> dict[str, Any]:
        """Small models of your architecture, by name (eval mode, seeded)."""
        raise NotImplementedError(
            f"{type(self).__name__}.make_models() must return {{name: model}} with at least one "
            "small model of the architecture your backend serves"
        )

    def make_foreign_models(self) -> dict[str, Any]:
        """Models of other architectures that your backend must not claim."""
        return {}

    def reference_activations(self, model: Any, batch: dict[str, Any]) -> dict[str, Any]:
        """Site name → value computed WITHOUT archscope (the model's own outputs, your own
        forward hooks, a manual unroll), for as many sites as you can."""
        raise NotImplementedError(
            f"{type(self).__name__}.reference_activations(model, batch) must return "
            "{site: tensor} computed without archscope (e.g. with your own forward hooks), so "
            "the kit can check extraction against an independent reference"
        )

    def vocab_size(self, model: Any) -> int:
        config = getattr(model, "config", None)
        for source in (config, model):
            for attr in ("vocab_size", "n_vocab", "vocab"):
                value = getattr(source, attr, None)
                if isinstance(value, int):
                    return value
        return int(self._backend(model).site_info("logits").dim)

    def make_batch(
        self, model: Any, lengths: list[int] | None = None, side: str = "right", seed: int = 0
    ) -> dict[str, Any]:
        """Random token ids; rows shorter than the longest are padded on ``side``."""
        import torch

        rows, seq = self.batch_shape
        lengths = lengths or [seq] * rows
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(1, self.vocab_size(model), (len(lengths), max(lengths)), generator=gen)
        batch = padded_batch(ids, lengths, side)
        return {k: v.to(self._device(model)) for k, v in batch.items()}

    def model_names(self) -> list[str]:
        """The names of `make_models()`, used to make one test item per (check, model). By
        default the models are built once, when the tests are collected; override this with
        the fixed names when they can only be built inside a fixture."""
        return list(self._models())

    # -- helpers -----------------------------------------------------------------------------
    def _models(self) -> dict[str, Any]:
        cls = type(self)
        models = cls.__dict__.get("_archscope_models")
        if models is None:  # built once per class, shared by every test item of the class
            models = self.make_models()
            if not models:
                _fix(f"{cls.__name__}.make_models() returned no model")
            cls._archscope_models = models  # type: ignore[attr-defined]
        return dict(models)

    def pytest_generate_tests(self, metafunc: Any) -> None:
        # pytest calls this for every test method of the class: one item per model.
        if "model_name" in metafunc.fixturenames:
            metafunc.parametrize("model_name", self.model_names())

    def _backend(self, model: Any) -> Any:
        from archscope import Backend

        return Backend.for_model(model, hint=self.backend_name)

    @staticmethod
    def _device(model: Any) -> Any:
        import torch

        for p in model.parameters():
            return p.device
        return torch.device("cpu")

    def _each(self, check: Callable[[str, Any, Any], None], model_name: str) -> None:
        models = self._models()
        if model_name not in models:
            _fix(
                f"model_names() lists {model_name!r}, but make_models() gives only {sorted(models)}"
            )
        model = models[model_name]
        check(model_name, model, self._backend(model))

    def _manager(self) -> Any:
        from archscope.plugins import refresh

        return refresh()

    # -- the first thing to get right ----------------------------------------------------------
    def test_run_returns_logits(self, model_name: str) -> None:
        from archscope.engine import LOGITS_FORMS

        def check(name: str, model: Any, backend: Any) -> None:
            if "logits" not in backend.capabilities:
                return
            try:
                logits = backend.run(self.make_batch(model)).logits
            except Exception as exc:
                _fix(f"run() on {name!r} failed: {exc!r}")
            import torch

            if not isinstance(logits, torch.Tensor):
                _fix(
                    f"run() on {name!r} returned logits={logits!r}: the model's output must be "
                    f"{', '.join(LOGITS_FORMS)}, or the backend must override logits_of(output)"
                )
            rows, seq = self.make_batch(model)["input_ids"].shape
            if tuple(logits.shape[:2]) != (rows, seq):
                _fix(
                    f"run() on {name!r} returned logits of shape {tuple(logits.shape)}; expected "
                    f"(batch={rows}, seq={seq}, vocab)"
                )

        self._each(check, model_name)

    # -- registration ------------------------------------------------------------------------
    def test_names_are_set(self) -> None:
        if not self.backend_name or not self.distribution:
            _fix(
                f"{type(self).__name__} must set backend_name (the registry name) and "
                "distribution (the pip name of your package)"
            )

    def test_entry_point_is_declared(self) -> None:
        import importlib_metadata

        try:
            dist = importlib_metadata.distribution(self.distribution)
        except importlib_metadata.PackageNotFoundError:
            _fix(
                f"distribution {self.distribution!r} is not installed: pip install -e <your "
                "package folder>"
            )
        eps = [ep for ep in dist.entry_points if ep.group == "archscope"]
        if not eps:
            _fix(
                f"{self.distribution} declares no entry point in the group 'archscope': add\n"
                '[project.entry-points.archscope]\n<name> = "<your_package>.plugin"\n'
                "to its pyproject.toml and reinstall it"
            )

    def test_backend_is_registered_exactly_once(self) -> None:
        manager = self._manager()
        infos = [i for i in manager.plugins.values() if i.distribution == self.distribution]
        failed = [i for i in infos if i.status != "ok"]
        if failed:
            _fix("plugin " + ", ".join(f"{i.name!r} {i.status}: {i.error}" for i in failed))
        registrations = sum(i.registered["backends"].count(self.backend_name) for i in infos)
        entry = manager.backends.get(self.backend_name)
        if entry is None or registrations == 0:
            _fix(
                f"no backend named {self.backend_name!r} was registered by {self.distribution}: "
                "implement register_backends(register) with @archscope.hookimpl in the entry-point "
                "module and call register(YourBackend) (the class's `name` attribute must be "
                f"{self.backend_name!r})"
            )
        if entry.distribution != self.distribution:
            _fix(
                f"the name {self.backend_name!r} is registered by {entry.distribution}, not "
                f"{self.distribution}: choose another name"
            )
        if registrations != 1:
            _fix(f"{self.distribution} registered {self.backend_name!r} {registrations} times")

    # -- detection ---------------------------------------------------------------------------
    def test_can_handle_claims_own_models(self, model_name: str) -> None:
        from archscope import Backend

        entry = self._manager().backends.get(self.backend_name)
        if entry is None:
            _fix(
                f"backend {self.backend_name!r} is not registered (see "
                "test_backend_is_registered_exactly_once)"
            )
        for name, model in [(model_name, self._models()[model_name])]:
            score = entry.obj.can_handle(model)
            if score is None or not 0 < score <= 1:
                _fix(
                    f"{entry.obj.__name__}.can_handle returned {score!r} for your own model "
                    f"{name!r}; it must return a confidence in (0, 1] for models it serves"
                )
            chosen = Backend.for_model(model)
            if chosen.name != self.backend_name:
                _fix(
                    f"Backend.for_model picked {chosen.name!r} for {name!r}, not "
                    f"{self.backend_name!r}: raise your can_handle confidence or priority"
                )

    def test_can_handle_declines_foreign_models_and_arbitrary_objects(self) -> None:
        from torch import nn

        cls = self._manager().backends.get(self.backend_name).obj
        others: dict[str, Any] = {
            "object()": object(),
            "None": None,
            "a string": "model-name",
            "an int": 3,
            "nn.Linear": nn.Linear(2, 2),
            **self.make_foreign_models(),
        }
        for name, obj in others.items():
            try:
                score = cls.can_handle(obj)
            except Exception as exc:
                _fix(
                    f"{cls.__name__}.can_handle raised {exc!r} on {name}: it must never raise; "
                    "return None for models it does not serve"
                )
            if score is not None:
                _fix(
                    f"{cls.__name__}.can_handle returned {score!r} for {name}, which it does "
                    "not serve; return None"
                )

    def test_discovery_and_can_handle_import_nothing_heavy(self) -> None:
        code = (
            "import sys\n"
            "from archscope.plugins import get_manager\n"
            f"entry = get_manager().backends.get({self.backend_name!r})\n"
            "entry.obj.can_handle(object())\n"
            f"print(json.dumps([m for m in {list(self.heavy_modules)!r} if m in sys.modules]))\n"
        )
        proc = subprocess.run(
            [sys.executable, "-c", "import json\n" + code],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if proc.returncode != 0:
            _fix(f"loading the plugins failed in a fresh interpreter:\n{proc.stderr[-2000:]}")
        heavy = json.loads(proc.stdout.strip().splitlines()[-1])
        if heavy:
            _fix(
                f"discovering plugins and calling can_handle imported {heavy}: import them "
                "inside the functions that need them, never at module level of the entry-point "
                "module, the backend module or the package's __init__.py (which Python imports "
                "first); decide in can_handle from type(model).__module__, class names and "
                "attributes"
            )

    # -- sites -------------------------------------------------------------------------------
    def test_site_metadata_matches_real_tensors(self, model_name: str) -> None:
        def check(name: str, model: Any, backend: Any) -> None:
            batch = self.make_batch(model)
            rows, seq = batch["input_ids"].shape
            sites = backend.sites()
            if not sites:
                _fix(f"{type(backend).__name__}.sites() is empty for {name!r}")
            result = backend.run(batch, capture=list(sites), stop_early=False)
            for site, info in sites.items():
                value = result[site]
                if len(info.shape) != value.dim():
                    _fix(
                        f"{site} of {name!r}: SiteInfo.shape names {len(info.shape)} axes "
                        f"{info.shape} but the tensor has shape {tuple(value.shape)}: name one "
                        "axis per tensor axis (SiteTable.add(..., shape=(...))), or give the "
                        "Hookpoint a to_site view that returns the site's tensor"
                    )
                sizes = dict(zip(info.shape, value.shape, strict=True))
                if sizes.get("batch", rows) != rows:
                    _fix(f"{site} of {name!r}: axis 'batch' has size {sizes['batch']}, not {rows}")
                if info.kind == "token" and sizes.get("seq", seq) != seq:
                    _fix(f"{site} of {name!r}: token site axis 'seq' is {sizes['seq']}, not {seq}")
                if info.kind == "token" and "seq" not in info.shape:
                    _fix(f"{site} of {name!r}: a token site must have a 'seq' axis in its shape")
                if info.shape[-1] == "key":  # attention patterns: the last axis is positions
                    if value.shape[-1] != seq:
                        _fix(f"{site} of {name!r}: axis 'key' is {value.shape[-1]}, not {seq}")
                elif value.shape[-1] != info.dim:
                    _fix(
                        f"{site} of {name!r}: SiteInfo.dim is {info.dim} but the last axis is "
                        f"{value.shape[-1]}"
                    )

        self._each(check, model_name)

    def test_seed_api_layer_names_and_hidden_dim(self, model_name: str) -> None:
        def check(name: str, model: Any, backend: Any) -> None:
            names = backend.layer_names()
            if not names:
                _fix(
                    f"layer_names() is empty for {name!r}: set primary_role to your main "
                    "per-layer role"
                )
            records = backend.extract(self.make_batch(model), layers=names[:2])
            for record in records:
                if record.activations.shape[-1] != backend.hidden_dim(record.layer_name):
                    _fix(
                        f"hidden_dim({record.layer_name!r}) disagrees with the extracted tensor: "
                        "SiteInfo.dim must be the size of the site's last axis"
                    )
                if record.attention_mask is None:
                    _fix("ActivationRecord.attention_mask is missing")

        self._each(check, model_name)

    def test_unknown_site_error_lists_valid_sites(self, model_name: str) -> None:
        from archscope import SiteError

        def check(name: str, model: Any, backend: Any) -> None:
            with pytest.raises(SiteError) as err:
                backend.run(self.make_batch(model), capture=["layer_999.residual"])
            if next(iter(backend.sites())) not in str(err.value):
                _fix(f"the error for an unknown site should list valid ones; got: {err.value}")

        self._each(check, model_name)

    def test_extraction_matches_independent_reference(self, model_name: str) -> None:
        import torch

        def check(name: str, model: Any, backend: Any) -> None:
            batch = self.make_batch(model)
            with torch.no_grad():
                reference = self.reference_activations(model, batch)
            if not reference:
                _fix("reference_activations returned nothing: give at least the per-layer sites")
            result = backend.run(batch, capture=list(reference), stop_early=False)
            for site, expected in reference.items():
                got = result[site].float()
                expected = expected.float()
                if got.shape != expected.shape or not torch.allclose(
                    got, expected, atol=self.atol, rtol=0
                ):
                    diff = (
                        (got - expected).abs().max().item()
                        if got.shape == expected.shape
                        else f"shape {tuple(got.shape)} vs {tuple(expected.shape)}"
                    )
                    _fix(f"{site} of {name!r} differs from the independent reference: {diff}")

        self._each(check, model_name)

    # -- running -----------------------------------------------------------------------------
    def test_early_stop_gives_identical_activations(self, model_name: str) -> None:
        import torch

        def check(name: str, model: Any, backend: Any) -> None:
            batch = self.make_batch(model)
            for site in backend.sites():
                early = backend.run(batch, capture=[site])
                full = backend.run(batch, capture=[site], stop_early=False)
                if not torch.equal(early[site], full[site]):
                    _fix(
                        f"{site} of {name!r}: stopping early changed the value: a later module "
                        "changes the captured tensor in place, so capture a copy "
                        "(Hookpoint(..., clone=True))"
                    )
            first = backend.layer_names()[0]
            if backend.run(batch, capture=[first]).logits is not None:
                _fix(
                    f"capturing only {first} of {name!r} still ran the model to the logits: "
                    "stop the forward pass after the deepest captured site (a HookBackend does "
                    "this when its hooks fire; a custom forward(ctx) must let StopForward "
                    "propagate, and a Backend without hooks must check request.stop_early)"
                )

        self._each(check, model_name)

    def test_identity_edit_leaves_logits_bit_identical(self, model_name: str) -> None:
        import torch

        from archscope import Edit

        def check(name: str, model: Any, backend: Any) -> None:
            batch = self.make_batch(model)
            clean = backend.run(batch).logits
            if clean is None:
                _fix(f"run() without captures returned no logits for {name!r}")
            for site, info in backend.sites().items():
                if not info.writable:
                    continue
                out = backend.run(batch, edits=[Edit.apply(site, lambda x: x)]).logits
                if not torch.equal(out, clean):
                    _fix(
                        f"an identity edit of {site} changed the logits of {name!r}: the value "
                        "written back must be exactly the value read (a Hookpoint's from_site "
                        "must undo its to_site, and index must name the element the model "
                        "uses)"
                    )

        self._each(check, model_name)

    def test_an_edit_reaches_the_output(self, model_name: str) -> None:
        import torch

        from archscope import Edit

        def check(name: str, model: Any, backend: Any) -> None:
            batch = self.make_batch(model)
            clean = backend.run(batch).logits
            site = backend.layer_names()[0]
            out = backend.run(batch, edits=[Edit.scale(site, 0.0)]).logits
            if torch.equal(out, clean):
                _fix(
                    f"zeroing {site} of {name!r} did not change the logits: edits are not "
                    "applied. Hook the module whose output the model goes on to use (not a "
                    "copy or a side branch), and return the edited value from the hook's view"
                )

        self._each(check, model_name)

    def test_padding_handled_as_declared(self, model_name: str) -> None:
        import torch

        from archscope import BackendError

        def check(name: str, model: Any, backend: Any) -> None:
            seq = self.batch_shape[1]
            short = seq - 2
            for side in ("right", "left"):
                batch = self.make_batch(model, lengths=[seq, short], side=side)
                supported = backend.padding in (side, "both")
                if not supported:
                    try:
                        backend.run(batch, capture=backend.layer_names()[:1])
                    except (ValueError, BackendError) as err:
                        if "pad" not in str(err):
                            _fix(
                                f"the error for {side}-padded input to {name!r} must mention "
                                f"padding; got: {err}"
                            )
                    else:
                        _fix(
                            f"{side}-padded input to {name!r} ran, but the backend declares "
                            f"padding={backend.padding!r}: declare 'both' if {side} padding is "
                            "exact, or reject it in prepare_inputs with an error that mentions "
                            "padding"
                        )
                    continue
                sites = list(backend.sites())
                padded = backend.run(batch, capture=sites, stop_early=False)
                real = batch["attention_mask"][1].bool()
                alone = {
                    "input_ids": batch["input_ids"][1:, real],
                    "attention_mask": batch["attention_mask"][1:, real],
                }
                single = backend.run(alone, capture=sites, stop_early=False)
                for site, info in backend.sites().items():
                    got = padded[site][1:2]
                    want = single[site]
                    if info.kind == "token":
                        axis = info.shape.index("seq")
                        index = real.nonzero().squeeze(-1)
                        got = got.index_select(axis, index)
                        for extra, ax_name in enumerate(info.shape):
                            if ax_name == "key":  # attention patterns: keys are positions too
                                got = got.index_select(extra, index)
                    if got.shape != want.shape or not torch.allclose(
                        got.float(), want.float(), atol=1e-4, rtol=1e-4
                    ):
                        _fix(
                            f"{site} of {name!r}: {side}-padded row differs from the unpadded "
                            "sequence at real tokens. "
                            + _padding_advice(info.kind, side, backend.padding)
                        )

        self._each(check, model_name)

    def test_hooks_removed_and_model_unchanged_after_a_failing_forward(
        self, model_name: str
    ) -> None:
        import torch

        from archscope import Edit

        def check(name: str, model: Any, backend: Any) -> None:
            batch = self.make_batch(model)
            clean = backend.run(batch).logits
            hooks = hook_ids(model)
            params = {k: v.detach().clone() for k, v in model.state_dict().items()}
            modes = [m.training for m in model.modules()]
            writable = [s for s, i in backend.sites().items() if i.writable]
            target = writable[len(writable) // 2]

            def boom(x: Any) -> Any:
                raise RuntimeError("archscope contract: deliberate failure")

            with pytest.raises(RuntimeError, match="deliberate failure"):
                backend.run(
                    batch, capture=backend.layer_names()[-1:], edits=[Edit.apply(target, boom)]
                )
            if hook_ids(model) != hooks:
                _fix(
                    f"hooks were left on {name!r} after a forward that raised (edit at "
                    f"{target}): remove them in a finally block"
                )
            if [m.training for m in model.modules()] != modes:
                _fix(f"the training/eval mode of {name!r} changed after a run")
            for key, value in model.state_dict().items():
                if not torch.equal(value, params[key]):
                    _fix(f"weight {key} of {name!r} changed after a run")
            if not torch.equal(backend.run(batch).logits, clean):
                _fix(f"a run after the failure gives different logits for {name!r}")

        self._each(check, model_name)

    def test_out_of_vocabulary_id_is_refused(self, model_name: str) -> None:
        from archscope.errors import ArchscopeError

        def check(name: str, model: Any, backend: Any) -> None:
            limits = backend.input_limits()
            vocab = limits.vocab_size if limits.vocab_size is not None else self.vocab_size(model)
            batch = self.make_batch(model)
            batch["input_ids"][0, 1] = vocab
            calls: list[bool] = []
            handle = model.register_forward_pre_hook(lambda m, args: calls.append(True))
            try:
                backend.run(batch, capture=backend.layer_names()[:1])
            except ArchscopeError as exc:
                if calls:
                    _fix(
                        f"token id {vocab} was refused for {name!r} ({exc}), but only after "
                        "the model ran: refuse it in input_limits()/the core's checks before "
                        "the forward pass"
                    )
                return
            except (IndexError, RuntimeError) as exc:
                _fix(
                    f"token id {vocab} (one past the vocabulary of {name!r}) reached the model "
                    f"and raised {type(exc).__name__}: {str(exc)[:120]}. input_limits() reports "
                    f"vocab_size={limits.vocab_size}: override input_limits() to return "
                    "archscope.guards.InputLimits(vocab_size=...), or let the default find the "
                    "vocabulary (get_input_embeddings(), config.vocab_size, or an nn.Embedding "
                    "as the module of the 'embed' site)"
                )
            finally:
                handle.remove()
            _fix(
                f"token id {vocab} ran on {name!r} without an error: if the model really "
                "takes it, return its vocabulary from vocab_size() in your contract class; "
                "otherwise make input_limits() report vocab_size"
            )

        self._each(check, model_name)

    def test_initial_state_with_a_wrong_axis_is_refused(self, model_name: str) -> None:

        def check(name: str, model: Any, backend: Any) -> None:
            if "state_patch" not in backend.capabilities:
                return
            batch = self.make_batch(model)
            state = backend.run(batch, return_state=True, stop_early=False).state or {}
            backend.run(batch, initial_state=state)  # the backend's own state is accepted
            calls: list[bool] = []
            handle = model.register_forward_pre_hook(lambda m, a: calls.append(True))
            try:
                for site, value in state.items():
                    for axis in range(1, value.dim()):
                        calls.clear()
                        self._refuse_wrong_axis(name, backend, batch, state, site, axis, calls)
            finally:
                handle.remove()

        self._each(check, model_name)

    @staticmethod
    def _refuse_wrong_axis(
        name: str, backend: Any, batch: Any, state: Any, site: str, axis: int, calls: list[bool]
    ) -> None:
        from archscope.errors import ArchscopeError

        value = state[site]
        axes = backend.site_info(site).shape
        shape = list(value.shape)
        shape[axis] += 1
        wrong = {**state, site: value.new_zeros(shape)}
        what = (
            f"initial_state[{site!r}] of shape {tuple(shape)} (axis "
            f"{axes[axis] if axis < len(axes) else axis} is {shape[axis]}, the backend's own "
            f"state has {value.shape[axis]}) on {name!r}"
        )
        try:
            backend.run(batch, initial_state=wrong)
        except ArchscopeError as exc:
            if calls or site not in str(exc):
                _fix(
                    f"{what} was refused, but "
                    + ("after the model ran" if calls else "without naming the site")
                    + f": {exc}"
                )
            return
        except Exception as exc:
            _fix(
                f"{what} reached the model and raised {type(exc).__name__}: {str(exc)[:120]}. "
                "Let Backend.run check it (archscope.state_patch.check_initial_state compares "
                "every axis with the state the backend returns): do not override run, and read "
                "the state in forward from ctx.initial_state"
            )
        _fix(f"{what} ran without an error: {_STATE_ADVICE}")

    # -- capabilities ------------------------------------------------------------------------
    def test_claimed_capabilities_have_their_sites(self, model_name: str) -> None:
        import torch

        roles_for = {
            "components": {"attn", "mlp", "mixer"},
            "mlp_hidden": {"mlp_hidden"},
            "attention_patterns": {"attn_pattern"},
            "recurrent_state": {"ssm_state", "conv_state", "hidden", "cell", "state"},
        }

        def check(name: str, model: Any, backend: Any) -> None:
            roles = {info.site.role for info in backend.sites().values()}
            if any(info.kind == "state" for info in backend.sites().values()):
                roles.add("state")  # any state-kind site is a recurrent state
            for capability, needed in roles_for.items():
                if capability in backend.capabilities and not roles & needed:
                    _fix(
                        f"{type(backend).__name__} claims {capability!r} but {name!r} has no "
                        f"site with role {sorted(needed)}"
                    )
            if "attention_patterns" in backend.capabilities:
                sites = [s for s, i in backend.sites().items() if i.site.role == "attn_pattern"]
                pattern = backend.run(self.make_batch(model), capture=sites[:1])[sites[0]]
                if not torch.allclose(pattern.float().sum(-1), torch.ones(()), atol=1e-3):
                    _fix(
                        f"{sites[0]} rows do not sum to 1: capture the attention probabilities "
                        "after the softmax (over the key axis, the last one), not the scores"
                    )

        self._each(check, model_name)

    def test_freezing_is_the_model_at_the_prompt_and_affine_around_it(
        self, model_name: str
    ) -> None:
        """A backend declaring ``freeze``: `check_frozen` on the first row of the test batch
        (the model at the prompt, affine around it, exact slopes, causal, nothing left)."""

        def check(name: str, model: Any, backend: Any) -> None:
            if "freeze" not in backend.capabilities:
                return
            ids = self.make_batch(model)["input_ids"][:1]
            token = min(7, self.vocab_size(model) - 1)
            try:
                check_frozen(backend, ids, token=token, tol=self.logits_atol, nonlinear=False)
            except AssertionError as exc:
                _fix(f"{name!r} declares 'freeze': {exc}")

        self._each(check, model_name)

    def test_unembed_reproduces_logits(self, model_name: str) -> None:
        import torch

        from archscope import BackendError

        def check(name: str, model: Any, backend: Any) -> None:
            batch = self.make_batch(model)
            last = backend.layer_names()[-1]
            if "unembed" not in backend.capabilities:
                with pytest.raises(BackendError):
                    backend.unembed(torch.zeros(1, 1, backend.hidden_dim(last)))
                return
            result = backend.run(batch, capture=[last, "logits"])
            logits = backend.unembed(result[last])
            if not torch.allclose(
                logits.float(), result.logits.float(), atol=self.logits_atol, rtol=0
            ):
                _fix(
                    f"unembed({last}) of {name!r} differs from the logits by "
                    f"{(logits.float() - result.logits.float()).abs().max().item():.3g}: apply "
                    "the model's own final norm and head"
                )

        self._each(check, model_name)

    def test_state_patch_reproduces_the_source_run(self, model_name: str) -> None:
        import torch

        def check(name: str, model: Any, backend: Any) -> None:
            if "state_patch" not in backend.capabilities:
                return
            a = self.make_batch(model, lengths=[4, 4], seed=1)
            b = self.make_batch(model, lengths=[4, 4], seed=2)
            suffix = self.make_batch(model, lengths=[3, 3], seed=3)
            patched = backend.state_patch(a, b, suffix)
            joined = {
                k: torch.cat([b[k], suffix[k]], dim=1) for k in ("input_ids", "attention_mask")
            }
            reference = backend.run(joined).logits[:, 4:]
            if not torch.allclose(
                patched.logits.float(), reference.float(), atol=self.logits_atol, rtol=0
            ):
                _fix(
                    f"state_patch on {name!r}: continuing prefix A with prefix B's state does "
                    f"not reproduce running B + suffix (max diff "
                    f"{(patched.logits.float() - reference.float()).abs().max().item():.3g}). "
                    + _STATE_ADVICE
                )
            unpatched = backend.state_patch(a, a, suffix)
            own = backend.run(
                {k: torch.cat([a[k], suffix[k]], 1) for k in ("input_ids", "attention_mask")}
            )
            if not torch.allclose(
                unpatched.logits.float(), own.logits[:, 4:].float(), atol=self.logits_atol, rtol=0
            ):
                _fix(
                    f"state_patch on {name!r} with its own state does not reproduce the plain "
                    "run. " + _STATE_ADVICE
                )

        self._each(check, model_name)

    def test_registered_methods_run_end_to_end(self, model_name: str) -> None:
        manager = self._manager()

        def check(name: str, model: Any, backend: Any) -> None:
            batch = self.make_batch(model)
            for entry in manager.methods:
                method = entry.obj
                if not method.supports(set(backend.capabilities)):
                    continue
                try:
                    result = method(
                        *[backend] * method.arity,
                        method_data(method, batch),
                        **method.quick_params(),
                    )
                except Exception as exc:
                    _fix(
                        f"method {method.name!r} ({entry.distribution}) failed on {name!r}, "
                        f"whose backend claims {sorted(method.requires)}: {exc!r}"
                    )
                for attr in ("to_dict", "to_markdown"):
                    if not callable(getattr(result, attr, None)):
                        _fix(
                            f"method {method.name!r} returned {type(result).__name__} without "
                            f"{attr}()"
                        )
                json.dumps(result.to_dict())

        self._each(check, model_name)

    # -- tokenizers: the one contract of docs/plugin-authors.md ---------------------------------
    def make_tokenizer(self, model: Any) -> Any:
        """The tokenizer your model source returns for ``model``, or None: then the kit uses
        `archscope.testing.tokenizers.ByteTokenizer`, which follows only the guide's call."""
        return None

    def _tokenizer(self, model: Any) -> Any:
        from .tokenizers import ByteTokenizer

        tokenizer = self.make_tokenizer(model)
        return tokenizer if tokenizer is not None else ByteTokenizer(self.vocab_size(model))

    def test_tokenizer_following_the_guide_works_with_lens_and_methods(
        self, model_name: str
    ) -> None:
        import warnings

        from archscope import run_method
        from archscope.methods.lens import logit_lens
        from archscope.tokens import contract_problems, encode_one

        def check(name: str, model: Any, backend: Any) -> None:
            tokenizer = self._tokenizer(model)
            problems = contract_problems(tokenizer)
            if problems:
                _fix(
                    f"the tokenizer of {name!r} ({type(tokenizer).__name__}) does not follow the "
                    'contract of docs/plugin-authors.md, tok(texts, return_tensors="pt", '
                    "padding=True) -> input_ids and attention_mask: " + "; ".join(problems)
                )
            caps = set(backend.capabilities)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # unknown words are fine here
                try:
                    if {"unembed", "logits"} <= caps:
                        prompt = "the cat sat on the mat"
                        target = encode_one(tokenizer, prompt)[-1]
                        logit_lens(backend, tokenizer, prompt, target_token=target, top_k=2)
                    if "residual" in caps:
                        run_method(
                            "activation-stats",
                            backend,
                            ["the cat sat", "a dog"],
                            tokenizer=tokenizer,
                        )
                except Exception as exc:
                    _fix(
                        f"with the tokenizer of {name!r} ({type(tokenizer).__name__}), the logit "
                        f"lens or a method on texts failed: {exc!r}. archscope calls a tokenizer "
                        "only through archscope.tokens (the guide's batched call)"
                    )

        self._each(check, model_name)

    def test_profile_names_contrast_pairs_of_unequal_token_lengths(self, model_name: str) -> None:
        import warnings

        from archscope.apps.bench import generic_tasks, profile_backend
        from archscope.data import Contrast

        from .tokenizers import ByteTokenizer

        if model_name != self.model_names()[0]:
            return  # one profile per backend is enough

        def check(name: str, model: Any, backend: Any) -> None:
            tokenizer = ByteTokenizer(self.vocab_size(model))
            tasks = generic_tasks(tokenizer, n=8)
            # equal words, unequal bytes: the second pair tokenises to 6 and 7 tokens
            tasks.contrast = Contrast(
                ["it was good", "it is so"], ["it was bad!", "it is sad"], tokenizer=tokenizer
            )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    profile = profile_backend(
                        backend, tokenizer, name=name, tasks=tasks, quick=True
                    )
                except Exception as exc:
                    _fix(
                        f"profile_backend (archscope bench) on {name!r} with a byte-level "
                        f"tokenizer failed: {exc!r}; a part that cannot run must be named in "
                        "the profile's notes"
                    )
            if {"edit", "logits"} <= set(backend.capabilities) and not any(
                "different lengths" in note for note in profile.notes
            ):
                _fix(
                    f"the profile of {name!r} does not name the contrast pair of unequal token "
                    f"lengths in its notes (notes: {profile.notes})"
                )

        self._each(check, model_name)
