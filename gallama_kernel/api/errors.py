"""Every error leaves the server in OpenAI's error shape, or in the error format a plugin route asks for
(``openapi_extra=error_format(name)``, formats from ``register_error_formats``)."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Mapping
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from ..hookspecs import ERROR_FORMAT_KEY
from ..protocol.errors import APIError, error_body

log = logging.getLogger("gallama.api")
ErrorFormats = Mapping[str, Callable[[int, dict[str, Any]], dict[str, Any]]]


def route_format(scope: Mapping[str, Any]) -> str | None:
    """The error format the matched route asks for, if any."""
    extra = getattr(scope.get("route"), "openapi_extra", None)
    name = extra.get(ERROR_FORMAT_KEY) if isinstance(extra, dict) else None
    return name if isinstance(name, str) else None


def render_error(formats: ErrorFormats, name: str | None, status: int, body: dict[str, Any]) -> dict[str, Any]:
    """``body`` (OpenAI's shape) in the format ``name``; unchanged without one, or when the format fails."""
    render = formats.get(name) if name is not None else None
    if render is None:
        return body
    try:
        return render(status, body)
    except Exception:  # a plugin's renderer must not turn one error into another
        log.exception("error format %s failed; answering in OpenAI's shape", name)
        return body


def routing_message(request: Request, error: HTTPException) -> tuple[str, str | None]:
    """Message and code of an HTTP error. The router's own 404 and 405 carry only the status phrase, which
    clients report as "model not found"; they say which method and path did not match instead."""
    if error.detail != HTTPStatus(error.status_code).phrase:
        return str(error.detail), None
    route = f"{request.method} {request.url.path}"
    if error.status_code == 404:
        return f"Unknown route: {route}", "unknown_route"
    if error.status_code == 405:
        allowed = (error.headers or {}).get("Allow", "")
        return f"{route} is not allowed" + (f" (allowed: {allowed})" if allowed else ""), "method_not_allowed"
    return str(error.detail), None


def install_error_handlers(app: FastAPI, formats: ErrorFormats | None = None) -> None:
    """OpenAI-shaped error responses, or the ``formats`` a route asks for."""
    known: ErrorFormats = formats or {}

    def respond(request: Request, status: int, body: dict[str, Any],
                headers: Mapping[str, str] | None = None) -> JSONResponse:
        return JSONResponse(render_error(known, route_format(request.scope), status, body), status_code=status,
                            headers=dict(headers) if headers else None)

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        # 408/413 are answered before the body was read to its end: the connection cannot carry another request
        headers = {**(error.headers or {}), **({"connection": "close"} if error.status in (408, 413) else {})}
        return respond(request, error.status, error.body(), headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {"loc": (), "msg": "invalid request"}
        param = ".".join(str(p) for p in first["loc"] if p != "body") or None
        return respond(request, 400, error_body(f"Invalid value for '{param}': {first['msg']}",
                                                "invalid_request_error", param))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        kind = "invalid_request_error" if error.status_code < 500 else "server_error"
        message, code = routing_message(request, error)
        return respond(request, error.status_code, error_body(message, kind, code=code), error.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        return respond(request, 500, internal_error_body(f"{request.method} {request.url.path}", error))


def internal_error_body(where: str, error: BaseException) -> dict[str, object]:
    """The body of an unexpected failure: "Internal error" and an incident id, nothing of the exception (paths,
    values, traces stay out of responses). The traceback is logged with the same id."""
    incident = uuid.uuid4().hex[:12]
    log.error("internal error %s in %s", incident, where, exc_info=error)
    return error_body(f"Internal error (incident {incident}; the server log has the details).", "server_error",
                      code="internal_error")
