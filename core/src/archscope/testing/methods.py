"""The conformance kit for method plugins: `MethodContract` runs a registered method on a toy
backend (or the author's own backends) and checks the Method protocol v2 end to end.

```python
from archscope.testing import MethodContract

class TestMyMethod(MethodContract):
    method_name = "my-method"
```
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

import pytest

from ..engine import HookBackend, Hookpoint, SiteTable
from .untouched import hook_ids


def _fix(message: str) -> None:
    pytest.fail(message, pytrace=False)


def method_data(method: Any, batch: dict[str, Any]) -> Any:
    """Inputs of the kind ``method.input`` made from a token batch: the batch itself, a
    labelled `Dataset` of its rows (labels alternate 0/1), or a `Contrast` of its rows against
    the same rows in reverse order."""
    from ..data import Contrast, as_dataset

    if method.input == "batch":
        return batch
    rows = as_dataset(batch).ids()
    if method.input == "dataset":
        return as_dataset(batch).with_labels([i % 2 for i in range(len(rows))])
    return Contrast(rows, rows[::-1])


def toy_model(
    seed: int = 0, vocab: int = 23, d_model: int = 8, d_mlp: int = 16, n_layers: int = 3
) -> Any:
    """A tiny residual MLP language model (embedding, blocks of mlp(h) added to h, a final
    norm and a head), in eval mode."""
    import torch
    from torch import nn

    class Mlp(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up, self.act, self.down = (
                nn.Linear(d_model, d_mlp),
                nn.GELU(),
                nn.Linear(d_mlp, d_model),
            )

        def forward(self, h: torch.Tensor) -> Any:
            return self.down(self.act(self.up(h)))

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mlp = Mlp()

        def forward(self, h: torch.Tensor) -> Any:
            return h + self.mlp(h)

    class ToyMethodModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.vocab, self.d_model = vocab, d_model
            self.embed = nn.Embedding(vocab, d_model)
            self.blocks = nn.ModuleList(Block() for _ in range(n_layers))
            self.norm = nn.LayerNorm(d_model)
            self.head = nn.Linear(d_model, vocab)

        def forward(self, input_ids: torch.Tensor) -> Any:
            h = self.embed(input_ids)
            for block in self.blocks:
                h = block(h)
            return self.head(self.norm(h))

    torch.manual_seed(seed)
    return ToyMethodModel().eval()


class ToyMethodBackend(HookBackend):
    """The kit's backend for `toy_model` (not registered: the kit builds it directly)."""

    name = "toy-methods"
    description = "residual MLP toy model of the method conformance kit"
    capabilities = frozenset({"residual", "components", "mlp_hidden", "unembed", "logits", "edit"})
    padding = "right"

    def site_table(self) -> SiteTable:
        m = self.model
        d = m.d_model
        table = SiteTable(m)
        table.add("embed", Hookpoint("embed"), dim=d)
        for i, block in enumerate(m.blocks):
            table.add(
                f"layer_{i}.mlp_hidden",
                Hookpoint(f"blocks.{i}.mlp.act"),
                dim=block.mlp.up.out_features,
            )
            table.add(f"layer_{i}.mlp", Hookpoint(f"blocks.{i}.mlp"), dim=d)
            table.add(f"layer_{i}.residual", Hookpoint(f"blocks.{i}"), dim=d)
        table.add("final_norm", Hookpoint("norm"), dim=d)
        table.add("logits", Hookpoint("head"), dim=m.vocab)
        return table

    def unembed(self, residual: Any) -> Any:
        return self.model.head(self.model.norm(residual))


