"""Soak: many requests from many clients, some of which leave mid-stream, against ``gallama run``.

Starts ``gallama run`` on a free 127.0.0.1 port with the embedded model (or uses ``--url``), then sends
``--requests`` requests (default 1,000) from ``--clients`` concurrent clients (default 16): a mix of plain and
streamed chat, constrained output (JSON schema, regex), tool calls and legacy completions, short generations. A
``--disconnect`` share of the streams (default 20 %) is dropped after its first chunks, and some plain requests
are abandoned by a short client timeout. Nothing else may fail: every request that was not abandoned must end in
200 with a well-formed body (a stream: ``[DONE]`` and a finish reason).

Memory: the resident set of the gateway and each worker is read after a warm-up (the first ``--warmup``
requests, default 100) and at the end; the goal is growth under 5 %. The report (stdout, and ``--json FILE``)
gives counts by outcome, latency percentiles, the RSS figures and the machine's load average at start and end.

    .venv/bin/python bench/soak.py                      # ~4 min on 2 cores
    .venv/bin/python bench/soak.py --requests 200 --clients 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

HI = [{"role": "user", "content": "Say something short about the sea."}]
TOOLS = [{"type": "function", "function": {"name": "lookup", "description": "Look a word up.",
                                           "parameters": {"type": "object", "properties": {"word": {"type": "string"}},
                                                          "required": ["word"]}}}]
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
          "required": ["name", "age"]}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def family(pid: int) -> list[int]:
    """``pid`` and its descendants (the gateway's workers)."""
    children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    found = [pid]
    for child in children.split():
        found += family(int(child))
    return found


def kinds(rng: random.Random) -> dict[str, Any]:
    """One request: its path, body, and whether the client will leave early."""
    pick = rng.random()
    body: dict[str, Any] = {"model": "smollm2", "messages": HI, "max_tokens": rng.randint(4, 24), "temperature": 0.7,
                            "seed": rng.randint(0, 1 << 30)}
    if pick < 0.30:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
        return {"path": "/v1/chat/completions", "body": body, "kind": "stream"}
    if pick < 0.45:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}}
        body["max_tokens"] = 60
        return {"path": "/v1/chat/completions", "body": body, "kind": "json"}
    if pick < 0.55:
        body["regex_pattern"] = "(yes|no), [a-z]{1,8}"
        return {"path": "/v1/chat/completions", "body": body, "kind": "regex"}
    if pick < 0.65:
        body.update(tools=TOOLS, tool_choice="required", max_tokens=40)
        return {"path": "/v1/chat/completions", "body": body, "kind": "tools"}
    if pick < 0.75:
        completion = {"model": "smollm2", "prompt": "The sea is", "max_tokens": body["max_tokens"]}
        return {"path": "/v1/completions", "body": completion, "kind": "completion"}
    return {"path": "/v1/chat/completions", "body": body, "kind": "chat"}


def check(kind: str, data: dict[str, Any]) -> str | None:
    """What is wrong with a 200 body, or None."""
    choice = (data.get("choices") or [{}])[0]
    if kind == "completion":
        return None if isinstance(choice.get("text"), str) else "no text"
    message = choice.get("message") or {}
    if kind == "json" and choice.get("finish_reason") == "stop":
        try:
            value = json.loads(message.get("content") or "")
        except ValueError:
            return "json_schema output is not JSON"
        if not isinstance(value, dict) or not isinstance(value.get("age"), int):
            return "json_schema output does not match"
    if kind == "tools" and choice.get("finish_reason") == "tool_calls":
        calls = message.get("tool_calls") or []
        if not calls or calls[0]["function"]["name"] != "lookup":
            return "tool_choice required without a call"
    return None


