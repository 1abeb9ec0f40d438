"""The gateway's HTTP/1.1 client for its own workers: a request out, the response back piece by piece.

Every streamed token crosses the gateway, and on a small CPU each microsecond spent there is taken from the
model's compute threads. So proxied requests skip a general-purpose client: this one writes the request in one
call, reads the status line and headers, then hands back the body as the worker frames it (each chunk of a
chunked response is one piece, which for a worker's event stream is one event). Connections are kept per worker
address and reused; an idle one is dropped after ``keepalive_s``, shorter than the workers' own keep-alive, so
a request is never written into a connection the worker is closing.

It speaks only what workers (uvicorn) answer: ``content-length`` or ``chunked`` bodies, or a body up to the
connection's end. Backends in front of another engine use it too (``gallama_kernel.plugin.UpstreamClient``): a
streamed generation is one chunk per token, whose trip through a general-purpose client costs more CPU than the
rest of the relay together; ``tls=True`` speaks HTTPS.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

CONNECT_TIMEOUT_S = 10.0
MAX_IDLE_PER_ADDRESS = 64


class UpstreamError(Exception):
    """The worker could not be reached, or broke the response off."""


Address = tuple[str, int, bool]  # host, port, TLS


@dataclass
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    idle_since: float = field(default_factory=time.monotonic)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


class UpstreamResponse:
    """Status and headers of a worker's response; the body through :meth:`pieces` or :meth:`read`."""

    def __init__(self, client: UpstreamClient, address: Address, connection: _Connection, status: int,
                 headers: dict[str, str]) -> None:
        self._client = client
        self._address = address
        self._connection: _Connection | None = connection
        self.status = status
        self.headers = headers

    async def pieces(self) -> AsyncIterator[bytes]:
        """The body as it arrives: one piece per chunk of a chunked body. Read to its end, the connection goes
        back to the pool; ended early (cancelled, closed by the caller) or broken, it is closed, which the worker
        sees as its client going away."""
        connection = self._connection
        if connection is None:
            return
        reader = connection.reader
        reusable = self.headers.get("connection", "").lower() != "close"
        complete = False
        try:
            if self.headers.get("transfer-encoding", "").lower() == "chunked":
                while size := int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16):
                    yield (await reader.readexactly(size + 2))[:-2]
                while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                    pass
            elif "content-length" in self.headers:
                if length := int(self.headers["content-length"]):
                    yield await reader.readexactly(length)
            else:
                reusable = False
                while data := await reader.read(65536):
                    yield data
            complete = True
        except (OSError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as error:
            raise UpstreamError(f"the response broke off ({type(error).__name__})") from None
        finally:
            self._connection = None
            if complete and reusable:
                self._client._release(self._address, connection)
            else:
                connection.close()

    async def read(self) -> bytes:
        return b"".join([piece async for piece in self.pieces()])

    def close(self) -> None:
        """Drop the connection unless the body was read to its end."""
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()


WORKER_SECRET_HEADER = "x-gallama-worker-secret"
"""Every request to a worker carries its gateway's per-run secret: a worker answers nobody else (see worker.py)."""


class UpstreamClient:
    """Keep-alive HTTP/1.1 connections per address. ``secret``: the gateway's worker secret, sent with every
    request; ``keepalive_s``: shorter than the server's own keep-alive."""

    def __init__(self, keepalive_s: float, secret: str | None = None) -> None:
        self.keepalive_s = keepalive_s
        self.secret = secret
        self._idle: dict[Address, list[_Connection]] = {}
        self._tls: ssl.SSLContext | None = None
        self._pruned_at = time.monotonic()

    async def post(self, host: str, port: int, path: str, body: bytes, content_type: str = "application/json",
                   headers: dict[str, str] | None = None) -> UpstreamResponse:
        return await self.request("POST", host, port, path, body, content_type, headers)

    async def get(self, host: str, port: int, path: str) -> UpstreamResponse:
        return await self.request("GET", host, port, path)

    async def request(self, method: str, host: str, port: int, path: str, body: bytes = b"",
                      content_type: str = "application/json", headers: dict[str, str] | None = None, *,
                      tls: bool = False, connect_timeout_s: float = CONNECT_TIMEOUT_S) -> UpstreamResponse:
        extra = {**({WORKER_SECRET_HEADER: self.secret} if self.secret else {}), **(headers or {})}
        lines = "".join(f"{name}: {value}\r\n" for name, value in extra.items())  # values are the gateway's own
        head = (f"{method} {path} HTTP/1.1\r\nhost: {host}:{port}\r\ncontent-type: {content_type}\r\n"
                f"content-length: {len(body)}\r\n{lines}\r\n").encode()
        address = (host, port, tls)
        if time.monotonic() - self._pruned_at > self.keepalive_s:
            self._prune()
        connection = self._reuse(address)
        if connection is not None:
            try:
                return await self._exchange(address, connection, head + body)
            except UpstreamError:  # the worker closed it meanwhile (restarted, say): once more on a new one
                pass
        if tls and self._tls is None:
            self._tls = ssl.create_default_context()
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, ssl=self._tls if tls else None), connect_timeout_s)
        except (TimeoutError, OSError) as error:
            raise UpstreamError(f"cannot connect ({type(error).__name__})") from None
        return await self._exchange(address, _Connection(reader, writer), head + body)

    async def _exchange(self, address: Address, connection: _Connection, request: bytes) -> UpstreamResponse:
        try:
            connection.writer.write(request)
            status_line = await connection.reader.readuntil(b"\r\n")
            status = int(status_line.split(b" ", 2)[1])
            headers: dict[str, str] = {}
            while (line := await connection.reader.readuntil(b"\r\n")) != b"\r\n":
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
        except (OSError, ValueError, IndexError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as error:
            connection.close()
            raise UpstreamError(f"no response ({type(error).__name__})") from None
        except BaseException:  # cancelled while waiting: the worker must see the request abandoned
            connection.close()
            raise
        return UpstreamResponse(self, address, connection, status, headers)

    def _reuse(self, address: Address) -> _Connection | None:
        idle = self._idle.get(address)
        now = time.monotonic()
        while idle:
            connection = idle.pop()
            if now - connection.idle_since < self.keepalive_s and not connection.reader.at_eof():
                return connection
            connection.close()
        return None

    def _release(self, address: Address, connection: _Connection) -> None:
        idle = self._idle.setdefault(address, [])
        if len(idle) >= MAX_IDLE_PER_ADDRESS:
            connection.close()
            return
        connection.idle_since = time.monotonic()
        idle.append(connection)

    def _prune(self) -> None:
        """Close expired idle connections, those to workers that were restarted on another port included."""
        now = self._pruned_at = time.monotonic()
        for address, idle in list(self._idle.items()):
            keep = [c for c in idle if now - c.idle_since < self.keepalive_s and not c.reader.at_eof()]
            for connection in idle:
                if connection not in keep:
                    connection.close()
            if keep:
                self._idle[address] = keep
            else:
                del self._idle[address]

    def close(self) -> None:
        for idle in self._idle.values():
            for connection in idle:
                connection.close()
        self._idle.clear()
