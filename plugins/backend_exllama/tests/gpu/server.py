"""Start, probe and stop the ``gallama run`` that the e2e and bench phases talk to.

``start`` writes one entry into ``$GALLAMA_HOME_PATH/model_config.yaml`` (as a user configures a model), runs
``gallama run NAME`` on 127.0.0.1 and a free port in a session of its own, and waits until ``/health`` says the
model is ready (or failed: then it stops at once, with the load error). Its own session keeps the server alive
across the phase that started it (a phase's ``timeout`` ends that phase's process group only), so the bench
phase reuses the loaded model; ``stop`` ends the whole session (gateway and workers) by the recorded id.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import yaml
from checklib import progress, report


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def parse_keys(text: str) -> dict[str, Any]:
    """``"max_seq_len=2048 gpus=20,24"`` as typed YAML scalars (``2048`` an int), as model_config.yaml has them."""
    keys: dict[str, Any] = {}
    for token in text.split():
        key, _, value = token.partition("=")
        keys[key] = yaml.safe_load(value)
    return keys


def write_config(home: Path, name: str, model_id: str, backend: str, keys: dict[str, Any]) -> Path:
    home.mkdir(parents=True, exist_ok=True)
    path = home / "model_config.yaml"
    entry = {"model_id": model_id, "backend": backend, **keys}
    path.write_text(yaml.safe_dump({name: entry}, sort_keys=False))
    return path


def model_health(base_url: str, name: str) -> dict[str, Any] | None:
    try:
        reply = httpx.get(f"{base_url}/health", timeout=5)
    except httpx.HTTPError:
        return None
    if reply.status_code != 200:
        return None
    return dict(reply.json().get("models", {}).get(name) or {"status": "absent"})


def load_error(base_url: str, name: str) -> str:
    try:
        models = httpx.get(f"{base_url}/list_loaded_models", timeout=5).json()["models"]
    except (httpx.HTTPError, ValueError, KeyError):
        return "unknown"
    return json.dumps([m for m in models if m.get("model_name") == name])[:2000]


def stop_session(pid: int, grace: float = 15) -> None:
    """End the server's session: SIGTERM to its process group (gateway and workers), SIGKILL after ``grace``."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def start(args: argparse.Namespace) -> int:
    home = Path(os.environ.get("GALLAMA_HOME_PATH") or Path(args.state).parent / "home")
    config = write_config(home, args.name, args.model_id, args.backend, parse_keys(args.keys))
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    log = open(args.log, "a")  # noqa: SIM115 (the server writes to it after this process ends)
    command = [sys.executable, "-c", "from gallama_kernel.cli import main; main()", "run", args.name,
               "--host", "127.0.0.1", "--port", str(port)]
    began = time.monotonic()
    # cwd: the home folder, not the source tree (whose gallama_kernel would shadow the installed one)
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=home,
                               env={**os.environ, "GALLAMA_HOME_PATH": str(home)})
    state = {"base_url": base_url, "model": args.name, "backend": args.backend, "pid": process.pid,
             "model_id": args.model_id}
    Path(args.state).write_text(json.dumps(state))
    progress(f"server: pid {process.pid} on {base_url}, {config}")
    deadline = began + args.wait
    while time.monotonic() < deadline:
        if process.poll() is not None:
            report(f"- server exited with code {process.returncode} before it was ready (see server.log)")
            return 1
        health = model_health(base_url, args.name)
        status = (health or {}).get("status")
        if status == "ok":
            seconds = time.monotonic() - began
            progress(f"server: {args.name} ready in {seconds:.1f} s: {json.dumps(health)[:300]}")
            report(f"- `gallama run {args.name}` ({args.backend}) ready in {seconds:.1f} s on {base_url}; health "
                   f"`{json.dumps({k: v for k, v in health.items() if k != 'replicas'})}`")
            return 0
        if status == "failed":
            report(f"- model failed to load: {load_error(base_url, args.name)}")
            stop_session(process.pid)
            return 1
        time.sleep(0.3)
    report(f"- server not ready after {args.wait} s (health: {model_health(base_url, args.name)})")
    stop_session(process.pid)
    return 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("action", choices=["start", "stop", "alive"])
    parser.add_argument("--state", required=True, help="JSON file: where the server is (written by start)")
    parser.add_argument("--name", default="tiny-exllama")
    parser.add_argument("--model-id", default="")
    parser.add_argument("--backend", default="exllama")
    parser.add_argument("--keys", default="", help="more model_config.yaml keys, as key=value words")
    parser.add_argument("--log", default=os.devnull)
    parser.add_argument("--wait", type=float, default=90)
    args = parser.parse_args()
    if args.action == "start":
        return start(args)
    if not Path(args.state).exists():
        return 1
    state = json.loads(Path(args.state).read_text())
    if args.action == "alive":
        return 0 if (model_health(state["base_url"], state["model"]) or {}).get("status") == "ok" else 1
    stop_session(int(state["pid"]))
    Path(args.state).unlink(missing_ok=True)
    progress(f"server: pid {state['pid']} stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
