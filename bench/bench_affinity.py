#!/usr/bin/env python3
"""Cache-affine routing: four agents on two replicas, gallama's ``affinity`` routing against ``least_outstanding``.

Two ``gallama run`` servers, started by this script on free 127.0.0.1 ports with private homes, each serving two
replicas of the embedded SmolLM2-135M-Instruct (``-id "model_id=smollm2 max_concurrent_requests=2
max_seq_len=4096"`` twice: four slots in all, one per agent): one with the default routing (``affinity``), the peer
with ``GALLAMA_ROUTING=least_outstanding`` (the rule before: the replica with the fewest outstanding requests).

The workload, per measurement: four agents (bench_agents.py's coding-assistant system prompt, ~400 tokens, opened
by a nonce unique to the round and server, the same for the four; four different tasks) run at once, each through
``--turns`` turns one after the other: the conversation so far plus a new user message, ``max_tokens=32``,
temperature 0, the answer appended. Requests use the official ``openai`` client (no streaming); usage gives
``prompt_tokens`` and ``prompt_tokens_details.cached_tokens``.

Per server and measurement: the total wall time, and the **cached share**: for every turn after the first, the
tokens of the previous turn's prompt the replica found cached (``min(cached, previous prompt)``), summed over all
agents and turns, over the previous prompts' tokens. The servers are measured alternately, in an order that rotates
round by round, each after a wait for quiet CPUs (bench_spine.settle), with the 1-minute load average and the CPU
other processes used meanwhile recorded (the other, idle server counts as foreign). Reported: medians over the
rounds, the speed-up (least_outstanding's median wall time / affinity's; also the median of the rounds' paired
ratios) and each server's affinity counters from ``/health``. Goals: affinity's cached share >= 90 %, speed-up
>= 1.3.

Also measured in this process: the time the gateway adds per request for its routing key (affinity.request_key on
a freshly parsed copy of each agent's last body, and Router.choose on two replicas), and the key of a hostile body
(200,000 content parts) to show the bound.

Usage: ``python bench/bench_affinity.py [--rounds 3] [--turns 10] [--quiet-wait 5] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import secrets
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_agents import AGENT_TASKS, SYSTEM_PROMPT
from bench_spine import (
    CLEAN_MAX_CORES,
    CpuMeter,
    ServerStartError,
    _fmt,
    _ratio,
    _rotated,
    descendants,
    run_guarded,
    settle,
    write_results,
)
from openai import AsyncOpenAI

from gallama_kernel.gateway.affinity import Key, ReplicaMemory, Router, request_key
from gallama_kernel.testing import RunningServer

MODEL = "smollm2"
SPEC = f"model_id={MODEL} max_concurrent_requests=2 max_seq_len=4096"
MODES = ("affinity", "least_outstanding")
MAX_TOKENS = 32
STARTUP_TIMEOUT_S = 300.0
REQUEST_TIMEOUT_S = 600.0
GOALS = {"cached_share": 0.9, "speedup": 1.3}
TASKS: dict[str, list[str]] = {
    **AGENT_TASKS,
    "C": [
        "Our login endpoint in src/app/auth.py sometimes returns 500 when the session store is slow. Investigate.",
        "read_file src/app/auth.py lines 10-50: login() calls store.get_session(token) without a timeout and "
        "lets StoreTimeout propagate.",
        "search_code for 'StoreTimeout' returned: src/store/session.py:31, src/app/auth.py:44. What next?",
        "Propose a patch that maps StoreTimeout to a 503 with a Retry-After header.",
        "apply_patch result: applied, 1 file changed (src/app/auth.py). Which tests cover it?",
        "run_tests tests/app/test_auth.py: 9 passed, 1 failed: test_login_slow_store expected 503, got 500.",
        "The failing test uses a fake store that raises TimeoutError, not StoreTimeout. Which side should change?",
        "We change the fake to raise StoreTimeout. run_tests result: 10 passed.",
        "Should the Retry-After value come from configuration? Answer briefly.",
        "Summarise the change for the release notes in two sentences.",
    ],
    "D": [
        "The nightly report job in src/core/report.py takes 40 minutes since last week. Where do you look first?",
        "read_file src/core/report.py lines 1-60: build_report() loops over customers and runs one query per "
        "customer for their orders.",
        "The customers table grew from 2,000 to 60,000 rows last week. Does that explain it?",
        "Write a patch that loads the orders of all customers in one query grouped by customer id.",
        "apply_patch result: applied, 1 file changed (src/core/report.py). What do you test?",
        "run_tests tests/core/test_report.py: 5 passed, 1 failed: test_report_totals expected 1520.50, got 1520.5.",
        "Is that a real difference or a formatting one? Fix whichever it is.",
        "apply_patch result: applied. run_tests result: 6 passed in 0.9 s.",
        "How long should the job take now, roughly, with 60,000 customers?",
        "Summarise the cause and the fix for the incident log.",
    ],
}
AGENTS = "ABCD"


def user_message(task: str, turn: int) -> str:
    texts = TASKS[task]
    return texts[turn % len(texts)] if turn < len(texts) else f"(Step {turn + 1}) {texts[turn % len(texts)]}"


class ModeServer:
    """One ``gallama run`` with two replicas and ``GALLAMA_ROUTING=mode``."""

    def __init__(self, mode: str, log_dir: Path) -> None:
        self.mode = mode
        self.log_dir = log_dir
        self.home = tempfile.TemporaryDirectory(prefix="bench_affinity_")
        try:
            self.server = RunningServer(Path(self.home.name), "-id", SPEC, "-id", SPEC,
                                        env={"GALLAMA_ROUTING": mode, "PYTHONUNBUFFERED": "1"},
                                        timeout=STARTUP_TIMEOUT_S)
        except RuntimeError as error:
            self.home.cleanup()
            raise ServerStartError(f"{mode}: {error}") from None
        routing = self.health()["models"][MODEL].get("routing")
        if routing != mode:
            self.stop()
            raise ServerStartError(f"{mode}: the server reports routing {routing!r}")
        self.client = AsyncOpenAI(base_url=f"{self.server.base_url}/v1", api_key="bench", max_retries=0,
                                  timeout=REQUEST_TIMEOUT_S)

    @property
    def pids(self) -> list[int]:
        return [self.server.process.pid, *descendants(self.server.process.pid)]

    def health(self) -> dict[str, Any]:
        return self.server.health()

    def counters(self) -> list[dict[str, Any]]:
        keys = ("replica", "affinity_hits", "affinity_misses", "affinity_overflows", "steps", "restarts")
        return [{k: r.get(k) for k in keys} for r in self.health()["models"][MODEL]["replicas"]]

    def stop(self) -> None:
        """Stop the gateway by its PID, then any worker it left behind (by PID); keep its log."""
        children = descendants(self.server.process.pid)
        self.server.stop()
        for pid in children:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            shutil.copy(self.server.log, self.log_dir / f"affinity-{self.mode}.log")
        self.home.cleanup()


async def agent(server: ModeServer, nonce: str, task: str, turns: int) -> tuple[list[dict[str, Any]], list]:
    """One agent's turns, one after the other; its rows and its last request's messages."""
    history: list[dict[str, Any]] = [{"role": "system", "content": f"Session {nonce}. {SYSTEM_PROMPT}"}]
    rows = []
    for turn in range(turns):
        history.append({"role": "user", "content": user_message(task, turn)})
        row: dict[str, Any] = {"agent": task, "turn": turn + 1, "error": None}
        start = time.perf_counter()
        try:
            reply = await server.client.chat.completions.create(model=MODEL, messages=history,  # type: ignore[arg-type]
                                                                max_tokens=MAX_TOKENS, temperature=0)
            usage = reply.usage
            details = usage.prompt_tokens_details if usage else None
            row.update(prompt_tokens=usage.prompt_tokens if usage else None,
                       cached_tokens=details.cached_tokens if details else 0,
                       completion_tokens=usage.completion_tokens if usage else None)
            content = reply.choices[0].message.content or ""
        except Exception as error:  # a failed request is a result, not a crash
            row["error"] = f"{type(error).__name__}: {error}"
            content = ""
        row["wall_s"] = time.perf_counter() - start
        rows.append(row)
        if turn < turns - 1:
            history.append({"role": "assistant", "content": content})
    return rows, history


def cached_share(rows: list[dict[str, Any]]) -> tuple[float | None, list[float]]:
    """Of every turn's previous prompt, the tokens found cached: over all turns, and per turn."""
    covered = total = 0
    shares = []
    by_agent: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_agent.setdefault(row["agent"], []).append(row)
    for turns in by_agent.values():
        for before, now in itertools.pairwise(turns):
            previous, cached = before.get("prompt_tokens"), now.get("cached_tokens")
            if not previous or cached is None:
                continue
            covered += min(cached, previous)
            total += previous
            shares.append(min(cached, previous) / previous)
    return (covered / total if total else None), shares


