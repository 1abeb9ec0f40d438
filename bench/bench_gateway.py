#!/usr/bin/env python3
"""Gateway benchmark: the same worker measured through the gateway and directly.

Starts ``gallama run`` (a gateway and one worker process serving the embedded SmolLM2-135M), reads the worker's
port from ``/list_loaded_models`` and measures, alternating between the two addresses, single streams with the
official ``openai`` client (streaming chat, temperature 0, ``repeat_penalty`` 1.0, distinct long-story prompts):
time to first content token and decode tok/s = (completion tokens - 1) / (first → last content token). Like
``bench_spine.py``, each run waits for quiet CPUs and runs during which foreign processes used more than 0.2
cores are left out of the medians. Goals: ≤ 3 % decode throughput and ≤ 5 ms TTFT lost to the gateway.

The throughput loss is judged on the median of the per-run ratios (run i through the gateway / run i direct,
measured back to back), not on the ratio of the two medians: this VM's speed drifts by 10-15 % within minutes,
which moves whole halves of the runs and the medians with them.

Usage: ``python bench/bench_gateway.py [--runs N] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
from bench_spine import (
    GALLAMA_MODEL,
    MAX_TOKENS,
    HttpTarget,
    Plan,
    ServerSpec,
    Session,
    TargetReport,
    _fmt,
    _ratio,
    gguf_path,
    prompts,
    run_guarded,
    running_servers,
    write_results,
)

GOALS = {"decode_loss": 0.03, "ttft_added_s": 0.005}


def address(name: str, pid: int, base_url: str) -> Any:
    """What HttpTarget reads of a server: ``spec.name``, ``proc.pid``, ``base_url`` and ``model``."""
    return SimpleNamespace(spec=SimpleNamespace(name=name), proc=SimpleNamespace(pid=pid), base_url=base_url,
                           model=GALLAMA_MODEL)


async def measure(plan: Plan, gateway: HttpTarget, direct: HttpTarget, worker_pid: int) -> dict[str, TargetReport]:
    gateway.pids.append(worker_pid)  # the gateway's work includes the worker's
    direct.pids.append(gateway.pids[0])  # the idle gateway is not foreign load either
    reports = {t.name: TargetReport(t.name, "default") for t in (gateway, direct)}
    session = Session(plan, reports)
    warm = prompts(1)[0]
    for target in (gateway, direct):
        await target.single(warm, 16)
    for run, prompt in enumerate(prompts(plan.runs)):
        order = (gateway, direct) if run % 2 == 0 else (direct, gateway)
        for target in order:
            result = await session.single(target, prompt)
            print(f"  run {run:2d} {target.name:<8} TTFT {_fmt(result.ttft_s, '.1f', 1000):>6} ms  "
                  f"decode {_fmt(result.decode_tps, '.1f'):>6} tok/s{'' if result.clean else '  (noisy)'}",
                  flush=True)
    return reports


def run(plan: Plan, log_dir: Path) -> dict[str, Any]:
    with running_servers([ServerSpec("gallama", "gallama", None)], gguf_path(), log_dir) as servers:
        server = servers[0]
        replica = httpx.get(f"{server.base_url}/list_loaded_models").json()["models"][0]["replicas"][0]
        gateway = HttpTarget(address("gateway", server.proc.pid, server.base_url))
        direct = HttpTarget(address("direct", replica["pid"], f"http://127.0.0.1:{replica['port']}"))

        async def both() -> dict[str, TargetReport]:
            try:
                return await measure(plan, gateway, direct, replica["pid"])
            finally:
                await gateway.close()
                await direct.close()

        reports = asyncio.run(both())
    summary = {name: {**r.summary(), "singles": [asdict(s) for s in r.singles]} for name, r in reports.items()}
    g, d = summary["gateway"], summary["direct"]
    decode_ratio = _ratio(g["decode_tps"], d["decode_tps"])
    ttft_added = None if g["ttft_s"] is None or d["ttft_s"] is None else g["ttft_s"] - d["ttft_s"]
    pairs = [(a, b) for a, b in zip(reports["gateway"].singles, reports["direct"].singles, strict=True)
             if a.clean and b.clean and a.decode_tps and b.decode_tps]
    paired = statistics.median(a.decode_tps / b.decode_tps for a, b in pairs) if pairs else None  # type: ignore[operator]
    return {"targets": summary, "decode_ratio": decode_ratio, "paired_decode_ratio": paired,
            "ttft_added_s": ttft_added}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=MAX_TOKENS)
    parser.add_argument("--quiet-wait", type=float, default=10.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    log_dir = Path(__file__).parent / "results" / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    plan = Plan(args.runs, 0, args.max_tokens, [], [], [], args.quiet_wait)
    result = run_guarded(lambda: run(plan, log_dir))
    if isinstance(result, int):
        return result
    for name, t in result["targets"].items():
        print(f"{name:<8} clean {t['clean_runs']}/{t['runs']}  TTFT {_fmt(t['ttft_s'], '.1f', 1000)} ms  "
              f"decode {_fmt(t['decode_tps'], '.1f')} tok/s ({_fmt(t['decode_tps_min'], '.1f')}-"
              f"{_fmt(t['decode_tps_max'], '.1f')})")
    ratio, paired, added = result["decode_ratio"], result["paired_decode_ratio"], result["ttft_added_s"]
    loss = None if paired is None else 1 - paired
    print(f"decode through the gateway / direct: ratio of medians {_fmt(ratio, '.3f')}; median of the runs' "
          f"ratios {_fmt(paired, '.3f')} (loss {_fmt(loss, '.1%')}; goal <= 3 %: "
          f"{'met' if loss is not None and loss <= GOALS['decode_loss'] else 'NOT met'})")
    print(f"TTFT added by the gateway: {_fmt(added, '.1f', 1000)} ms (goal <= 5 ms: "
          f"{'met' if added is not None and added <= GOALS['ttft_added_s'] else 'NOT met'})")
    write_results(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
