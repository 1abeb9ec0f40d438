"""The real server (``gallama run`` through its gateway, embedded SmolLM2, loopback only) with this plugin."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from gallama_kernel.testing import RunningServer

KEYS = "responses-key-one,responses-key-two"


@pytest.fixture(scope="session")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gallama-responses-home")


@pytest.fixture(scope="session")
def responses_server(home: Path) -> Iterator[RunningServer]:
    with RunningServer(home, env={"GALLAMA_API_KEYS": KEYS}) as server:
        yield server


@pytest.fixture()
def client(responses_server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{responses_server.base_url}/v1", api_key="responses-key-one", max_retries=0,
                         timeout=300)


@pytest.fixture()
def other_client(responses_server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{responses_server.base_url}/v1", api_key="responses-key-two", max_retries=0,
                         timeout=300)
