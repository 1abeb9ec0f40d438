"""The gateway's HTTP/1.1 connections: uvicorn's h11 protocol with a deadline for each request's head.

uvicorn's keep-alive timer is reset by every byte received, so a client that sends a header byte every few seconds
(slow loris) keeps its connection, and a slot of the server's attention, for as long as it likes. Here a
connection must deliver each request's head within :data:`~gallama_kernel.protocol.limits.HEADER_TIMEOUT_S` of its
start (or of the request's first byte, for later requests on a kept-alive connection); else it is closed. Bodies
have their own deadline (``read_body``), and idle connections the keep-alive timeout.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from ..protocol import limits

log = logging.getLogger("gallama.gateway")


class HeadDeadlineH11(H11Protocol):
    """:class:`H11Protocol` closing connections whose request head does not arrive in time."""

    _head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._head_deadline is None and (self.cycle is None or self.cycle.response_complete):
            self._arm()  # the first byte of a later request on this connection
        super().data_received(data)

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:  # a request's head was complete: its cycle started
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._head_deadline = self.loop.call_later(limits.HEADER_TIMEOUT_S, self._too_slow)

    def _disarm(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _too_slow(self) -> None:
        self._head_deadline = None
        if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
            return
        peer = f"{self.client[0]}:{self.client[1]}" if self.client else "?"
        log.info("closed a connection from %s: no complete request head within %g s", peer, limits.HEADER_TIMEOUT_S)
        self.transport.close()
