"""The plugin system against real installed distributions (pip-installed test plugins)."""

from __future__ import annotations

import json
import warnings

import pytest

import archscope
from archscope.plugins import PluginError, PluginWarning


def _plugins_json(run_cli, site, env=None):
    proc = run_cli("plugins", "--json", site=site, env=env)
    assert proc.returncode == 0, proc.stderr
    return {p["name"]: p for p in json.loads(proc.stdout)}, proc.stderr


def test_plugins_command_lists_installed_distributions_with_versions(run_cli, plugin_site):
    plugins, _ = _plugins_json(run_cli, plugin_site)
    good = plugins["good"]
    assert good["distribution"] == "archscope-testplugin-good"
    assert good["version"] == "1.2.3"
    assert good["status"] == "ok"
    assert good["registered"]["sources"] == ["toy"]
    assert "toy-norms" in good["registered"]["methods"]
    assert good["registered"]["commands"] == ["toy-hello"]
    assert plugins["archscope"]["registered"]["methods"]  # built-ins register like any plugin
    import importlib_metadata

    installed = {
        ep.dist.name: ep.dist.version for ep in importlib_metadata.entry_points(group="archscope")
    }
    listed = {p["distribution"]: p["version"] for p in plugins.values()}
    for distribution, version in installed.items():
        assert listed[distribution] == version


def test_broken_plugins_are_reported_failed_and_the_rest_works(run_cli, plugin_site):
    plugins, stderr = _plugins_json(run_cli, plugin_site)
    on_import = plugins["broken-import"]
    assert on_import["status"] == "failed"
    assert "ImportError" in on_import["error"] and "broken on purpose" in on_import["error"]
    on_register = plugins["broken-register"]
    assert on_register["status"] == "failed"
    assert "registration failed on purpose" in on_register["error"]
    # One warning line each, naming distribution, version and error.
    lines = [ln for ln in stderr.splitlines() if "broken-import" in ln and "disabled" in ln]
    assert len(lines) == 1
    assert "archscope-testplugin-broken 0.0.1" in lines[0]
    assert plugins["good"]["status"] == "ok"


def test_plugins_table_shows_failed_plugin_and_exits_zero(run_cli, plugin_site):
    proc = run_cli("plugins", site=plugin_site, env={"COLUMNS": "400"})
    assert proc.returncode == 0, proc.stderr
    assert "failed" in proc.stdout and "archscope-testplugin-broken" in proc.stdout
    assert "archscope-testplugin-good" in proc.stdout and "1.2.3" in proc.stdout


def test_half_registered_plugin_leaves_nothing_behind(with_plugins):
    assert with_plugins.methods.get("half-registered") is None


def test_strict_mode_reraises_plugin_errors(run_cli, plugin_site):
    proc = run_cli("plugins", site=plugin_site, env={"ARCHSCOPE_STRICT_PLUGINS": "1"})
    assert proc.returncode != 0
    assert "PluginError" in proc.stderr and "on purpose" in proc.stderr


