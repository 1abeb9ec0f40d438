"""What the gateway relays of the routes plugins add (gateway/plugin_routes.py), and what it records instead."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.testclient import TestClient

from gallama_kernel.gateway.access import Access
from gallama_kernel.gateway.app import check_plugin_routes, create_gateway
from gallama_kernel.gateway.plugin_routes import discover
from gallama_kernel.gateway.pool import Pool
from gallama_kernel.keys import KeyStore
from gallama_kernel.plugin import ADMIN_SCOPE, hookimpl
from gallama_kernel.plugins import PluginHost


class Routes:
    @hookimpl
    def register_routes(self, app: FastAPI) -> None:
        @app.get("/v1/things/{thing}")
        def thing(thing: str) -> dict[str, str]:
            return {"thing": thing}

        @app.post("/v1/admin-thing", openapi_extra=ADMIN_SCOPE)
        def admin_thing() -> dict[str, str]:
            return {}

        @app.get("/hidden", include_in_schema=False)
        def hidden() -> dict[str, str]:
            return {}


class Clashing:
    @hookimpl
    def register_routes(self, app: FastAPI) -> None:
        @app.get("/health")
        def health() -> dict[str, str]:
            return {}

        @app.get("/v1/things/{thing}")
        def again(thing: str) -> dict[str, str]:
            return {}

        @app.get("/v1/odd", openapi_extra={"x-gallama-scope": "root"})
        def odd() -> dict[str, str]:
            return {}

        app.mount("/static", FastAPI())


def host_with(**plugins: Any) -> PluginHost:
    host = PluginHost()
    for name, plugin in plugins.items():
        host.register(plugin, name)
    return host


def test_routes_are_kept_with_methods_scopes_and_operations():
    host = host_with(things=Routes())
    found = discover(host, {("/health", "GET")})
    kept = {(r.path, *r.methods, r.scope, r.plugin) for r in found.routes}
    assert kept == {("/v1/things/{thing}", "GET", "inference", "things"),
                    ("/v1/admin-thing", "POST", "admin", "things")}
    assert found.paths["/v1/things/{thing}"]["get"]["tags"] == ["plugin: things"]
    assert host.records["things"].errors == []


def test_clashes_bad_scopes_and_mounts_are_recorded_against_the_plugin():
    host = host_with(clashing=Clashing(), things=Routes())
    found = discover(host, {("/health", "GET")})
    # pluggy's order, as in a worker's app: the plugin registered last adds its routes first and keeps the path
    assert {r.plugin for r in found.routes} == {"things"}
    errors = host.records["clashing"].errors
    assert host.records["clashing"].status == "failed"
    assert any("GET /health is already served" in e for e in errors)
    assert any("GET /v1/things/{thing} is already served" in e for e in errors)
    assert any("x-gallama-scope must be one of inference, admin" in e for e in errors)
    assert any("/static (Mount)" in e for e in errors)
    assert all(e.startswith("register_routes: ") for e in errors)


def test_gateway_checks_the_route_scope_before_relaying(tmp_path: Path):
    store = KeyStore(tmp_path, "inference-key", "admin-key")
    app = create_gateway(Pool({}), tmp_path, Access(store), host=host_with(things=Routes()))
    with TestClient(app) as client:
        document = client.get("/openapi.json").json()
        assert {"/v1/things/{thing}", "/v1/admin-thing"} <= set(document["paths"])
        assert "/hidden" not in document["paths"]
        ids = [operation["operationId"] for item in document["paths"].values() for operation in item.values()]
        assert len(ids) == len(set(ids)) and "things_thing_v1_things__thing__get" in ids
        assert client.get("/hidden").status_code == 404  # not relayed: left out of the schema
        assert client.get("/v1/things/x").status_code == 401
        refused = client.post("/v1/admin-thing", headers={"authorization": "Bearer inference-key"}, json={})
        assert refused.status_code == 403
        # admitted, but no model is ready to serve it: a 503 that says so
        unserved = client.get("/v1/things/x", headers={"authorization": "Bearer inference-key"})
        assert unserved.status_code == 503 and unserved.json()["error"]["code"] == "no_model_ready"
        named = client.get("/v1/things/x?model=nope", headers={"authorization": "Bearer inference-key"})
        assert named.status_code == 404 and named.json()["error"]["code"] == "model_not_found"


def test_gallama_plugins_learns_the_routes_the_gateway_would_not_relay(tmp_path: Path):
    host = host_with(clashing=Clashing())
    check_plugin_routes(host, tmp_path)
    assert any("GET /health is already served" in e for e in host.records["clashing"].errors)
    assert not any(tmp_path.iterdir())  # nothing written, nothing started
