#!/usr/bin/env python3
"""Agent workloads: gallama against llama.cpp's own C++ ``llama-server``, both serving the embedded
SmolLM2-135M-Instruct Q4_1 GGUF.

Targets, started at once on free 127.0.0.1 ports: ``gallama run --host 127.0.0.1 --port P`` exactly as users
start it (a private GALLAMA_HOME_PATH, no other options), ``llama-server -m GGUF -t CPUS -c 32768 -np 8 --jinja``
(8 slots of 4,096 tokens; its prompt cache is on by default) and the same with ``--cache-reuse 256``
("llama-server reuse"). All requests use the official ``openai`` client: streaming, temperature 0,
``repeat_penalty`` 1.0 (both servers read it; llama-server's default is 1.0 too), ``stream_options.include_usage``.

Scenarios, each measured ``--rounds`` times; per round the targets take turns in a rotating order (so that
background load hits all alike), each measurement after a wait for quiet CPUs (bench_spine.settle), with the
1-minute load average and the CPU other processes used meanwhile recorded:

1. one agent: a ~400-token coding-assistant system prompt (rules and four tools in plain text) and ``--turns``
   user turns; each turn appends the server's own answer (64 tokens at most) and the next user message. A
   round-unique nonce opens the system prompt, so no server has the conversation cached. Total wall time, time
   to first token per turn, completion tokens (and wall time per completion token);
2. two agents with the same system prompt (same nonce) and different tasks, strictly alternating A1, B1, A2, B2,
   ... one request at a time: total wall time (does a server keep each conversation's cache when another one
   sharing its opening comes in between?);
3. constrained answers, ``--prompts`` distinct prompts per round each: (a) ``response_format`` json_schema (an
   object of 5 typed required fields, no additional properties) and (b) a tool call (one function with 3 typed
   parameters, ``tool_choice`` forcing it; "required" for every server instead when a server ignores the forced
   form but honours "required"). Wall time per answer (sent → end of stream), completion tokens, tokens/s, and
   whether each answer parses (JSON with the schema's fields and types / one call of the function with JSON
   arguments of the right fields and types);
4. resident memory (VmRSS, VmHWM from /proc/PID/status) after warm-up and at the end: gallama's gateway and all
   its descendants summed, llama-server's one process;
5. cold start (``--cold-starts``): after the targets above are stopped, ``gallama run`` and llama-server spawned
   one at a time: time from spawn to ``/health`` ready and to the first successful short chat answer.

Ratios gallama / llama-server (the best variant per scenario, and each variant), goals: one agent ≤ 1.0, two
interleaved agents ≤ 0.7, json_schema and tool call ≤ 0.7 (median wall time per answer), gallama cold start
(to the first answer) ≤ 3 s.

Usage: ``python bench/bench_agents.py [--rounds 3] [--turns 10] [--prompts 4] [--cold-starts 3]
[--llama-server auto|PATH] [--json PATH]`` (see ``--help``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import signal
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import openai
from bench_spine import (
    CLEAN_MAX_CORES,
    GALLAMA_MODEL,
    CpuMeter,
    Server,
    ServerSpec,
    _fmt,
    _llama_server,
    _ratio,
    _rotated,
    descendants,
    gguf_path,
    run_guarded,
    running_servers,
    settle,
    write_results,
)
from openai import AsyncOpenAI

GALLAMA = "gallama"
LLAMA = "llama-server"
LLAMA_REUSE = "llama-server reuse"
SLOTS = 8
SLOT_CTX = 4096
CACHE_REUSE = 256
AGENT_MAX_TOKENS = 64
JSON_MAX_TOKENS = 128
TOOL_MAX_TOKENS = 96
REQUEST_TIMEOUT_S = 600.0
COLD_TIMEOUT_S = 180.0
SAMPLING: dict[str, Any] = {"repeat_penalty": 1.0}  # gallama reads it; llama-server too (its default is 1.0)
GOALS = {"one_agent": 1.0, "two_agents": 0.7, "json_schema": 0.7, "tool_call": 0.7}
COLD_GOAL_S = 3.0

SYSTEM_PROMPT = """\
You are Forge, a senior software engineer working as a coding assistant in the user's repository. Follow \
these rules in every answer:
1. Be brief: at most five sentences unless the user asks for code.
2. Never invent file contents. If you need to see a file, ask for it with the read_file tool.
3. Change code only with the apply_patch tool, in unified diff format, one file per patch.
4. After every change, run the tests that cover it with the run_tests tool and report the result.
5. Keep the existing style: type hints, docstrings, lines under 100 characters.
6. Do not add new dependencies without asking the user first.
7. If the request is ambiguous, ask one clarifying question instead of guessing.
8. Explain the cause of a bug before you propose a fix, and never delete tests to make a build pass.

Tools. To use a tool, write one line: TOOL <name> <arguments as JSON>, and wait for the result.
- read_file {"path": string, "start": integer, "end": integer}: returns the numbered lines start..end of a file.
- search_code {"query": string, "path": string}: returns up to twenty matching lines with file names and line \
numbers; path limits the search to a folder.
- run_tests {"target": string}: runs pytest on a file, folder or test; returns the summary and first failure.
- apply_patch {"diff": string}: applies a unified diff and returns the changed files, or why it did not apply.