class MethodContract:
    """Inherit in a ``Test*`` class and set ``method_name``; override `make_backends` to run
    the checks on your own backends instead of the kit's toy one."""

    #: The registry name of the method under test.
    method_name: ClassVar[str] = ""
    #: Token batch used by the checks: (rows, tokens).
    batch_shape: ClassVar[tuple[int, int]] = (4, 7)

    def make_backends(self) -> dict[str, Any]:
        """Backends to run the method on (default: the kit's toy backend)."""
        return {"toy": ToyMethodBackend(toy_model())}

    def make_batch(self, backend: Any, seed: int = 0) -> dict[str, Any]:
        """Random token ids, rows of different lengths padded as the backend allows."""
        import torch

        from ..data import pad_batch, padding_for

        rows, seq = self.batch_shape
        vocab = backend.site_info("logits").dim if "logits" in backend.sites() else 20
        gen = torch.Generator().manual_seed(seed)
        ids = [
            torch.randint(1, vocab, (seq - (r % 3),), generator=gen).tolist() for r in range(rows)
        ]
        return pad_batch(ids, padding_for(backend))

    # -- helpers -----------------------------------------------------------------------------
    def _method(self) -> Any:
        from ..plugins import refresh

        entry = refresh().methods.get(self.method_name)
        if entry is None:
            pytest.fail(
                f"no method {self.method_name!r} is registered; register it from a "
                "plugin's register_methods hook (see docs/plugin-authors.md)",
                pytrace=False,
            )
        return entry.obj

    def _run(self, method: Any, backend: Any, **params: Any) -> Any:
        data = method_data(method, self.make_batch(backend))
        return method(*([backend] * method.arity), data, **params)

    # -- the contract ------------------------------------------------------------------------
    def test_parameters_have_a_schema_and_quick_settings_validate(self) -> None:
        method = self._method()
        try:
            method.quick_params()
        except Exception as exc:
            _fix(f"the quick settings of {method.name!r} do not fit its parameters: {exc}")
        for spec in method.params().values():
            if spec.type_name == "any":
                _fix(
                    f"parameter {spec.name!r} of {method.name!r} has no type annotation; "
                    "annotate it (int, float, bool, str, Literal[...], list[...], X | None)"
                )

    def test_runs_end_to_end_and_returns_a_serialisable_result(self) -> None:
        method = self._method()
        for name, backend in self.make_backends().items():
            if not method.supports(set(backend.capabilities)):
                continue
            try:
                result = self._run(method, backend, **method.quick_params())
            except Exception as exc:
                _fix(f"method {method.name!r} failed on {name!r}: {exc!r}")
            for attr in ("to_dict", "to_json", "to_markdown"):
                if not callable(getattr(result, attr, None)):
                    _fix(
                        f"{method.name!r} returned {type(result).__name__} without {attr}(); "
                        "subclass archscope.Result in a dataclass"
                    )
            json.loads(result.to_json())
            if not result.to_markdown().strip():
                _fix(f"{method.name!r}: to_markdown() is empty")

    def test_unknown_parameter_is_refused_with_the_valid_ones(self) -> None:
        from ..errors import ParameterError

        method = self._method()
        backend = next(iter(self.make_backends().values()))
        with pytest.raises(ParameterError, match="its parameters"):
            self._run(method, backend, no_such_parameter_=1)

    def test_missing_capability_raises_capability_error(self) -> None:
        from ..errors import CapabilityError

        method = self._method()
        if not method.requires:
            return
        backend = next(iter(self.make_backends().values()))
        bare = type("NoCapabilities", (type(backend),), {"capabilities": frozenset()})(
            backend.model
        )
        with pytest.raises(CapabilityError):
            self._run(method, bare, **method.quick_params())

    def test_model_weights_mode_and_hooks_unchanged(self) -> None:
        import torch

        method = self._method()
        for _name, backend in self.make_backends().items():
            if not method.supports(set(backend.capabilities)):
                continue
            model = backend.model
            before = {k: v.clone() for k, v in model.state_dict().items()}
            modes = [m.training for m in model.modules()]
            hooks = hook_ids(model)
            self._run(method, backend, **method.quick_params())
            after = model.state_dict()
            if any(not torch.equal(before[k], after[k]) for k in before):
                _fix(f"{method.name!r} changed the model's weights")
            if [m.training for m in model.modules()] != modes:
                _fix(f"{method.name!r} changed the model's train/eval mode")
            if hook_ids(model) != hooks:
                _fix(f"{method.name!r} left hooks on the model")
