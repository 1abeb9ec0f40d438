#!/usr/bin/env python3
"""Remote-engine benchmark: a client talking to llama.cpp's ``llama-server`` directly, against the same client
talking to gallama's gateway serving that same ``llama-server`` through ``backend=remote``.

One run starts ``llama-server`` (the one ``make llama-server`` built) on the embedded SmolLM2 GGUF, then
``gallama run -id "backend=remote … engine=llama_server"`` in front of it, on free 127.0.0.1 ports. Both paths
are measured with the official ``openai`` client (streaming chat, temperature 0), interleaved in a rotating
order, each request with a prompt of its own (same length, no cached answer):

1. single streams: time to first token, decode tok/s; the TTFT gallama adds is the median of the per-run
   differences (each run's two requests meet the same moment of the machine);
2. CONCURRENCY simultaneous streams per path: completed, aggregate completion tok/s.

Goals (the gateway in front of a remote engine): decode and aggregate throughput ≥ 0.97x direct, added
TTFT ≤ 5 ms. Machine load is recorded with every measurement.

Usage: ``python bench/bench_remote.py [--runs N] [--rounds N] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench_spine import (
    CONCURRENCY,
    GALLAMA_MODEL,
    HttpTarget,
    ServerSpec,
    _fmt,
    _llama_server,
    _ratio,
    _rotated,
    gguf_path,
    prompts,
    run_guarded,
    running_servers,
    write_results,
)

DIRECT = "llama-server"
GATEWAY = "gallama remote"
MAX_TOKENS = 128


async def measure(targets: list[HttpTarget], runs: int, rounds: int) -> dict[str, dict[str, list[Any]]]:
    results: dict[str, dict[str, list[Any]]] = {t.name: {"singles": [], "rounds": [], "load": []} for t in targets}
    base = prompts(32)
    count = len(targets) * (1 + runs + rounds * CONCURRENCY)
    pool = [f"Request {i}. {base[i % len(base)]}" for i in range(count)]  # distinct from their first words
    for target in targets:  # warm both paths (connections, the template's opening in the engine's cache)
        await target.single(pool.pop(), 16)
    for run in range(runs):
        for target in _rotated(targets, run):
            result = await target.single(pool.pop(), MAX_TOKENS)
            results[target.name]["singles"].append(result)
            results[target.name]["load"].append(os.getloadavg()[0])
            print(f"  run {run + 1}  {target.name:<15} TTFT {_fmt(result.ttft_s, '7.1f', 1000)} ms  decode "
                  f"{_fmt(result.decode_tps, '6.1f')} tok/s  {result.completion_tokens} tokens"
                  f"{'  ERROR ' + str(result.error) if result.error else ''}", flush=True)
    for r in range(rounds):
        for target in _rotated(targets, r):
            batch = [pool.pop() for _ in range(CONCURRENCY)]
            outcome = await target.concurrent(batch, MAX_TOKENS)
            results[target.name]["rounds"].append(outcome)
            print(f"  {CONCURRENCY} concurrent  {target.name:<15} completed {outcome.completed}/{outcome.streams}, "
                  f"{outcome.total_tokens} tokens in {outcome.wall_s:.2f} s, {outcome.aggregate_tps:.1f} tok/s",
                  flush=True)
    return results


def summarise(results: dict[str, dict[str, list[Any]]]) -> dict[str, Any]:
    def median(values: Sequence[float | None]) -> float | None:
        kept = [v for v in values if v is not None]
        return statistics.median(kept) if kept else None

    table = {}
    for name, data in results.items():
        singles = data["singles"]
        table[name] = {
            "ttft_s": median([s.ttft_s for s in singles]), "decode_tps": median([s.decode_tps for s in singles]),
            "errors": sum(s.error is not None for s in singles),
            "aggregate_tps": median([r.aggregate_tps for r in data["rounds"]]),
            "completed": min((r.completed for r in data["rounds"]), default=None),
            "load": [min(data["load"], default=0.0), max(data["load"], default=0.0)],
        }
    pairs = [(g.ttft_s - d.ttft_s) * 1000 for g, d in zip(results[GATEWAY]["singles"], results[DIRECT]["singles"],
                                                           strict=False)
             if g.ttft_s is not None and d.ttft_s is not None]
    ratios = {
        "decode": _ratio(table[GATEWAY]["decode_tps"], table[DIRECT]["decode_tps"]),
        "aggregate": _ratio(table[GATEWAY]["aggregate_tps"], table[DIRECT]["aggregate_tps"]),
        "ttft_extra_ms": median(pairs),
    }
    return {"targets": table, "ratios": ratios}


def print_summary(summary: dict[str, Any]) -> None:
    print(f"\n{'path':<16}{'TTFT ms':>9}{'decode tok/s':>14}{f'{CONCURRENCY}-conc tok/s':>15}{'done':>6}"
          f"{'errors':>8}{'load':>12}")
    for name, row in summary["targets"].items():
        print(f"{name:<16}{_fmt(row['ttft_s'], '.1f', 1000):>9}{_fmt(row['decode_tps'], '.1f'):>14}"
              f"{_fmt(row['aggregate_tps'], '.1f'):>15}{row['completed'] if row['completed'] is not None else '-':>6}"
              f"{row['errors']:>8}{row['load'][0]:>6.2f}-{row['load'][1]:<5.2f}")
    ratios = summary["ratios"]
    decode, aggregate, extra = ratios["decode"], ratios["aggregate"], ratios["ttft_extra_ms"]
    print("\ngallama (backend=remote) against the same llama-server directly:")
    print(f"  decode tok/s      {_fmt(decode, '.3f'):>7}   goal >= 0.97: "
          f"{'n/a' if decode is None else 'meets goal' if decode >= 0.97 else 'BELOW GOAL'}")
    print(f"  {CONCURRENCY}-conc tok/s      {_fmt(aggregate, '.3f'):>7}   goal >= 0.97: "
          f"{'n/a' if aggregate is None else 'meets goal' if aggregate >= 0.97 else 'BELOW GOAL'}")
    print(f"  TTFT added        {_fmt(extra, '+.1f'):>7} ms (median of the runs' differences)   goal <= +5 ms: "
          f"{'n/a' if extra is None else 'meets goal' if extra <= 5 else 'BELOW GOAL'}")


def run_benchmark(binary: str, runs: int, rounds: int, log_dir: Path, extra_keys: str = "") -> dict[str, Any]:
    gguf = gguf_path()
    engine_spec = ServerSpec(DIRECT, "llama-server", os.cpu_count() or 2, binary=binary)
    with running_servers([engine_spec], gguf, log_dir) as (engine,):
        keys = f"backend=remote url={engine.base_url}/v1 engine=llama_server {extra_keys}".strip()
        with running_servers([ServerSpec(GATEWAY, "gallama", None, keys=keys)], gguf, log_dir) as (gateway,):
            gateway.model = GALLAMA_MODEL
            targets = [HttpTarget(engine), HttpTarget(gateway)]
            results = asyncio.run(measure(targets, runs, rounds))
    summary = summarise(results)
    print_summary(summary)
    return {"plan": {"runs": runs, "rounds": rounds, "max_tokens": MAX_TOKENS, "concurrency": CONCURRENCY},
            **summary}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="single-stream runs per path (default 10)")
    parser.add_argument("--rounds", type=int, default=3, help=f"{CONCURRENCY}-concurrent rounds per path")
    parser.add_argument("--llama-server", default="auto", help="llama-server executable, or 'auto' (the cached "
                        "build of 'make llama-server')")
    parser.add_argument("--keys", default="", help="more -id keys for gallama (e.g. stream_interval_ms=0)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--log-dir", type=Path, default=Path(__file__).parent / "results" / "logs" / "remote")
    args = parser.parse_args(argv)
    binary = _llama_server(args.llama_server)
    if binary is None:
        print("llama-server is not built: run `make llama-server`", file=sys.stderr)
        return 2
    args.log_dir.mkdir(parents=True, exist_ok=True)
    result = run_guarded(lambda: run_benchmark(binary, args.runs, args.rounds, args.log_dir, args.keys))
    if isinstance(result, int):
        return result
    write_results(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
