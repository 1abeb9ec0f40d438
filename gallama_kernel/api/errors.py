"""Every error leaves the server in OpenAI's error shape."""

from __future__ import annotations

import logging
import uuid
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from ..protocol.errors import APIError, error_body

log = logging.getLogger("gallama.api")


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


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, error: APIError) -> JSONResponse:
        # 408/413 are answered before the body was read to its end: the connection cannot carry another request
        headers = {**(error.headers or {}), **({"connection": "close"} if error.status in (408, 413) else {})}
        return JSONResponse(error.body(), status_code=error.status, headers=headers or None)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {"loc": (), "msg": "invalid request"}
        param = ".".join(str(p) for p in first["loc"] if p != "body") or None
        return JSONResponse(error_body(f"Invalid value for '{param}': {first['msg']}", "invalid_request_error",
                                       param), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        kind = "invalid_request_error" if error.status_code < 500 else "server_error"
        message, code = routing_message(request, error)
        return JSONResponse(error_body(message, kind, code=code), status_code=error.status_code,
                            headers=error.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        return JSONResponse(internal_error_body(f"{request.method} {request.url.path}", error), status_code=500)


def internal_error_body(where: str, error: BaseException) -> dict[str, object]:
    """The body of an unexpected failure: "Internal error" and an incident id, nothing of the exception (paths,
    values, traces stay out of responses). The traceback is logged with the same id."""
    incident = uuid.uuid4().hex[:12]
    log.error("internal error %s in %s", incident, where, exc_info=error)
    return error_body(f"Internal error (incident {incident}; the server log has the details).", "server_error",
                      code="internal_error")
