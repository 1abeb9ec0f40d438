"""The product as its users get it: ``make run`` in an environment that ``make install`` alone made.

Run by ``make smoke`` with the system Python; it uses the standard library only, so nothing that the test extra
installs can hide a missing runtime dependency. It starts ``make run`` (HOST/PORT overridden: 127.0.0.1 and a free
port; a fresh GALLAMA_HOME_PATH), waits until it is ready, checks what it printed, lists ``/v1/models``, sends one
chat request, one streamed chat request, one ``/v1/completions``, one ``/v1/messages`` and one ``/v1/responses``
request, loads the chat page's files, and stops it. Then it starts it a second time and checks that make installed
nothing again. Exits non-zero on the first failure.

    python3 tests/smoke.py [--make "make run VENV=.venv-smoke"] [--timeout 600]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2"


class SmokeFailure(Exception):
    pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def call(base: str, path: str, body: dict[str, Any] | None = None, timeout: float = 120) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(base + path, data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


class Server:
    """``make run`` in its own process group, so that stopping it stops gallama and its workers too."""

    def __init__(self, command: list[str], home: Path, log: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = {**os.environ, "GALLAMA_HOME_PATH": str(home)}
        with log.open("w") as out:
            self.process = subprocess.Popen([*command, "HOST=127.0.0.1", f"PORT={self.port}"], cwd=ROOT, env=env,
                                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.started = time.monotonic()

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float) -> float:
        deadline = self.started + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SmokeFailure(f"make run exited with {self.process.returncode}:\n{self.output()[-4000:]}")
            try:
                status, _ = call(self.base, "/health", timeout=5)
                if status == 200:
                    return time.monotonic() - self.started
            except OSError:
                pass
            time.sleep(0.5)
        raise SmokeFailure(f"not ready after {timeout:.0f} s:\n{self.output()[-4000:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise SmokeFailure(message)


def check_requests(base: str) -> None:
    status, body = call(base, "/v1/models")
    expect(status == 200, f"GET /v1/models: {status} {body[:500]!r}")
    names = [card["id"] for card in json.loads(body)["data"]]
    expect(MODEL in names, f"GET /v1/models lists {names}, not {MODEL}")

    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 16}
    status, body = call(base, "/v1/chat/completions", chat)
    expect(status == 200, f"POST /v1/chat/completions: {status} {body[:500]!r}")
    reply = json.loads(body)
    expect(bool(reply["choices"][0]["message"]["content"]), f"empty chat answer: {reply}")
    expect(reply["usage"]["completion_tokens"] >= 1, f"no usage: {reply}")

    status, body = call(base, "/v1/chat/completions", {**chat, "stream": True})
    expect(status == 200, f"POST /v1/chat/completions (stream): {status} {body[:500]!r}")
    events = [line.removeprefix("data: ") for line in body.decode().splitlines() if line.startswith("data: ")]
    expect(events[-1:] == ["[DONE]"], f"stream did not end with [DONE]: {events[-3:]}")
    text = "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1]
                   if json.loads(e)["choices"])
    expect(bool(text), f"stream carried no text: {events[:5]}")

    completion = {"model": MODEL, "prompt": "The three primary colors are", "max_tokens": 8}
    status, body = call(base, "/v1/completions", completion)
    expect(status == 200, f"POST /v1/completions: {status} {body[:500]!r}")
    expect(bool(json.loads(body)["choices"][0]["text"]), f"empty completion: {body[:500]!r}")

    # the protocol plugins `make install` brings: Anthropic Messages and OpenAI Responses
    message = {"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "Say hello."}]}
    status, body = call(base, "/v1/messages", message)
    expect(status == 200, f"POST /v1/messages: {status} {body[:500]!r}")
    expect(json.loads(body)["content"][0]["type"] == "text", f"no text block: {body[:500]!r}")
    status, body = call(base, "/v1/responses", {"model": MODEL, "input": "Say hello.", "max_output_tokens": 8})
    expect(status == 200, f"POST /v1/responses: {status} {body[:500]!r}")
    expect(json.loads(body)["output"][0]["type"] == "message", f"no message item: {body[:500]!r}")

    # the chat page, from the installed package's data (/ redirects to it)
    status, body = call(base, "/")
    expect(status == 200 and b'src="/ui/app.js"' in body, f"GET / (the chat page): {status} {body[:300]!r}")
    for name in ("app.js", "chat.js", "markdown.js", "highlight.js", "style.css"):
        status, body = call(base, f"/ui/{name}")
        expect(status == 200 and len(body) > 100, f"GET /ui/{name}: {status} {body[:300]!r}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--make", default="make run", help="the command that serves, as the README says")
    parser.add_argument("--timeout", type=float, default=600, help="seconds the first start may take")
    args = parser.parse_args()
    command = shlex.split(args.make)
    with tempfile.TemporaryDirectory(prefix="gallama-smoke-") as folder:
        home = Path(folder) / "home"
        for attempt in ("first", "second"):
            server = Server(command, home, Path(folder) / f"{attempt}.log")
            try:
                seconds = server.wait_ready(args.timeout)
                printed = server.output()
                expect(server.base in printed, f"make run did not print its address {server.base}:\n{printed}")
                expect(f"{server.base}/v1" in printed and MODEL in printed.split(f"{server.base}/v1", 1)[1],
                       f"make run did not print which models it serves at {server.base}/v1:\n{printed}")
                if attempt == "second":
                    expect("pip install" not in printed, f"the second make run installed again:\n{printed}")
                check_requests(server.base)
                print(f"smoke: {attempt} make run ready in {seconds:.1f} s on {server.base}; models, chat, stream, "
                      "completions, messages and responses answered")
            except SmokeFailure as failure:
                print(f"smoke: FAILED ({attempt} make run): {failure}", file=sys.stderr)
                return 1
            finally:
                server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
