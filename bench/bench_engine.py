#!/usr/bin/env python3
"""Engine benchmark: gallama's continuous-batching engine vs llama-cpp-python's server, measured in one run.

gallama runs with ``max_concurrent_requests=8`` (8 slots); the peer is ``python -m llama_cpp.server --n_threads 2
--n_ctx 4096 --flash_attn True`` (its faster setting in bench_spine), once with its default
``--interrupt_requests True`` and once serializing (``False``). Sections (``--only``, all by default, in this
order), all through the official ``openai`` client, greedy, ``repeat_penalty`` 1.0:

* agent (first, so that it meets gallama's slots unused but for the warm-up): a scripted 10-turn tool-calling
  conversation (tools described in the system prompt, fixed assistant messages and tool results appended each
  turn, the generated text discarded): total wall time (goal: gallama <= 0.8x peer), gallama's cached_tokens per
  turn (goal: > 0 from turn 2; also checked: they cover the agent's previous prompt); then two such agents
  interleaved turn by turn (goal: <= 0.4x peer, whose single prefix cache thrashes), and once more on gallama after
  a burst of 8 requests has used every slot. The single agent runs on gallama, the peer and the floor at once,
  interleaved turn by turn (the machine's speed drifts within minutes); the floor replays the conversation in this
  process on llama.cpp's low-level API with a perfect prefix cache and no server (what the conversation's own
  compute takes; both servers' walls are printed against it);
* concurrent: 8 simultaneous 128-token streams: completions, worst TTFT (goal: gallama <= 1/3 of the serializing
  peer's), aggregate tok/s (goal: >= 1.05x gallama's own single-stream tok/s, both = completion tokens / wall);
* gap: 4 gallama streams running, then a ~1,500-token prompt arrives: the running streams' worst inter-token
  gap between its send and its first token (goal: <= 250 ms) and its TTFT, next to its TTFT on idle servers (the
  peer runs one request at a time, so it has no running streams to measure);
* memory: gallama's VmRSS after load, after each section and after 100 sequential short requests.

Each timed measurement waits first for other processes to leave the CPUs and is marked noisy when they used more
than CLEAN_MAX_CORES meanwhile (noisy runs are left out of the medians when clean ones exist), as in
``bench_spine.py``, whose server, client and CPU-meter pieces this script imports.

Usage: ``python bench/bench_engine.py [--quick] [--json PATH] [--only agent,concurrent,gap,memory]``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import httpx
import llama_cpp as ll
from bench_spine import (
    CLEAN_MAX_CORES,
    CONCURRENCY,
    GALLAMA_MODEL,
    PLACES,
    SAMPLING_EXTRA,
    SUBJECTS,
    WARMUP_PROMPT,
    ConcurrentResult,
    CpuMeter,
    DecodeLoop,
    HttpTarget,
    Server,
    ServerSpec,
    StreamResult,
    _fmt,
    _ratio,
    _rotated,
    descendants,
    gguf_path,
    prompts,
    run_guarded,
    running_servers,
    settle,
    write_results,
)
from openai.types.chat import ChatCompletionMessageParam

from gallama_backend_llamacpp.model import common_prefix

T = TypeVar("T")
Messages = list[ChatCompletionMessageParam]

SECTIONS = ("agent", "concurrent", "gap", "memory")  # agent first: it meets gallama's slots unused
GALLAMA, PEER_INTERRUPTING, PEER_SERIAL = "gallama", "peer-interrupting", "peer-serializing"
PEER_THREADS = 2
STREAM_TOKENS = 128  # concurrent section
AGENT_TURNS = 10
AGENT_MAX_TOKENS = 48
GAP_STREAMS = 4
GAP_STREAM_TOKENS = 300
GAP_WARM_CHUNKS = 8  # the long request is sent once every running stream has delivered this many chunks
GAP_POOL_OFFSET = 20  # prompts the concurrent section did not use
GAP_BASELINE_S = 1.0  # the running streams' gaps in this window before the long request: steady state
LONG_PROMPT_RECORDS = 59  # ~1,500 prompt tokens
LONG_MAX_TOKENS = 16
IDLE_LEDGER = 100  # the idle-server reference uses its own ledger (no prefix shared with the runs)
MEMORY_REQUESTS = 100
MEMORY_SAMPLE_EVERY = 25
IDLE_TIMEOUT_S = 5.0
GOALS = {"ttft_vs_serial_peer": 1 / 3, "aggregate_vs_single": 1.05, "agent_vs_peer": 0.8, "pair_vs_peer": 0.4,
         "worst_gap_s": 0.25}


# -- one server, seen by the client ------------------------------------------------------------------------


@dataclass
class EngineSpec(ServerSpec):
    """A ServerSpec with extra settings: ``key=value`` pairs for gallama's ``-id``, extra argv for the peer."""

    extra: tuple[str, ...] = ()

    def argv(self, port: int, gguf: Path) -> list[str]:
        if self.kind == "gallama" and self.extra:
            return [*super().argv(port, gguf), "-id", " ".join((f"model_id={GALLAMA_MODEL}", *self.extra))]
        return [*super().argv(port, gguf), *self.extra]


def server_specs(sections: set[str], peer_flash_attn: bool = True,
                 gallama_keys: Sequence[str] = ()) -> list[EngineSpec]:
    specs = [EngineSpec(GALLAMA, "gallama", None, extra=(f"max_concurrent_requests={CONCURRENCY}", *gallama_keys))]
    if "concurrent" in sections:
        specs.append(EngineSpec(PEER_INTERRUPTING, "peer", PEER_THREADS, flash_attn=peer_flash_attn))
    if sections & {"concurrent", "agent", "gap"}:
        specs.append(EngineSpec(PEER_SERIAL, "peer", PEER_THREADS, flash_attn=peer_flash_attn,
                                extra=("--interrupt_requests", "False")))
    return specs


@dataclass
class Turn:
    """One non-streamed chat completion."""

    wall_s: float
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    completion_tokens: int | None = None
    error: str | None = None


