"""Plugin discovery and the registries it fills.

Plugins are modules named by entry points in the group ``archscope``. They are discovered
lazily (on the first registry use), once, and can be refreshed. Each plugin is loaded and
registered in isolation: one that fails is disabled with a single warning line and shown as
failed by ``archscope plugins``; the rest keep working. Environment variables:

- ``ARCHSCOPE_STRICT_PLUGINS=1``: re-raise plugin errors (CI, plugin authors).
- ``ARCHSCOPE_PLUGINS=a,b``: load only these plugins (distribution or entry-point names).
- ``ARCHSCOPE_DISABLE_PLUGINS=a,b``: do not load these.

The core's own built-in methods register through the same hooks, as the plugin ``archscope``.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, cast

import pluggy

from . import hookspecs
from .errors import PluginError

ENTRY_POINT_GROUP = "archscope"
CORE_DISTRIBUTION = "archscope"
IN_PROCESS = "<in-process>"
#: The core's own plugins (name -> module): the methods layer's methods and the applications
#: layer's commands.
_BUILTIN_MODULES = {"archscope": "archscope.methods", "archscope-apps": "archscope.apps"}
KINDS = ("backends", "methods", "sources", "commands")


class PluginWarning(UserWarning):
    """A plugin failed, or two plugins registered the same name."""


def _warn(message: str) -> None:
    # warn_explicit with a pseudo file name prints exactly one line (no source line below it).
    warnings.warn_explicit(
        message, PluginWarning, filename="archscope", lineno=0, module="archscope.plugins"
    )


def _catalogue() -> dict[str, Any]:
    text = resources.files("archscope").joinpath("_catalogue.json").read_text()
    return cast("dict[str, Any]", json.loads(text))


def first_party() -> frozenset[str]:
    return frozenset(_catalogue()["first_party"])


def suggest_distribution(model: Any) -> str | None:
    """Which first-party distribution serves this model's family, from the catalogue table."""
    cls = type(model)
    text = f"{cls.__module__}.{cls.__qualname__}".lower()
    for family in _catalogue()["families"]:
        if any(token in text for token in family["match"]):
            return str(family["distribution"])
    return None


@dataclass
class Entry:
    """One registered object: a backend class, a method or a model source."""

    name: str
    obj: Any
    distribution: str
    version: str
    aliases: tuple[str, ...] = ()


@dataclass
class PluginInfo:
    """What `archscope plugins` shows for one plugin."""

    name: str
    distribution: str
    version: str
    module: str
    status: str = "ok"  # ok | failed | disabled | rejected (every registration lost its name)
    error: str | None = None
    registered: dict[str, list[str]] = field(default_factory=lambda: {k: [] for k in KINDS})
    #: names this plugin registered that another distribution holds (kind -> names)
    rejected: dict[str, list[str]] = field(default_factory=lambda: {k: [] for k in KINDS})

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "module": self.module,
            "status": self.status,
            "error": self.error,
            "registered": {k: list(v) for k, v in self.registered.items() if v},
            "rejected": {k: list(v) for k, v in self.rejected.items() if v},
        }


def _env_list(var: str) -> set[str] | None:
    raw = os.environ.get(var)
    if raw is None:
        return None
    return {part.strip() for part in raw.split(",") if part.strip()}


def strict() -> bool:
    return os.environ.get("ARCHSCOPE_STRICT_PLUGINS", "").lower() in {"1", "true", "yes", "on"}


