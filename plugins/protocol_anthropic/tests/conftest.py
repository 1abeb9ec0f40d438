"""The real server (``gallama run`` through its gateway, embedded SmolLM2, loopback only) with this plugin."""

from __future__ import annotations

from collections.abc import Iterator

import anthropic
import pytest

from gallama_kernel.testing import RunningServer


@pytest.fixture(scope="session")
def anthropic_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with RunningServer(tmp_path_factory.mktemp("gallama-anthropic-home")) as server:
        yield server


@pytest.fixture()
def client(anthropic_server: RunningServer) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=anthropic_server.base_url, api_key="unused", max_retries=0, timeout=300)
