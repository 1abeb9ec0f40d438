"""Fixtures shared by the embedding backend's tests."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """One event loop for the module, like a server's: the batching loop starts on it once."""
    running = asyncio.new_event_loop()
    yield running
    running.close()
