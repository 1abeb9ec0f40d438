#!/usr/bin/env python3
"""Core budget: two models, and two replicas of one model, decoding at the same time on one machine.

``gallama run`` starts one worker process per model replica. Each starts a ``gallama run`` on a free
127.0.0.1 port with the embedded SmolLM2-135M model, all at once (each with a private home):

* ``alone``: one model, default threads (the reference: one stream using all cores);
* ``board``: two models, default threads: the workers split the cores while both are busy and a worker alone
  takes them all (``gallama_kernel.cores``, the default);
* ``split``: two models with ``n_threads`` = half the cores each (a fixed split);
* ``none``: two models with ``n_threads`` = all cores each (every worker on every core: no budget, as before);
* ``replicas``: one model with two replicas, default threads (the gateway sends two simultaneous requests to
  the two replicas).

Per round, in a rotating order: for each two-worker server, two streams at once (one per worker), and for
``board`` and ``split`` also one stream alone (the other worker idle); for ``alone`` one stream. Each stream
asks for ``--max-tokens`` greedy tokens of a long story (distinct prompts) and its decode rate is
(completion tokens - 1) / (first -> last content chunk). Medians over ``--rounds``; the load average is
recorded at each measurement. Goals: with both busy, aggregate >= 0.9x ``alone`` and neither stream below 0.4x
``alone``; a worker alone on a board decodes at ``alone``'s rate (>= 0.95x).

Usage: ``python bench/bench_cores.py [--rounds N] [--max-tokens N] [--json PATH]``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from gallama_kernel.cores import machine_cores
from gallama_kernel.testing import RunningServer

GOAL_AGGREGATE = 0.9
GOAL_WORST = 0.4
GOAL_ONE_OF_TWO = 0.95
TOPICS = ("a lighthouse keeper", "a travelling clockmaker", "a young dragon", "an old librarian", "a lost robot",
          "a river pilot", "a mountain baker", "a retired astronaut")


def configurations(cores: int) -> dict[str, list[str]]:
    half = max(1, cores // 2)
    return {
        "alone": ["-id", "model_id=smollm2 model_name=a"],
        "board": ["-id", "model_id=smollm2 model_name=a", "-id", "model_id=smollm2 model_name=b"],
        "split": ["-id", f"model_id=smollm2 model_name=a n_threads={half}",
                  "-id", f"model_id=smollm2 model_name=b n_threads={half}"],
        "none": ["-id", f"model_id=smollm2 model_name=a n_threads={cores}",
                 "-id", f"model_id=smollm2 model_name=b n_threads={cores}"],
        "replicas": ["-id", "model_id=smollm2 model_name=r", "-id", "model_id=smollm2 model_name=r"],
    }


async def stream(client: httpx.AsyncClient, base_url: str, model: str, prompt: str, max_tokens: int) -> float:
    """Decode tok/s of one streamed greedy answer."""
    body = {"model": model, "stream": True, "max_tokens": max_tokens, "temperature": 0,
            "stream_options": {"include_usage": True}, "messages": [{"role": "user", "content": prompt}]}
    first = last = None
    tokens = 0
    async with client.stream("POST", f"{base_url}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            choices = chunk.get("choices") or []
            if choices and (choices[0].get("delta") or {}).get("content"):
                last = time.perf_counter()
                first = first or last
    if first is None or last is None or last <= first or tokens < 2:
        raise RuntimeError(f"{model}: no usable stream ({tokens} tokens)")
    return (tokens - 1) / (last - first)


async def measure(servers: dict[str, RunningServer], rounds: int, max_tokens: int) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    prompts = (f"Write a long, detailed story about {topic}. Describe every scene." for _ in range(10**6)
               for topic in TOPICS)
    cases: list[tuple[str, tuple[str, ...]]] = [("alone", ("a",))]
    for name in ("board", "split", "none"):
        cases += [(name, ("a", "b"))]
    cases += [("board", ("a",)), ("split", ("a",)), ("replicas", ("r", "r"))]
    async with httpx.AsyncClient(timeout=600) as client:
        for name, server in servers.items():  # warm-up: every worker answers (replicas: at once, one each)
            models = max((models for case, models in cases if case == name), key=len)
            await asyncio.gather(*(stream(client, server.base_url, model, "Say hello.", 8) for model in models))
        for round_ in range(rounds):
            for offset in range(len(cases)):
                case, models = cases[(offset + round_) % len(cases)]
                await asyncio.sleep(1.0)  # let the previous case's threads go idle
                load = os.getloadavg()[0]
                rates = await asyncio.gather(*(stream(client, servers[case].base_url, model, next(prompts),
                                                      max_tokens) for model in models))
                record = {"round": round_, "case": case, "streams": len(models), "rates": list(rates),
                          "load1": load}
                records.append(record)
                print(f"round {round_} {case:>8} x{len(models)}: " + " ".join(f"{r:6.1f}" for r in rates)
                      + f" tok/s  (load {load:.2f})", flush=True)
    return records


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    def med(values: list[float]) -> float:
        return statistics.median(values)

    def rows(case: str, streams: int) -> list[dict[str, Any]]:
        return [r for r in records if r["case"] == case and r["streams"] == streams]

    alone = med([r["rates"][0] for r in rows("alone", 1)])
    summary: dict[str, Any] = {"alone_tps": alone, "cases": {}}
    for case in ("board", "split", "none", "replicas"):
        both = rows(case, 2)
        aggregate = med([sum(r["rates"]) for r in both])
        worst = med([min(r["rates"]) for r in both])
        entry = {"aggregate_tps": aggregate, "worst_tps": worst, "aggregate_vs_alone": aggregate / alone,
                 "worst_vs_alone": worst / alone,
                 "aggregate_spread": [min(sum(r["rates"]) for r in both), max(sum(r["rates"]) for r in both)]}
        single = rows(case, 1)
        if single:
            one = med([r["rates"][0] for r in single])
            entry |= {"one_busy_tps": one, "one_busy_vs_alone": one / alone}
        summary["cases"][case] = entry
    return summary


def report(summary: dict[str, Any], cores: int) -> None:
    alone = summary["alone_tps"]
    print(f"\n{cores} cores; one model alone: {alone:.1f} tok/s (median)")
    print(f"{'case':>9} {'both busy: agg tok/s':>21} {'x alone':>8} {'worst x alone':>14} {'one busy x alone':>17}")
    for case, entry in summary["cases"].items():
        one = entry.get("one_busy_vs_alone")
        print(f"{case:>9} {entry['aggregate_tps']:>21.1f} {entry['aggregate_vs_alone']:>8.2f} "
              f"{entry['worst_vs_alone']:>14.2f} {one if one is None else round(one, 2)!s:>17}")
    for case in ("board", "replicas"):
        entry = summary["cases"][case]
        ok = entry["aggregate_vs_alone"] >= GOAL_AGGREGATE and entry["worst_vs_alone"] >= GOAL_WORST
        print(f"goal {case}: aggregate >= {GOAL_AGGREGATE}x and each >= {GOAL_WORST}x alone: "
              f"{'met' if ok else 'NOT met'}")
    one = summary["cases"]["board"].get("one_busy_vs_alone", 0.0)
    print(f"goal board, one worker busy: >= {GOAL_ONE_OF_TWO}x alone: {'met' if one >= GOAL_ONE_OF_TWO else 'NOT met'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    cores = machine_cores()
    with contextlib.ExitStack() as stack:
        servers: dict[str, RunningServer] = {}
        for name, argv in configurations(cores).items():
            home = stack.enter_context(tempfile.TemporaryDirectory(prefix=f"bench_cores_{name}_"))
            servers[name] = stack.enter_context(RunningServer(Path(home), *argv, timeout=300))
        records = asyncio.run(measure(servers, args.rounds, args.max_tokens))
    summary = summarize(records)
    report(summary, cores)
    if args.json:
        args.json.write_text(json.dumps({"cores": cores, "records": records, "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
