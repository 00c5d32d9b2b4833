"""The plugin is found through its entry point like any third-party plugin."""

from __future__ import annotations

from importlib.metadata import entry_points


def test_entry_point_is_in_the_archscope_group() -> None:
    found = {ep.name: ep.value for ep in entry_points(group="archscope")}
    assert found.get("graphs") == "archscope_graphs.plugin"


def test_the_shared_types_import_without_torch_side_effects() -> None:
    import archscope_graphs

    assert {"AttributionGraph", "Node", "Transcoder"} <= set(archscope_graphs.__all__)