@dataclass
class Trace:
    """One streamed chat completion as the client saw it: send time and the arrival time of every content chunk."""

    sent: float = 0.0
    arrivals: list[float] = field(default_factory=list)
    done: float | None = None
    finish: str | None = None
    prompt_tokens: int | None = None
    error: str | None = None

    @property
    def ttft_s(self) -> float | None:
        return self.arrivals[0] - self.sent if self.arrivals else None


class Endpoint:
    """A running server: bench_spine's HttpTarget for plain streams, plus agent turns, traces, health, RSS."""

    def __init__(self, server: Server) -> None:
        self.name = server.spec.name
        self.server = server
        self.target = HttpTarget(server)
        self.pids = self.target.pids  # gallama: the gateway and its workers
        self.client = self.target.client

    async def complete(self, messages: Messages, max_tokens: int) -> Turn:
        start = time.perf_counter()
        try:
            reply = await self.client.chat.completions.create(
                model=self.server.model, messages=messages, temperature=0, max_tokens=max_tokens,
                extra_body=SAMPLING_EXTRA)
        except Exception as error:  # a failed request is a result, not a crash
            return Turn(time.perf_counter() - start, error=f"{type(error).__name__}: {error}")
        wall = time.perf_counter() - start
        usage = reply.usage
        if usage is None:
            return Turn(wall)
        details = usage.prompt_tokens_details
        return Turn(wall, usage.prompt_tokens, details.cached_tokens if details else None, usage.completion_tokens)

    async def stream(self, messages: Messages, max_tokens: int, trace: Trace) -> Trace:
        """Stream into ``trace`` (filled as chunks arrive, so that others can watch it)."""
        trace.sent = time.perf_counter()
        try:
            stream = await self.client.chat.completions.create(
                model=self.server.model, messages=messages, temperature=0, max_tokens=max_tokens, stream=True,
                stream_options={"include_usage": True}, extra_body=SAMPLING_EXTRA)
            async for chunk in stream:
                now = time.perf_counter()
                if chunk.usage is not None:
                    trace.prompt_tokens = chunk.usage.prompt_tokens
                for choice in chunk.choices:
                    if choice.delta.content:
                        trace.arrivals.append(now)
                    trace.finish = choice.finish_reason or trace.finish
        except Exception as error:
            trace.error = f"{type(error).__name__}: {error}"
        trace.done = time.perf_counter()
        return trace

    async def health(self) -> dict[str, Any]:
        """gallama's per-model engine stats."""
        async with httpx.AsyncClient(timeout=5) as http:
            reply = await http.get(f"{self.server.base_url}/health")
        return dict(reply.json()["models"][GALLAMA_MODEL])

    def rss_kib(self) -> int | None:
        """VmRSS of the server's processes together (gallama: the gateway and its worker)."""
        total = None
        for pid in self.target.pids:
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total = (total or 0) + int(line.split()[1])
            except OSError:
                pass
        return total

    async def close(self) -> None:
        await self.target.close()


class ReplayFloor(DecodeLoop):
    """The agent loop's floor: the same conversation replayed in this process on llama.cpp's low-level API, with
    no server around it. One sequence keeps the tokens whose KV it holds; each turn computes only what follows
    the longest common prefix (the best any prefix cache can do for one agent), then decodes greedily. What a
    server adds to this (HTTP, scheduling, sampling overhead) is its cost; what this takes is llama.cpp's."""

    FLOOR = "floor (in-process llama.cpp)"

    def __init__(self, gguf: Path, threads: int) -> None:
        super().__init__(gguf, threads)
        self.name = self.FLOOR
        self.held: list[int] = []  # tokens whose KV the sequence holds

    async def complete(self, messages: Messages, max_tokens: int) -> Turn:
        start = time.perf_counter()
        prompt = self.tokenize_chat(messages)
        keep = min(common_prefix(self.held, prompt), len(prompt) - 1)  # the last token yields logits
        ll.llama_memory_seq_rm(self.memory, 0, keep, -1)
        self.held = prompt[:keep]
        for at in range(keep, len(prompt), 512):
            self._decode(prompt[at:at + 512], at)
        self.held = list(prompt)
        ll.llama_sampler_reset(self.sampler)
        generated = 0
        while True:
            token = ll.llama_sampler_sample(self.sampler, self.ctx, -1)
            if ll.llama_vocab_is_eog(self.vocab, token):
                break
            generated += 1
            if generated == max_tokens:
                break
            self._decode([token], len(self.held))
            self.held.append(token)
        return Turn(time.perf_counter() - start, len(prompt), keep, generated)


# -- bookkeeping -------------------------------------------------------------------------------------------


@dataclass
class Config:
    sections: set[str]
    runs: int  # single streams (gallama's own rate)
    rounds: int  # concurrent rounds per server
    agent_reps: int  # single-agent runs (every target, interleaved turn by turn)
    pair_reps: int  # interleaved two-agent runs per server (the peer's take ~100 s each)
    pair_slots_used: bool  # one more gallama pair run after a burst has used every slot
    gap_reps: int
    memory_requests: int
    quiet_wait_s: float
    peer_flash_attn: bool = True
    gallama_keys: tuple[str, ...] = ()


@dataclass
class Bench:
    config: Config
    endpoints: dict[str, Endpoint]
    rss_kib: dict[str, int | None] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def gallama(self) -> Endpoint:
        return self.endpoints[GALLAMA]

    async def metered(self, pids: Sequence[int], work: Callable[[], Awaitable[T]]) -> tuple[T, float, float]:
        """(result, wall seconds, cores foreign processes used meanwhile), after waiting for quiet CPUs."""
        await settle(self.config.quiet_wait_s)
        meter = CpuMeter(pids)
        start = time.perf_counter()
        result = await work()
        return result, time.perf_counter() - start, meter.other_cores()

    def snapshot(self, label: str) -> None:
        self.rss_kib[label] = self.gallama.rss_kib()
        print(f"  gallama VmRSS {label}: {_mib(self.rss_kib[label])} MiB", flush=True)

    async def check_idle(self, after: str) -> dict[str, Any]:
        """After a section every slot must be free again and nothing waiting (else: a slot leak)."""
        deadline = time.monotonic() + IDLE_TIMEOUT_S
        while True:
            stats = await self.gallama.health()
            if (stats["busy"] == 0 and stats["waiting"] == 0) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        if stats["busy"] or stats["waiting"]:
            self.problem(f"after {after}: {stats['busy']} slots busy, {stats['waiting']} waiting "
                         f"{IDLE_TIMEOUT_S:.0f} s after the last request ended")
        print(f"  gallama /health after {after}: {stats}", flush=True)
        return stats

    def problem(self, text: str) -> None:
        self.problems.append(text)
        print(f"  PROBLEM: {text}", flush=True)