The repository is a Python 3.11 web service: src/app/ (HTTP handlers), src/core/ (business logic), src/net/ \
(HTTP client), src/store/ (database); tests/ mirrors src/."""

AGENT_TASKS: dict[str, list[str]] = {
    "A": [
        "The HTTP client in src/net/client.py gives up after the first timeout. Add retries with exponential "
        "backoff, three attempts at most. Where do you start?",
        "Here is the result of read_file for src/net/client.py lines 1-40: the class Client has a method "
        "get(url, timeout=5.0) that calls httpx.get once and raises NetError on httpx.TimeoutException.",
        "search_code for 'NetError' returned: src/net/client.py:12, src/core/sync.py:48, src/core/sync.py:77, "
        "tests/net/test_client.py:20. What does that tell you?",
        "Write the patch for the retry loop now. Keep the public signature of get unchanged.",
        "apply_patch result: applied, 1 file changed (src/net/client.py). Which tests do you run?",
        "run_tests result for tests/net/: 11 passed, 1 failed: test_get_timeout expected NetError after 5.0 s "
        "but the call took 15.2 s.",
        "Should the total time stay within the caller's timeout, or is the timeout per attempt? Decide and fix it.",
        "apply_patch result: applied. run_tests result for tests/net/: 12 passed in 0.8 s.",
        "src/core/sync.py catches NetError and retries itself. Is that still needed?",
        "Good. Summarise the change for the pull request description, in three bullet points.",
    ],
    "B": [
        "The CSV export in src/core/export.py drops rows whose customer name contains non-ASCII letters. "
        "Find the cause.",
        "Here is the result of read_file for src/core/export.py lines 30-60: rows are written with "
        "csv.writer(open(path, 'w')) and a try/except UnicodeEncodeError that skips the row.",
        "The server runs with LANG=C in production. Does that matter here?",
        "Propose the fix as a patch. The file must stay readable by Excel.",
        "apply_patch result: applied, 1 file changed (src/core/export.py). What do you test?",
        "run_tests result for tests/core/test_export.py: 6 passed, 1 failed: test_export_header expected "
        "'id,name' but the first line starts with '\\ufeffid,name'.",
        "Is the byte order mark the right choice, or should the test change? Explain briefly.",
        "We keep the BOM. Update the test accordingly and run it again.",
        "run_tests result for tests/core/: 18 passed in 1.3 s. Anything else that writes CSV files?",
        "Summarise the fix and the remaining risks for the changelog.",
    ],
}

CONSTRAINED_SYSTEM = "You are a helpful assistant for a software team. Answer precisely."
TICKET_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"title": {"type": "string"}, "component": {"type": "string"}, "severity": {"type": "integer"},
                   "reproducible": {"type": "boolean"}, "estimate_hours": {"type": "number"}},
    "required": ["title", "component", "severity", "reproducible", "estimate_hours"],
    "additionalProperties": False,
}
SEARCH_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "search_code",
        "description": "Search the repository's source code and return the matching lines.",
        "parameters": {
            "type": "object",
            "properties": {"query": {"type": "string", "description": "text or identifier to look for"},
                           "path": {"type": "string", "description": "folder to search in"},
                           "max_results": {"type": "integer", "description": "how many matches to return"}},
            "required": ["query", "path", "max_results"],
            "additionalProperties": False,
        },
    },
}
BUG_REPORTS = (
    "the login page freezes on Safari when the password contains an emoji",
    "exported invoices show the wrong currency symbol for Swiss customers",
    "the nightly backup job fails silently when the disk is more than 90 percent full",
    "search results are empty when the query ends with a space",
    "the mobile app logs users out after every app update",
    "uploading a PDF larger than 20 MB returns an internal server error",
    "dark mode makes the error messages on the signup form invisible",
    "the API returns dates in local time instead of UTC for some endpoints",
    "email notifications are sent twice when a task is reassigned",
    "the dashboard chart skips the last day of every month",
    "password reset links expire after one minute instead of one hour",
    "the CSV import treats semicolons inside quotes as separators",
)
SEARCH_TASKS = (
    ("the retry logic of the HTTP client", "src/net"), ("where database sessions are opened", "src/store"),
    ("the handler of the /login route", "src/app"), ("the function that formats invoice numbers", "src/core"),
    ("every use of the deprecated utcnow call", "src"), ("the fixture that creates a test user", "tests"),
    ("the rate limiter middleware", "src/app"), ("where CSV files are written", "src/core"),
    ("the migration that added the orders table", "src/store"), ("the timeout setting of outgoing requests", "src/net"),
    ("the tests of the export module", "tests/core"), ("the cache eviction policy", "src/core"),
)
COLD_PROMPT = "Say hello in one word."
KIB_PER_MIB = 1024


# -- one server through the openai client ------------------------------------------------------------------


@dataclass
class Answer:
    """One streamed chat completion as the client saw it."""

    wall_s: float = 0.0
    ttft_s: float | None = None  # first content or tool-call delta
    content: str = ""
    tool_calls: list[dict[str, str]] = field(default_factory=list)
    finish: str | None = None
    completion_tokens: int | None = None
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    error: str | None = None
    retried: bool = False  # the first attempt found the kept-alive connection closed (see Client.chat)


class Client:
    """A target as the benchmark sees it: an openai client on one server, its processes, its extra body."""

    def __init__(self, server: Server) -> None:
        self.name = server.spec.name
        self.server = server
        self.model = server.model
        self.extra: dict[str, Any] = dict(SAMPLING)
        self.client = AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="bench", max_retries=0,
                                  timeout=REQUEST_TIMEOUT_S)

    @property
    def pids(self) -> list[int]:
        return [self.server.proc.pid, *descendants(self.server.proc.pid)]

    async def chat(self, messages: list[dict[str, Any]], max_tokens: int, **options: Any) -> Answer:
        """Stream one answer. Both servers close a kept-alive connection after 5 idle seconds (uvicorn's and
        cpp-httplib's default), and the waits for quiet CPUs are about that long: when the request then finds
        the connection closed before any response, it is sent once more (timed afresh) and marked retried."""
        for attempt in range(2):
            answer = Answer(retried=attempt > 0)
            start = time.perf_counter()
            try:
                stream = await self.client.chat.completions.create(
                    model=self.model, messages=messages, max_tokens=max_tokens, temperature=0, stream=True,  # type: ignore[arg-type]
                    stream_options={"include_usage": True}, extra_body=self.extra, **options)
            except openai.APIConnectionError as error:
                if attempt == 0 and "disconnected" in str(error.__cause__).lower():
                    continue
                answer.error = f"{type(error).__name__}: {error} ({error.__cause__})"
                answer.wall_s = time.perf_counter() - start
                return answer
            except Exception as error:  # a failed request is a result, not a crash
                answer.error = f"{type(error).__name__}: {error}"
                answer.wall_s = time.perf_counter() - start
                return answer
            try:
                await self._read(stream, answer, start)
            except Exception as error:
                answer.error = f"{type(error).__name__} during the stream: {error}"
            answer.wall_s = time.perf_counter() - start
            return answer
        raise AssertionError("unreachable")

    @staticmethod
    async def _read(stream: Any, answer: Answer, start: float) -> None:
        calls: dict[int, dict[str, str]] = {}
        async for chunk in stream:
            if chunk.usage is not None:
                answer.completion_tokens = chunk.usage.completion_tokens
                answer.prompt_tokens = chunk.usage.prompt_tokens
                details = chunk.usage.prompt_tokens_details
                answer.cached_tokens = details.cached_tokens if details else None
            for choice in chunk.choices:
                delta = choice.delta
                if (delta.content or delta.tool_calls) and answer.ttft_s is None:
                    answer.ttft_s = time.perf_counter() - start
                answer.content += delta.content or ""
                for call in delta.tool_calls or []:
                    slot = calls.setdefault(call.index, {"name": "", "arguments": ""})
                    if call.function is not None:
                        slot["name"] += call.function.name or ""
                        slot["arguments"] += call.function.arguments or ""
                answer.finish = choice.finish_reason or answer.finish
        answer.tool_calls = [calls[i] for i in sorted(calls)]

    def rss(self) -> dict[str, Any]:
        """VmRSS and VmHWM (KiB), summed over the server's processes (gallama: the gateway and its workers)."""
        pids = self.pids
        total = {"VmRSS": 0, "VmHWM": 0}
        for pid in pids:
            with contextlib.suppress(OSError, ValueError, IndexError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    key = line.split(":", 1)[0]
                    if key in total:
                        total[key] += int(line.split()[1])
        return {"processes": len(pids), "rss_kib": total["VmRSS"], "hwm_kib": total["VmHWM"]}

    async def close(self) -> None:
        await self.client.close()


@dataclass
class AgentSpec(ServerSpec):
    """bench_spine's ServerSpec for this benchmark: plain ``gallama run``; llama-server with ``--jinja`` (tools,
    json_schema through the model's own chat template) and ``extra`` arguments."""

    extra: tuple[str, ...] = ()

    def argv(self, port: int, gguf: Path) -> list[str]:
        if self.kind == "gallama":
            return super().argv(port, gguf)
        return [self.binary, "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-t", str(self.threads),
                "-c", str(SLOTS * SLOT_CTX), "-np", str(SLOTS), "--jinja", *self.extra]


def target_specs(binary: str, cpus: int) -> list[AgentSpec]:
    return [AgentSpec(GALLAMA, "gallama", None),
            AgentSpec(LLAMA, "llama-server", cpus, binary=binary),
            AgentSpec(LLAMA_REUSE, "llama-server", cpus, binary=binary, extra=("--cache-reuse", str(CACHE_REUSE)))]


def stop_server(server: Server) -> None:
    """Stop a server by its PID (bench_spine's Server.stop) and then any descendant it left behind, by PID."""
    children = descendants(server.proc.pid)
    server.stop()
    for pid in children:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


# -- the workloads -----------------------------------------------------------------------------------------


def agent_message(task: str, turn: int) -> str:
    tasks = AGENT_TASKS[task]
    text = tasks[turn % len(tasks)]
    return text if turn < len(tasks) else f"(Step {turn + 1}) {text}"


def system_prompt(nonce: str) -> str:
    return f"Session {nonce}. {SYSTEM_PROMPT}"


async def run_conversations(client: Client, nonce: str, tasks: Sequence[str], turns: int) -> dict[str, Any]:
    """``turns`` turns of each task's conversation, strictly alternating between them, one request at a time."""
    histories = {t: [{"role": "system", "content": system_prompt(nonce)}] for t in tasks}
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    for turn in range(turns):
        for task in tasks:
            history = histories[task]
            history.append({"role": "user", "content": agent_message(task, turn)})
            answer = await client.chat(history, AGENT_MAX_TOKENS)
            history.append({"role": "assistant", "content": answer.content})
            rows.append({"task": task, "turn": turn + 1, **asdict(answer)})
    wall = time.perf_counter() - start
    tokens = sum(r["completion_tokens"] or 0 for r in rows)
    return {"wall_s": wall, "completion_tokens": tokens, "ms_per_token": wall * 1000 / tokens if tokens else None,
            "errors": [f"{r['task']}{r['turn']}: {r['error']}" for r in rows if r["error"]],
            "retried": sum(r["retried"] for r in rows), "turns": rows}


def ticket_prompt(index: int, nonce: str) -> list[dict[str, Any]]:
    report = BUG_REPORTS[index % len(BUG_REPORTS)]
    return [{"role": "system", "content": CONSTRAINED_SYSTEM},
            {"role": "user", "content": f"Turn bug report {nonce}-{index} into a ticket with a title, the "
                                        f"affected component, a severity from 1 to 5, whether it is reproducible "
                                        f"and an estimate in hours. Report: {report}."}]


def search_prompt(index: int, nonce: str) -> list[dict[str, Any]]:
    what, path = SEARCH_TASKS[index % len(SEARCH_TASKS)]
    return [{"role": "system", "content": CONSTRAINED_SYSTEM},
            {"role": "user", "content": f"Request {nonce}-{index}: find {what} in {path}, at most "
                                        f"{5 + index % 4 * 5} results."}]


_TYPES: dict[str, Callable[[Any], bool]] = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
}


def check_object(text: str, schema: dict[str, Any]) -> str | None:
    """Why ``text`` is not a JSON object with exactly the schema's fields and types, or None."""
    try:
        value = json.loads(text)
    except ValueError as error:
        return f"not JSON ({error})"
    if not isinstance(value, dict):
        return f"not an object: {type(value).__name__}"
    fields = schema["properties"]
    if set(value) != set(fields):
        return f"fields {sorted(value)} instead of {sorted(fields)}"
    wrong = [k for k, spec in fields.items() if not _TYPES[spec["type"]](value[k])]
    return f"wrong types: {wrong}" if wrong else None


def check_json_answer(answer: Answer) -> str | None:
    if answer.error:
        return answer.error
    return check_object(answer.content, TICKET_SCHEMA)


def check_tool_answer(answer: Answer) -> str | None:
    if answer.error:
        return answer.error
    if len(answer.tool_calls) != 1:
        return f"{len(answer.tool_calls)} tool calls (finish {answer.finish}, content {answer.content[:60]!r})"
    call = answer.tool_calls[0]
    if call["name"] != SEARCH_TOOL["function"]["name"]:
        return f"called {call['name']!r}"
    return check_object(call["arguments"], SEARCH_TOOL["function"]["parameters"])


async def run_constrained(client: Client, kind: str, nonce: str, count: int, first: int,
                          tool_choice: Any) -> dict[str, Any]:
    rows = []
    for index in range(first, first + count):
        if kind == "json_schema":
            answer = await client.chat(ticket_prompt(index, nonce), JSON_MAX_TOKENS, response_format={
                "type": "json_schema", "json_schema": {"name": "ticket", "schema": TICKET_SCHEMA}})
            problem = check_json_answer(answer)
        else:
            answer = await client.chat(search_prompt(index, nonce), TOOL_MAX_TOKENS, tools=[SEARCH_TOOL],
                                       tool_choice=tool_choice)
            problem = check_tool_answer(answer)
        tokens = answer.completion_tokens
        rows.append({**asdict(answer), "problem": problem,
                     "tok_s": tokens / answer.wall_s if tokens and answer.wall_s > 0 else None})
    return {"answers": rows, "failures": sum(r["problem"] is not None for r in rows),
            "retried": sum(r["retried"] for r in rows)}


# -- the run -----------------------------------------------------------------------------------------------


@dataclass
class Plan:
    rounds: int
    turns: int
    prompts: int
    cold_starts: int
    quiet_wait_s: float
    noisy_retries: int
    llama_server: str
    cpus: int = field(default_factory=lambda: len(os.sched_getaffinity(0)))


class Bench:
    def __init__(self, plan: Plan, log_dir: Path) -> None:
        self.plan = plan
        self.log_dir = log_dir
        self.notes: list[str] = []
        self.tool_choice: Any = {"type": "function", "function": {"name": SEARCH_TOOL["function"]["name"]}}

    async def metered(self, client: Client, work: Callable[[str], Awaitable[dict[str, Any]]]) -> list[dict[str, Any]]:
        """Wait for quiet CPUs, then run ``work(nonce suffix)``, recording the load average and other processes' CPU
        use; a noisy run (other processes used more than CLEAN_MAX_CORES) is repeated up to ``--noisy-retries``
        times with a fresh nonce suffix (nothing cached). Every run is returned, each marked noisy or not."""
        rows = []
        for attempt in range(1 + self.plan.noisy_retries):
            await settle(self.plan.quiet_wait_s)
            load = os.getloadavg()[0]
            meter = CpuMeter(client.pids)
            row = await work("" if attempt == 0 else f"r{attempt}")
            other = meter.other_cores()
            row.update(load_avg_1m=load, other_cores=other, noisy=other > CLEAN_MAX_CORES, attempt=attempt)
            rows.append(row)
            if not row["noisy"]:
                break
            if attempt < self.plan.noisy_retries:
                print(f"  ({client.name}: other processes used {other:.2f} cores; measuring again)", flush=True)
        return rows

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"  note: {text}", flush=True)

    async def warm_up(self, clients: list[Client]) -> dict[str, Any]:
        """Load every code path once, check the sampling parameter and the forced tool choice."""
        found: dict[str, Any] = {}
        for client in clients:
            answer = await client.chat([{"role": "user", "content": "Write one sentence about the sea."}], 16)
            if answer.error and "repeat_penalty" in answer.error:
                self.note(f"{client.name} refused repeat_penalty ({answer.error}); sent to no server")
                for other in clients:
                    other.extra = {}
                answer = await client.chat([{"role": "user", "content": "Write one sentence about the sea."}], 16)
            if answer.error:
                raise RuntimeError(f"{client.name} failed the warm-up request: {answer.error}")
            await client.chat(ticket_prompt(99, "warm"), 32, response_format={
                "type": "json_schema", "json_schema": {"name": "ticket", "schema": TICKET_SCHEMA}})
        forced = {c.name: check_tool_answer(await c.chat(search_prompt(99, "warm"), TOOL_MAX_TOKENS,
                                                          tools=[SEARCH_TOOL], tool_choice=self.tool_choice))
                  for c in clients}
        found["forced_tool_choice"] = forced
        if any(forced.values()):
            required = {c.name: check_tool_answer(await c.chat(search_prompt(99, "warm"), TOOL_MAX_TOKENS,
                                                                tools=[SEARCH_TOOL], tool_choice="required"))
                        for c in clients}
            found["required_tool_choice"] = required
            if not any(required.values()):
                self.tool_choice = "required"
                self.note(f"forced tool_choice gave no valid call on {[n for n, p in forced.items() if p]}; "
                          "\"required\" works everywhere and is used for every server")
            else:
                self.note(f"no valid tool call with forced tool_choice on {[n for n, p in forced.items() if p]}, "
                          f"nor with \"required\" on {[n for n, p in required.items() if p]}: the forced form is "
                          "kept, those servers' tool answers count as failures")
        found["tool_choice"] = self.tool_choice
        return found

    async def measure(self, clients: list[Client]) -> dict[str, Any]:
        plan = self.plan
        result: dict[str, Any] = {"rss": {}, "one_agent": {}, "two_agents": {}, "json_schema": {}, "tool_call": {}}
        for kind in ("one_agent", "two_agents", "json_schema", "tool_call"):
            result[kind] = {c.name: [] for c in clients}
        print("warming up", flush=True)
        result["warm_up"] = await self.warm_up(clients)
        result["rss"]["after_warm_up"] = {c.name: c.rss() for c in clients}
        run_id = secrets.token_hex(3)
        for r in range(plan.rounds):
            order = _rotated(clients, r)
            print(f"round {r + 1}/{plan.rounds}: order {', '.join(c.name for c in order)}", flush=True)
            nonces = {kind: f"{run_id}{kind[0]}{r}" for kind in ("one", "two", "json", "tool")}
            for kind, label, nonce, tasks in (("one_agent", "one agent", nonces["one"], "A"),
                                              ("two_agents", "two agents", nonces["two"], "AB")):
                for client in order:
                    rows = await self.metered(client, partial(self.conversation, client, nonce, tasks))
                    result[kind][client.name] += rows
                    for row in rows:
                        _print_conversation(label, client.name, row)
            for kind, nonce in (("json_schema", nonces["json"]), ("tool_call", nonces["tool"])):
                for client in order:
                    rows = await self.metered(client, partial(self.constrained, client, kind, nonce, r))
                    result[kind][client.name] += rows
                    for row in rows:
                        _print_constrained(kind, client.name, row)
        result["rss"]["end"] = {c.name: c.rss() for c in clients}
        return result

    async def conversation(self, client: Client, nonce: str, tasks: str, suffix: str) -> dict[str, Any]:
        return await run_conversations(client, nonce + suffix, tasks, self.plan.turns)

    async def constrained(self, client: Client, kind: str, nonce: str, round_index: int,
                          suffix: str) -> dict[str, Any]:
        plan = self.plan
        return await run_constrained(client, kind, nonce + suffix, plan.prompts, round_index * plan.prompts,
                                     self.tool_choice)

    def cold_start(self, spec: AgentSpec, gguf: Path, index: int) -> dict[str, Any]:
        """Spawn one server; seconds until /health is ready and until a short chat answer succeeds."""
        name = f"cold {spec.name} {index + 1}"
        cold_spec = AgentSpec(name, spec.kind, spec.threads, binary=spec.binary, extra=spec.extra)
        start = time.perf_counter()
        server = Server(cold_spec, gguf, self.log_dir)
        row: dict[str, Any] = {"health_s": None, "first_answer_s": None, "error": None, "load_avg_1m": None}
        try:
            deadline = time.monotonic() + COLD_TIMEOUT_S
            body = {"model": GALLAMA_MODEL, "messages": [{"role": "user", "content": COLD_PROMPT}], "max_tokens": 8,
                    "temperature": 0}
            with httpx.Client(base_url=server.base_url, timeout=60) as http:
                while row["first_answer_s"] is None and time.monotonic() < deadline:
                    if server.proc.poll() is not None:
                        row["error"] = f"exited with code {server.proc.returncode}; log {server.log_path}"
                        break
                    with contextlib.suppress(httpx.HTTPError, ValueError, KeyError, IndexError):
                        if row["health_s"] is None:
                            reply = http.get("/health")
                            if reply.status_code == 200 and reply.json().get("status") == "ok":
                                row["health_s"] = time.perf_counter() - start
                        else:
                            reply = http.post("/v1/chat/completions", json=body)
                            if reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"]:
                                row["first_answer_s"] = time.perf_counter() - start
                    if row["first_answer_s"] is None:
                        time.sleep(0.05)
            if row["first_answer_s"] is None and row["error"] is None:
                row["error"] = f"no answer within {COLD_TIMEOUT_S:.0f} s; log {server.log_path}"
        finally:
            stop_server(server)
        return row


