"""Reading HTTP requests safely, shared by the workers' routes and the gateway: content type, body size and
time, JSON nesting and unicode checked before anything parses the body (4xx otherwise), large bodies parsed off
the event loop, and work cancelled when its client leaves."""

from __future__ import annotations

import asyncio
import functools
import json
import re
from collections.abc import Awaitable
from typing import Any, TypeVar

from fastapi import Request
from starlette.requests import ClientDisconnect

from ..config import Settings
from ..protocol.errors import (
    ClientDisconnected,
    InvalidRequest,
    PayloadTooLarge,
    RequestTimeout,
    UnsupportedMediaType,
)
from ..protocol.limits import MAX_JSON_DEPTH

T = TypeVar("T")


@functools.cache
def body_limits() -> tuple[int, float]:
    """``(max_body_bytes, body_timeout_s)`` from the settings (``GALLAMA_MAX_BODY_BYTES``,
    ``GALLAMA_BODY_TIMEOUT_S``), read once per process."""
    settings = Settings()
    return settings.max_body_bytes, settings.body_timeout_s


def check_content_type(request: Request) -> None:
    """Only ``application/json`` (parameters such as ``charset`` allowed): a web page can POST ``text/plain`` or
    a form to 127.0.0.1 cross-site without a preflight, but not ``application/json``."""
    given = request.headers.get("content-type", "")
    if given.partition(";")[0].strip().lower() != "application/json":
        shown = given[:100] if given.isprintable() else repr(given[:100])
        raise UnsupportedMediaType(f"Content-Type must be application/json (got {shown or 'none'}).",
                                   code="unsupported_media_type")


async def read_body(request: Request, max_bytes: int | None = None, timeout_s: float | None = None) -> bytes:
    """The body, refused while it arrives when it grows past ``max_bytes`` (413) or takes longer than
    ``timeout_s`` in all (408). Defaults: :func:`body_limits`. Later ``request.body()`` calls get it too."""
    if hasattr(request, "_body"):
        return request._body
    default_bytes, default_timeout = body_limits()
    max_bytes = default_bytes if max_bytes is None else max_bytes
    timeout_s = default_timeout if timeout_s is None else timeout_s
    too_large = PayloadTooLarge(f"The request body is larger than the limit of {max_bytes} bytes "
                                "(GALLAMA_MAX_BODY_BYTES).", code="body_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_bytes:
                    raise too_large
                chunks.append(chunk)
    except TimeoutError:
        raise RequestTimeout(f"The request body did not arrive within {timeout_s:g} s (GALLAMA_BODY_TIMEOUT_S).",
                             code="body_timeout") from None
    except ClientDisconnect:
        raise ClientDisconnected("The client disconnected while sending the request body.") from None
    request._body = b"".join(chunks)
    return request._body


_JSON_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*+"|"|[\[\]{}]', re.DOTALL)
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def check_depth(raw: bytes, limit: int = MAX_JSON_DEPTH) -> None:
    """Refuse JSON nested deeper than ``limit`` before parsing it (deep nesting exhausts the parser's stack)."""
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return
    depth = 0
    for token in _JSON_TOKENS.finditer(raw):
        bracket = raw[token.start():token.start() + 1]  # not group(): strings would be copied
        if bracket in (b"[", b"{"):
            depth += 1
            if depth > limit:
                raise InvalidRequest(f"The request body nests JSON arrays/objects deeper than the limit of {limit} "
                                     "levels.", code="body_too_deep")
        elif bracket in (b"]", b"}"):
            depth -= 1
        elif token.end() - token.start() == 1 and bracket == b'"':
            # a string that never ends: not JSON (the parser says so); rescanning from each quote is quadratic
            return


def _has_lone_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_lone_surrogate(item) for item in value)
    return False


def parse_json(raw: bytes) -> Any:
    """``raw`` parsed, or a 400: invalid JSON, nesting past :data:`MAX_JSON_DEPTH`, or a ``\\uD800``-style
    escape that is not half of a surrogate pair (such a string cannot be encoded as UTF-8 later on)."""
    check_depth(raw)
    try:
        value = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InvalidRequest(f"The request body is not valid JSON: {error}") from None
    except RecursionError:  # a limit below MAX_JSON_DEPTH somewhere; never a 500
        raise InvalidRequest("The request body nests JSON arrays/objects too deeply.", code="body_too_deep") from None
    if _SURROGATE_ESCAPE.search(raw) and _has_lone_surrogate(value):
        raise InvalidRequest("The request body has an invalid unicode escape: a lone surrogate (\\ud800-\\udfff "
                             "not part of a pair).", code="invalid_unicode")
    return value


INLINE_PARSE_BYTES = 64 * 1024
"""Bodies up to this size are parsed on the event loop; larger ones (up to 8 MiB: tenths of a second to parse and
validate) in a preparation thread, so that other clients' streams keep flowing meanwhile."""


async def read_json(request: Request) -> Any:
    """A POST body as JSON: content type, size, time, nesting depth and unicode checked (4xx otherwise)."""
    check_content_type(request)
    raw = await read_body(request)
    return parse_json(raw) if len(raw) <= INLINE_PARSE_BYTES else await asyncio.to_thread(parse_json, raw)


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Run ``work``; cancel it (which aborts its generation) if the client goes away first."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)  # let the generation unwind
    if task.cancelled():
        raise ClientDisconnected("The client disconnected before the response was ready.")
    return task.result()