def test_strict_mode_in_process(with_plugins, monkeypatch):
    monkeypatch.setenv("ARCHSCOPE_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match="archscope-testplugin-broken 0.0.1"):
        archscope.plugins.refresh()


def test_only_env_var_loads_named_plugins(run_cli, plugin_site):
    plugins, stderr = _plugins_json(run_cli, plugin_site, env={"ARCHSCOPE_PLUGINS": "good"})
    assert plugins["good"]["status"] == "ok"
    assert plugins["broken-import"]["status"] == "disabled"
    assert plugins["transformer"]["status"] == "disabled"
    assert plugins["archscope"]["status"] == "ok"  # the core's built-ins always load
    assert "broken on purpose" not in stderr


def test_only_env_var_accepts_distribution_names(run_cli, plugin_site):
    plugins, _ = _plugins_json(
        run_cli, plugin_site, env={"ARCHSCOPE_PLUGINS": "archscope-testplugin-broken"}
    )
    assert plugins["broken-register"]["status"] == "failed"
    assert plugins["good"]["status"] == "disabled"


def test_disable_env_var_skips_named_plugins(run_cli, plugin_site):
    plugins, stderr = _plugins_json(
        run_cli,
        plugin_site,
        env={"ARCHSCOPE_DISABLE_PLUGINS": "archscope-testplugin-broken, conflict"},
    )
    assert plugins["broken-import"]["status"] == "disabled"
    assert plugins["broken-register"]["status"] == "disabled"
    assert plugins["conflict"]["status"] == "disabled"
    assert plugins["good"]["status"] == "ok"
    assert "disabled:" not in stderr


def test_conflicting_names_warn_with_both_distributions(with_all_plugins):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        manager = archscope.plugins.refresh()
    messages = [str(w.message) for w in caught if issubclass(w.category, PluginWarning)]
    toy = [m for m in messages if "'toy'" in m]
    assert (
        toy and "archscope-testplugin-good" in toy[0] and "archscope-testplugin-conflict" in toy[0]
    )
    # Deterministic winner between third parties: the alphabetically first distribution.
    assert manager.backends.get("toy").distribution == "archscope-testplugin-conflict"


def test_first_party_name_needs_explicit_replace(with_all_plugins):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        manager = archscope.plugins.refresh()
    lens = manager.methods.get("logit-lens")
    assert lens.distribution == "archscope" and lens.obj.summary != "impostor"
    warning = next(str(w.message) for w in caught if "'logit-lens'" in str(w.message))
    assert "archscope-testplugin-conflict" in warning and "replace=True" in warning
    stats = manager.methods.get("activation-stats")
    assert stats.distribution == "archscope-testplugin-conflict"
    assert stats.obj.summary == "replacement"


def test_discovery_is_lazy_cached_and_refreshable(plugin_site, monkeypatch):
    manager = archscope.plugins.get_manager()
    assert manager.backends.get("toy") is None
    assert archscope.plugins.get_manager() is manager  # cached: same object, no rediscovery
    monkeypatch.syspath_prepend(str(plugin_site))
    assert archscope.plugins.get_manager().backends.get("toy") is None
    try:
        assert archscope.plugins.refresh().backends.get("toy") is not None
    finally:
        monkeypatch.undo()
        archscope.plugins.refresh()


def test_plugin_commands_are_added_to_the_cli(run_cli, plugin_site):
    proc = run_cli("toy-hello", site=plugin_site)
    assert proc.returncode == 0, proc.stderr
    assert "hello from the toy plugin" in proc.stdout


def test_plugins_and_help_do_not_import_torch_or_transformers(run_cli, plugin_site):
    code = (
        "import sys\n"
        "from archscope.apps.cli import main\n"
        "for args in (['plugins'], ['plugins', '--json'], ['--help'], ['info', '--json']):\n"
        "    try:\n"
        "        main(args)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print('HEAVY', sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    proc = run_cli(code=code, site=plugin_site)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout


def test_import_archscope_needs_only_the_core(run_cli):
    proc = run_cli(
        code="import archscope, sys; print(archscope.__version__, 'torch' in sys.modules)"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [archscope.__version__, "False"]


def test_registration_without_a_name_is_a_clear_plugin_error():
    from archscope.plugins import PluginInfo, PluginManager

    manager = PluginManager()

    class Module:
        @staticmethod
        @archscope.hookimpl
        def register_backends(register):
            register(object())

    manager.pm.register(Module, name="x:y")
    info = PluginInfo(name="y", distribution="x", version="1", module="m")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        manager._register_from("x:y", info, Module)
    assert info.status == "failed"
    assert "without a name" in info.error
    assert any("x 1" in str(w.message) for w in caught)


def test_a_plugin_that_exits_at_import_is_isolated(run_cli, plugin_site):
    plugins, _ = _plugins_json(run_cli, plugin_site)
    assert plugins["broken-exit"]["status"] == "failed"
    assert "SystemExit: this plugin exits on import on purpose" in plugins["broken-exit"]["error"]
    assert plugins["good"]["status"] == "ok"
    assert run_cli("--help", site=plugin_site).returncode == 0


def test_selecting_a_plugin_that_is_not_installed_warns_with_the_installed_ones(
    run_cli, plugin_site
):
    _, stderr = _plugins_json(
        run_cli, plugin_site, env={"ARCHSCOPE_PLUGINS": "archscope-transformr"}
    )
    assert (
        "ARCHSCOPE_PLUGINS names archscope-transformr, which is not an installed plugin; "
        "installed: "
    ) in stderr
    assert "archscope-testplugin-good" in stderr.split("installed: ")[1]
