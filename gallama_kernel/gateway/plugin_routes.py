"""Plugin routes on the gateway's address.

One rule: a route a plugin adds with ``register_routes`` is served by a worker, and the gateway relays it. At start
the gateway runs ``register_routes`` itself, once per plugin, on a blank application of that plugin's own, only to
learn the routes (path, methods, scope, OpenAPI operation); the workers run the same hook on the app that serves.

A relayed request goes to a replica of the model its JSON body names in ``model`` (or the ``model`` query
parameter); with no model named, to a replica of the first model that is ready. Bodies are JSON (415 otherwise),
bounded like every other body. A route needs an inference key once keys exist, or an admin key when it is declared
with ``openapi_extra=ADMIN_SCOPE``. A route with ``openapi_extra=error_format(name)`` gets every error, the
gateway's own included, in that registered format. A path and method the gateway already serves, or that an
earlier plugin added, is not relayed; the clash is recorded against the plugin (``gallama plugins`` shows it).
Only HTTP routes are relayed, those the plugin's OpenAPI document lists (``include_in_schema=False`` keeps a route
worker-only): a mounted application or a websocket route is recorded as an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from starlette.routing import Mount, WebSocketRoute

from ..hookspecs import ERROR_FORMAT_KEY, SCOPE_KEY
from ..plugins import PluginHost

SCOPES = ("inference", "admin")
BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
HTTP_METHODS = BODY_METHODS | {"GET", "HEAD", "OPTIONS"}


@dataclass(frozen=True)
class PluginRoute:
    """One relayed route: ``path`` in FastAPI's syntax (``/v1/items/{item}``), its methods and scope."""

    plugin: str
    path: str
    methods: frozenset[str]
    scope: str
    name: str
    error_format: str | None = None


@dataclass
class PluginRoutes:
    """The routes the gateway relays, and the OpenAPI fragment that documents them."""

    routes: list[PluginRoute]
    paths: dict[str, dict[str, Any]]
    schemas: dict[str, Any]


def discover(host: PluginHost, taken: set[tuple[str, str]]) -> PluginRoutes:
    """Run ``register_routes`` once per plugin on a blank app and collect what can be relayed: the operations of
    the app's OpenAPI document (a route left out of the schema is not relayed). ``taken``: the gateway's own
    ``(path, METHOD)`` pairs, extended with every route kept."""
    apps: dict[str, FastAPI] = {}

    def blank(plugin: str) -> dict[str, Any]:
        apps[plugin] = FastAPI(title=plugin)
        return {"app": apps[plugin]}

    host.call_each("register_routes", per_plugin=blank)
    found = PluginRoutes([], {}, {})
    for plugin, app in apps.items():
        for route in app.routes:
            if isinstance(route, Mount | WebSocketRoute):
                host.record_error(plugin, "register_routes", f"{route.path} ({type(route).__name__}): the gateway "
                                  "relays HTTP routes only (app.get, app.post, routers)")
        try:
            document = app.openapi()
        except Exception as error:  # a route whose schema cannot be generated: the plugin's error
            host.record_error(plugin, "register_routes", f"its OpenAPI document failed: {error}")
            continue
        for path, operations in document.get("paths", {}).items():
            for method, operation in operations.items():
                if method.upper() not in HTTP_METHODS or not isinstance(operation, dict):
                    continue
                _keep(found, host, plugin, path, method, operation, taken)
        found.schemas.update(document.get("components", {}).get("schemas", {}))
    return found


def _keep(found: PluginRoutes, host: PluginHost, plugin: str, path: str, method: str, operation: dict[str, Any],
          taken: set[tuple[str, str]]) -> None:
    scope = operation.get(SCOPE_KEY, "inference")
    error_format = operation.get(ERROR_FORMAT_KEY)
    if error_format is not None and error_format not in host.error_formats:
        host.record_error(plugin, "register_routes", f"{method.upper()} {path}: error format {error_format!r} is not "
                          "registered (register_error_formats); its errors leave in OpenAI's shape")
        error_format = None
    if (path, method.upper()) in taken:
        host.record_error(plugin, "register_routes", f"{method.upper()} {path} is already served by the gateway or "
                          "another plugin; not relayed")
    elif scope not in SCOPES:
        host.record_error(plugin, "register_routes", f"{method.upper()} {path}: {SCOPE_KEY} must be one of "
                          f"{', '.join(SCOPES)} (got {scope!r}); not relayed")
    else:
        taken.add((path, method.upper()))
        found.routes.append(PluginRoute(plugin, path, frozenset({method.upper()}), scope,
                                        str(operation.get("operationId", path)), error_format))
        operation = {**operation, "tags": [*operation.get("tags", []), f"plugin: {plugin}"],  # ids unique:
                     "operationId": f"{plugin}_{operation.get('operationId', method + path)}"}  # plugins may clash
        found.paths.setdefault(path, {})[method] = operation
