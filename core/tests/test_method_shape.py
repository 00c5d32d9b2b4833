"""One shape per method: every built-in method is a function in `archscope.methods` declared by
the `method` decorator beside its code, with one parameter schema; the configuration classes
kept from 0.2 take their defaults from that schema."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Annotated, Literal

import pytest

from archscope import Param
from archscope.errors import ParameterError
from archscope.methods import builtin_methods
from archscope.plugins import get_manager
from archscope.registry import Method, method


def test_every_builtin_method_is_declared_beside_its_function() -> None:
    found = builtin_methods()
    registered = {
        e.name: e.obj for e in get_manager().methods.entries() if e.distribution == "archscope"
    }
    assert {m.name for m in found} <= set(registered)
    assert len(found) == len({m.name for m in found}) == 16
    for m in found:
        assert callable(m.function), m.name
        module = inspect.getmodule(m.function)
        assert module is not None and module.__name__.startswith("archscope.methods."), m.name
        # the Method object sits in its module under the function's own name
        assert getattr(module, m.function.__name__) is m, m.name


def test_probe_and_probe_sweep_share_one_schema() -> None:
    from archscope.methods.probes import ProbeConfig, ProbeOptions, probe_method, probe_sweep

    shared = [f.name for f in dataclasses.fields(ProbeOptions)]
    assert len(shared) == 10
    assert list(probe_method.params()) == [*shared, "site"]
    assert list(probe_sweep.params()) == [*shared, "sites"]
    for name in ("probe_type", "hidden_dim", "pool", "weight_decay", "seed", "solver"):
        spec = probe_method.params()[name]
        assert getattr(ProbeConfig(), name) == spec.default == probe_sweep.params()[name].default


def test_config_classes_take_the_method_defaults() -> None:
    from archscope.methods.neurons import NeuronEditConfig, neurons_method
    from archscope.methods.sae import SAEConfig, sae_method

    assert NeuronEditConfig().top_frac == neurons_method.params()["top_frac"].default == 0.01
    config = SAEConfig(input_dim=4, n_features=8)
    params = sae_method.params()
    for name in ("sparsity", "batch_size", "learning_rate", "k", "seed"):
        assert getattr(config, name) == params[name].default, name
    assert (config.sparsity, config.batch_size) == (0.1, 4096)
    assert config.sae_type == "dense"  # 0.2's build_sae(SAEConfig(d, n)) is a DenseSAE


@dataclasses.dataclass
class ToyOptions:
    layer: Annotated[int, Param(min=0, max=8, help="which layer")] = 1
    pool: Literal["mean", "last"] = "mean"
    sites: list[str] | None = None


@method("toy-options", "a method with an options dataclass", options=ToyOptions)
def toy(backend: object, data: object, options: ToyOptions) -> tuple[object, ToyOptions]:
    return data, options


class FakeBackend:
    name = "fake"
    capabilities = frozenset({"residual"})


def test_options_dataclass_is_the_schema_and_arrives_validated() -> None:
    assert isinstance(toy, Method) and toy.name == "toy-options"
    assert list(toy.params()) == ["layer", "pool", "sites"]
    assert toy.params()["layer"].help == "which layer"
    _, options = toy(FakeBackend(), [[1, 2]], layer=3.0, sites=["a"])
    assert options == ToyOptions(layer=3, pool="mean", sites=["a"])
    assert isinstance(options.layer, int)
    with pytest.raises(ParameterError, match=r"no parameter 'layerz'.*layer: int = 1"):
        toy(FakeBackend(), [[1]], pool="max", layerz=1)
    with pytest.raises(ParameterError, match="must be <= 8"):
        toy(FakeBackend(), [[1]], layer=9)


def test_one_dotted_attribute_walk_for_references() -> None:
    from archscope.modules import find_attribute

    class Boom:
        @property
        def bad(self) -> int:
            raise RuntimeError("no")

    assert find_attribute(dataclasses, "fields.__name__") == "fields"
    assert find_attribute(Boom(), "bad") is None and find_attribute(Boom(), "nope.x") is None
    lazy = Method("m", "s", "archscope.methods.stats:activation_stats.function")
    assert lazy.resolve().__name__ == "activation_stats"
    with pytest.raises(ParameterError, match="has no attribute 'nope'"):
        Method("m", "s", "archscope.methods.stats:nope").resolve()
