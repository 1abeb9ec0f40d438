"""Worker processes of the gateway: one per model replica, started, watched, restarted and stopped here.

A model is a :class:`ModelGroup` of one or more :class:`Worker` replicas (the same spec given twice is two
replicas). Requests go to the ready replica that holds their prompt's prefix or session while it has a free slot,
else to the one with the fewest outstanding requests (affinity.py has the rule; with
``GALLAMA_ROUTING=least_outstanding``, always the fewest outstanding). A worker that dies after it
was ready is restarted with exponential backoff (1 s, 2 s, 4 s … 30 s); one that fails to load is reported with
its error and not retried. Removing a model first waits for its in-flight requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..config import ModelSpec
from ..cores import CoreBoard
from ..loading import PluginSelection
from ..protocol.errors import APIError, ModelNotFound, ServiceUnavailable
from ..protocol.limits import MAX_RELAYED_ERROR_CHARS
from .affinity import AFFINITY, ROUTINGS, Key, ReplicaMemory, Router
from .worker import FAILED, READY, SECRET_ENV

log = logging.getLogger("gallama.gateway")


def shorten(text: str, limit: int = MAX_RELAYED_ERROR_CHARS) -> str:
    """``text`` cut to ``limit`` characters: a worker's error (a load failure's trace, say) that the gateway
    relays in /health and error bodies stays short."""
    return text if len(text) <= limit else text[:limit] + "… (cut; the server log has all of it)"


BACKOFF_START_S = 1.0
BACKOFF_MAX_S = 30.0
STABLE_AFTER_S = 60.0  # a worker up this long has its backoff reset
LOAD_TIMEOUT_S = 600.0


class Conflict(APIError):
    status = 409
    type = "invalid_request_error"


@dataclass
class Worker:
    """One worker process serving one replica of a model."""

    spec: ModelSpec
    replica: int
    state: str = "starting"  # starting, ready, restarting, failed, stopping, stopped
    port: int | None = None
    pid: int | None = None
    outstanding: int = 0
    seat: int | None = None  # its seat on the pool's core board
    slots: int | None = None  # requests it runs at once, as its READY line said
    restarts: int = 0
    error: str | None = None
    ready_at: float | None = None
    process: asyncio.subprocess.Process | None = field(default=None, repr=False)
    ready: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    monitor: asyncio.Task[None] | None = field(default=None, repr=False)
    output: asyncio.Task[None] | None = field(default=None, repr=False)  # copies later stdout to stderr
    memory: ReplicaMemory = field(default_factory=ReplicaMemory, repr=False)  # what its slots hold (affinity.py)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def describe(self) -> dict[str, Any]:
        return {"replica": self.replica, "state": self.state, "pid": self.pid, "port": self.port,
                "outstanding": self.outstanding, "restarts": self.restarts, "error": self.error,
                **self.memory.counters()}


@dataclass
class ModelGroup:
    """A served model name (and its aliases) with its replicas."""

    name: str
    spec: ModelSpec
    workers: list[Worker]
    created: int = field(default_factory=lambda: int(time.time()))
    removing: bool = False
    router: Router = field(default_factory=Router, repr=False)  # its sticky keys (affinity.py)

    @property
    def aliases(self) -> list[str]:
        return list(self.spec.aliases)

    @property
    def state(self) -> str:
        states = {w.state for w in self.workers}
        if self.removing:
            return "removing"
        if "ready" in states:
            return "ready"
        if states & {"starting", "restarting"}:
            return "loading"
        return "failed"

    def describe(self) -> dict[str, Any]:
        return {"model_name": self.name, "aliases": self.aliases, "state": self.state,
                "backend": self.spec.backend, "model_id": self.spec.model_id,
                "replicas": [w.describe() for w in self.workers]}


class Pool:
    """All worker processes of one gateway.

    :param worker_env: environment for worker processes
    :param plugins: the plugin selection each worker loads (on its command line)
    :param routing: ``affinity`` (a request goes where its prefix or session is, while that replica has a free
        slot) or ``least_outstanding`` (``GALLAMA_ROUTING``)
    """

    def __init__(self, worker_env: dict[str, str] | None = None,
                 on_state: Callable[[Worker, str], None] | None = None,
                 plugins: PluginSelection | None = None, routing: str = AFFINITY) -> None:
        if routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {', '.join(ROUTINGS)}, not {routing!r}")
        self.routing = routing
        self.groups: dict[str, ModelGroup] = {}
        self._lookup: dict[str, str] = {}
        # a secret per run: workers answer only requests that carry it, so nobody reaches a model around the
        # gateway's keys by calling a worker's port directly
        self.worker_secret = secrets.token_urlsafe(32)
        self.worker_env = {**os.environ, **(worker_env or {}), SECRET_ENV: self.worker_secret}
        self.on_state = on_state
        self.plugins = plugins or PluginSelection()  # every worker loads this selection
        self._rotation = itertools.count()
        self._closing = False
        self.cores = CoreBoard()  # the CPU cores all workers share (see gallama_kernel.cores)

    # -- lookup --------------------------------------------------------------------------------------------
    def get(self, name: str) -> ModelGroup:
        key = self._lookup.get(name)
        if key is None:
            raise ModelNotFound(name, sorted(self._lookup))
        return self.groups[key]

    def all(self) -> list[ModelGroup]:
        return list(self.groups.values())

    def pick(self, group: ModelGroup, key: Key | None = None) -> Worker:
        """The replica for a request with routing ``key`` (affinity.py's rule); without a key, or with routing
        ``least_outstanding``, the ready replica with the fewest outstanding requests (ties rotate)."""
        ready = [w for w in group.workers if w.state == "ready"]
        if group.removing or not ready:
            raise ServiceUnavailable(f"The model '{group.name}' is {group.state}; try again shortly.",
                                     code="model_unavailable")
        turn = next(self._rotation)
        if self.routing != AFFINITY:
            return min(ready, key=lambda w: (w.outstanding, (w.replica - turn) % len(group.workers)))
        worker, _ = group.router.choose(ready, key, turn, len(group.workers))
        return worker

    # -- lifecycle -----------------------------------------------------------------------------------------
    def add(self, specs: list[ModelSpec]) -> list[ModelGroup]:
        """Start workers for ``specs`` (the same name more than once: replicas). Names already served, or
        loading, are a 409; nothing is started then."""
        by_name: dict[str, list[ModelSpec]] = {}
        for spec in specs:
            by_name.setdefault(spec.name, []).append(spec)
        claimed: dict[str, str] = {}
        for name, group_specs in by_name.items():
            for key in (name, *group_specs[0].aliases):
                if claimed.setdefault(key, name) != name:
                    raise Conflict(f"The name '{key}' is claimed by both '{claimed[key]}' and '{name}'.",
                                   param="model_name", code="model_exists")
                if key in self._lookup:
                    state = self.groups[self._lookup[key]].state
                    raise Conflict(f"The model name '{key}' is already {state}.", param="model_name",
                                   code="model_exists")
            if any(s.model_copy(update={"model_path": None}) != group_specs[0].model_copy(update={"model_path": None})
                   for s in group_specs[1:]):
                raise Conflict(f"Replicas of '{name}' must have the same settings.", param="model_name")
        groups = []
        for name, group_specs in by_name.items():
            workers = [Worker(spec, replica, seat=self.cores.take()) for replica, spec in enumerate(group_specs)]
            group = ModelGroup(name, group_specs[0], workers)
            self.groups[name] = group
            for key in (name, *group.aliases):
                self._lookup[key] = name
            for worker in workers:
                worker.monitor = asyncio.create_task(self._run(worker), name=f"worker {name}#{worker.replica}")
            groups.append(group)
        return groups

    async def wait_loaded(self, groups: list[ModelGroup], timeout: float = LOAD_TIMEOUT_S) -> None:
        """Wait until every replica of ``groups`` is ready or has failed to load."""

        async def settled(worker: Worker) -> None:
            while worker.state in ("starting",):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(worker.ready.wait(), 0.5)

        await asyncio.wait_for(asyncio.gather(*(settled(w) for g in groups for w in g.workers)), timeout)

    async def remove(self, name: str, drain_timeout: float = 300.0) -> ModelGroup:
        """Stop serving ``name``: no new requests, in-flight ones finish (up to ``drain_timeout``), then its
        workers stop."""
        group = self.get(name)
        if group.removing:
            raise Conflict(f"The model '{group.name}' is already being removed.", param="model_name")
        group.removing = True
        deadline = time.monotonic() + drain_timeout
        while any(w.outstanding for w in group.workers) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.gather(*(self._stop(w) for w in group.workers))
        for worker in group.workers:
            self.cores.give_back(worker.seat)
        self.groups.pop(group.name, None)
        for key in (group.name, *group.aliases):
            self._lookup.pop(key, None)
        return group

    async def close(self) -> None:
        self._closing = True
        await asyncio.gather(*(self._stop(w) for g in self.groups.values() for w in g.workers))
        self.cores.close()

    # -- one worker ----------------------------------------------------------------------------------------
    def _set(self, worker: Worker, state: str) -> None:
        worker.state = state
        if self.on_state is not None:
            self.on_state(worker, state)

    async def _run(self, worker: Worker) -> None:
        """Start the worker and keep it running: restart it with backoff whenever it dies after being ready."""
        backoff = BACKOFF_START_S
        while True:
            became_ready = await self._start(worker)
            if not became_ready:
                self.cores.clear(worker.seat)
                self._set(worker, "failed")
                return
            assert worker.process is not None
            code = await worker.process.wait()
            self.cores.clear(worker.seat)  # a worker that died busy must not keep its cores
            self._forget(worker)  # a new process starts with empty caches
            if worker.state in ("stopping", "stopped") or self._closing:
                return
            worker.error = f"worker process exited with code {code}"
            log.warning("%s replica %d: %s; restarting in %.0f s", worker.spec.name, worker.replica, worker.error,
                        backoff)
            self._set(worker, "restarting")
            worker.restarts += 1
            if worker.ready_at is not None and time.monotonic() - worker.ready_at > STABLE_AFTER_S:
                backoff = BACKOFF_START_S
            await asyncio.sleep(backoff)
            backoff = min(BACKOFF_MAX_S, backoff * 2)
            if worker.state != "restarting":  # stopped meanwhile
                return

    def _forget(self, worker: Worker) -> None:
        worker.memory.forget()
        group = self.groups.get(worker.spec.name)
        if group is not None and worker in group.workers:
            group.router.forget(worker.replica)

    async def _start(self, worker: Worker) -> bool:
        worker.ready.clear()
        worker.port = None
        spec_json = worker.spec.model_dump_json()
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gallama_kernel.gateway.worker", spec_json, *self.plugins.argv(),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, env={**self.worker_env, **self.cores.env(worker.seat)})
        worker.process, worker.pid = process, process.pid
        assert process.stdout is not None
        try:
            while True:
                line = (await process.stdout.readline()).decode(errors="replace")
                if not line:
                    code = await process.wait()
                    worker.error = f"worker exited with code {code} while loading"
                    return False
                kind, _, payload = line.strip().partition(" ")
                if kind == READY:
                    info = json.loads(payload)
                    worker.port, worker.pid = int(info["port"]), int(info.get("pid", process.pid))
                    worker.slots = info.get("slots") if isinstance(info.get("slots"), int) else None
                    worker.ready_at = time.monotonic()
                    worker.error = None
                    self._set(worker, "ready")
                    return True
                if kind == FAILED:
                    error = str(json.loads(payload).get("error"))
                    if len(error) > MAX_RELAYED_ERROR_CHARS:  # the whole of it goes to the log only
                        log.warning("%s replica %d failed to load: %s", worker.spec.name, worker.replica, error)
                    worker.error = shorten(error)
                    await process.wait()
                    return False
                sys.stderr.write(line)  # anything else the worker printed
        finally:
            worker.ready.set()
            if worker.state == "ready":
                worker.output = asyncio.create_task(self._drain_stdout(process))

    @staticmethod
    async def _drain_stdout(process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        while line := await process.stdout.readline():
            sys.stderr.write(line.decode(errors="replace"))

    async def _stop(self, worker: Worker, timeout: float = 15.0) -> None:
        if worker.state in ("stopped",):
            return
        self._set(worker, "stopping")
        process = worker.process
        if process is not None and process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), timeout)
            except TimeoutError:
                process.kill()
                await process.wait()
        self.cores.clear(worker.seat)
        if worker.monitor is not None and worker.monitor is not asyncio.current_task():
            worker.monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker.monitor
        self._set(worker, "stopped")
