"""The chat page's static routes on the gateway (gallama_kernel/webui): an allowlist of files, GET only, the
security headers, no key needed for the page while the API keeps needing one; no browser here (tests/test_webui.py
drives one)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from gallama_kernel import webui
from gallama_kernel.gateway.access import Access
from gallama_kernel.gateway.app import create_gateway
from gallama_kernel.gateway.pool import Pool
from gallama_kernel.keys import KeyStore
from gallama_kernel.plugin import hookimpl
from gallama_kernel.plugins import PluginHost

STATIC = Path(webui.__file__).with_name("static")


@pytest.fixture()
def client(tmp_path: Path):
    app = create_gateway(Pool({}), tmp_path, Access(KeyStore(tmp_path, "inference-key", "admin-key")))
    with TestClient(app, follow_redirects=False) as client:
        yield client


def test_every_allowlisted_file_is_served_with_its_type_and_headers(client: TestClient):
    for name, content_type in webui.ASSETS.items():
        path = "/ui" if name == "index.html" else f"/ui/{name}"
        response = client.get(path)
        assert response.status_code == 200, path
        assert response.headers["content-type"] == content_type
        assert response.content == (STATIC / name).read_bytes()
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["cache-control"] == "no-cache"
        policy = response.headers["content-security-policy"]
        assert "script-src 'self'" in policy and "default-src 'none'" in policy
        directives = dict(part.strip().split(" ", 1) for part in policy.split(";"))
        assert directives["script-src"] == "'self'" and "unsafe-eval" not in policy and "http" not in policy
        assert directives["style-src"] == "'self' 'unsafe-inline'"  # for artifact previews' own <style>
        assert "frame-ancestors 'none'" in policy
        again = client.get(path, headers={"if-none-match": response.headers["etag"]})
        assert again.status_code == 304 and not again.content
    assert client.get("/ui/").content == (STATIC / "index.html").read_bytes()


def test_the_root_redirects_to_the_page(client: TestClient):
    response = client.get("/")
    assert response.status_code == 307 and response.headers["location"] == "/ui"


def test_the_static_folder_holds_exactly_the_allowlist():
    assert sorted(p.name for p in STATIC.iterdir()) == sorted(webui.ASSETS)


@pytest.mark.parametrize("path", [
    "/ui/nope.js", "/ui/index.html", "/ui/__init__.py", "/ui/../__init__.py", "/ui/..%2f__init__.py",
    "/ui/%2e%2e/%2e%2e/pyproject.toml", "/ui/static/app.js", "/ui/app.js/", "/ui/APP.JS", "/ui/app.js%00",
    "/ui//etc/passwd", "/ui/%2fetc%2fpasswd",
])
def test_anything_else_is_a_404(client: TestClient, path: str):
    response = client.get(path)
    assert response.status_code in (404, 307), path  # 307: the router's trailing-slash redirect, to /ui/app.js
    if response.status_code == 404:
        assert response.json()["error"]["code"] == "unknown_route"
    else:
        assert response.headers["location"].endswith("/ui/app.js")


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "HEAD"])
def test_only_get(client: TestClient, method: str):
    for path in ("/ui", "/ui/app.js", "/"):
        assert client.request(method, path).status_code == 405, (method, path)


def test_the_page_needs_no_key_but_the_api_does(client: TestClient):
    assert client.get("/ui").status_code == 200
    assert client.get("/v1/models").status_code == 401
    assert client.get("/v1/models", headers={"authorization": "Bearer inference-key"}).status_code == 200


def test_the_page_is_not_in_the_openapi_document(client: TestClient):
    paths = client.get("/openapi.json").json()["paths"]
    assert not any(path == "/" or path.startswith("/ui") for path in paths)


def test_the_page_loads_nothing_from_elsewhere_and_no_inline_script():
    html = (STATIC / "index.html").read_text()
    assert not re.search(r"<script(?![^>]*\bsrc=\"/ui/)", html)
    assert re.findall(r"(?:src|href)=\"([^\"]+)\"", html) == ["data:,", "/ui/style.css", "/ui/app.js"]
    for name in webui.ASSETS:
        text = (STATIC / name).read_text()
        assert not re.search(r"https?://", text), name  # no other origin
        assert not re.search(r"\bimport\s*\(|from\s+\"(?!\./)", text), name  # only this folder's modules
        assert ".innerHTML" not in text and "outerHTML" not in text and "insertAdjacentHTML" not in text, name
        assert "document.write" not in text and "eval(" not in text, name


class RootPlugin:
    @hookimpl
    def register_routes(self, app: FastAPI) -> None:
        @app.get("/")
        def root() -> dict[str, str]:
            return {"plugin": "root"}


def test_a_plugin_that_serves_the_root_keeps_it(tmp_path: Path):
    host = PluginHost()
    host.register(RootPlugin(), "root")
    app = create_gateway(Pool({}), tmp_path, host=host)
    served = [r.path for r in app.routes if getattr(r, "path", None) == "/"]
    assert len(served) == 1
    assert app.url_path_for("webui:/ui") == "/ui"