def _mib(kib: int | None) -> str:
    return "-" if kib is None else f"{kib / 1024:.0f}"


def _noisy(other_cores: float) -> str:
    return "" if other_cores <= CLEAN_MAX_CORES else f"  [noisy: other processes used {other_cores:.2f} cores]"


def clean_median(rows: Sequence[dict[str, Any]], key: str) -> float | None:
    """Median of ``key`` over the rows measured on quiet CPUs (all rows when none was)."""
    valid = [r for r in rows if r.get(key) is not None]
    clean = [r for r in valid if r["other_cores"] <= CLEAN_MAX_CORES] or valid
    return statistics.median(r[key] for r in clean) if clean else None


def clean_max(rows: Sequence[dict[str, Any]], key: str) -> float | None:
    valid = [r for r in rows if r.get(key) is not None]
    clean = [r for r in valid if r["other_cores"] <= CLEAN_MAX_CORES] or valid
    return max((r[key] for r in clean), default=None)


def user(text: str) -> Messages:
    return [{"role": "user", "content": text}]


# -- 1. concurrent streams ---------------------------------------------------------------------------------


async def section_concurrent(bench: Bench) -> dict[str, Any]:
    cfg = bench.config
    pool = prompts(cfg.runs + cfg.rounds * CONCURRENCY)
    singles = [await _single(bench, prompt) for prompt in pool[: cfg.runs]]
    targets = [e for n, e in bench.endpoints.items() if n in (GALLAMA, PEER_INTERRUPTING, PEER_SERIAL)]
    rounds: dict[str, list[dict[str, Any]]] = {e.name: [] for e in targets}
    for r in range(cfg.rounds):
        batch = pool[cfg.runs + r * CONCURRENCY: cfg.runs + (r + 1) * CONCURRENCY]
        for endpoint in _rotated(targets, r):
            rounds[endpoint.name].append(await _round(bench, endpoint, batch))
    for name, rows in rounds.items():
        if name == GALLAMA and any(row["completed"] < CONCURRENCY for row in rows):
            bench.problem(f"gallama completed only {min(row['completed'] for row in rows)}/{CONCURRENCY} "
                          f"concurrent streams: {[row['errors'][:2] for row in rows]}")
    await bench.check_idle("concurrent")
    bench.snapshot("after concurrent")
    return {"gallama_single": singles, "rounds": rounds, "summary": _concurrent_summary(singles, rounds),
            "gallama_max_concurrent_requests": CONCURRENCY}


async def _single(bench: Bench, prompt: str) -> dict[str, Any]:
    gallama = bench.gallama
    result, wall, other = await bench.metered(gallama.pids, partial(gallama.target.single, prompt, STREAM_TOKENS))
    rate = result.completion_tokens / wall if wall > 0 else None
    row = {**asdict(result), "wall_s": wall, "rate_tps": rate, "other_cores": other}
    print(f"  gallama single stream: {result.completion_tokens} tokens in {wall:.2f} s = {_fmt(rate, '.1f')} tok/s "
          f"(TTFT {_fmt(result.ttft_s, '.0f', 1000)} ms, decode {_fmt(result.decode_tps, '.1f')} tok/s)"
          f"{_error(result)}{_noisy(other)}", flush=True)
    return row


def _error(result: StreamResult) -> str:
    return f"  ERROR {result.error}" if result.error else ""


async def _round(bench: Bench, endpoint: Endpoint, batch: Sequence[str]) -> dict[str, Any]:
    work = partial(endpoint.target.concurrent, batch, STREAM_TOKENS)
    result, _, other = await bench.metered(endpoint.pids, work)
    result.other_cores = other
    _print_round(endpoint.name, result)
    return {**asdict(result), "aggregate_tps": result.aggregate_tps}


def _print_round(name: str, c: ConcurrentResult) -> None:
    errors = f", errors: {c.errors[:1]}" if c.errors else ""
    print(f"  {CONCURRENCY} concurrent  {name:<18} completed {c.completed}/{c.streams}, content {c.with_content}, "
          f"worst TTFT {_fmt(c.worst_ttft_s, '.2f')} s, {c.total_tokens} tokens in {c.wall_s:.1f} s = "
          f"{c.aggregate_tps:.1f} tok/s{errors}{_noisy(c.other_cores or 0.0)}", flush=True)


