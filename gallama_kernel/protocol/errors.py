"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

from typing import Any


class APIError(Exception):
    """An error returned to the client with ``status`` and OpenAI's error body."""

    status = 500
    type = "server_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers  # sent with the response (Retry-After, WWW-Authenticate)

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


class InvalidRequest(APIError):
    status = 400
    type = "invalid_request_error"


class ModelNotFound(APIError):
    status = 404
    type = "invalid_request_error"

    def __init__(self, model: str, available: list[str]) -> None:
        super().__init__(f"The model '{model}' does not exist. Available models: {', '.join(available) or 'none'}",
                         param="model", code="model_not_found")


class NotFound(APIError):
    status = 404
    type = "invalid_request_error"


class Unauthorized(APIError):
    """No key, or a key the server does not know."""

    status = 401
    type = "invalid_request_error"


class Forbidden(APIError):
    """A known key that may not do this (its scope, or the model)."""

    status = 403
    type = "invalid_request_error"


class TooManyRequests(APIError):
    """A quota or a queue is full: ``headers`` carry ``Retry-After``."""

    status = 429
    type = "rate_limit_error"


class RequestTimeout(APIError):
    """The body did not arrive within its deadline."""

    status = 408
    type = "invalid_request_error"


class PayloadTooLarge(APIError):
    status = 413
    type = "invalid_request_error"


class UnsupportedMediaType(APIError):
    status = 415
    type = "invalid_request_error"


class ClientDisconnected(APIError):
    """Nobody is left to read the response; the status is only logged."""

    status = 499
    type = "client_disconnected"


class BadGateway(APIError):
    """An engine behind this server (a remote one) failed or answered something invalid."""

    status = 502
    type = "server_error"


class ServiceUnavailable(APIError):
    status = 503
    type = "server_error"


class GatewayTimeout(APIError):
    """An engine behind this server did not answer in time."""

    status = 504
    type = "server_error"


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
