"""The site vocabulary: the one parser/formatter of site names."""

from __future__ import annotations

import pytest

from archscope import Site, SiteError
from archscope.sites import SiteInfo, resolve


@pytest.mark.parametrize(
    "text",
    [
        "embed",
        "final_norm",
        "logits",
        "layer_0.residual",
        "layer_12.mlp_hidden",
        "layer_3.ssm_state",
        "layer_1.cell",
    ],
)
def test_parse_and_format_round_trip(text):
    assert str(Site.parse(text)) == text
    assert Site.parse(Site.parse(text)) == Site.parse(text)


def test_parsed_fields():
    site = Site.parse("layer_5.residual")
    assert (site.layer, site.role) == (5, "residual")
    assert Site.parse("embed").layer is None


@pytest.mark.parametrize(
    "bad, fragment",
    [
        ("layer_x.residual", "expected 'layer_<i>.<role>'"),
        ("residual", "'residual' is not a model-level site"),
        ("layer_1", "'layer_1' is not a model-level site"),
        ("layer_1.Residual", "expected 'layer_<i>.<role>'"),
        ("", "expected 'layer_<i>.<role>'"),
    ],
)
def test_bad_names_say_what_is_valid(bad, fragment):
    with pytest.raises(SiteError) as err:
        Site.parse(bad)
    assert fragment in str(err.value)
    assert "embed" in str(err.value) or "layer_0" in str(err.value)


def test_non_string_is_rejected():
    with pytest.raises(SiteError, match="got int"):
        Site.parse(3)  # type: ignore[arg-type]


def test_negative_layer_rejected():
    with pytest.raises(SiteError, match=">= 0"):
        Site(role="residual", layer=-1)


def test_resolve_lists_what_the_backend_has():
    table = {
        str(s): SiteInfo(s, "token", ("batch", "seq", "d"), 4)
        for s in (Site("embed"), Site("residual", 0), Site("residual", 1), Site("mlp", 1))
    }
    with pytest.raises(SiteError) as err:
        resolve("layer_2.residual", table, "toy")
    message = str(err.value)
    assert "backend 'toy'" in message and "layers 0..1" in message
    assert "roles mlp, residual" in message and "model-level sites embed" in message
