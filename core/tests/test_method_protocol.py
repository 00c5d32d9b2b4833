"""Method protocol v2: the parameter schema read from a signature, validation messages,
input kinds and arity, run_method, and missing capabilities."""

from __future__ import annotations

from typing import Annotated, Literal

import pytest

from archscope import Method, Param
from archscope.data import Contrast, Dataset
from archscope.errors import CapabilityError, MethodError, ParameterError
from archscope.registry import run_method


def toy_method(
    backend: object,
    data: object,
    *,
    layer: Annotated[int, Param(min=0, max=8, help="which layer")] = 1,
    pool: Literal["mean", "last"] = "mean",
    scale: float = 1.0,
    sites: list[str] | None = None,
    flag: bool = False,
    position: int | Literal["last"] = "last",
) -> dict:
    return {
        "data": data,
        "layer": layer,
        "pool": pool,
        "scale": scale,
        "sites": sites,
        "flag": flag,
        "position": position,
    }


class FakeBackend:
    name = "fake"
    capabilities = frozenset({"residual"})


METHOD = Method("toy", "a toy", toy_method, requires={"residual"})


def test_schema_lists_types_defaults_help_and_bounds() -> None:
    specs = METHOD.params()
    assert list(specs) == ["layer", "pool", "scale", "sites", "flag", "position"]
    assert specs["layer"].describe() == "layer: int = 1 [>= 0, <= 8] — which layer"
    assert specs["pool"].type_name == "{'mean', 'last'}"
    assert specs["sites"].type_name == "list[str] | None"


@pytest.mark.parametrize(
    ("name", "text", "value"),
    [
        ("layer", "3", 3),
        ("pool", "last", "last"),
        ("scale", "0.5", 0.5),
        ("sites", "layer_0.residual,layer_1.residual", ["layer_0.residual", "layer_1.residual"]),
        ("sites", "none", None),
        ("flag", "true", True),
        ("position", "4", 4),
        ("position", "last", "last"),
    ],
)
def test_command_line_values_are_parsed_by_type(name: str, text: str, value: object) -> None:
    assert METHOD.params()[name].parse(text) == value


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"layr": 1}, "has no parameter 'layr'; its parameters: layer: int = 1"),
        ({"layer": 9}, "'layer' must be <= 8, got 9"),
        ({"layer": "two"}, "'layer' expects int"),
        ({"pool": "max"}, "choose one of 'mean', 'last'"),
        ({"flag": "yes"}, "'flag' expects bool"),
    ],
)
def test_bad_parameters_are_refused_with_the_valid_ones(values: dict, message: str) -> None:
    with pytest.raises(ParameterError, match=message.replace("[", r"\[")):
        METHOD(FakeBackend(), [[1, 2]], **values)


def test_unparsable_command_line_value() -> None:
    with pytest.raises(ParameterError, match="expects int"):
        METHOD.params()["layer"].parse("x")


def test_call_validates_and_passes_defaults_through_the_function() -> None:
    out = METHOD(FakeBackend(), [[1, 2]], layer=2)
    assert out["layer"] == 2 and out["pool"] == "mean"


def test_missing_capability_is_the_same_error_everywhere() -> None:
    method = Method("needs", "x", toy_method, requires={"unembed"})
    with pytest.raises(CapabilityError, match="lacks \\['unembed'\\]"):
        method(FakeBackend(), [[1]])


def test_input_kinds_are_normalised() -> None:
    dataset = Method("d", "x", toy_method, input="dataset")(FakeBackend(), [[1, 2], [3]])
    assert isinstance(dataset["data"], Dataset) and dataset["data"].ids() == [[1, 2], [3]]
    contrast = Method("c", "x", toy_method, input="contrast")(FakeBackend(), ([[1]], [[2]]))
    assert isinstance(contrast["data"], Contrast)


def test_arity_two_takes_two_backends() -> None:
    def two(a: object, b: object, data: object, *, k: int = 1) -> tuple:
        return a, b, data, k

    method = Method("two", "x", two, arity=2)
    a, b = FakeBackend(), FakeBackend()
    assert method(a, b, "d", k=3) == (a, b, "d", 3)
    with pytest.raises(ParameterError, match="method\\(backend_a, backend_b, data"):
        method(a, "d")


def test_registration_checks_input_and_arity() -> None:
    with pytest.raises(ParameterError, match="input must be one of batch, dataset, contrast"):
        Method("bad", "x", toy_method, input="text")  # type: ignore[arg-type]
    with pytest.raises(ParameterError, match="arity"):
        Method("bad", "x", toy_method, arity=3)


def test_run_method_by_name(with_plugins: object) -> None:
    from archscope import Backend
    from archscope_testplugin_good.backend import build_toy

    backend = Backend.for_model(build_toy())
    result = run_method("activation-stats", backend, [[1, 2, 3]], sites=["layer_0.residual"])
    assert result.sites[0].site == "layer_0.residual"
    with pytest.raises(MethodError, match="no method named 'nope'; registered methods: "):
        run_method("nope", backend, [[1]])


def test_a_bad_parameter_is_named_before_a_missing_capability() -> None:
    method = Method("needs", "x", toy_method, requires={"unembed"})
    with pytest.raises(ParameterError, match="has no parameter 'layr'"):
        method(FakeBackend(), [[1]], layr=1)
