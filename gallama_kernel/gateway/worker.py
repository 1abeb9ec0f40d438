"""A worker process: serves one model replica on 127.0.0.1, on a port the OS chooses.

Started by the gateway as ``python -m gallama_kernel.gateway.worker SPEC_JSON [--plugins LIST]
[--disable-plugins LIST]`` (the gateway's plugin selection). It loads the model, binds
``127.0.0.1:0``, prints one line ``READY {"port": N}`` on stdout (or ``FAILED {"error": "..."}``) and serves
the single-model app. It exits when its stdin closes: the gateway holds the other end, so a worker never
outlives its gateway, even one killed with ``kill -9``. It answers only requests carrying the gateway's per-run
secret (``GALLAMA_WORKER_SECRET``), so the gateway's keys cannot be bypassed through the worker's port.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import socket
import sys
import threading
from typing import Any

READY = "READY"
SECRET_ENV = "GALLAMA_WORKER_SECRET"  # the gateway's per-run secret (see upstream.WORKER_SECRET_HEADER)
WORKER_KEEP_ALIVE_S = 300  # longer than the gateway keeps idle connections: the gateway always closes first
FAILED = "FAILED"


def _announce(kind: str, payload: dict[str, object]) -> None:
    sys.stdout.write(f"{kind} {json.dumps(payload)}\n")
    sys.stdout.flush()


def _exit_with_parent() -> None:
    """Exit as soon as stdin reaches end of file (the gateway is gone)."""

    def watch() -> None:
        try:
            while sys.stdin.buffer.read(4096):
                pass
        except OSError:
            pass
        os._exit(0)

    threading.Thread(target=watch, name="gallama-parent-watch", daemon=True).start()


def _only_with_secret(app: Any, secret: str) -> Any:
    """``app`` behind a check of the gateway's secret header: anything else is a 403 in OpenAI's shape."""
    from ..protocol.errors import error_body
    from .upstream import WORKER_SECRET_HEADER

    expected = secret.encode()
    refusal = json.dumps(error_body("This port serves the gallama gateway only; send requests to the gateway.",
                                    "invalid_request_error", code="worker_port")).encode()

    async def guarded(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            given = dict(scope.get("headers") or []).get(WORKER_SECRET_HEADER.encode(), b"")
            if not hmac.compare_digest(given, expected):
                await send({"type": "http.response.start", "status": 403,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(refusal)).encode())]})
                await send({"type": "http.response.body", "body": refusal})
                return
        await app(scope, receive, send)

    return guarded


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m gallama_kernel.gateway.worker")
    parser.add_argument("spec_json")
    parser.add_argument("--plugins", default=None)
    parser.add_argument("--disable-plugins", default=None)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    _exit_with_parent()
    verbose = os.environ.get("GALLAMA_WORKER_VERBOSE") == "1"
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(levelname)s %(name)s [worker]: %(message)s")
    import uvicorn

    from ..api.app import create_app
    from ..backend import BackendError
    from ..config import ConfigError, ModelSpec
    from ..loading import load_models, selected_host

    try:
        spec = ModelSpec.model_validate_json(args.spec_json)
        host = selected_host(args.plugins, args.disable_plugins)
        registry = load_models([spec], host, quiet=True)
    except (ConfigError, BackendError, ValueError) as error:
        _announce(FAILED, {"error": str(error)})
        return 3
    except Exception as error:  # an unexpected failure must still reach the gateway as a message
        logging.exception("worker failed to load")
        _announce(FAILED, {"error": f"{type(error).__name__}: {error}"})
        return 3
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(512)
    secret = os.environ.pop(SECRET_ENV, "")
    app = create_app(registry, host)
    guarded = _only_with_secret(app, secret) if secret else app
    config = uvicorn.Config(guarded, log_level="debug" if verbose else "warning", access_log=verbose,
                            timeout_graceful_shutdown=5, timeout_keep_alive=WORKER_KEEP_ALIVE_S)
    server = uvicorn.Server(config)

    async def serve() -> None:
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not task.done():
            await asyncio.sleep(0.01)
        if server.started:
            slots = [model.backend.capabilities.max_concurrency for model in registry.all()]
            _announce(READY, {"port": sock.getsockname()[1], "pid": os.getpid(), "slots": sum(slots)})
        await task

    loop_factory = getattr(config, "get_loop_factory", lambda: None)()  # uvloop where installed, as uvicorn.run
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