def _print_conversation(scenario: str, name: str, row: dict[str, Any]) -> None:
    ttfts = [t["ttft_s"] for t in row["turns"] if t["ttft_s"] is not None]
    errors = f"  ERRORS {row['errors'][:2]}" if row["errors"] else ""
    retried = f", {row['retried']} retried" if row["retried"] else ""
    print(f"  {scenario:<11} {name:<19} {row['wall_s']:6.2f} s  {row['completion_tokens']:4d} tokens  "
          f"{_fmt(row['ms_per_token'], '5.1f')} ms/token  TTFT turn 1 {_fmt(ttfts[0] if ttfts else None, '.0f', 1000)}"
          f" ms, median {_fmt(_median(ttfts), '.0f', 1000)} ms  load {row['load_avg_1m']:.2f}  other "
          f"{row['other_cores']:.2f} cores{' [noisy]' if row['noisy'] else ''}{retried}{errors}", flush=True)


def _print_constrained(kind: str, name: str, row: dict[str, Any]) -> None:
    walls = [a["wall_s"] for a in row["answers"]]
    tokens = [a["completion_tokens"] or 0 for a in row["answers"]]
    problems = [a["problem"] for a in row["answers"] if a["problem"]]
    shown = f"  FAILED {row['failures']}: {problems[0][:100]}" if problems else ""
    print(f"  {kind:<11} {name:<19} median {_median(walls) * 1000:6.0f} ms/answer  tokens {tokens}  load "
          f"{row['load_avg_1m']:.2f}  other {row['other_cores']:.2f} cores{' [noisy]' if row['noisy'] else ''}{shown}",
          flush=True)


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def run_benchmark(plan: Plan, log_dir: Path) -> dict[str, Any]:
    gguf = gguf_path()
    specs = target_specs(plan.llama_server, plan.cpus)
    bench = Bench(plan, log_dir)
    print(f"model {gguf}\nllama-server {plan.llama_server}\nlogs  {log_dir}\nCPUs  {plan.cpus}", flush=True)
    result: dict[str, Any] = {"plan": asdict(plan), "argv": {s.name: s.argv(0, gguf) for s in specs}}
    with running_servers(specs, gguf, log_dir) as servers:
        try:
            result |= asyncio.run(_measure_and_close(bench, servers))
        finally:
            for server in servers:  # running_servers stops them too; this also stops gallama's workers by PID
                stop_server(server)
    cold: dict[str, list[dict[str, Any]]] = {GALLAMA: [], LLAMA: []}
    cold_specs = [s for s in specs if s.name in cold]
    if plan.cold_starts:
        print("cold starts", flush=True)
    for i in range(plan.cold_starts):
        for spec in _rotated(cold_specs, i):
            asyncio.run(settle(plan.quiet_wait_s))
            load = os.getloadavg()[0]
            row = bench.cold_start(spec, gguf, i) | {"load_avg_1m": load}
            cold[spec.name].append(row)
            print(f"  cold start {spec.name:<13} /health {_fmt(row['health_s'], '.2f')} s, first answer "
                  f"{_fmt(row['first_answer_s'], '.2f')} s  load {load:.2f}"
                  f"{'  ERROR ' + row['error'] if row['error'] else ''}", flush=True)
    result["cold_start"] = cold
    result["notes"] = bench.notes
    return result


