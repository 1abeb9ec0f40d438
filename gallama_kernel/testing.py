"""Helpers for testing gallama plugins, inside this repository or without a checkout of it.

Two ways to exercise a plugin:

* in process, fast and without a model: :func:`worker_app` builds the application one worker process serves, with
  the backends and plugins you choose (a :class:`DummyBackend` answers a fixed text); drive it with FastAPI's or
  Starlette's ``TestClient`` (used as a context manager, so that closing it unloads the models)::

      from fastapi.testclient import TestClient
      from gallama_kernel.testing import DummyBackend, dummy_spec, worker_app

      app = worker_app([DummyBackend(dummy_spec())], {"mine": my_plugin_module})
      with TestClient(app) as client:
          client.post("/v1/chat/completions", json={"model": "dummy", "messages": [...]})

* end to end: :class:`RunningServer` starts the real product (``gallama run``) on a free loopback port with a
  private home folder, and stops it afterwards::

      with RunningServer(tmp_path, "-id", "model_id=...") as server:
          OpenAI(base_url=f"{server.base_url}/v1", api_key="unused")

This module is part of the runtime package: it uses the standard library and the kernel only (no ``pytest``,
``httpx`` or ``openai``), so importing it adds no test dependency to a plugin.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from .backend import Backend, GenerationEvent, GenerationRequest, ProgressCallback
from .config import ModelSpec, check_backend_keys

if TYPE_CHECKING:
    from fastapi import FastAPI

__all__ = ["GALLAMA", "DummyBackend", "RunningServer", "dummy_spec", "free_port", "worker_app"]

GALLAMA = Path(sys.executable).with_name("gallama")
"""The ``gallama`` executable of the running Python environment."""

LOG_TAIL = 3000
"""Characters of the server log quoted when it fails to start."""


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now (the operating system picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RunningServer:
    """The real product, ``gallama run --host 127.0.0.1 --port <free port> *args``, ready to answer.

    :param home: a private folder used as ``GALLAMA_HOME_PATH``; the server's output goes to a log file in it
        (:attr:`log`).
    :param args: more ``gallama run`` arguments (``"-id", "model_id=..."``); without any, the default model.
    :param env: environment variables set for the server on top of this process's environment.
    :param timeout: seconds to wait for ``GET /health`` to answer 200.
    :raises RuntimeError: when the server exits before it is ready, or is not ready in time (it is then
        stopped); the message ends with the tail of the log.

    Attributes: ``port``, ``base_url`` (``http://127.0.0.1:<port>``), ``log`` (path of the log file) and
    ``process`` (the :class:`subprocess.Popen`). Use it as a context manager to stop it on exit, or call
    :meth:`stop`.
    """

    def __init__(self, home: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 120) -> None:
        home = Path(home)
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log = home / f"server-{self.port}.log"
        environment = {**os.environ, "GALLAMA_HOME_PATH": str(home), **(env or {})}
        command = [str(GALLAMA), "run", "--host", "127.0.0.1", "--port", str(self.port), *args]
        with self.log.open("w") as log:
            self.process = subprocess.Popen(command, env=environment, stdout=log, stderr=subprocess.STDOUT)
        self._wait_ready(timeout)

    def _log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-LOG_TAIL:]
        except OSError:
            return ""

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited early (exit status {self.process.returncode}):\n"
                                   f"{self._log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.base_url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except (OSError, ValueError):  # not listening yet, or not healthy yet (HTTPError is an OSError)
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"server did not become ready within {timeout:g} s:\n{self._log_tail()}")

    def health(self) -> dict[str, Any]:
        """The body of ``GET /health``; an error status raises :class:`urllib.error.HTTPError`."""
        with urllib.request.urlopen(f"{self.base_url}/health", timeout=10) as response:
            return json.loads(response.read())

    def stop(self) -> None:
        """Terminate the server process (by its PID), wait up to 20 s, then kill it."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()


class DummyBackend(Backend):
    """A backend that needs no model: tokens are code points, and every generation answers :attr:`reply` in one
    event, then finishes with ``"stop"``. Subclass it to change :attr:`reply` (or :attr:`name`)."""

    name = "dummy"
    reply: str = "hello"
    """The text of every answer."""

    def load(self, progress: ProgressCallback | None = None) -> None:
        if progress:
            progress(1.0)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        yield GenerationEvent(self.reply, 1)
        yield GenerationEvent("", 1, finish_reason="stop", prompt_tokens=len(request.prompt_tokens))

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        return [ord(c) for c in text]

    def detokenize(self, tokens: list[int]) -> str:
        return "".join(chr(t) for t in tokens)

    @property
    def context_length(self) -> int:
        return 4096


def dummy_spec(name: str = "dummy", **keys: Any) -> ModelSpec:
    """A model spec for :class:`DummyBackend`: ``ModelSpec(model_id=name, backend="dummy", **keys)``."""
    return ModelSpec(model_id=name, backend="dummy", **keys)


def worker_app(models: Sequence[Backend], plugins: Mapping[str, object] | None = None, *,
               entry_points: bool = False) -> FastAPI:
    """The application one worker process serves, in this process, with the chosen models and plugins.

    :param models: backend instances, already constructed; each spec is checked against its backend's declared
        keys (its options validated, defaults filled), then the backend is loaded here (``backend.load()``) and
        served under ``backend.spec.name`` (and the spec's aliases).
    :param plugins: name -> plugin (a module, or an object with ``@hookimpl`` methods), registered in this order.
    :param entry_points: also load the installed plugins (entry points of the ``gallama`` group) first.

    Drive the result with ``fastapi.testclient.TestClient`` as a context manager: leaving it closes the models.
    """
    from .api.app import create_app
    from .pipeline.models import ModelRegistry, ServedModel
    from .plugins import PluginHost

    host = PluginHost()
    if entry_points:
        host.load_entry_points()
    for name, plugin in (plugins or {}).items():
        host.register(plugin, name)
    registry = ModelRegistry()
    for backend in models:  # checked against the backend's declared keys, as a worker does
        backend.spec = check_backend_keys(backend.spec, type(backend), f"model '{backend.spec.name}'")
        backend.load()
        registry.add(ServedModel(backend.spec.name, backend, aliases=list(backend.spec.aliases)))
    return create_app(registry, host)