class Registry:
    """Name → entry, with conflict rules that do not depend on discovery order."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry] = {}
        self._aliases: dict[str, str] = {}

    def add(self, entry: Entry, *, replace: bool = False) -> bool:
        """Add an entry; returns whether it won the name."""
        current = self._entries.get(entry.name)
        if current is not None and current.distribution != entry.distribution:
            winner = self._winner(current, entry, replace)
            loser = entry if winner is current else current
            _warn(
                f"archscope: {self.kind[:-1]} name {entry.name!r} is registered by both "
                f"{current.distribution} and {entry.distribution}; using {winner.distribution}"
                + (
                    f" (pass replace=True in {loser.distribution} to take over a first-party name)"
                    if loser.distribution != IN_PROCESS and winner.distribution in first_party()
                    else ""
                )
            )
            if winner is current:
                return False
        self._entries[entry.name] = entry
        for alias in entry.aliases:
            self._aliases[alias] = entry.name
        return True

    @staticmethod
    def _winner(current: Entry, new: Entry, replace: bool) -> Entry:
        if new.distribution == IN_PROCESS:
            return new  # explicit in-process registration is the user's own choice
        if current.distribution == IN_PROCESS:
            return current
        fp = first_party()
        if current.distribution in fp and new.distribution not in fp:
            return new if replace else current
        if new.distribution in fp and current.distribution not in fp:
            return current if replace else new
        # Same standing: the alphabetically first distribution wins, whatever the load order.
        return min(current, new, key=lambda e: e.distribution)

    def get(self, name: str) -> Entry | None:
        return self._entries.get(name) or self._entries.get(self._aliases.get(name, ""))

    def names(self) -> list[str]:
        return sorted(self._entries)

    def aliases(self) -> dict[str, str]:
        return dict(self._aliases)

    def entries(self) -> list[Entry]:
        return [self._entries[n] for n in sorted(self._entries)]

    def remove_distribution(self, distribution: str) -> None:
        for name in [n for n, e in self._entries.items() if e.distribution == distribution]:
            del self._entries[name]
        self._aliases = {a: n for a, n in self._aliases.items() if n in self._entries}

    def __iter__(self) -> Iterator[Entry]:
        return iter(self.entries())


class PluginManager:
    """Discovers plugins through entry points and fills the backend/method/source registries."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._loaded = False
        self.pm = pluggy.PluginManager("archscope")
        self.pm.add_hookspecs(hookspecs)
        self.backends = Registry("backends")
        self.methods = Registry("methods")
        self.sources = Registry("sources")
        self.plugins: dict[str, PluginInfo] = {}
        self._in_process: list[tuple[str, Entry, bool]] = []

    # -- discovery ---------------------------------------------------------------------------
    def ensure_loaded(self) -> PluginManager:
        if not self._loaded:
            with self._lock:
                if not self._loaded:
                    self._load()
                    self._loaded = True
        return self

    def refresh(self) -> PluginManager:
        """Forget what was discovered and discover again (after installing a plugin)."""
        with self._lock:
            for name in list(self.pm.list_name_plugin()):
                self.pm.unregister(name=name[0])
            self.backends = Registry("backends")
            self.methods = Registry("methods")
            self.sources = Registry("sources")
            self.plugins = {}
            self._loaded = False
        return self.ensure_loaded()

    def _load(self) -> None:
        import importlib_metadata

        candidates: list[tuple[str, str, str, str, Callable[[], Any]]] = []
        from ._version import __version__

        for builtin, module in _BUILTIN_MODULES.items():
            candidates.append(
                (
                    builtin,
                    CORE_DISTRIBUTION,
                    __version__,
                    module,
                    functools.partial(importlib.import_module, module),
                )
            )
        seen: set[tuple[str, str]] = set()
        for ep in sorted(
            importlib_metadata.entry_points(group=ENTRY_POINT_GROUP),
            key=lambda e: (e.dist.name if e.dist else "", e.name),
        ):
            dist = ep.dist.name if ep.dist is not None else "<unknown>"
            key = (dist, ep.name)
            if key in seen:  # the same distribution visible twice on sys.path
                continue
            seen.add(key)
            version = ep.dist.version if ep.dist is not None else "?"
            candidates.append((ep.name, dist, version, ep.value, ep.load))

        only = _env_list("ARCHSCOPE_PLUGINS")
        disabled = _env_list("ARCHSCOPE_DISABLE_PLUGINS") or set()
        known = {n for c in candidates for n in c[:2]}
        for variable, names in (
            ("ARCHSCOPE_PLUGINS", only),
            ("ARCHSCOPE_DISABLE_PLUGINS", disabled),
        ):
            unknown = sorted((names or set()) - known)
            if unknown:
                installed = sorted({c[1] for c in candidates if c[1] != CORE_DISTRIBUTION})
                _warn(
                    f"archscope: {variable} names {', '.join(unknown)}, which is not an "
                    f"installed plugin; installed: {', '.join(installed) or 'none'}"
                )
        for name, dist, version, module_name, load in candidates:
            info = PluginInfo(name=name, distribution=dist, version=version, module=module_name)
            plugin_id = f"{dist}:{name}"
            self.plugins[plugin_id] = info
            is_core = dist == CORE_DISTRIBUTION and name in _BUILTIN_MODULES
            if not is_core and (
                (only is not None and not ({name, dist} & only)) or ({name, dist} & disabled)
            ):
                info.status = "disabled"
                continue
            try:
                module = load()
                self.pm.register(module, name=plugin_id)
            except BaseException as exc:
                # a broken plugin must not take the rest down
                self._fail(info, "failed to load", exc)
                continue
            self._register_from(plugin_id, info, module)
        for kind, entry, replace in self._in_process:
            self._registry(kind).add(entry, replace=replace)
        self._settle()

    def _settle(self) -> None:
        """Move names a plugin lost to another distribution from ``registered`` to
        ``rejected``; a plugin that kept none of them gets the status "rejected"."""
        for info in self.plugins.values():
            if info.status != "ok":
                continue
            for kind in ("backends", "methods", "sources"):
                registry = self._registry(kind)
                for name in list(info.registered[kind]):
                    entry = registry.get(name)
                    if entry is None or entry.distribution != info.distribution:
                        info.registered[kind].remove(name)
                        info.rejected[kind].append(name)
            lost = {k: v for k, v in info.rejected.items() if v}
            if lost and not any(info.registered.values()):
                info.status = "rejected"
                info.error = "every registration lost to another plugin: " + "; ".join(
                    f"{kind} {', '.join(names)}" for kind, names in lost.items()
                )

    def _register_from(self, plugin_id: str, info: PluginInfo, module: Any) -> None:
        staged: dict[str, list[tuple[Entry, bool]]] = {
            k: [] for k in ("backends", "methods", "sources")
        }

        def make_register(kind: str) -> Callable[..., None]:
            def register(
                obj: Any,
                name: str | None = None,
                aliases: tuple[str, ...] = (),
                replace: bool = False,
            ) -> None:
                entry_name = name or getattr(obj, "name", None)
                if not entry_name or not isinstance(entry_name, str):
                    raise PluginError(
                        f"{info.distribution} registered a {kind[:-1]} without a name: "
                        f"give the object a 'name' attribute or pass name=..."
                    )
                staged[kind].append(
                    (
                        Entry(entry_name, obj, info.distribution, info.version, tuple(aliases)),
                        replace,
                    )
                )

            return register

        try:
            for kind, hook in (
                ("backends", "register_backends"),
                ("methods", "register_methods"),
                ("sources", "register_model_sources"),
            ):
                for impl in getattr(self.pm.hook, hook).get_hookimpls():
                    if impl.plugin_name == plugin_id:
                        impl.function(register=make_register(kind))
        except BaseException as exc:
            self.pm.unregister(name=plugin_id)
            self._fail(info, "failed to register", exc)
            return
        for kind, items in staged.items():
            for entry, replace in items:
                if self._registry(kind).add(entry, replace=replace):
                    info.registered[kind].append(entry.name)
                else:
                    info.rejected[kind].append(entry.name)

    def _fail(self, info: PluginInfo, what: str, exc: BaseException) -> None:
        """Disable a plugin that raised anything (sys.exit() at import included) but
        KeyboardInterrupt, which the user asked for and which goes on."""
        if isinstance(exc, KeyboardInterrupt):
            raise exc
        info.status = "failed"
        info.error = f"{type(exc).__name__}: {exc}"
        message = (
            f"archscope: plugin {info.name!r} from {info.distribution} {info.version} "
            f"{what} and is disabled: {info.error}"
        )
        if strict():
            raise PluginError(message) from exc
        _warn(message)

    def _registry(self, kind: str) -> Registry:
        return {"backends": self.backends, "methods": self.methods, "sources": self.sources}[kind]

    # -- in-process registration ------------------------------------------------------------
    def register_in_process(self, kind: str, entry: Entry, replace: bool = True) -> None:
        """Register without a distribution (``Backend.register`` for quick experiments)."""
        with self._lock:
            self._in_process.append((kind, entry, replace))
            if self._loaded:
                self._registry(kind).add(entry, replace=replace)

    def add_commands(self, cli: Any) -> None:
        self.ensure_loaded()
        for plugin_id, info in self.plugins.items():
            impls = [
                i
                for i in self.pm.hook.register_commands.get_hookimpls()
                if i.plugin_name == plugin_id
            ]
            before = set(getattr(cli, "commands", {}))
            try:
                for impl in impls:
                    impl.function(cli=cli)
                info.registered["commands"] = sorted(set(getattr(cli, "commands", {})) - before)
            except BaseException as exc:
                self._fail(info, "failed to add commands", exc)


_manager = PluginManager()


def get_manager() -> PluginManager:
    """The process-wide plugin manager, discovered on first use."""
    return _manager.ensure_loaded()


def refresh() -> PluginManager:
    """Discover plugins again (after installing or removing one in this process)."""
    return _manager.refresh()
