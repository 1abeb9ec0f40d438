#!/usr/bin/env python3
"""Protocol overhead: the same generation through ``/v1/chat/completions``, ``/v1/messages`` (Anthropic) and
``/v1/responses`` (OpenAI Responses), against one ``gallama run`` on the embedded model.

Each round sends one streamed request per protocol, in a rotating order (so background load hits all alike):
the same conversation, greedy, the same token budget; the protocol plugins translate it into the same chat
request, so the prompt (read from the cache after the first round) and the generated tokens are the same. Per
request: time to first text (request sent → first text delta) and decode rate ((completion tokens - 1) / first →
last text delta). Medians over the rounds; each protocol is compared with chat completions measured in the same
run. Goals (issue: agent protocols): throughput ratio ≥ 0.98, time to first text at most 2 ms more. The load
average of each round is recorded.

Usage: ``python bench/bench_protocols.py [--rounds N] [--max-tokens N] [--json PATH]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from gallama_kernel.testing import RunningServer

PROMPT = "Write a long story about a lighthouse keeper and a storm."
MODEL = "smollm2"
GOAL_RATIO = 0.98
GOAL_TTFT_MS = 2.0


def bodies(max_tokens: int) -> dict[str, tuple[str, dict[str, Any]]]:
    messages = [{"role": "user", "content": PROMPT}]
    return {
        "chat": ("/v1/chat/completions", {"model": MODEL, "messages": messages, "max_tokens": max_tokens,
                                          "temperature": 0, "stream": True,
                                          "stream_options": {"include_usage": True}}),
        "messages": ("/v1/messages", {"model": MODEL, "messages": messages, "max_tokens": max_tokens,
                                      "temperature": 0, "stream": True}),
        "responses": ("/v1/responses", {"model": MODEL, "input": messages, "max_output_tokens": max_tokens,
                                        "temperature": 0, "stream": True, "store": False}),
    }


def text_and_tokens(protocol: str, data: dict[str, Any]) -> tuple[str, int | None]:
    """The text a stream event carries, and the completion tokens when it reports them."""
    if protocol == "chat":
        choices = data.get("choices") or []
        text = (choices[0].get("delta") or {}).get("content") or "" if choices else ""
        return text, (data.get("usage") or {}).get("completion_tokens")
    kind = data.get("type")
    if protocol == "messages":
        if kind == "content_block_delta" and data["delta"].get("type") == "text_delta":
            return data["delta"]["text"], None
        return "", data["usage"]["output_tokens"] if kind == "message_delta" else None
    if kind == "response.output_text.delta":
        return data["delta"], None
    return "", data["response"]["usage"]["output_tokens"] if kind in ("response.completed",
                                                                      "response.incomplete") else None


def measure(client: httpx.Client, protocol: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    sent = time.perf_counter()
    first = last = None
    tokens = None
    text = ""
    with client.stream("POST", path, json=body) as response:
        response.raise_for_status()
        lines = response.iter_lines()
        for line in lines:
            if not line.startswith("data: {"):
                continue
            piece, reported = text_and_tokens(protocol, json.loads(line.removeprefix("data: ")))
            if piece:
                last = time.perf_counter()
                first = first or last
                text += piece
            tokens = reported if reported is not None else tokens
    if first is None or last is None or not tokens:
        raise RuntimeError(f"{protocol}: no text or no usage in the stream")
    return {"ttft_ms": (first - sent) * 1000, "tok_s": (tokens - 1) / (last - first) if last > first else None,
            "tokens": tokens, "text": text}


def run(rounds: int, max_tokens: int) -> dict[str, Any]:
    requests = bodies(max_tokens)
    order = list(requests)
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in order}
    loads: list[float] = []
    with tempfile.TemporaryDirectory() as home, RunningServer(Path(home)) as server, \
            httpx.Client(base_url=server.base_url, timeout=600) as client:
        for name in order:  # warm-up: the prompt enters the cache, every code path is loaded
            measure(client, name, *requests[name])
        for index in range(rounds):
            loads.append(os.getloadavg()[0])
            for name in order[index % len(order):] + order[:index % len(order)]:
                rows[name].append(measure(client, name, *requests[name]))
    texts = {name: {row["text"] for row in rows[name]} for name in order}
    summary: dict[str, Any] = {"rounds": rounds, "max_tokens": max_tokens, "load_avg_1m": loads,
                               "same_text": len(set().union(*texts.values())) == 1}
    for name in order:
        summary[name] = {"ttft_ms": statistics.median(r["ttft_ms"] for r in rows[name]),
                         "tok_s": statistics.median(r["tok_s"] for r in rows[name] if r["tok_s"]),
                         "tokens": statistics.median(r["tokens"] for r in rows[name])}
    for name in ("messages", "responses"):
        summary[name]["throughput_ratio"] = summary[name]["tok_s"] / summary["chat"]["tok_s"]
        summary[name]["ttft_extra_ms"] = summary[name]["ttft_ms"] - summary["chat"]["ttft_ms"]
    return summary


def report(summary: dict[str, Any]) -> None:
    print(f"{summary['rounds']} rounds of {summary['max_tokens']} tokens; load average (1 min) "
          f"{min(summary['load_avg_1m']):.2f}-{max(summary['load_avg_1m']):.2f}; same text on every protocol: "
          f"{summary['same_text']}")
    print(f"{'protocol':<10} {'TTFT ms':>8} {'tok/s':>8} {'ratio':>7} {'+TTFT ms':>9}  goal")
    for name in ("chat", "messages", "responses"):
        row = summary[name]
        if name == "chat":
            print(f"{name:<10} {row['ttft_ms']:8.1f} {row['tok_s']:8.1f} {'':>7} {'':>9}  (reference)")
            continue
        met = row["throughput_ratio"] >= GOAL_RATIO and row["ttft_extra_ms"] <= GOAL_TTFT_MS
        print(f"{name:<10} {row['ttft_ms']:8.1f} {row['tok_s']:8.1f} {row['throughput_ratio']:7.3f} "
              f"{row['ttft_extra_ms']:9.2f}  {'met' if met else 'NOT met'} (≥ {GOAL_RATIO}, ≤ {GOAL_TTFT_MS} ms)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    summary = run(args.rounds, args.max_tokens)
    report(summary)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
