"""Who may call the gateway, how much, and a record of every call.

Keys (``keys.py``): inference routes need a key once inference keys exist (``GALLAMA_API_KEYS`` or the key file);
administration (model management, ``/metrics``, routes a plugin marks as admin) needs an admin key once any key
exists, so ``GALLAMA_ADMIN_KEY`` alone protects administration only, as before. With no key at all the server is
open, which ``gallama run`` allows on loopback addresses only without a warning. A missing or unknown key is a 401,
a key without the scope or the model a 403; tokens sent to an open server are ignored (OpenAI clients always send
one).

Quotas: a key's concurrent requests and tokens per minute (:class:`~gallama_kernel.keys.QuotaTracker`); over
either, a 429 naming the limit with ``Retry-After``. Tokens are counted from the response's ``usage`` (streams:
the worker's closing ``: usage`` comment, which the gateway reads and does not relay).

Request records: every request gets an id (``x-request-id`` when the client sent a plain one, else generated),
returned in the response's ``x-request-id`` and passed to the worker; one log line per request says method, path,
status, model, key id (never the key), tokens, time to first byte and duration, as text or JSON
(``--log-format json``).
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..keys import Admission, KeyStore, Principal, QuotaTracker, Refusal, token_from_headers
from ..protocol.errors import Forbidden, TooManyRequests, Unauthorized

log = logging.getLogger("gallama.access")

REQUEST_ID_HEADER = "x-request-id"
_PLAIN_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
MAX_GAPS = 100_000


@dataclass
class CallRecord:
    """What one request did, filled in as it goes; logged once at its end (see :class:`RequestLog`)."""

    request_id: str
    method: str
    path: str
    started: float = field(default_factory=time.perf_counter)
    status: int | None = None
    model: str | None = None
    key_id: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    first_byte_s: float | None = None
    first_token_s: float | None = None  # streams: until the first generated chunk
    gaps: list[float] = field(default_factory=list)  # streams: between generated chunks (at most MAX_GAPS)
    admission: Admission | None = None
    _last_chunk: float | None = None

    def chunk(self) -> None:
        """A generated chunk of a stream went out now."""
        now = time.perf_counter()
        if self.first_token_s is None:
            self.first_token_s = now - self.started
        elif self._last_chunk is not None and len(self.gaps) < MAX_GAPS:
            self.gaps.append(now - self._last_chunk)
        self._last_chunk = now

    def count(self, usage: Any) -> None:
        """Add the token counts of a response's ``usage`` object (a mixture of agents has several; anything
        that is not a usage object is ignored)."""
        if not isinstance(usage, dict):
            return
        for key in ("prompt_tokens", "completion_tokens"):
            if isinstance(usage.get(key), int):
                setattr(self, key, (getattr(self, key) or 0) + usage[key])
        details = usage.get("prompt_tokens_details")
        if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
            self.cached_tokens = (self.cached_tokens or 0) + details["cached_tokens"]

    @property
    def tokens(self) -> int:
        return (self.prompt_tokens or 0) + (self.completion_tokens or 0)

    def finish(self) -> None:
        """Release the key's quota slot, counting this request's tokens. Idempotent."""
        if self.admission is not None:
            self.admission.finish(self.tokens)


def printable(text: str, limit: int = 200) -> str:
    """``text`` safe for one log line: control characters escaped (a name or path with a newline cannot forge a
    line), at most ``limit`` characters."""
    return text[:limit].encode("unicode_escape").decode("ascii")


def record_of(scope: Scope) -> CallRecord | None:
    return scope.get("state", {}).get("call")


class Access:
    """Keys and quotas of one gateway."""

    def __init__(self, store: KeyStore, quotas: QuotaTracker | None = None) -> None:
        self.store = store
        self.quotas = quotas or QuotaTracker()

    def authorize(self, headers: Any, scope: str) -> Principal | None:
        """The caller's key for ``scope`` ("inference" or "admin"); ``None`` when that scope needs no key.
        Raises 401 (no or unknown key) or 403 (a key without the scope)."""
        needed = self.store.inference_configured if scope == "inference" else self.store.configured
        if not needed:
            return None
        principal = self.store.authenticate(token_from_headers(headers))
        if principal is None:
            raise Unauthorized("A valid API key is required: send it as 'Authorization: Bearer <key>' or "
                               "'x-api-key: <key>'.", code="invalid_api_key",
                               headers={"www-authenticate": "Bearer"})
        if not principal.allows(scope):  # type: ignore[arg-type]
            if scope == "admin" and not self.store.admin_configured:
                message = ("This endpoint needs an admin key, and none is configured: set GALLAMA_ADMIN_KEY or "
                           "create one with 'gallama keys add NAME --admin'.")
            else:
                message = "This endpoint needs an admin key; the key sent is an inference key."
            raise Forbidden(message, code="insufficient_scope")
        return principal

    @staticmethod
    def check_model(principal: Principal | None, names: list[str], asked: str) -> None:
        """403 unless ``principal`` may use the model served under ``names`` (its name and aliases)."""
        if principal is not None and not any(principal.may_use(name) for name in names):
            raise Forbidden(f"This key may not use the model '{asked}'.", param="model", code="model_not_allowed")

    @staticmethod
    def visible(principal: Principal | None, names: list[str]) -> bool:
        return principal is None or any(principal.may_use(name) for name in names)

    def admit(self, principal: Principal | None, record: CallRecord | None) -> None:
        """Count the request against its key's quotas (released by :meth:`CallRecord.finish`); 429 when over."""
        if principal is None or (principal.max_concurrent is None and principal.tokens_per_minute is None):
            return
        outcome = self.quotas.admit(principal)
        if isinstance(outcome, Refusal):
            raise TooManyRequests(outcome.message, code=f"{outcome.limit}_exceeded", headers=outcome.headers)
        if record is not None:
            record.admission = outcome
        else:  # no record to release it at the end: nothing to count tokens against
            outcome.finish(0)


