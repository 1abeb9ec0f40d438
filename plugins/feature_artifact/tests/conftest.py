"""Fixtures: the real server (embedded SmolLM2 model, loopback only) with this plugin installed.

The server helper is the kernel's own ``RunningServer`` from the repository's ``tests/conftest.py``, loaded by
path (the repository root is not on ``sys.path`` under pytest, so ``from tests.conftest import …`` does not
work). Without a kernel checkout next to this plugin, the end-to-end tests are skipped.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from openai import OpenAI

KERNEL_CONFTEST = Path(__file__).resolve().parents[3] / "tests" / "conftest.py"


def _kernel_fixtures() -> ModuleType | None:
    if not KERNEL_CONFTEST.is_file():
        return None
    spec = importlib.util.spec_from_file_location("gallama_kernel_tests_conftest", KERNEL_CONFTEST)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_KERNEL = _kernel_fixtures()


@pytest.fixture(scope="module")
def start_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Any]]:
    """``start_server(*cli_args)``: a running server (the kernel's ``RunningServer``), stopped after the module."""
    if _KERNEL is None:
        pytest.skip(f"the kernel's test helpers are not at {KERNEL_CONFTEST}")
    started: list[Any] = []

    def start(*args: str) -> Any:
        running = _KERNEL.RunningServer(tmp_path_factory.mktemp("gallama-home"), *args)
        started.append(running)
        return running

    try:
        yield start
    finally:
        for running in started:
            running.stop()


@pytest.fixture(scope="module")
def artifact_server(start_server: Callable[..., Any]) -> Any:
    return start_server()


@pytest.fixture()
def client(artifact_server: Any) -> OpenAI:
    return OpenAI(base_url=f"{artifact_server.base_url}/v1", api_key="unused", max_retries=0, timeout=300)
