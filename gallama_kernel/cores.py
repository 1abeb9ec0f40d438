"""A CPU core budget shared by every worker process of one gateway.

``gallama run`` starts one worker process per model replica, and a CPU engine's compute threads default to every
core. Two busy workers then run twice as many threads as there are cores, and on a small machine each decodes far
below half its speed (measured with two llama.cpp processes on 2 cores: a few tokens per second each instead of
~60). So the gateway keeps a *board*: a small file, mapped into every worker, with one seat per worker. A worker
whose engine has work writes its demand into its seat; before each compute step the engine asks
:meth:`CoreShare.threads`, which splits the cores among the busy workers. A worker alone gets every core; two
busy workers on 2 cores get one each, and the one still busy gets both back as soon as the other goes idle.

A model with ``n_threads`` set keeps that many threads and writes them as its demand: the others share what is
left (at least one thread each). The cores are those of the gateway's affinity mask, bounded by its cgroup's CPU
quota; ``GALLAMA_CORES`` overrides the count. A worker started without a gateway (tests, one process serving
models in-process) has a share of its own: every core.

Seats are single bytes written only by their worker (0: idle, else busy), so no lock is needed; the gateway clears
a worker's seat when its process ends, so a crashed busy worker does not keep its cores.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import tempfile
import threading
from pathlib import Path

BOARD_ENV = "GALLAMA_CORE_BOARD"  # the board file's path, set by the gateway for its workers
SEAT_ENV = "GALLAMA_CORE_SEAT"  # the worker's seat on it
CORES_ENV = "GALLAMA_CORES"  # the cores to share; set by the user to override what the machine says
SEATS = 256  # workers one board holds; a worker beyond them shares nothing (it gets every core)
ADAPTIVE = 255  # a busy seat whose worker takes a share of what the fixed ones leave
MAX_FIXED = ADAPTIVE - 1  # a fixed demand is written as at most this many threads


def _quota_cores(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Cores the cgroup's CPU quota allows (rounded up), if it sets one (cgroup v2, else v1)."""
    with contextlib.suppress(OSError, ValueError):
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else max(1, math.ceil(int(quota) / int(period)))
    with contextlib.suppress(OSError, ValueError):
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 else max(1, math.ceil(quota_us / period_us))
    return None


def machine_cores() -> int:
    """Cores this process may use: ``GALLAMA_CORES`` if set, else its affinity mask, bounded by the cgroup's CPU
    quota."""
    given = os.environ.get(CORES_ENV, "").strip()
    if given.isdigit() and int(given) > 0:
        return int(given)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _quota_cores()
    return max(1, min(cores, quota) if quota else cores)


def split(cores: int, seats: bytes, seat: int | None) -> int:
    """Threads for ``seat`` (busy or about to be) given every seat's byte: the cores the fixed demands leave,
    divided among the adaptive busy seats (the lower seats take the remainder), at least one."""
    fixed = sum(value for value in seats if 0 < value < ADAPTIVE)
    adaptive = [index for index, value in enumerate(seats) if value == ADAPTIVE]
    if seat is not None and seat not in adaptive:
        adaptive = sorted([*adaptive, seat])
    free = max(cores - fixed, 0)
    if not adaptive:
        return max(1, free)
    share, extra = divmod(free, len(adaptive))
    rank = adaptive.index(seat) if seat is not None else len(adaptive) - 1
    return max(1, share + (1 if rank < extra else 0))


class CoreBoard:
    """The gateway's side: the board file and its seats."""

    def __init__(self, cores: int | None = None) -> None:
        self.cores = cores or machine_cores()
        self._dir = tempfile.TemporaryDirectory(prefix="gallama-cores-")
        self.path = Path(self._dir.name) / "board"
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, bytes(SEATS))
            self._map = mmap.mmap(fd, SEATS)
        finally:
            os.close(fd)
        self._taken: set[int] = set()

    def take(self) -> int | None:
        """A free seat (cleared), or None when all are taken."""
        for seat in range(SEATS):
            if seat not in self._taken:
                self._taken.add(seat)
                self._map[seat] = 0
                return seat
        return None

    def clear(self, seat: int | None) -> None:
        """Mark ``seat`` idle: its worker has ended (or is about to be started again)."""
        if seat is not None:
            self._map[seat] = 0

    def give_back(self, seat: int | None) -> None:
        if seat is not None:
            self.clear(seat)
            self._taken.discard(seat)

    def env(self, seat: int | None) -> dict[str, str]:
        """The environment that gives a worker ``seat`` (or, with None, no seat: every core)."""
        env = {CORES_ENV: str(self.cores)}
        if seat is not None:
            env |= {BOARD_ENV: str(self.path), SEAT_ENV: str(seat)}
        return env

    def busy(self) -> list[int]:
        """The busy seats' bytes (what the workers wrote; for tests and debugging)."""
        return [value for value in self._map[:] if value]

    def close(self) -> None:
        with contextlib.suppress(BufferError, ValueError):
            self._map.close()
        self._dir.cleanup()


class CoreShare:
    """A worker's side: its seat and the threads it may run now.

    An engine calls :meth:`hold` when it gets work (with its fixed thread count, or None to take a share),
    :meth:`threads` before each compute step, and :meth:`release` when it has nothing left to do.
    """

    def __init__(self, cores: int, board: Path | None = None, seat: int | None = None) -> None:
        self.cores = cores
        self._map: mmap.mmap | None = None
        self.seat: int | None = None
        self._lock = threading.Lock()
        self._holders: dict[int, int | None] = {}  # engines of this process that hold the seat: fixed demand
        if board is not None and seat is not None and 0 <= seat < SEATS:
            with contextlib.suppress(OSError, ValueError):
                fd = os.open(board, os.O_RDWR)
                try:
                    self._map = mmap.mmap(fd, SEATS)
                    self.seat = seat
                finally:
                    os.close(fd)

    @property
    def shared(self) -> bool:
        """Whether other workers share the cores (a gateway's board), or this process has them all."""
        return self._map is not None

    def hold(self, owner: int, fixed: int | None = None) -> None:
        """Mark the seat busy for ``owner`` (an engine's id): with ``fixed`` threads, or a share (None)."""
        with self._lock:
            self._holders[owner] = fixed
            self._write()

    def release(self, owner: int) -> None:
        with self._lock:
            self._holders.pop(owner, None)
            self._write()

    def _write(self) -> None:
        if self._map is None or self.seat is None:
            return
        if not self._holders:
            value = 0
        elif any(fixed is None for fixed in self._holders.values()):
            value = ADAPTIVE
        else:
            value = min(MAX_FIXED, sum(fixed or 0 for fixed in self._holders.values()))
        self._map[self.seat] = value

    def threads(self) -> int:
        """Threads for a compute step of this worker now: its split of the cores among the busy workers (this
        one counted busy)."""
        if self._map is None:
            return self.cores
        return split(self.cores, self._map[:].rstrip(b"\0"), self.seat)  # seats are taken from the first


_share: CoreShare | None = None
_share_lock = threading.Lock()


def core_share() -> CoreShare:
    """This process's :class:`CoreShare`: its gateway's board when it was started by one, else all its cores."""
    global _share
    with _share_lock:
        if _share is None:
            board = os.environ.get(BOARD_ENV)
            seat = os.environ.get(SEAT_ENV, "")
            _share = CoreShare(machine_cores(), Path(board) if board else None,
                               int(seat) if seat.isdigit() else None)
        return _share
