"""Fixtures: the real server (embedded SmolLM2 model, loopback only) with this plugin installed.

The server helper is the kernel's public ``gallama_kernel.testing.RunningServer``: these tests need the kernel
installed, not a checkout of its repository.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from openai import OpenAI

from gallama_kernel.testing import RunningServer


@pytest.fixture(scope="module")
def start_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., RunningServer]]:
    """``start_server(*cli_args)``: a running server (``RunningServer``), stopped after the module."""
    started: list[RunningServer] = []

    def start(*args: str) -> RunningServer:
        running = RunningServer(tmp_path_factory.mktemp("gallama-home"), *args)
        started.append(running)
        return running

    try:
        yield start
    finally:
        for running in started:
            running.stop()


@pytest.fixture(scope="module")
def artifact_server(start_server: Callable[..., RunningServer]) -> RunningServer:
    return start_server()


@pytest.fixture()
def client(artifact_server: RunningServer) -> OpenAI:
    return OpenAI(base_url=f"{artifact_server.base_url}/v1", api_key="unused", max_retries=0, timeout=300)
