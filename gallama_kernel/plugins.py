"""Plugin discovery and the registries filled through ``register_*`` hooks.

Each entry point of the group ``gallama`` loads in its own ``try``: a broken plugin is recorded (and shown by
``gallama plugins``), never fatal. An allowlist and a blocklist choose what loads.

Hook rules, one set for all: every hook runs in pluggy's call order (the plugin registered last first;
``tryfirst`` / ``trylast`` honoured). The per-request hooks (``prepare_request``, ``response_transformers``) are
called through pluggy itself, wrappers included. The registration hooks (``register_*``) are called implementation
by implementation, through :meth:`PluginHost.call_each` alone, so that one plugin's failure is recorded against it
(with the hook's name: every error is kept) while the others still register; a wrapper cannot take part in that,
so a plugin that wraps a registration hook is refused when it is registered.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

import pluggy

from . import PROJECT_NAME, hookspecs
from .backend import Backend

ENTRY_POINT_GROUP = PROJECT_NAME
REGISTRATION_HOOKS = frozenset({"register_backends", "register_request_fields", "register_routes",
                                "register_commands", "register_models", "register_error_formats"})
ErrorFormat = Callable[[int, dict[str, Any]], dict[str, Any]]


@dataclass
class PluginRecord:
    """What ``gallama plugins`` shows about one plugin."""

    name: str
    version: str | None = None
    hooks: list[str] = field(default_factory=list)
    status: str = "loaded"  # loaded | failed | disabled
    errors: list[str] = field(default_factory=list)  # "hook: error" (or the import's error), every one
    backends: dict[str, dict[str, Any]] = field(default_factory=dict)  # registered backends and their model keys

    @property
    def error(self) -> str | None:
        return "; ".join(self.errors) or None

    def failed(self, message: str) -> None:
        self.status = "failed"
        if message not in self.errors:
            self.errors.append(message)

    def failed_in(self, hook_name: str) -> bool:
        return any(error.startswith(f"{hook_name}: ") for error in self.errors)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "hooks": self.hooks, "status": self.status,
                "error": self.error, "errors": self.errors, "backends": self.backends}


@dataclass(frozen=True)
class RequestField:
    name: str
    annotation: Any
    description: str
    plugin: str


def describe_backend(backend: type[Backend]) -> dict[str, Any]:
    """The model keys a backend takes: the kernel's (``keys``) and its own (``options``: type, default, help)."""
    from .config import accepted_keys, backend_options

    options = {}
    for name, info in backend_options(backend).items():
        default = None if info.is_required() else info.get_default(call_default_factory=True)
        options[name] = {"type": getattr(info.annotation, "__name__", None) or str(info.annotation),
                         "required": info.is_required(), "default": default, "description": info.description}
    return {"keys": accepted_keys(backend), "options": options}


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
        self._formats: dict[str, ErrorFormat] | None = None

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
                self.records[ep.name] = PluginRecord(ep.name, version, status="failed", errors=[_short_error(error)])
                continue
            self.records[ep.name] = PluginRecord(ep.name, version, hooks=self._hooks_of(ep.name))
            self._refuse_wrapped_registration(ep.name)

    def register(self, plugin: object, name: str, version: str | None = None) -> None:
        """Register an in-process plugin object (tests, embedding applications)."""
        if not self.is_enabled(name):
            self.records[name] = PluginRecord(name, version, status="disabled")
            return
        self.pm.register(plugin, name=name)
        self.records[name] = PluginRecord(name, version, hooks=self._hooks_of(name))
        self._refuse_wrapped_registration(name)
        self._backends = self._fields = self._formats = None

    def unregister(self, name: str) -> None:
        self.pm.unregister(name=name)
        self.records.pop(name, None)
        self._backends = self._fields = self._formats = None

    def _hooks_of(self, name: str) -> list[str]:
        plugin = self.pm.get_plugin(name)
        callers = self.pm.get_hookcallers(plugin) or []
        return sorted(caller.name for caller in callers)

    def _refuse_wrapped_registration(self, name: str) -> None:
        """Unregister (and record as failed) a plugin that wraps a registration hook: those hooks run
        implementation by implementation (see the module docstring), which a wrapper cannot take part in."""
        plugin = self.pm.get_plugin(name)
        wrapped = sorted(caller.name for caller in self.pm.get_hookcallers(plugin) or []
                         if caller.name in REGISTRATION_HOOKS
                         and any(impl.plugin_name == name and (impl.wrapper or impl.hookwrapper)
                                 for impl in caller.get_hookimpls()))
        if wrapped:
            self.pm.unregister(name=name)
            self.records[name].failed(f"{', '.join(wrapped)}: hook wrappers are not supported on registration hooks")

    def call_each(self, hook_name: str, per_plugin: Callable[[str], dict[str, Any]] | None = None,
                  **kwargs: Any) -> None:
        """Call a registration hook implementation by implementation, in pluggy's call order, recording a failure
        against its plugin (the others still run).

        :param per_plugin: arguments that depend on the implementing plugin's name (a ``register`` callback that
            remembers who registered what), merged over ``kwargs``
        """
        if hook_name not in REGISTRATION_HOOKS:
            raise ValueError(f"'{hook_name}' is called through pluggy, not implementation by implementation")
        for impl in reversed(getattr(self.pm.hook, hook_name).get_hookimpls()):  # pluggy's own order
            arguments = {**kwargs, **(per_plugin(impl.plugin_name) if per_plugin is not None else {})}
            try:
                impl.function(**{arg: arguments[arg] for arg in impl.argnames})
            except Exception as error:  # recorded and shown by `gallama plugins`
                self.record_error(impl.plugin_name, hook_name, _short_error(error))

    def record_error(self, plugin: str, hook_name: str, message: str) -> None:
        """Record a failure of ``plugin`` in ``hook_name`` (the plugin is then listed as failed)."""
        self.records.setdefault(plugin, PluginRecord(plugin)).failed(f"{hook_name}: {message}")

    # -- per-request hooks (through pluggy: its order, wrappers honoured) -------------------------------------
    def prepare_request(self, request: Any, plan: Any) -> None:
        """Every plugin's ``prepare_request`` on one chat request's plan."""
        self.pm.hook.prepare_request(request=request, plan=plan)

    def response_transformers(self, request: Any, plan: Any) -> list[Any]:
        """The transformers every plugin returns for one chat request, in call order."""
        return [t for group in self.pm.hook.response_transformers(request=request, plan=plan) if group
                for t in group]

    def run_registrations(self, cli: Any = None) -> None:
        """Run every registration hook that has no side effect outside this host (for ``gallama plugins``), so
        that each plugin's registration errors are known: backends, request fields, models, and commands onto
        ``cli`` (a throwaway group by default). ``register_routes`` needs the app it adds to and runs with it."""
        import click

        from .catalog import load_catalog

        self.backends  # noqa: B018  (each property runs its hook once)
        self.request_fields  # noqa: B018
        self.error_formats  # noqa: B018
        load_catalog(self)
        self.call_each("register_commands", cli=cli if cli is not None else click.Group())

    # -- registries -------------------------------------------------------------------------------------
    @property
    def backends(self) -> dict[str, type[Backend]]:
        if self._backends is None:
            found: dict[str, type[Backend]] = {}

            def registrar(plugin: str) -> Callable[..., None]:
                def register(name: str, backend: type[Backend]) -> None:
                    if name in found and found[name] is not backend:
                        raise ValueError(f"backend '{name}' is registered twice")
                    found[name] = backend
                    record = self.records.setdefault(plugin, PluginRecord(plugin))
                    record.backends[name] = describe_backend(backend)

                return register

            self.call_each("register_backends", per_plugin=lambda plugin: {"register": registrar(plugin)})
            self._backends = found
        return self._backends

    @property
    def request_fields(self) -> dict[str, RequestField]:
        if self._fields is None:
            found: dict[str, RequestField] = {}

            def registrar(plugin: str) -> Callable[..., None]:
                def register(name: str, annotation: Any, description: str = "") -> None:
                    if name in found:
                        raise ValueError(f"request field '{name}' is declared twice")
                    found[name] = RequestField(name, annotation, description, plugin)

                return register

            self.call_each("register_request_fields", per_plugin=lambda plugin: {"register": registrar(plugin)})
            self._fields = found
        return self._fields

    @property
    def error_formats(self) -> dict[str, ErrorFormat]:
        """Error formats by name (``register_error_formats``)."""
        if self._formats is None:
            found: dict[str, ErrorFormat] = {}

            def register(name: str, render: ErrorFormat) -> None:
                if name in found or not callable(render):
                    raise ValueError(f"error format '{name}' is registered twice" if name in found
                                     else f"error format '{name}': render must be callable")
                found[name] = render

            self.call_each("register_error_formats", register=register)
            self._formats = found
        return self._formats

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