class RequestLog:
    """ASGI middleware: a request id and one log line per HTTP request (see the module docstring)."""

    def __init__(self, app: ASGIApp, observers: list[Callable[[CallRecord, float], None]] | None = None) -> None:
        """:param observers: called with each finished request and its duration (metrics)."""
        self.app = app
        self.observers = observers or []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers") or []).get(REQUEST_ID_HEADER.encode(), b"").decode("latin-1")
        request_id = given if _PLAIN_ID.fullmatch(given) else f"req_{uuid.uuid4().hex[:24]}"
        record = CallRecord(request_id, scope.get("method", ""), printable(scope.get("path", "")))
        scope.setdefault("state", {})["call"] = record

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
                message["headers"] = [*message.get("headers", []),
                                      (REQUEST_ID_HEADER.encode(), request_id.encode())]
            elif message["type"] == "http.response.body" and record.first_byte_s is None and message.get("body"):
                record.first_byte_s = time.perf_counter() - record.started
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception:
            record.status = record.status or 500  # answered by the outermost error handler
            raise
        finally:
            record.finish()
            duration = time.perf_counter() - record.started
            write(record, duration)
            for observe in self.observers:
                observe(record, duration)


def write(record: CallRecord, duration: float) -> None:
    """The request's log line: text, or (with :class:`~gallama_kernel.logformat.JsonLines`) its fields as keys."""
    fields: dict[str, Any] = {
        "event": "request", "request_id": record.request_id, "method": record.method, "path": record.path,
        "status": record.status or 499, "model": record.model, "key": record.key_id,
        "prompt_tokens": record.prompt_tokens, "completion_tokens": record.completion_tokens,
        "cached_tokens": record.cached_tokens,
        "first_byte_ms": round(record.first_byte_s * 1000, 1) if record.first_byte_s is not None else None,
        "duration_ms": round(duration * 1000, 1),
    }
    text = " ".join(f"{k}={v}" for k, v in fields.items()
                    if v is not None and k not in ("event", "method", "path"))
    log.info("%s %s %s", record.method, record.path, text, extra={"fields": fields})
