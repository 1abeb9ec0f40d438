"""Fixtures that start the real server (real model, real HTTP) on a free loopback port.

The server helpers live in :mod:`gallama_kernel.testing` (plugin tests use them too); they are re-exported here
for the test modules that import them from ``conftest``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from openai import AsyncOpenAI, OpenAI

from gallama_kernel.testing import GALLAMA, RunningServer, free_port

__all__ = ["GALLAMA", "RunningServer", "free_port"]


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    running = RunningServer(tmp_path_factory.mktemp("gallama-home"))
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture()
def client(server: RunningServer) -> OpenAI:
    return OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture()
def async_client(server: RunningServer) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=120)
