"""Fixtures for the end-to-end tests: a gallama server of our own, started with the kernel's ``RunningServer``
(``tests/conftest.py``: real embedded model, real HTTP, 127.0.0.1 only).

The kernel's session ``server`` fixture is not visible from this folder (its conftest only covers ``tests/``),
and ours needs ``GALLAMA_THINKING_MAX_TOKENS``: a short thinking budget keeps these tests fast on small CPUs.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from openai import OpenAI

THINKING_BUDGET = 96
"""Thinking tokens per request in these tests (the plugin's default is 512); test_thinking_e2e.py repeats it."""

KERNEL_CONFTEST = Path(__file__).resolve().parents[3] / "tests" / "conftest.py"


def _kernel_fixtures() -> ModuleType:
    """The kernel's ``tests/conftest.py`` as a plain module (not registered with pytest: its fixtures stay
    where they are; we only use ``RunningServer``)."""
    spec = importlib.util.spec_from_file_location("gallama_kernel_test_fixtures", KERNEL_CONFTEST)
    assert spec is not None and spec.loader is not None, KERNEL_CONFTEST
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def thinking_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    running_server = _kernel_fixtures().RunningServer
    with pytest.MonkeyPatch.context() as patch:  # the server process inherits the environment
        patch.setenv("GALLAMA_THINKING_MAX_TOKENS", str(THINKING_BUDGET))
        running = running_server(tmp_path_factory.mktemp("gallama-thinking-home"))
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="session")
def client(thinking_server: Any) -> OpenAI:
    return OpenAI(base_url=f"{thinking_server.base_url}/v1", api_key="unused", max_retries=0, timeout=600)