async def _measure_and_close(bench: Bench, servers: list[Server]) -> dict[str, Any]:
    clients = [Client(s) for s in servers]
    try:
        return await bench.measure(clients)
    finally:
        for client in clients:
            await client.close()


# -- report ------------------------------------------------------------------------------------------------


def summarise(result: dict[str, Any]) -> dict[str, Any]:
    """Medians and spreads per scenario and target, the ratios and the verdicts."""
    summary: dict[str, Any] = {}
    for kind in ("one_agent", "two_agents"):
        summary[kind] = {}
        for name, measured in result[kind].items():
            rows = _counted(measured)
            walls = [r["wall_s"] for r in rows]
            turns = [t for r in rows for t in r["turns"]]
            summary[kind][name] = {
                "wall_s": _median(walls), "min": min(walls, default=None), "max": max(walls, default=None),
                "completion_tokens": _median([r["completion_tokens"] for r in rows]),
                "ms_per_token": _median([r["ms_per_token"] for r in rows]),
                "ttft_first_s": _median([t["ttft_s"] for t in turns if t["turn"] == 1]),
                "ttft_later_s": _median([t["ttft_s"] for t in turns if t["turn"] > 1]),
                "cached_later": _median([t["cached_tokens"] for t in turns if t["turn"] > 1]),
                "prompt_last": _median([r["turns"][-1]["prompt_tokens"] for r in rows if r["turns"]]),
                "errors": sum(len(r["errors"]) for r in rows), "retried": sum(r["retried"] for r in rows),
                "load": [r["load_avg_1m"] for r in measured], "noisy": sum(r["noisy"] for r in measured),
                "runs": len(measured), "counted": len(rows),
            }
    for kind in ("json_schema", "tool_call"):
        summary[kind] = {}
        for name, measured in result[kind].items():
            rows = _counted(measured)
            answers = [a for r in rows for a in r["answers"]]
            walls = [a["wall_s"] for a in answers]
            summary[kind][name] = {
                "wall_s": _median(walls), "min": min(walls, default=None), "max": max(walls, default=None),
                "completion_tokens": _median([a["completion_tokens"] for a in answers]),
                "tok_s": _median([a["tok_s"] for a in answers]),
                "failures": sum(r["failures"] for r in rows), "answers": len(answers),
                "retried": sum(r["retried"] for r in rows),
                "load": [r["load_avg_1m"] for r in measured], "noisy": sum(r["noisy"] for r in measured),
                "runs": len(measured), "counted": len(rows),
            }
    summary["ratios"] = {}
    for kind, goal in GOALS.items():
        table = summary[kind]
        peers = {n: t["wall_s"] for n, t in table.items() if n != GALLAMA and t["wall_s"] is not None}
        best = min(peers, key=peers.__getitem__) if peers else None
        mine = table[GALLAMA]["wall_s"]
        ratio = _ratio(mine, peers.get(best)) if best else None
        summary["ratios"][kind] = {
            "best": best, "ratio": ratio, "goal": goal,
            "verdict": "n/a" if ratio is None else "meets goal" if ratio <= goal else "BELOW GOAL",
            "each": {n: _ratio(mine, w) for n, w in peers.items()},
        }
    cold = {}
    for name, rows in result["cold_start"].items():
        answer = [r["first_answer_s"] for r in rows if r["first_answer_s"] is not None]
        health = [r["health_s"] for r in rows if r["health_s"] is not None]
        cold[name] = {"health_s": _median(health), "health_min": min(health, default=None),
                      "health_max": max(health, default=None), "first_answer_s": _median(answer),
                      "answer_min": min(answer, default=None), "answer_max": max(answer, default=None),
                      "errors": sum(r["error"] is not None for r in rows)}
    summary["cold_start"] = cold
    mine = cold.get(GALLAMA, {}).get("first_answer_s")
    summary["ratios"]["cold_start"] = {
        "gallama_s": mine, "goal_s": COLD_GOAL_S,
        "verdict": "n/a" if mine is None else "meets goal" if mine <= COLD_GOAL_S else "BELOW GOAL"}
    return summary


