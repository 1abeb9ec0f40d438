"""events_from_thread and ThreadJobs: the relay from an engine thread to a backend's async event stream."""

from __future__ import annotations

import asyncio
import threading

import pytest

from gallama_kernel.backend import Emit, GenerationEvent, ThreadJobs, events_from_thread


class Worker:
    """An engine stand-in: a thread that emits ``items`` and records whether it was stopped."""

    def __init__(self, items: list[GenerationEvent | BaseException], endless: bool = False) -> None:
        self.items, self.endless = items, endless
        self.stops = 0
        self.stopped = threading.Event()

    def start(self, emit: Emit) -> None:
        def run() -> None:
            for item in self.items:
                emit(item)
            while self.endless and not self.stopped.wait(0.001):
                emit(GenerationEvent("more", 1))

        threading.Thread(target=run, daemon=True).start()

    def stop(self) -> None:
        self.stops += 1
        self.stopped.set()


async def collect(worker: Worker, limit: int | None = None) -> list[GenerationEvent]:
    events = []
    stream = events_from_thread(worker.start, worker.stop)
    async for event in stream:
        events.append(event)
        if limit is not None and len(events) == limit:
            break
    await stream.aclose()
    return events


def test_events_until_the_final_one_then_stop():
    worker = Worker([GenerationEvent("a", 1), GenerationEvent("b", 2, "stop"), GenerationEvent("late", 3)])
    events = asyncio.run(collect(worker))
    assert [e.text for e in events] == ["a", "b"] and worker.stops >= 1


def test_an_emitted_exception_is_raised():
    worker = Worker([GenerationEvent("a", 1), RuntimeError("engine failed")])
    with pytest.raises(RuntimeError, match="engine failed"):
        asyncio.run(collect(worker))
    assert worker.stops >= 1


def test_leaving_early_stops_the_generation():
    worker = Worker([], endless=True)
    assert len(asyncio.run(collect(worker, limit=3))) == 3
    assert worker.stopped.is_set()


def test_emitting_after_the_event_loop_closed_stops_the_generation():
    worker = Worker([])
    emitted: list[Emit] = []

    async def start_only() -> None:
        stream = events_from_thread(lambda emit: emitted.append(emit), worker.stop)
        task = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0)  # the generator runs up to its first wait: start() has been called
        task.cancel()

    asyncio.run(start_only())
    before = worker.stops
    emitted[0](GenerationEvent("x", 1))  # the loop is closed now
    assert worker.stops == before + 1


def test_thread_jobs_abort_by_request_id_and_forget_finished_ones():
    jobs, cancelled = ThreadJobs(), []
    emits: dict[str, Emit] = {}

    def make(emit: Emit) -> str:
        emits["r1"] = emit
        return "job-1"

    async def run() -> list[GenerationEvent]:
        stream = jobs.events("r1", make, lambda job: None, cancelled.append)
        first = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0)
        jobs.abort("r1")  # the engine is asked to stop job-1; its final event still ends the stream
        emits["r1"](GenerationEvent("", 0, "stop"))
        events = [await first]
        await stream.aclose()
        return events

    assert [e.finish_reason for e in asyncio.run(run())] == ["stop"]
    assert cancelled == ["job-1", "job-1"]  # by abort, then once more as the stream ended
    jobs.abort("r1")  # finished: nothing left to cancel
    assert cancelled == ["job-1", "job-1"]