async def measure(server: ModeServer, nonce: str, turns: int, quiet_wait_s: float) -> dict[str, Any]:
    await settle(quiet_wait_s)
    load = os.getloadavg()[0]
    meter = CpuMeter(server.pids)
    start = time.perf_counter()
    results = await asyncio.gather(*(agent(server, nonce, task, turns) for task in AGENTS))
    wall = time.perf_counter() - start
    other = meter.other_cores()
    rows = [row for agent_rows, _ in results for row in agent_rows]
    share, shares = cached_share(rows)
    return {"mode": server.mode, "nonce": nonce, "wall_s": wall, "cached_share": share,
            "turn_share_median": statistics.median(shares) if shares else None,
            "turns_at_least_90": sum(s >= 0.9 for s in shares), "turns_measured": len(shares),
            "completion_tokens": sum(r.get("completion_tokens") or 0 for r in rows),
            "errors": [f"{r['agent']}{r['turn']}: {r['error']}" for r in rows if r["error"]],
            "load_avg_1m": load, "other_cores": other, "noisy": other > CLEAN_MAX_CORES, "rows": rows,
            "last_bodies": [{"model": MODEL, "messages": history, "max_tokens": MAX_TOKENS, "temperature": 0}
                            for _, history in results]}


async def warm_up(server: ModeServer) -> None:
    """Both replicas answer once (four distinct requests at once)."""
    await asyncio.gather(*(server.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": f"Warm-up {n}: say hello."}], max_tokens=8)
        for n in range(4)))


