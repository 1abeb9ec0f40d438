"""A short benchmark against the running server: how fast the backend decodes, alone and eight at once, what a
grammar costs, and what prefix reuse saves an agent loop.

* **single stream**: one greedy stream at a time; decode rate = completion tokens after the first / time from
  the first to the last token, so prompt processing does not count.
* **8 concurrent streams**: eight streams started together; aggregate rate = all completion tokens / wall time.
  Without flash-attn the exllama backend decodes one request at a time, and this shows it.
* **grammar vs free**: the same prompt decoded free and under ``regex_pattern`` ``[a-z ]{N}`` (a mask every
  token, and an output of known length), decode rates side by side and their ratio.
* **prefix reuse**: an agent loop whose conversation grows each turn (system prompt with tools, user task, then
  per turn an assistant tool call and its result), each turn sent right after the previous one. The last
  turn's time to first token with the earlier turns cached is compared with the same prompt made cold by a
  different first line (nothing cached matches it), with ``usage.prompt_tokens_details.cached_tokens``.

Random weights may end a completion early (their end token is as likely as any), so rates sum several requests
and say how many tokens they are over. Each part has a share of ``--budget-s`` and stops early when its time is
up; every result goes into the report when it is measured. The numbers are the backend's plumbing on this
model, not a model's speed: compare them across runs and backends, not with published figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from dataclasses import dataclass
from typing import Any

from checklib import progress, report, server_state
from openai import OpenAI

TOOLS_TEXT = json.dumps([{"name": "read_file", "parameters": {"path": "string"}},
                         {"name": "run_tests", "parameters": {"pattern": "string"}},
                         {"name": "edit_file", "parameters": {"path": "string", "old": "string", "new": "string"}}])
SYSTEM = "You are a coding agent. Call one tool per turn. Tools: " + TOOLS_TEXT


@dataclass
class Timed:
    """One streamed completion: when it started, its first and last content, how many tokens."""

    began: float
    first: float | None = None
    last: float | None = None
    tokens: int = 0
    cached: int = 0
    prompt: int = 0
    text: str = ""

    @property
    def ttft(self) -> float:
        return (self.first or self.began) - self.began

    @property
    def decode_rate(self) -> float:
        """Tokens per second after the first token (0 when fewer than two tokens came)."""
        span = (self.last or 0) - (self.first or 0)
        return (self.tokens - 1) / span if self.tokens > 1 and span > 0 else 0.0


class Bench:
    def __init__(self, base_url: str, model: str, budget_s: float) -> None:
        self.timeout = float(os.environ.get("GPU_CHECK_REQUEST_TIMEOUT_S") or 30)
        self.client = OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=self.timeout)
        self.model = model
        self.deadline = time.monotonic() + budget_s
        self.budget_s = budget_s

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def stream(self, messages: list[dict[str, Any]], max_tokens: int, **keys: Any) -> Timed:
        timed = Timed(began=time.perf_counter())
        # never past the bench's own deadline: a slow request fails its part instead of the phase's timeout
        client = self.client.with_options(timeout=max(1.0, min(self.timeout, self.left())))
        chunks = client.chat.completions.create(model=self.model, messages=messages, max_tokens=max_tokens,
                                                temperature=0, stream=True, stream_options={"include_usage": True},
                                                **keys)
        pieces = []
        for chunk in chunks:
            now = time.perf_counter()
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
                timed.first = timed.first or now
                timed.last = now
            if chunk.usage is not None:
                timed.tokens = chunk.usage.completion_tokens
                timed.prompt = chunk.usage.prompt_tokens
                details = chunk.usage.prompt_tokens_details
                timed.cached = (getattr(details, "cached_tokens", 0) or 0) if details is not None else 0
        timed.text = "".join(pieces)
        return timed

    @staticmethod
    def ask(text: str) -> list[dict[str, Any]]:
        return [{"role": "user", "content": text}]

    # -- parts ---------------------------------------------------------------------------------------------
    def single(self, share: float, max_tokens: int = 256) -> float:
        stop_at = time.monotonic() + share
        runs: list[Timed] = []
        while time.monotonic() < stop_at and self.left() > 0 and sum(r.tokens for r in runs) < 4 * max_tokens:
            runs.append(self.stream(self.ask(f"Write a long story, part {len(runs)}."), max_tokens))
        useful = [r for r in runs if r.decode_rate > 0]
        if not useful:
            report("- single stream: no run produced two tokens")
            return 0.0
        tokens = sum(r.tokens - 1 for r in useful)
        seconds = sum((r.last or 0) - (r.first or 0) for r in useful)
        rate = tokens / seconds
        report(f"- single stream decode: **{rate:.0f} tok/s** over {tokens} tokens in {len(useful)} requests "
               f"(median TTFT {statistics.median(r.ttft for r in useful) * 1000:.0f} ms)")
        progress(f"bench: single stream {rate:.0f} tok/s")
        return rate

    def concurrent(self, streams: int = 8, max_tokens: int = 128) -> None:
        results: list[Timed | Exception | None] = [None] * streams

        def one(index: int) -> None:
            try:
                results[index] = self.stream(self.ask(f"Story {index}: once upon a time"), max_tokens)
            except Exception as error:  # counted below
                results[index] = error

        began = time.perf_counter()
        threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=max(self.left(), 1))
        wall = time.perf_counter() - began
        done = [r for r in results if isinstance(r, Timed)]
        failed = [r for r in results if not isinstance(r, Timed)]
        if not done:
            report(f"- {streams} concurrent streams: all failed: {failed[:2]}")
            return
        tokens = sum(r.tokens for r in done)
        ttfts = sorted(r.ttft for r in done)
        report(f"- {streams} concurrent streams: **{tokens / wall:.0f} tok/s aggregate** ({tokens} tokens in "
               f"{wall:.2f} s; TTFT min {ttfts[0] * 1000:.0f} ms, max {ttfts[-1] * 1000:.0f} ms)"
               + (f"; {len(failed)} failed: {failed[:2]}" if failed else ""))
        progress(f"bench: {streams} streams {tokens / wall:.0f} tok/s aggregate")

    def grammar_cost(self, share: float, length: int = 200) -> None:
        stop_at = time.monotonic() + share
        free: list[Timed] = []
        bound: list[Timed] = []
        pattern = f"[a-z ]{{{length}}}"
        index = 0
        while time.monotonic() < stop_at and self.left() > 0 and index < 4:
            prompt = self.ask(f"Describe the sea, take {index}.")
            free.append(self.stream(prompt, length))
            bound.append(self.stream(prompt, length + 8, extra_body={"regex_pattern": pattern}))
            index += 1

        def rate(runs: list[Timed]) -> tuple[float, int]:
            useful = [r for r in runs if r.decode_rate > 0]
            tokens = sum(r.tokens - 1 for r in useful)
            seconds = sum((r.last or 0) - (r.first or 0) for r in useful)
            return (tokens / seconds if seconds else 0.0), tokens

        free_rate, free_tokens = rate(free)
        bound_rate, bound_tokens = rate(bound)
        ratio = bound_rate / free_rate if free_rate else 0.0
        valid = all(len(r.text) == length and set(r.text) <= set("abcdefghijklmnopqrstuvwxyz ") for r in bound)
        report(f"- grammar vs free decode: free {free_rate:.0f} tok/s ({free_tokens} tokens), regex "
               f"`{pattern}` {bound_rate:.0f} tok/s ({bound_tokens} tokens): **ratio {ratio:.2f}**; constrained "
               f"outputs {'all valid' if valid else 'NOT all valid'}")
        progress(f"bench: grammar/free {ratio:.2f}")

    def prefix_reuse(self, turns: int = 6) -> None:
        """The agent loop: each turn appends a tool call and a long tool result and is sent right after the
        previous one (as an agent does), so its prefix is cached; then the last turn's prompt is sent cold.

        Cold is measured once, at the end: a cold request replaces what an unpaged cache holds (exllamav2 without
        flash-attn keeps only the previous sequence), so interleaving cold requests would empty the warm ones.
        """
        messages: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM},
                                          {"role": "user", "content": "Fix the failing test in parser.py."}]
        report("- prefix reuse on a growing agent loop (each turn sent right after the previous one):")
        report("")
        report("  | turn | prompt tokens | cached tokens | TTFT (ms) |")
        report("  | --- | --- | --- | --- |")
        last: Timed | None = None
        turns_done = 0
        for turn in range(turns):
            if self.left() < 4:
                break
            if turn:
                call_id = f"call_{turn}"
                result = f"parser.py line {turn * 40}: " + "def parse(tokens): return [t.strip() for t in tokens] " * 12
                messages += [
                    {"role": "assistant", "content": None, "tool_calls": [{
                        "id": call_id, "type": "function",
                        "function": {"name": "read_file", "arguments": json.dumps({"path": f"parser.py#{turn}"})}}]},
                    {"role": "tool", "tool_call_id": call_id, "content": result}]
            last = self.stream(messages, 16)
            turns_done = turn + 1
            report(f"  | {turns_done} | {last.prompt} | {last.cached} | {last.ttft * 1000:.1f} |")
        report("")
        if last is None:
            report("- prefix reuse: no time left")
            return
        # the same last prompt twice more: cached (right after itself) and cold (a different first line)
        again = self.stream(messages, 16)
        cold_messages = [{"role": "system", "content": f"Session {time.time_ns()}. " + SYSTEM}, *messages[1:]]
        cold = self.stream(cold_messages, 16)
        ratio = cold.ttft / last.ttft if last.ttft else 0.0
        report(f"- turn {turns_done} ({last.prompt} prompt tokens): TTFT **{last.ttft * 1000:.1f} ms with "
               f"{last.cached} cached** vs **{cold.ttft * 1000:.1f} ms cold** ({cold.cached} cached): cold/cached "
               f"**{ratio:.1f}x**; the same prompt again: {again.ttft * 1000:.1f} ms, {again.cached} cached")
        progress(f"bench: turn {turns_done}: {last.prompt} prompt tokens, {last.cached} cached, TTFT "
                 f"{last.ttft * 1000:.0f} ms cached vs {cold.ttft * 1000:.0f} ms cold")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--state", required=True, help="server.py's state file")
    parser.add_argument("--budget-s", type=float, default=60)
    args = parser.parse_args()
    state = server_state(args.state)
    # a few seconds in hand for the report: the phase's timeout ends the process where it is
    bench = Bench(state["base_url"], state["model"], max(args.budget_s - 5, 10))
    share = bench.budget_s / 5
    parts = [("single stream", lambda: bench.single(share)), ("8 concurrent streams", bench.concurrent),
             ("grammar vs free", lambda: bench.grammar_cost(share)), ("prefix reuse", bench.prefix_reuse)]
    failures = 0
    for name, part in parts:
        if bench.left() < 2:
            report(f"- {name}: skipped, no time left")
            continue
        began = time.monotonic()
        try:
            part()
        except Exception as error:  # one part's failure is reported; the next part runs
            failures += 1
            report(f"- {name} FAILED: {type(error).__name__}: {str(error)[:300]}")
            progress(f"bench: {name} failed: {error}")
        progress(f"bench: {name} took {time.monotonic() - began:.1f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