def _counted(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs that other processes left alone, or all runs when there is none such (as in bench_spine)."""
    return [r for r in rows if not r["noisy"]] or rows


def _spread(low: float | None, high: float | None, spec: str = ".2f", scale: float = 1.0) -> str:
    return f"{_fmt(low, spec, scale)}-{_fmt(high, spec, scale)}"


def _load(values: Sequence[float]) -> str:
    return f"{min(values):.1f}-{max(values):.1f}" if values else "-"


def _noisy(t: dict[str, Any]) -> str:
    return f"{t['noisy']}/{t['runs']}"


def print_report(result: dict[str, Any], summary: dict[str, Any]) -> None:
    plan = result["plan"]
    print(f"\n{plan['rounds']} rounds; medians over rounds (conversations) or over all answers (constrained); "
          f"'noisy' = measurements during which other processes used > {CLEAN_MAX_CORES} cores")
    head = (f"{'scenario':<13}{'target':<20}{'wall s':>9}{'(min-max)':>15}{'tokens':>8}{'ms/tok':>8}"
            f"{'TTFT1 ms':>9}{'TTFT2+ ms':>10}{'cached2+':>9}{'errors':>7}{'load':>9}{'noisy':>6}")
    print("\n" + head + "\n" + "-" * len(head))
    for kind, label in (("one_agent", f"1 agent x{plan['turns']}"), ("two_agents", f"2 agents x{plan['turns']}")):
        for name, t in summary[kind].items():
            print(f"{label:<13}{name:<20}{_fmt(t['wall_s'], '.2f'):>9}{_spread(t['min'], t['max']):>15}"
                  f"{_fmt(t['completion_tokens'], '.0f'):>8}{_fmt(t['ms_per_token'], '.1f'):>8}"
                  f"{_fmt(t['ttft_first_s'], '.0f', 1000):>9}{_fmt(t['ttft_later_s'], '.0f', 1000):>10}"
                  f"{_fmt(t['cached_later'], '.0f'):>9}{t['errors']:>7}{_load(t['load']):>9}"
                  f"{_noisy(t):>6}")
    head = (f"{'scenario':<13}{'target':<20}{'ms/answer':>10}{'(min-max)':>15}{'tokens':>8}{'tok/s':>8}"
            f"{'failed':>9}{'load':>9}{'noisy':>6}")
    print("\n" + head + "\n" + "-" * len(head))
    for kind in ("json_schema", "tool_call"):
        for name, t in summary[kind].items():
            print(f"{kind:<13}{name:<20}{_fmt(t['wall_s'], '.0f', 1000):>10}"
                  f"{_spread(t['min'], t['max'], '.0f', 1000):>15}{_fmt(t['completion_tokens'], '.0f'):>8}"
                  f"{_fmt(t['tok_s'], '.1f'):>8}{t['failures']:>5}/{t['answers']:<3}{_load(t['load']):>9}"
                  f"{_noisy(t):>6}")
    print(f"\n{'memory':<20}{'VmRSS MiB after warm-up':>24}{'at end':>8}{'VmHWM MiB at end':>18}{'processes':>11}")
    for name, end in result["rss"]["end"].items():
        warm = result["rss"]["after_warm_up"][name]
        print(f"{name:<20}{warm['rss_kib'] / KIB_PER_MIB:>24.0f}{end['rss_kib'] / KIB_PER_MIB:>8.0f}"
              f"{end['hwm_kib'] / KIB_PER_MIB:>18.0f}{end['processes']:>11}")
    if summary["cold_start"]:
        print(f"\n{'cold start':<20}{'to /health s':>13}{'(min-max)':>12}{'to first answer s':>19}{'(min-max)':>12}"
              f"{'errors':>8}")
        for name, c in summary["cold_start"].items():
            print(f"{name:<20}{_fmt(c['health_s'], '.2f'):>13}{_spread(c['health_min'], c['health_max']):>12}"
                  f"{_fmt(c['first_answer_s'], '.2f'):>19}{_spread(c['answer_min'], c['answer_max']):>12}"
                  f"{c['errors']:>8}")
    print_ratios(summary)
    for note in result["notes"]:
        print(f"note: {note}")


def print_ratios(summary: dict[str, Any]) -> None:
    print("\nratios gallama / llama-server, wall time (lower is better; best = the faster variant per scenario)")
    for kind, r in summary["ratios"].items():
        if kind == "cold_start":
            continue
        each = ", ".join(f"{n} {_fmt(v, '.3f')}" for n, v in r["each"].items())
        print(f"  {kind:<11} {_fmt(r['ratio'], '.3f'):>6} vs {r['best']}  goal <= {r['goal']}: {r['verdict']}"
              f"  ({each})")
        for line in _caveats(kind, summary[kind]):
            print(line)
    cold = summary["ratios"]["cold_start"]
    print(f"  cold start  gallama {_fmt(cold['gallama_s'], '.2f')} s to the first answer  goal <= {cold['goal_s']} s: "
          f"{cold['verdict']}")


def _caveats(kind: str, table: dict[str, Any]) -> list[str]:
    """What makes a time comparison unequal: different completion lengths, failed answers, errors."""
    lines = []
    mine = table[GALLAMA]
    for name, t in table.items():
        if name == GALLAMA:
            continue
        if mine["completion_tokens"] and t["completion_tokens"] and mine["completion_tokens"] != t["completion_tokens"]:
            per = ""
            if kind in ("one_agent", "two_agents"):
                per_token = _ratio(mine["ms_per_token"], t["ms_per_token"])
                per = f"; time per completion token gallama / {name} = {_fmt(per_token, '.3f')}"
            lines.append(f"      different lengths: gallama {mine['completion_tokens']:.0f} vs {name} "
                         f"{t['completion_tokens']:.0f} completion tokens (median){per}")
        failed = t.get("failures") or t.get("errors")
        if failed:
            lines.append(f"      {name}: {failed} failed answers or errors: its times are not comparable")
    if mine.get("failures") or mine.get("errors"):
        lines.append(f"      gallama: {mine.get('failures') or mine.get('errors')} failed answers or errors")
    return lines


# -- command line ------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> tuple[Plan, Path | None, Path]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every scenario (default 3)")
    parser.add_argument("--turns", type=int, default=10, help="user turns per agent conversation (default 10)")
    parser.add_argument("--prompts", type=int, default=4, help="constrained prompts per kind and round (default 4)")
    parser.add_argument("--cold-starts", type=int, default=3, help="cold starts per server (default 3; 0: none)")
    parser.add_argument("--quiet-wait", type=float, default=5.0,
                        help="seconds to wait, before each measurement, for other processes to leave the CPUs")
    parser.add_argument("--noisy-retries", type=int, default=1,
                        help="measure a scenario again (fresh nonce) when other processes used more than "
                             f"{CLEAN_MAX_CORES} cores during it, at most this often (default 1)")
    parser.add_argument("--llama-server", default="auto",
                        help="llama.cpp's llama-server executable, or 'auto' (the one 'make llama-server' cached "
                             "under GALLAMA_BENCH_CACHE, default ~/.cache/gallama-bench)")
    parser.add_argument("--json", type=Path, help="write all raw results here")
    parser.add_argument("--log-dir", type=Path,
                        default=Path(__file__).resolve().parent / "results" / "logs" / "agents")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.turns < 1 or args.prompts < 1 or min(args.cold_starts, args.noisy_retries) < 0:
        parser.error("--rounds, --turns and --prompts must be at least 1, --cold-starts and --noisy-retries at least 0")
    binary = _llama_server(args.llama_server) if args.llama_server != "none" else None
    if binary is None or not Path(binary).is_file() or not os.access(binary, os.X_OK):
        where = "no cached build found (run 'make llama-server')" if args.llama_server == "auto" else \
            f"{args.llama_server!r} is not an executable file"
        raise SystemExit(f"bench_agents.py needs llama.cpp's llama-server: {where}; pass --llama-server PATH")
    plan = Plan(args.rounds, args.turns, args.prompts, args.cold_starts, args.quiet_wait, args.noisy_retries, binary)
    return plan, args.json, args.log_dir


def main(argv: Sequence[str] | None = None) -> int:
    plan, json_path, log_dir = parse_args(argv)
    log_dir.mkdir(parents=True, exist_ok=True)
    result = run_guarded(lambda: run_benchmark(plan, log_dir))
    if isinstance(result, int):
        return result
    summary = summarise(result)
    result["summary"] = summary
    print_report(result, summary)
    write_results(result, json_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