def _concurrent_summary(singles: list[dict[str, Any]], rounds: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    per_target = {
        name: {"completed": min((r["completed"] for r in rows), default=None),
               "with_content": min((r["with_content"] for r in rows), default=None),
               "worst_ttft_s": max((r["worst_ttft_s"] for r in rows if r["worst_ttft_s"] is not None), default=None),
               "aggregate_tps": clean_median(rows, "aggregate_tps")}
        for name, rows in rounds.items()}
    single_rate = clean_median(singles, "rate_tps")
    gallama, serial = per_target[GALLAMA], per_target.get(PEER_SERIAL, {})
    return {"targets": per_target, "gallama_single_tps": single_rate,
            "ttft_vs_serial_peer": _ratio(gallama["worst_ttft_s"], serial.get("worst_ttft_s")),
            "aggregate_vs_single": _ratio(gallama["aggregate_tps"], single_rate)}


# -- 2. agent loop -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Agent:
    """A scripted tool-calling agent: tools described in the system prompt, fixed calls and tool results."""

    name: str
    system: str
    task: str
    tools: tuple[str, ...]
    words: tuple[str, ...]

    def opening(self) -> Messages:
        return [{"role": "system", "content": self.system}, {"role": "user", "content": self.task}]

    def scripted(self, turn: int) -> Messages:
        """The assistant's tool call of ``turn`` (fixed, not the generated text) and the tool's result."""
        rng = random.Random(f"{self.name}/{turn}")
        tool = self.tools[turn % len(self.tools)]
        call = {"tool": tool, "arguments": {"query": f"{rng.choice(self.words)} {rng.choice(self.words)}",
                                            "limit": 4, "page": turn + 1}}
        items = [{"id": f"{tool[:3]}-{rng.randint(100, 999)}", "name": f"{rng.choice(self.words)} "
                  f"{rng.choice(self.words)}", "score": rng.randint(1, 99), "note": rng.choice(self.words)}
                 for _ in range(3)]
        result = {"tool": tool, "status": "ok", "page": turn + 1, "total": rng.randint(5, 60), "items": items}
        return [{"role": "assistant", "content": f"Step {turn + 1}: I call {tool}.\nCALL {json.dumps(call)}"},
                {"role": "user", "content": f"Tool result: {json.dumps(result)}"}]


def _tool_prompt(persona: str, tools: dict[str, str]) -> str:
    listed = "\n".join(f"- {name}: {what}" for name, what in tools.items())
    return (f"{persona}\nYou solve the user's task by calling tools, one call per message. Available tools:\n"
            f"{listed}\nTo call a tool, reply with one short sentence of reasoning and then one line:\n"
            'CALL {"tool": "<name>", "arguments": {...}}\n'
            "The tool's answer comes back as a message starting with 'Tool result:'. When the task is done, "
            "reply with FINAL: and a summary.")


def make_agents(session: str) -> tuple[Agent, Agent]:
    """Two agents whose system prompts differ from their first words (``session`` keeps runs apart)."""
    travel = {"search_flights": "find flights (origin, destination, date)",
              "get_weather": "forecast for a city and date", "find_hotels": "hotels in a city under a budget",
              "convert_currency": "convert an amount between currencies"}
    ops = {"query_metrics": "time series of a service metric", "read_logs": "recent log lines of a service",
           "list_deploys": "deployments of a service", "open_ticket": "file an incident ticket"}
    return (
        Agent("travel", _tool_prompt(f"[session {session}] You are TripPlanner, a travel booking assistant.",
                                     travel),
              "Plan a five-day trip from Lisbon to Tokyo in April for two people; the budget is 4000 EUR.",
              tuple(travel), ("Tokyo", "Lisbon", "Kyoto", "Osaka", "ryokan", "hostel", "direct", "window",
                              "breakfast", "harbour", "garden", "station")),
        Agent("ops", _tool_prompt(f"Incident desk {session}: you are OpsBot, an on-call site reliability engineer.",
                                  ops),
              "The checkout service returns HTTP 502 for 8% of requests since 09:40; find the cause.",
              tuple(ops), ("checkout", "gateway", "latency", "timeout", "pod", "canary", "rollback", "cpu",
                           "memory", "upstream", "retry", "cache")))


async def run_agents(endpoint: Endpoint | ReplayFloor, agents: Sequence[Agent], turns: int) -> list[dict[str, Any]]:
    """``turns`` turns of each agent, interleaved turn by turn, one request after another."""
    histories = {a.name: a.opening() for a in agents}
    rows: list[dict[str, Any]] = []
    for turn in range(turns):
        for agent in agents:
            result = await endpoint.complete(histories[agent.name], AGENT_MAX_TOKENS)
            rows.append({"agent": agent.name, "turn": turn + 1, **asdict(result)})
            histories[agent.name] += agent.scripted(turn)
    return rows


async def section_agent(bench: Bench) -> dict[str, Any]:
    """Single agent on every target, interleaved turn by turn; then two interleaved agents on gallama's slots as
    found, then, on gallama only, two more after a burst of CONCURRENCY requests has used every slot."""
    servers: list[Endpoint | ReplayFloor] = [bench.gallama, bench.endpoints[PEER_SERIAL]]
    floor = ReplayFloor(gguf_path(), PEER_THREADS)  # one sequence: single agents only
    runs: dict[str, list[dict[str, Any]]] = {"single": [], "pair": [], "pair_slots_used": []}
    try:
        await floor.complete(user(WARMUP_PROMPT), 16)
        for rep in range(bench.config.agent_reps):
            runs["single"] += await _single_agent_runs(bench, [*servers, floor], make_agents(f"{rep + 1}s")[0], rep)
    finally:
        floor.close()
    for rep in range(bench.config.pair_reps):
        for endpoint in _rotated(servers, rep):
            runs["pair"].append(await _agent_run(bench, endpoint, make_agents(f"{rep + 1}p"), "pair", rep))
    if bench.config.pair_slots_used:
        await asyncio.gather(*(bench.gallama.complete(user(f"Say hello to visitor {i}."), 2)
                               for i in range(CONCURRENCY)))
        runs["pair_slots_used"].append(await _agent_run(bench, bench.gallama, make_agents("1w"), "pair_slots_used", 0))
    await bench.check_idle("agent")
    bench.snapshot("after agent")
    summary = _agent_summary(runs)
    _check_reuse(bench, runs)
    _print_turns(runs["single"])
    return {"runs": runs, "summary": summary}


async def _single_agent_runs(bench: Bench, targets: Sequence[Endpoint | ReplayFloor], agent: Agent,
                             rep: int) -> list[dict[str, Any]]:
    """One agent's conversation on every target at once, turn by turn (each target keeps its own history and
    cache; the order rotates every turn): the machine's speed drifts by 10-15 % within minutes, which separate
    runs would read as a difference between targets. A target's wall time is the sum of its requests' times."""
    histories = {t.name: agent.opening() for t in targets}
    turns: dict[str, list[dict[str, Any]]] = {t.name: [] for t in targets}

    async def run() -> None:
        for turn in range(AGENT_TURNS):
            for target in _rotated(targets, turn + rep):
                result = await target.complete(histories[target.name], AGENT_MAX_TOKENS)
                turns[target.name].append({"agent": agent.name, "turn": turn + 1, **asdict(result)})
                histories[target.name] += agent.scripted(turn)

    _, _, other = await bench.metered([pid for t in targets for pid in t.pids], run)
    return [_agent_row(bench, target.name, "single", rep, sum(t["wall_s"] for t in turns[target.name]), other,
                       turns[target.name]) for target in targets]


async def _agent_run(bench: Bench, endpoint: Endpoint | ReplayFloor, agents: Sequence[Agent], kind: str,
                     rep: int) -> dict[str, Any]:
    turns, wall, other = await bench.metered(endpoint.pids, partial(run_agents, endpoint, agents, AGENT_TURNS))
    return _agent_row(bench, endpoint.name, kind, rep, wall, other, turns)


def _agent_row(bench: Bench, name: str, kind: str, rep: int, wall: float, other: float,
               turns: list[dict[str, Any]]) -> dict[str, Any]:
    errors = [t["error"] for t in turns if t["error"]]
    if errors:
        bench.problem(f"{name} agent {kind} run {rep + 1}: {len(errors)} failed turns: {errors[0]}")
    generated = sum(t["completion_tokens"] or 0 for t in turns)
    last_prompt = max((t["prompt_tokens"] or 0 for t in turns), default=0)
    print(f"  agent {kind:<15} run {rep + 1}  {name:<18} {len(turns)} requests in {wall:.2f} s, "
          f"{generated} tokens generated, largest prompt {last_prompt} tokens{_noisy(other)}", flush=True)
    return {"target": name, "rep": rep + 1, "wall_s": wall, "other_cores": other,
            "generated_tokens": generated, "largest_prompt_tokens": last_prompt, "turns": turns}


def _agent_summary(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    peer_pair = clean_median([r for r in runs["pair"] if r["target"] == PEER_SERIAL], "wall_s")
    for kind, rows in runs.items():
        gallama_rows = [r for r in rows if r["target"] == GALLAMA]
        gallama = clean_median(gallama_rows, "wall_s")
        peer = peer_pair if kind == "pair_slots_used" else clean_median(
            [r for r in rows if r["target"] == PEER_SERIAL], "wall_s")
        reuse = [_reuse(r) for r in gallama_rows]
        floor = clean_median([r for r in rows if r["target"] == ReplayFloor.FLOOR], "wall_s")
        summary[kind] = {"gallama_wall_s": gallama, "peer_wall_s": peer, "ratio": _ratio(gallama, peer),
                         "floor_wall_s": floor, "gallama_vs_floor": _ratio(gallama, floor),
                         "peer_vs_floor": _ratio(peer, floor),
                         "largest_prompt_tokens": max((r["largest_prompt_tokens"] for r in rows), default=None),
                         "turns_from_2": sum(r[0] for r in reuse), "cached_nonzero": sum(r[1] for r in reuse),
                         "reused_previous_prompt": sum(r[2] for r in reuse)}
    return summary


def _reuse(row: dict[str, Any]) -> tuple[int, int, int]:
    """(turns from 2 on, those with cached_tokens > 0, those whose cache covered the agent's previous prompt)."""
    previous: dict[str, int] = {}
    counts = [0, 0, 0]
    for turn in row["turns"]:
        cached = turn["cached_tokens"] or 0
        if turn["agent"] in previous:
            counts[0] += 1
            counts[1] += cached > 0
            counts[2] += cached >= previous[turn["agent"]]
        previous[turn["agent"]] = turn["prompt_tokens"] or 0
    return counts[0], counts[1], counts[2]


def _check_reuse(bench: Bench, runs: dict[str, list[dict[str, Any]]]) -> None:
    for kind, rows in runs.items():
        for row in rows:
            turns, _, reused = _reuse(row)
            if row["target"] == GALLAMA and reused < turns:
                cached = [t["cached_tokens"] for t in row["turns"]]
                bench.problem(f"gallama agent {kind} run {row['rep']}: only {reused}/{turns} turns reused the agent's "
                              f"previous prompt from the slot cache (cached_tokens per request: {cached})")


def _print_turns(rows: list[dict[str, Any]]) -> None:
    """Per-turn view of the first single-agent run on each server."""
    first = {r["target"]: r["turns"] for r in rows if r["rep"] == 1}
    if GALLAMA not in first:
        return
    others = [first.get(PEER_SERIAL, []), first.get(ReplayFloor.FLOOR, [])]
    print(f"\n  agent turns (run 1)  {'prompt tok':>10} {'cached':>7} {'gallama ms':>11} {'gen':>4} "
          f"{'peer ms':>8} {'gen':>4} {'floor ms':>9} {'gen':>4}")
    for i, turn in enumerate(first[GALLAMA]):
        line = (f"  turn {turn['turn']:>2}{'':14}{turn['prompt_tokens'] or 0:>10} {turn['cached_tokens'] or 0:>7} "
                f"{turn['wall_s'] * 1000:>11.0f} {turn['completion_tokens'] or 0:>4}")
        for rows_of, width in zip(others, (8, 9), strict=True):
            other = rows_of[i] if i < len(rows_of) else {}
            line += f" {_fmt(other.get('wall_s'), '.0f', 1000):>{width}} {other.get('completion_tokens') or 0:>4}"
        print(line)


# -- 3. long prompt arrival --------------------------------------------------------------------------------


def long_prompt(rep: int) -> str:
    rng = random.Random(f"ledger/{rep}")
    names = ("Ana", "Bruno", "Chen", "Dara", "Emeka", "Farah", "Goran", "Hana")
    goods = ("coffee", "copper wire", "rice", "olive oil", "tea", "wool", "paper", "glass")
    cities = ("Porto", "Nairobi", "Osaka", "Quito", "Tallinn", "Perth", "Lyon", "Recife")
    lines = [f"Record {i + 1}: {rng.choice(names)} shipped {rng.randint(2, 99)} crates of {rng.choice(goods)} "
             f"to {rng.choice(cities)} on day {rng.randint(1, 365)}." for i in range(LONG_PROMPT_RECORDS)]
    return (f"Shipping ledger number {rep + 1} follows.\n" + "\n".join(lines)
            + "\nWhich city received the most crates in total? Answer in one sentence.")


async def section_gap(bench: Bench) -> dict[str, Any]:
    pool = prompts(len(SUBJECTS) * len(PLACES))
    idle = {e.name: await _idle_long(bench, e) for e in (bench.gallama, bench.endpoints.get(PEER_SERIAL)) if e}
    runs = []
    for rep in range(bench.config.gap_reps):
        batch = [pool[(GAP_POOL_OFFSET + rep * GAP_STREAMS + i) % len(pool)] for i in range(GAP_STREAMS)]
        row, _, other = await bench.metered(bench.gallama.pids, partial(_gap_run, bench.gallama, batch, rep))
        row["other_cores"] = other
        _report_gap(bench, rep, row)
        runs.append(row)
    await bench.check_idle("gap")
    bench.snapshot("after gap")
    return {"idle_long": idle, "runs": runs, "summary": _gap_summary(idle, runs)}


def _gap_summary(idle: dict[str, dict[str, Any]], runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {"worst_gap_s": clean_max(runs, "worst_gap_s"), "worst_gap_median_s": clean_median(runs, "worst_gap_s"),
            "baseline_gap_s": clean_median(runs, "baseline_gap_s"), "long_ttft_s": clean_median(runs, "long_ttft_s"),
            "idle_long_ttft_s": {name: row["ttft_s"] for name, row in idle.items()},
            "long_prompt_tokens": runs[0]["long_prompt_tokens"] if runs else None}


async def _idle_long(bench: Bench, endpoint: Endpoint) -> dict[str, Any]:
    """Reference: the long prompt's TTFT on a server with nothing else to do."""
    work = partial(endpoint.stream, user(long_prompt(IDLE_LEDGER)), LONG_MAX_TOKENS, Trace())
    trace, _, other = await bench.metered(endpoint.pids, work)
    print(f"  long prompt alone on {endpoint.name:<18} TTFT {_fmt(trace.ttft_s, '.0f', 1000)} ms"
          f"{'  ERROR ' + trace.error if trace.error else ''}{_noisy(other)}", flush=True)
    return {"ttft_s": trace.ttft_s, "prompt_tokens": trace.prompt_tokens, "error": trace.error, "other_cores": other}


async def _gap_run(endpoint: Endpoint, batch: Sequence[str], rep: int) -> dict[str, Any]:
    traces = [Trace() for _ in batch]
    tasks = [asyncio.create_task(endpoint.stream(user(p), GAP_STREAM_TOKENS, t)) for p, t in zip(batch, traces,
                                                                                                  strict=True)]
    try:
        await _until(lambda: all(len(t.arrivals) >= GAP_WARM_CHUNKS or t.done for t in traces), 60.0)
        long = await endpoint.stream(user(long_prompt(rep)), LONG_MAX_TOKENS, Trace())
    finally:
        await asyncio.gather(*tasks)
    start = long.sent
    end = long.arrivals[0] if long.arrivals else (long.done or start)
    return {"long_ttft_s": long.ttft_s, "long_prompt_tokens": long.prompt_tokens, "long_error": long.error,
            "window_s": end - start,
            "worst_gap_s": max((g for t in traces if (g := worst_gap(t.arrivals, start, end)) is not None),
                               default=None),
            "baseline_gap_s": max((g for t in traces if (g := worst_gap(t.arrivals, start - GAP_BASELINE_S, start,
                                                                        inside=True)) is not None), default=None),
            "streams": [{"chunks": len(t.arrivals), "finish": t.finish, "error": t.error,
                         "worst_gap_s": worst_gap(t.arrivals, start, end),
                         "running_at_first_token": bool(t.arrivals) and t.arrivals[-1] >= end} for t in traces]}


async def _until(condition: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        await asyncio.sleep(0.005)


def worst_gap(times: Sequence[float], start: float, end: float, inside: bool = False) -> float | None:
    """Longest pause between consecutive arrivals that overlaps [start, end] (``inside``: lies within it)."""

    def counted(a: float, b: float) -> bool:
        return a >= start and b <= end if inside else b > start and a < end

    return max((b - a for a, b in itertools.pairwise(times) if counted(a, b)), default=None)


def _report_gap(bench: Bench, rep: int, row: dict[str, Any]) -> None:
    streams = row["streams"]
    running = sum(s["running_at_first_token"] for s in streams)
    print(f"  gap run {rep + 1}: long prompt {row['long_prompt_tokens']} tokens, TTFT "
          f"{_fmt(row['long_ttft_s'], '.0f', 1000)} ms; running streams' worst gap meanwhile "
          f"{_fmt(row['worst_gap_s'], '.0f', 1000)} ms (steady state before: {_fmt(row['baseline_gap_s'], '.0f', 1000)}"
          f" ms); {running}/{len(streams)} streams still running at its first token{_noisy(row['other_cores'])}",
          flush=True)
    for i, s in enumerate(streams):
        if s["error"] or s["finish"] not in ("stop", "length"):
            bench.problem(f"gap run {rep + 1} stream {i + 1}: finish {s['finish']}, error {s['error']}")
    if row["long_error"]:
        bench.problem(f"gap run {rep + 1} long request: {row['long_error']}")
    if running < len(streams):
        print(f"    note: {len(streams) - running} streams ended before the long prompt's first token "
              "(their gaps cover only part of the window)")


# -- 4. memory ---------------------------------------------------------------------------------------------


async def section_memory(bench: Bench) -> dict[str, Any]:
    gallama, samples = bench.gallama, []
    before = gallama.rss_kib()
    errors = 0
    for i in range(bench.config.memory_requests):
        turn = await gallama.complete(user(f"Request {i + 1}: name one colour and one fruit."), 8)
        errors += turn.error is not None
        if (i + 1) % MEMORY_SAMPLE_EVERY == 0 or i + 1 == bench.config.memory_requests:
            samples.append({"requests": i + 1, "rss_kib": gallama.rss_kib()})
    if errors:
        bench.problem(f"memory: {errors} of {bench.config.memory_requests} short requests failed")
    print(f"  {bench.config.memory_requests} short requests: VmRSS "
          + ", ".join(f"{_mib(s['rss_kib'])} MiB after {s['requests']}" for s in samples), flush=True)
    await bench.check_idle("memory")
    bench.snapshot(f"after {bench.config.memory_requests} short requests")
    return {"rss_before_kib": before, "samples": samples, "errors": errors}


# -- the run -----------------------------------------------------------------------------------------------


async def measure(bench: Bench) -> dict[str, Any]:
    bench.snapshot("after load")
    print("warming up", flush=True)
    for endpoint in bench.endpoints.values():
        await endpoint.complete(user(WARMUP_PROMPT), 16)
    bench.snapshot("after warm-up")
    steps: dict[str, Callable[[Bench], Awaitable[dict[str, Any]]]] = {
        "concurrent": section_concurrent, "agent": section_agent, "gap": section_gap, "memory": section_memory}
    results: dict[str, Any] = {}
    for name in SECTIONS:
        if name in bench.config.sections:
            print(f"\n== {name}", flush=True)
            results[name] = await steps[name](bench)
    return results


def code_version() -> dict[str, Any]:
    """The commit measured, and whether the server code differs from it (others edit the engine meanwhile)."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=False).stdout.strip()

    changed = git("status", "--porcelain", "--", "gallama_kernel", "plugins")
    return {"commit": git("rev-parse", "--short", "HEAD"), "server_code_modified": bool(changed)}


def run_benchmark(config: Config, log_dir: Path) -> dict[str, Any]:
    gguf = gguf_path()
    specs = server_specs(config.sections, config.peer_flash_attn, config.gallama_keys)
    print(f"model {gguf}\ncode  {code_version()}\nlogs  {log_dir}", flush=True)
    print(f"starting {len(specs)} servers: gallama with max_concurrent_requests={CONCURRENCY}; peer --n_threads "
          f"{PEER_THREADS} --flash_attn {config.peer_flash_attn} (interrupting and/or --interrupt_requests False)",
          flush=True)
    with running_servers(specs, gguf, log_dir) as servers:
        meter = CpuMeter([pid for s in servers for pid in (s.proc.pid, *descendants(s.proc.pid))])
        bench = Bench(config, {s.spec.name: Endpoint(s) for s in servers})
        sections = asyncio.run(_measure_and_close(bench))
        other_cores = meter.other_cores()
    return {"config": {**asdict(config), "sections": sorted(config.sections)}, "code": code_version(),
            "sections": sections,
            "rss_kib": bench.rss_kib, "problems": bench.problems, "other_processes_cores": other_cores}


async def _measure_and_close(bench: Bench) -> dict[str, Any]:
    try:
        return await measure(bench)
    finally:
        for endpoint in bench.endpoints.values():
            await endpoint.close()


# -- report ------------------------------------------------------------------------------------------------


def verdict(value: float | None, goal: float, at_most: bool = False) -> str:
    if value is None:
        return "n/a"
    return "meets goal" if (value <= goal if at_most else value >= goal) else "MISSES GOAL"


def _line(label: str, value: str, reference: str = "", ratio: str = "", goal: str = "", judged: str = "") -> None:
    print(f"{label:<46}{value:>12}{reference:>12}{ratio:>8}  {goal:<12}{judged}")


def print_report(result: dict[str, Any]) -> None:
    sections = result["sections"]
    print()
    _line("measure", "gallama", "peer", "ratio", "goal", "verdict")
    print("-" * 104)
    if "concurrent" in sections:
        _report_concurrent(sections["concurrent"]["summary"])
    if "agent" in sections:
        _report_agent(sections["agent"]["summary"])
    if "gap" in sections:
        _report_gap_summary(sections["gap"]["summary"])
    _report_memory(result["rss_kib"])
    _report_problems(result)


def _report_concurrent(s: dict[str, Any]) -> None:
    targets = s["targets"]
    g, serial, interrupting = targets[GALLAMA], targets.get(PEER_SERIAL, {}), targets.get(PEER_INTERRUPTING, {})

    def done(t: dict[str, Any]) -> str:
        return "-" if t.get("completed") is None else f"{t['completed']}/{CONCURRENCY}"

    _line(f"{CONCURRENCY} streams: completed (peer: serializing)", done(g), done(serial), "", f"{CONCURRENCY}/8",
          "meets goal" if g["completed"] == CONCURRENCY else "MISSES GOAL")
    _line(f"{CONCURRENCY} streams: completed, interrupting peer", "", done(interrupting))
    ttft = s["ttft_vs_serial_peer"]
    _line(f"{CONCURRENCY} streams: worst TTFT s (serializing peer)", _fmt(g["worst_ttft_s"], ".2f"),
          _fmt(serial.get("worst_ttft_s"), ".2f"), _fmt(ttft, ".3f"), "<= 0.333",
          verdict(ttft, GOALS["ttft_vs_serial_peer"], at_most=True))
    _line(f"{CONCURRENCY} streams: aggregate tok/s (serializing peer)", _fmt(g["aggregate_tps"], ".1f"),
          _fmt(serial.get("aggregate_tps"), ".1f"), _fmt(_ratio(g["aggregate_tps"], serial.get("aggregate_tps")),
                                                          ".3f"))
    agg = s["aggregate_vs_single"]
    _line(f"{CONCURRENCY} streams agg. tok/s / gallama 1 stream", _fmt(g["aggregate_tps"], ".1f"),
          _fmt(s["gallama_single_tps"], ".1f"), _fmt(agg, ".3f"), ">= 1.05", verdict(agg, GOALS["aggregate_vs_single"]))


def _report_agent(s: dict[str, Any]) -> None:
    one, two, used = s["single"], s["pair"], s["pair_slots_used"]
    _line(f"agent, {AGENT_TURNS} turns: wall s", _fmt(one["gallama_wall_s"], ".2f"), _fmt(one["peer_wall_s"], ".2f"),
          _fmt(one["ratio"], ".3f"), "<= 0.8", verdict(one["ratio"], GOALS["agent_vs_peer"], at_most=True))
    if one.get("floor_wall_s") is not None:
        _line("  floor: replay in-process (column 2), gallama/it", _fmt(one["gallama_wall_s"], ".2f"),
              _fmt(one["floor_wall_s"], ".2f"), _fmt(one["gallama_vs_floor"], ".3f"), "(context)")
        _line("  peer / floor", _fmt(one["peer_wall_s"], ".2f"), _fmt(one["floor_wall_s"], ".2f"),
              _fmt(one["peer_vs_floor"], ".3f"), "(context)")
    _line(f"2 agents interleaved, 2x{AGENT_TURNS} turns: wall s", _fmt(two["gallama_wall_s"], ".2f"),
          _fmt(two["peer_wall_s"], ".2f"), _fmt(two["ratio"], ".3f"), "<= 0.4",
          verdict(two["ratio"], GOALS["pair_vs_peer"], at_most=True))
    if used["gallama_wall_s"] is not None:
        _line("  same, after a burst used every gallama slot", _fmt(used["gallama_wall_s"], ".2f"),
              _fmt(used["peer_wall_s"], ".2f"), _fmt(used["ratio"], ".3f"), "(context)")
    _line("agent: largest prompt (turn 10) tokens", str(one["largest_prompt_tokens"]), "", "", "> 1500",
          verdict(one["largest_prompt_tokens"], 1501))
    for kind, label in (("single", "1 agent"), ("pair", "2 agents"), ("pair_slots_used", "2 agents, slots used")):
        k = s[kind]
        if not k["turns_from_2"]:
            continue
        _line(f"cached > 0 from turn 2, {label}", f"{k['cached_nonzero']}/{k['turns_from_2']}", "", "", "all",
              "meets goal" if k["cached_nonzero"] == k["turns_from_2"] else "MISSES GOAL")
        _line("  ... covering the agent's previous prompt", f"{k['reused_previous_prompt']}/{k['turns_from_2']}", "",
              "", "all", "meets goal" if k["reused_previous_prompt"] == k["turns_from_2"] else "MISSES GOAL")


def _report_gap_summary(s: dict[str, Any]) -> None:
    _line(f"long prompt ({s['long_prompt_tokens']} tok): worst gap ms", _fmt(s["worst_gap_s"], ".0f", 1000), "", "",
          "<= 250", verdict(s["worst_gap_s"], GOALS["worst_gap_s"], at_most=True))
    _line("  median over runs of each run's worst gap ms", _fmt(s["worst_gap_median_s"], ".0f", 1000))
    _line("  steady-state worst gap before it ms", _fmt(s["baseline_gap_s"], ".0f", 1000))
    idle = s["idle_long_ttft_s"]
    _line("long prompt TTFT ms, 4 streams running / alone", _fmt(s["long_ttft_s"], ".0f", 1000),
          _fmt(idle.get(GALLAMA), ".0f", 1000), _fmt(_ratio(s["long_ttft_s"], idle.get(GALLAMA)), ".2f"))
    _line("long prompt TTFT ms alone (peer: serializing)", _fmt(idle.get(GALLAMA), ".0f", 1000),
          _fmt(idle.get(PEER_SERIAL), ".0f", 1000), _fmt(_ratio(idle.get(GALLAMA), idle.get(PEER_SERIAL)), ".3f"))


def _report_memory(rss: dict[str, int | None]) -> None:
    load = rss.get("after load")
    for label, kib in rss.items():
        diff = "" if kib is None or load is None else f"{(kib - load) / 1024:+.0f}"
        _line(f"gallama VmRSS {label} MiB", _mib(kib), diff, "", "", "(column 2: change since load)")


def _report_problems(result: dict[str, Any]) -> None:
    other = result["other_processes_cores"]
    note = "  <- background load: numbers are noisy" if other > CLEAN_MAX_CORES else ""
    print(f"\nprocesses outside this benchmark used {other:.2f} cores on average while measuring{note}")
    print("problems observed: " + ("none" if not result["problems"] else ""))
    for problem in result["problems"]:
        print(f"  - {problem}")


# -- command line ------------------------------------------------------------------------------------------


def _sections(text: str) -> set[str]:
    chosen = {s.strip() for s in text.split(",") if s.strip()}
    if not chosen or chosen - set(SECTIONS):
        raise argparse.ArgumentTypeError(f"choose among {','.join(SECTIONS)}")
    return chosen


def parse_args(argv: Sequence[str] | None = None) -> tuple[Config, Path | None, Path]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true",
                        help="one repetition of everything, no pair run after the slot-filling burst (~4 min)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--only", type=_sections, default=set(SECTIONS),
                        help=f"comma-separated sections (default all: {','.join(SECTIONS)})")
    parser.add_argument("--agent-reps", type=int, help="single-agent runs (default 2, --quick 1)")
    parser.add_argument("--memory-requests", type=int, default=MEMORY_REQUESTS)
    parser.add_argument("--gallama-keys", default="", help='more -id keys for gallama, e.g. "stream_interval_ms=0"')
    parser.add_argument("--peer-flash-attn", choices=("on", "off"), default="on",
                        help="the peer's --flash_attn (default on, its faster setting; off is its default)")
    parser.add_argument("--quiet-wait", type=float, default=5.0,
                        help="seconds to wait, before each measurement, for other processes to leave the CPUs (0: off)")
    parser.add_argument("--log-dir", type=Path,
                        default=Path(__file__).resolve().parent / "results" / "logs" / "engine")
    args = parser.parse_args(argv)
    reps = 1 if args.quick else 2
    config = Config(sections=args.only, runs=2 if args.quick else 3, rounds=1, agent_reps=args.agent_reps or reps,
                    pair_reps=1, pair_slots_used=not args.quick,
                    gap_reps=reps, memory_requests=args.memory_requests, quiet_wait_s=args.quiet_wait,
                    peer_flash_attn=args.peer_flash_attn == "on", gallama_keys=tuple(args.gallama_keys.split()))
    return config, args.json, args.log_dir


def main(argv: Sequence[str] | None = None) -> int:
    config, json_path, log_dir = parse_args(argv)
    log_dir.mkdir(parents=True, exist_ok=True)
    result = run_guarded(lambda: run_benchmark(config, log_dir))
    if isinstance(result, int):
        return result
    print_report(result)
    write_results(result, json_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
