"""The chat web page that ``gallama run`` serves at ``GET /ui`` (``GET /`` redirects there when no plugin took it).

The page is a handful of static files shipped as package data (``static/``) and written for gallama: plain ES
modules, no third-party code and no CDN, so it works offline. It talks to the gateway's own OpenAI API with
``fetch`` (the API key, when one is set on the page, goes in ``Authorization: Bearer``); the page itself needs no
key.

Hostile input: only ``GET``; a fixed allowlist of file names, read once from the package when the app is built
(a request never names a path on disk, so there is nothing to traverse); each answer carries its content type,
``Cache-Control: no-cache`` with an ``ETag`` (a revalidation is a 304), ``X-Content-Type-Options: nosniff`` and a
Content-Security-Policy that allows scripts and connections from this origin only (no inline script, no
third-party origin, no ``eval``), styles from this origin and inline (for artifact previews), frames from nowhere but
``srcdoc`` previews, and no framing of the page itself.
"""

from __future__ import annotations

import hashlib
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.routing import APIRoute

from ..protocol.errors import error_body

PAGE_PATH = "/ui"
"""Where the page is served; its files are under ``/ui/<name>``."""

ASSETS: dict[str, str] = {
    "index.html": "text/html; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "chat.js": "text/javascript; charset=utf-8",
    "markdown.js": "text/javascript; charset=utf-8",
    "highlight.js": "text/javascript; charset=utf-8",
}
"""The only files served: name -> content type."""

CONTENT_SECURITY_POLICY = "; ".join([
    "default-src 'none'",
    "script-src 'self'",
    # inline styles: an artifact preview (a srcdoc frame) inherits this policy, and an HTML artifact's own <style>
    # must apply there; the page itself never puts model or client text into markup (DOM nodes and textContent
    # only), so nothing untrusted can bring a style into it, and img-src keeps any style from loading elsewhere
    "style-src 'self' 'unsafe-inline'",
    "connect-src 'self'",
    "img-src 'self' data:",
    "frame-src 'self'",  # artifact previews: srcdoc frames, sandboxed without allow-same-origin
    "base-uri 'none'",
    "form-action 'none'",
    "frame-ancestors 'none'",
])
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}


class Asset:
    """One static file, read from the package once."""

    def __init__(self, name: str, content_type: str) -> None:
        self.body = resources.files(__package__).joinpath("static", name).read_bytes()
        self.content_type = content_type
        self.etag = '"' + hashlib.sha256(self.body).hexdigest()[:32] + '"'

    def response(self, request: Request) -> Response:
        headers = {**SECURITY_HEADERS, "ETag": self.etag}
        if self.etag in request.headers.get("if-none-match", ""):
            return Response(status_code=304, headers=headers)
        return Response(self.body, media_type=self.content_type, headers=headers)


def load_assets() -> dict[str, Asset]:
    """Every allowlisted file, read from the installed package."""
    return {name: Asset(name, content_type) for name, content_type in ASSETS.items()}


def install(app: FastAPI) -> None:
    """Add the page's routes to ``app`` (GET only, left out of the OpenAPI document); paths a plugin already
    serves (``/`` in particular) are left to it."""
    assets = load_assets()
    taken = {route.path for route in app.routes if isinstance(route, APIRoute) and "GET" in (route.methods or ())}
    page = assets["index.html"]

    async def index(request: Request) -> Response:
        return page.response(request)

    async def asset(request: Request, name: str) -> Response:
        found = assets.get(name)
        if found is None or name == "index.html":
            return _not_found(request)
        return found.response(request)

    async def root() -> Response:
        return RedirectResponse(PAGE_PATH, status_code=307, headers={"Cache-Control": "no-cache"})

    routes: list[tuple[str, Any]] = [(PAGE_PATH, index), (PAGE_PATH + "/", index), (PAGE_PATH + "/{name}", asset),
                                     ("/", root)]
    for path, handler in routes:
        if path not in taken:
            app.add_api_route(path, handler, methods=["GET"], include_in_schema=False, name=f"webui:{path}")


def _not_found(request: Request) -> Response:
    body = error_body(f"Unknown route: {request.method} {request.url.path}", "invalid_request_error",
                      code="unknown_route")
    return JSONResponse(body, status_code=404, headers={"X-Content-Type-Options": "nosniff"})
