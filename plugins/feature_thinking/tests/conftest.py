"""Fixtures for the end-to-end tests: a gallama server of our own, started with the kernel's public
``gallama_kernel.testing.RunningServer`` (real embedded model, real HTTP, 127.0.0.1 only).

The kernel's own ``server`` fixture is not visible from this folder, and ours needs
``GALLAMA_THINKING_MAX_TOKENS``: a short thinking budget keeps these tests fast on small CPUs.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from openai import OpenAI

from gallama_kernel.testing import RunningServer

THINKING_BUDGET = 96
"""Thinking tokens per request in these tests (the plugin's default is 512); test_thinking_e2e.py repeats it."""


@pytest.fixture(scope="session")
def thinking_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    running = RunningServer(tmp_path_factory.mktemp("gallama-thinking-home"),
                            env={"GALLAMA_THINKING_MAX_TOKENS": str(THINKING_BUDGET)})
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="session")
def client(thinking_server: RunningServer) -> OpenAI:
    return OpenAI(base_url=f"{thinking_server.base_url}/v1", api_key="unused", max_retries=0, timeout=600)