async def one(client: httpx.AsyncClient, base: str, rng: random.Random, leave_share: float) -> tuple[str, float]:
    request = kinds(rng)
    started = time.perf_counter()
    leave = rng.random() < leave_share
    try:
        if request["kind"] == "stream":
            async with client.stream("POST", base + request["path"], json=request["body"]) as response:
                if response.status_code != 200:
                    return f"status {response.status_code}: {(await response.aread())[:200]!r}", 0.0
                chunks, finished, done = 0, False, False
                async for line in response.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        done = True
                        break
                    event = json.loads(line[6:])
                    if "error" in event:
                        return f"error event: {event['error'].get('message')}", 0.0
                    chunks += 1
                    finished |= any(c.get("finish_reason") for c in event.get("choices", []))
                    if leave and chunks >= 2:
                        return "left", 0.0  # the client goes away mid-stream
                if not (done and finished):
                    return "stream ended without a finish reason or [DONE]", 0.0
                return "ok", time.perf_counter() - started
        timeout = 0.05 if leave and rng.random() < 0.5 else 120.0
        response = await client.post(base + request["path"], json=request["body"], timeout=timeout)
        if response.status_code != 200:
            return f"status {response.status_code}: {response.text[:200]}", 0.0
        problem = check(request["kind"], response.json())
        return (problem or "ok"), time.perf_counter() - started
    except httpx.TimeoutException:
        return ("left" if leave else "client timeout"), 0.0
    except httpx.HTTPError as error:
        return f"transport error: {type(error).__name__}: {error}", 0.0


async def soak(base: str, total: int, clients: int, leave_share: float, seed: int, on_warm: Any) -> dict[str, Any]:
    outcomes: dict[str, int] = {}
    latencies: list[float] = []
    counter = iter(range(total))
    rng = random.Random(seed)
    warmup = min(100, total // 10)
    warmed = asyncio.Event()

    async def worker(index: int) -> None:
        local = random.Random(rng.random() + index)
        async with httpx.AsyncClient(timeout=120) as client:
            for n in counter:
                outcome, seconds = await one(client, base, local, leave_share)
                outcomes[outcome] = outcomes.get(outcome, 0) + 1
                if outcome == "ok":
                    latencies.append(seconds)
                if n == warmup and not warmed.is_set():
                    warmed.set()
                    on_warm()

    await asyncio.gather(*(worker(i) for i in range(clients)))
    latencies.sort()
    return {"outcomes": outcomes, "latency_s": {
        "p50": statistics.median(latencies) if latencies else None,
        "p95": latencies[int(len(latencies) * 0.95) - 1] if latencies else None,
        "max": latencies[-1] if latencies else None}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--disconnect", type=float, default=0.2, help="share of requests whose client leaves")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json", type=Path, help="write the report here too")
    args = parser.parse_args()

    port = free_port()
    home = Path(tempfile.mkdtemp(prefix="gallama-soak-"))
    gallama = Path(sys.executable).with_name("gallama")
    log = (home / "server.log").open("w")
    env = {**os.environ, "GALLAMA_HOME_PATH": str(home)}
    for name in ("GALLAMA_API_KEYS", "GALLAMA_ADMIN_KEY"):
        env.pop(name, None)
    server = subprocess.Popen([str(gallama), "run", "--host", "127.0.0.1", "--port", str(port), "-id",
                               "model_id=smollm2 max_concurrent_requests=4 max_seq_len=2048"],
                              env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while not _up(base):
            if server.poll() is not None or time.monotonic() > deadline:
                print((home / "server.log").read_text()[-3000:])
                return 2
            time.sleep(0.5)
        while httpx.get(base + "/health", timeout=5).status_code != 200:
            time.sleep(0.5)
        rss: dict[str, dict[int, int]] = {}

        def measure(label: str) -> None:
            rss[label] = {pid: rss_kib(pid) for pid in family(server.pid)}

        load_start = os.getloadavg()
        started = time.perf_counter()
        result = asyncio.run(soak(base, args.requests, args.clients, args.disconnect, args.seed,
                                  lambda: measure("warm")))
        wall = time.perf_counter() - started
        time.sleep(2)  # abandoned requests finish or are cancelled
        measure("end")
        health = httpx.get(base + "/health", timeout=10)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()

    growth = {}
    for pid, end in rss.get("end", {}).items():
        warm = rss.get("warm", {}).get(pid)
        if warm:
            growth[pid] = {"warm_kib": warm, "end_kib": end, "growth_pct": round(100 * (end - warm) / warm, 2)}
    failures = {k: v for k, v in result["outcomes"].items() if k not in ("ok", "left")}
    report = {"requests": args.requests, "clients": args.clients, "wall_s": round(wall, 1), **result,
              "failures": failures, "rss": growth, "health_after": health.status_code,
              "load_average": {"start": load_start, "end": os.getloadavg()},
              "goals": {"zero_errors": not failures and health.status_code == 200,
                        "rss_growth_under_5pct": all(g["growth_pct"] < 5 for g in growth.values())}}
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0 if all(report["goals"].values()) else 1


def _up(base: str) -> bool:
    try:
        return httpx.get(base + "/health/live", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


if __name__ == "__main__":
    sys.exit(main())
