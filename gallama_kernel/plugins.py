"""Plugin discovery and the registries filled through ``register_*`` hooks.

Each entry point of the group ``gallama`` loads in its own ``try``: a broken plugin is recorded (and shown by
``gallama plugins``), never fatal. An allowlist and a blocklist choose what loads.
"""

from __future__ import annotations

import traceback
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

import pluggy

from . import PROJECT_NAME, hookspecs
from .backend import Backend

ENTRY_POINT_GROUP = PROJECT_NAME


@dataclass
class PluginRecord:
    """What ``gallama plugins`` shows about one plugin."""

    name: str
    version: str | None = None
    hooks: list[str] = field(default_factory=list)
    status: str = "loaded"  # loaded | failed | disabled
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "hooks": self.hooks, "status": self.status,
                "error": self.error}


@dataclass(frozen=True)
class RequestField:
    name: str
    annotation: Any
    description: str
    plugin: str


def _split(names: str | Iterable[str] | None) -> set[str] | None:
    if names is None:
        return None
    items = names.split(",") if isinstance(names, str) else names
    return {n.strip() for n in items if n.strip()}


def _short_error(error: BaseException) -> str:
    frames = traceback.extract_tb(error.__traceback__)
    where = f" ({frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return f"{type(error).__name__}: {error}{where}"


class PluginHost:
    """Owns the pluggy manager and what the plugins registered."""

    def __init__(self, allow: str | Iterable[str] | None = None, deny: str | Iterable[str] | None = None):
        self.pm = pluggy.PluginManager(PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        self.allow = _split(allow)
        self.deny = _split(deny) or set()
        self.records: dict[str, PluginRecord] = {}
        self._backends: dict[str, type[Backend]] | None = None
        self._fields: dict[str, RequestField] | None = None

    # -- loading ---------------------------------------------------------------------------------------
    def is_enabled(self, name: str) -> bool:
        return name not in self.deny and (self.allow is None or name in self.allow)

    def load_entry_points(self) -> None:
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            if ep.name in self.records:
                continue
            version = ep.dist.version if ep.dist else None
            if not self.is_enabled(ep.name):
                self.records[ep.name] = PluginRecord(ep.name, version, status="disabled")
                continue
            try:
                module = ep.load()
                self.pm.register(module, name=ep.name)
            except Exception as error:  # a broken plugin must not take the server down
                self.records[ep.name] = PluginRecord(ep.name, version, status="failed", error=_short_error(error))
                continue
            self.records[ep.name] = PluginRecord(ep.name, version, hooks=self._hooks_of(ep.name))

    def register(self, plugin: object, name: str, version: str | None = None) -> None:
        """Register an in-process plugin object (tests, embedding applications)."""
        if not self.is_enabled(name):
            self.records[name] = PluginRecord(name, version, status="disabled")
            return
        self.pm.register(plugin, name=name)
        self.records[name] = PluginRecord(name, version, hooks=self._hooks_of(name))
        self._backends = self._fields = None

    def unregister(self, name: str) -> None:
        self.pm.unregister(name=name)
        self.records.pop(name, None)
        self._backends = self._fields = None

    def _hooks_of(self, name: str) -> list[str]:
        plugin = self.pm.get_plugin(name)
        callers = self.pm.get_hookcallers(plugin) or []
        return sorted(caller.name for caller in callers)

    def call_each(self, hook_name: str, **kwargs: Any) -> None:
        """Call a hook implementation by implementation, recording a failure against its plugin."""
        for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
            self._call_one(impl, hook_name, **kwargs)

    def _call_one(self, impl: pluggy.HookImpl, hook_name: str, **kwargs: Any) -> None:
        try:
            impl.function(**{arg: kwargs[arg] for arg in impl.argnames})
        except Exception as error:  # recorded and shown by `gallama plugins`
            record = self.records.setdefault(impl.plugin_name, PluginRecord(impl.plugin_name))
            record.status = "failed"
            record.error = f"{hook_name}: {_short_error(error)}"

    # -- registries -------------------------------------------------------------------------------------
    @property
    def backends(self) -> dict[str, type[Backend]]:
        if self._backends is None:
            found: dict[str, type[Backend]] = {}

            def register(name: str, backend: type[Backend]) -> None:
                if name in found and found[name] is not backend:
                    raise ValueError(f"backend '{name}' is registered twice")
                found[name] = backend

            self.call_each("register_backends", register=register)
            self._backends = found
        return self._backends

    @property
    def request_fields(self) -> dict[str, RequestField]:
        if self._fields is None:
            found: dict[str, RequestField] = {}
            current: list[str] = [""]

            def register(name: str, annotation: Any, description: str = "") -> None:
                if name in found:
                    raise ValueError(f"request field '{name}' is declared twice")
                found[name] = RequestField(name, annotation, description, current[0])

            for impl in self.pm.hook.register_request_fields.get_hookimpls():
                current[0] = impl.plugin_name
                self._call_one(impl, "register_request_fields", register=register)
            self._fields = found
        return self._fields

    def summaries(self) -> list[PluginRecord]:
        return sorted(self.records.values(), key=lambda r: r.name)


def create_host(allow: str | Iterable[str] | None = None, deny: str | Iterable[str] | None = None,
                extra: Iterable[tuple[str, object]] = ()) -> PluginHost:
    """A host with every enabled entry-point plugin loaded, plus ``extra`` (name, plugin) pairs."""
    host = PluginHost(allow, deny)
    host.load_entry_points()
    for name, plugin in extra:
        host.register(plugin, name)
    return host

