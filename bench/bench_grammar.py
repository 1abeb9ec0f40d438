#!/usr/bin/env python3
"""Grammar benchmark: constrained vs free decoding on the same server and model, and grammar compile time.

1. Decode rate, through the real server with the official ``openai`` client (non-streaming, temperature 0):
   for each constrained kind (a tool call with ``tool_choice="required"``, a nested ``json_schema``) a
   request is sent twice (the second one finds its prompt in the slot's cache, so its wall time is almost all
   decoding), then the same conversation without the constraint and ``max_tokens`` equal to the constrained
   completion's length, also twice. Rate = completion tokens / wall time of the second request; the ratio
   constrained / free is the cost of enforcing the grammar (mask per token, matcher copy, read-back parse).
   Rounds alternate the kinds; medians are reported.
2. Compile time, in process, for a request with 20 tools: the kernel's Lark grammar (cold, then from the
   constraint cache), llguidance's matcher (cold compile, then a copy from the backend's matcher cache), and
   Python Lark's parser for the read-back (first parse, then cached).

Usage: ``python bench/bench_grammar.py [--rounds N] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench_spine import GALLAMA_MODEL, ServerSpec, gguf_path, run_guarded, running_servers, write_results
from openai import OpenAI

from gallama_backend_llamacpp.grammar import GrammarEngine
from gallama_backend_llamacpp.model import LlamaModel
from gallama_kernel.grammar.tools import ToolSpec, call_text
from gallama_kernel.pipeline import constraints

GOAL = 0.9
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 40}, "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 14}},
        "required": ["city", "unit", "days"], "additionalProperties": False}}}
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 40}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "address": {"type": "object", "properties": {"street": {"type": "string", "maxLength": 60},
                                                 "city": {"type": "string", "maxLength": 30}},
                "required": ["street", "city"], "additionalProperties": False},
    "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 30}, "maxItems": 4}},
    "required": ["name", "age", "address", "hobbies"], "additionalProperties": False}
KINDS: dict[str, dict[str, Any]] = {
    "tool_call": {"prompt": "What's the weather in Paris for the next three days?",
                  "constraint": {"tools": [WEATHER], "tool_choice": "required"}},
    "json_schema": {"prompt": "Describe a fictional person who lives in Lisbon.",
                    "constraint": {"response_format": {"type": "json_schema", "json_schema": {
                        "name": "person", "schema": PERSON}}}},
}


def twenty_tools() -> list[ToolSpec]:
    tools = []
    for i in range(20):
        properties: dict[str, Any] = {
            "query": {"type": "string", "maxLength": 80},
            "limit": {"type": "integer", "minimum": 1, "maximum": 100},
            "mode": {"enum": ["fast", "exact", "fuzzy"]},
            "when": {"type": "string", "format": "date"},
            "filters": {"type": "array", "maxItems": 5, "items": {"type": "object", "properties": {
                "field": {"type": "string"}, "value": {"anyOf": [{"type": "string"}, {"type": "number"}]}},
                "required": ["field", "value"], "additionalProperties": False}},
        }
        keep = dict(list(properties.items())[: 2 + i % 4])
        tools.append(ToolSpec(f"tool_{i}", {"type": "object", "properties": keep, "required": ["query"],
                                            "additionalProperties": False}))
    return tools


def timed(fn: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def compile_times() -> dict[str, float]:
    tools = twenty_tools()
    constraint = constraints.Constraint("tools", "tools", tools=tuple(tools), choice="auto")
    constraints._CACHE.clear()
    kernel_cold, grammar = timed(lambda: constraints.compile_constraint(constraint))
    kernel_warm, _ = timed(lambda: constraints.compile_constraint(constraint))
    model = LlamaModel(str(gguf_path()), None)
    try:
        tokenizer_s, engine = timed(lambda: GrammarEngine(model))
        matcher_cold, _ = timed(lambda: engine.matcher(grammar))
        matcher_warm, _ = timed(lambda: engine.matcher(grammar))
    finally:
        model.close()
    sample = call_text("tool_3", '{"query":"x","limit":3,"mode":"fast"}')
    parse_cold, _ = timed(lambda: grammar.parse(sample))
    parse_warm, _ = timed(lambda: grammar.parse(sample))
    return {"grammar_lines": len(grammar.llguidance.splitlines()), "kernel_compile_cold_s": kernel_cold,
            "kernel_compile_cached_s": kernel_warm, "tokenizer_build_s": tokenizer_s,
            "matcher_compile_cold_s": matcher_cold, "matcher_from_cache_s": matcher_warm,
            "readback_parse_first_s": parse_cold, "readback_parse_cached_s": parse_warm}


def rate(client: OpenAI, messages: list[dict[str, str]], **kwargs: Any) -> tuple[float, int, str | None]:
    """Tokens/s of the second of two identical requests (the first one fills the prompt cache)."""
    for _ in range(2):
        start = time.perf_counter()
        completion = client.chat.completions.create(model=GALLAMA_MODEL, messages=messages, temperature=0,
                                                    **kwargs)
        wall = time.perf_counter() - start
    tokens = completion.usage.completion_tokens
    return tokens / wall, tokens, completion.choices[0].finish_reason


def decode_rates(base_url: str, rounds: int) -> dict[str, Any]:
    client = OpenAI(base_url=f"{base_url}/v1", api_key="bench", max_retries=0, timeout=300)
    rows: dict[str, list[dict[str, Any]]] = {kind: [] for kind in KINDS}
    for round_ in range(rounds):
        for kind, setup in KINDS.items():
            messages = [{"role": "user", "content": f"{setup['prompt']} (round {round_})"}]
            constrained, tokens, finish = rate(client, messages, max_tokens=300, **setup["constraint"])
            free, free_tokens, _ = rate(client, messages, max_tokens=tokens)
            rows[kind].append({"constrained_tps": constrained, "free_tps": free, "tokens": tokens,
                               "free_tokens": free_tokens, "finish": finish})
            print(f"  round {round_} {kind:<12} constrained {constrained:6.1f} tok/s ({tokens} tok, {finish})"
                  f"   free {free:6.1f} tok/s ({free_tokens} tok)", flush=True)
    summary = {}
    for kind, kind_rows in rows.items():
        constrained = statistics.median(r["constrained_tps"] for r in kind_rows)
        free = statistics.median(r["free_tps"] for r in kind_rows)
        summary[kind] = {"constrained_tps": constrained, "free_tps": free, "ratio": constrained / free,
                         "runs": kind_rows}
    return summary


def run(rounds: int, log_dir: Path) -> dict[str, Any]:
    print("compile times (20 tools) ...", flush=True)
    result: dict[str, Any] = {"compile": compile_times()}
    with running_servers([ServerSpec("gallama", "gallama", None)], gguf_path(), log_dir) as servers:
        result["decode"] = decode_rates(servers[0].base_url, rounds)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    log_dir = Path(__file__).parent / "results" / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    result = run_guarded(lambda: run(args.rounds, log_dir))
    if isinstance(result, int):
        return result
    print("\ncompile, 20 tools:")
    for key, value in result["compile"].items():
        print(f"  {key:<28} {value * 1000:9.2f} ms" if key.endswith("_s") else f"  {key:<28} {value:9d}")
    print(f"\ndecode (median of {args.rounds}; goal constrained/free >= {GOAL}):")
    for kind, row in result["decode"].items():
        verdict = "met" if row["ratio"] >= GOAL else "NOT met"
        print(f"  {kind:<12} constrained {row['constrained_tps']:6.1f} tok/s   free {row['free_tps']:6.1f} tok/s"
              f"   ratio {row['ratio']:.3f}  {verdict}")
    write_results(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