def key_cost(bodies: list[dict[str, Any]]) -> dict[str, Any]:
    """Microseconds per request the gateway spends on routing: the key of a freshly parsed body, and the choice."""
    raws = [json.dumps(body).encode() for body in bodies]
    key_us, choose_us = [], []

    class Replica:
        def __init__(self, index: int) -> None:
            self.replica, self.outstanding, self.slots, self.memory = index, 0, 2, ReplicaMemory()

    router, replicas = Router(), [Replica(0), Replica(1)]
    for _ in range(200):
        for raw in raws:
            body = json.loads(raw)  # fresh strings: their hashes are not cached yet, as in the gateway
            start = time.perf_counter()
            key = request_key("/v1/chat/completions", {}, body)
            key_us.append((time.perf_counter() - start) * 1e6)
            start = time.perf_counter()
            router.choose(replicas, key, 0, 2)
            choose_us.append((time.perf_counter() - start) * 1e6)
    hostile = {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "text", "text": "x"}] * 200_000}]}
    start = time.perf_counter()
    hostile_key = request_key("/v1/chat/completions", {}, hostile)
    hostile_ms = (time.perf_counter() - start) * 1000
    start = time.perf_counter()
    router.choose(replicas, hostile_key or Key(), 0, 2)
    hostile_choose_ms = (time.perf_counter() - start) * 1000
    return {"body_bytes": [len(r) for r in raws], "messages": [len(b["messages"]) for b in bodies],
            "key_us_median": statistics.median(key_us), "key_us_p99": sorted(key_us)[int(len(key_us) * 0.99)],
            "choose_us_median": statistics.median(choose_us),
            "hostile_key_ms": hostile_ms, "hostile_choose_ms": hostile_choose_ms,
            "hostile_body_bytes": len(json.dumps(hostile))}


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarise(runs: list[dict[str, Any]], final: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for mode in MODES:
        mine = [r for r in runs if r["mode"] == mode]
        walls = [r["wall_s"] for r in mine]
        shares = [r["cached_share"] for r in mine if r["cached_share"] is not None]
        summary[mode] = {"rounds": len(mine), "wall_s": _median(walls), "wall_s_min": min(walls, default=None),
                         "wall_s_max": max(walls, default=None), "cached_share": _median(shares),
                         "cached_share_min": min(shares, default=None),
                         "errors": sum(len(r["errors"]) for r in mine), "noisy": sum(r["noisy"] for r in mine),
                         "load_min": min((r["load_avg_1m"] for r in mine), default=None),
                         "load_max": max((r["load_avg_1m"] for r in mine), default=None),
                         "other_cores_max": max((r["other_cores"] for r in mine), default=None),
                         "replicas_at_end": final.get(mode)}
    a, b = summary["affinity"], summary["least_outstanding"]
    paired = [lo["wall_s"] / af["wall_s"] for af, lo in zip([r for r in runs if r["mode"] == "affinity"],
                                                             [r for r in runs if r["mode"] == "least_outstanding"],
                                                             strict=False)]
    summary["speedup"] = _ratio(b["wall_s"], a["wall_s"])
    summary["speedup_paired_median"] = _median(paired)
    return summary


async def run(args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    servers: list[ModeServer] = []
    try:
        for mode in MODES:
            servers.append(ModeServer(mode, log_dir))
            print(f"  ready: {mode:<18} {servers[-1].server.base_url}", flush=True)
        for server in servers:
            await warm_up(server)
        run_id = secrets.token_hex(3)
        runs = []
        for r in range(args.rounds):
            for server in _rotated(servers, r):
                result = await measure(server, f"{run_id}-{r}-{server.mode[0]}", args.turns, args.quiet_wait)
                runs.append(result)
                print(f"  round {r + 1} {server.mode:<18} wall {result['wall_s']:6.2f} s  cached share "
                      f"{_fmt(result['cached_share'], '.1%')}  (turns >= 90 %: {result['turns_at_least_90']}/"
                      f"{result['turns_measured']})  errors {len(result['errors'])}  load "
                      f"{result['load_avg_1m']:.2f}  other {result['other_cores']:.2f} cores"
                      f"{'  (noisy)' if result['noisy'] else ''}", flush=True)
        final = {server.mode: server.counters() for server in servers}
        for server in servers:
            await server.client.close()
    finally:
        for server in servers:
            server.stop()
    bodies = [body for r in runs if r["mode"] == "affinity" for body in r["last_bodies"]][:len(AGENTS)]
    cost = key_cost(bodies)
    for r in runs:
        r.pop("last_bodies")
    return {"plan": {"rounds": args.rounds, "turns": args.turns, "agents": len(AGENTS), "replicas": 2,
                     "spec": SPEC, "max_tokens": MAX_TOKENS, "cpus": len(os.sched_getaffinity(0))},
            "runs": runs, "summary": summarise(runs, final), "key_cost": cost}


def report(result: dict[str, Any]) -> None:
    summary, cost = result["summary"], result["key_cost"]
    print(f"\n{'routing':<18} {'wall s (min-max)':>22} {'cached share (min)':>20} {'errors':>7} {'noisy':>6} "
          f"{'load':>11}")
    for mode in MODES:
        s = summary[mode]
        print(f"{mode:<18} {_fmt(s['wall_s'], '.2f'):>8} ({_fmt(s['wall_s_min'], '.2f')}-"
              f"{_fmt(s['wall_s_max'], '.2f')}) {_fmt(s['cached_share'], '.1%'):>11} "
              f"({_fmt(s['cached_share_min'], '.1%')}) {s['errors']:>7} {s['noisy']:>3}/{s['rounds']} "
              f"{_fmt(s['load_min'], '.2f'):>5}-{_fmt(s['load_max'], '.2f')}")
    for mode in MODES:
        counts = ", ".join(f"replica {c['replica']}: {c['affinity_hits']} hits, {c['affinity_misses']} misses, "
                           f"{c['affinity_overflows']} overflows, {c['steps']} steps"
                           for c in summary[mode]["replicas_at_end"] or [])
        print(f"  {mode}: {counts}")
    share = summary["affinity"]["cached_share"]
    speedup = summary["speedup"]
    print(f"affinity cached share of the previous prompt: {_fmt(share, '.1%')} (goal >= 90 %: "
          f"{'met' if share is not None and share >= GOALS['cached_share'] else 'NOT met'}); least_outstanding: "
          f"{_fmt(summary['least_outstanding']['cached_share'], '.1%')}")
    print(f"speed-up least_outstanding / affinity wall time: {_fmt(speedup, '.3f')} (median of the rounds' ratios "
          f"{_fmt(summary['speedup_paired_median'], '.3f')}; goal >= 1.3: "
          f"{'met' if speedup is not None and speedup >= GOALS['speedup'] else 'NOT met'})")
    print(f"routing cost per request (this process, bodies of {min(cost['body_bytes'])}-{max(cost['body_bytes'])} "
          f"bytes, {min(cost['messages'])}-{max(cost['messages'])} messages): key {cost['key_us_median']:.1f} µs "
          f"(p99 {cost['key_us_p99']:.1f}), choice {cost['choose_us_median']:.1f} µs; a hostile body of "
          f"{cost['hostile_body_bytes'] / 1e6:.1f} MB (200,000 content parts): key {cost['hostile_key_ms']:.2f} ms, "
          f"choice {cost['hostile_choose_ms']:.2f} ms")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--quiet-wait", type=float, default=5.0, help="seconds to wait at most for quiet CPUs")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--log-dir", type=Path, default=Path(__file__).parent / "results" / "logs")
    args = parser.parse_args(argv)
    args.log_dir.mkdir(parents=True, exist_ok=True)
    result = run_guarded(lambda: asyncio.run(run(args, args.log_dir)))
    if isinstance(result, int):
        return result
    report(result)
    write_results(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
