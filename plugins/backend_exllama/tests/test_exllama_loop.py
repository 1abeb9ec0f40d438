"""The generator loop against a scripted generator that follows exllamav2's documented result format.

exllamav2's own generator needs CUDA (see test_gpu.py); this one replays, per job, the ``streaming`` results
exllamav2 would produce, so the routing — stop strings, end reasons, counts, pacing, cancellation, failures —
is tested everywhere.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from exllama_folder import END_ID, N_VOCAB

from gallama_backend_exllama.engine import GeneratorLoop, Request
from gallama_backend_exllama.guidance import GuidanceMask, tokenizer_for
from gallama_backend_exllama.settings import TokenizerFiles
from gallama_kernel.backend import BackendError, GenerationEvent, GenerationRequest
from gallama_kernel.grammar import Grammar
from gallama_kernel.grammar.matchers import MatcherCache


@dataclass
class Job:
    identifier: str
    steps: Iterator[dict[str, Any]] | None  # one streaming result per iterate(), the last with eos=True
    cached_tokens: int = 3


@dataclass
class ScriptedGenerator:
    scripts: dict[str, Iterable[dict[str, Any]] | None]  # None: a job the generator refuses
    active: list[Job] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    fail_next: bool = False

    def enqueue(self, job: Job) -> None:
        if job.steps is None:
            raise AssertionError("Job is too large for the cache")
        self.active.append(job)

    def cancel(self, job: Job) -> None:
        self.cancelled.append(job.identifier)
        self.active.remove(job)

    def iterate(self) -> list[dict[str, Any]]:
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("CUDA error: an illegal memory access")
        results = []
        for job in list(self.active):
            step = next(job.steps)
            results.append({"job": job, "stage": "streaming", "identifier": job.identifier, "eos": False, **step})
            if results[-1]["eos"]:
                self.active.remove(job)
        return results


def _steps(script: Iterable[dict[str, Any]] | None) -> Iterator[dict[str, Any]] | None:
    return None if script is None else iter(script)


def tokens(n: int) -> torch.Tensor:
    return torch.zeros((1, n), dtype=torch.long)


def step(text: str, n: int = 1) -> dict[str, Any]:
    return {"text": text, "token_ids": tokens(n)}


def end(reason: str, new_tokens: int, text: str = "", **extra: Any) -> dict[str, Any]:
    return {"eos": True, "eos_reason": reason, "new_tokens": new_tokens, "text": text, "prompt_tokens": 5,
            "cached_tokens": 2, **extra}


class Sink:
    def __init__(self) -> None:
        self.items: list[GenerationEvent | BaseException] = []
        self.done = threading.Event()

    def __call__(self, item: GenerationEvent | BaseException) -> None:
        self.items.append(item)
        if isinstance(item, BaseException) or item.finish_reason is not None:
            self.done.set()

    def wait(self) -> list[GenerationEvent | BaseException]:
        assert self.done.wait(5), f"no final event: {self.items}"
        return self.items


@pytest.fixture
def run():
    loops: list[GeneratorLoop] = []

    def start(scripts: dict[str, Iterable[dict[str, Any]] | None]) -> tuple[GeneratorLoop, ScriptedGenerator]:
        generator = ScriptedGenerator(scripts)
        pieces = {END_ID: ""}
        loop = GeneratorLoop(generator, lambda r: Job(r.id, _steps(generator.scripts[r.id])),
                             lambda t: pieces.get(t, "x"))
        loops.append(loop)
        return loop, generator

    yield start
    for loop in loops:
        loop.close()


def submit(loop: GeneratorLoop, rid: str, stop: list[str] | None = None, interval: float = 0.0,
           mask: GuidanceMask | None = None) -> tuple[Request, Sink]:
    sink = Sink()
    request = Request(GenerationRequest(rid, [1, 2, 3, 4, 5], 16, stop=stop or [], emit_interval_s=interval), sink,
                      mask)
    loop.submit(request)
    return request, sink


def text_of(items: list[Any]) -> str:
    return "".join(i.text for i in items)


def test_stop_token_end_drops_the_stop_token_and_keeps_held_text(run):
    loop, _ = run({"a": [step("Hel"), step("lo", 2), end("stop_token", 5, held={"text": "!"},
                                                        eos_triggering_token_id=END_ID)]})
    items = submit(loop, "a")[1].wait()
    final = items[-1]
    assert text_of(items) == "Hello!" and final.finish_reason == "stop"
    assert (final.completion_tokens, final.prompt_tokens, final.cached_tokens) == (4, 5, 2)
    assert items[0].text == "Hel" and items[0].completion_tokens == 1


def test_non_special_stop_token_text_is_not_shown(run):
    loop, _ = run({"a": [step("Hi"), end("stop_token", 2, held={"text": "x"}, eos_triggering_token_id=7)]})
    assert text_of(submit(loop, "a")[1].wait()) == "Hi"  # piece of token 7 is "x": not part of the output


def test_max_new_tokens_is_length(run):
    loop, _ = run({"a": [step("one"), end("max_new_tokens", 2, text=" two")]})
    items = submit(loop, "a")[1].wait()
    assert text_of(items) == "one two" and items[-1].finish_reason == "length" and items[-1].completion_tokens == 2


def test_stop_string_across_results_cancels_the_job(run):
    loop, generator = run({"a": [step("say EN"), step("D now"), step("never"), end("max_new_tokens", 9)]})
    items = submit(loop, "a", stop=["END"])[1].wait()
    assert text_of(items) == "say " and items[-1].finish_reason == "stop" and items[-1].completion_tokens == 2
    assert generator.cancelled == ["a"] and items[-1].cached_tokens == 3  # the job's count
    assert loop.stats()["busy"] == 0


def test_text_is_paced_but_the_first_never_held(run):
    loop, _ = run({"a": [step("a"), step("b"), step("c"), end("max_new_tokens", 4, text="d")]})
    items = submit(loop, "a", interval=math.inf)[1].wait()
    assert [i.text for i in items] == ["a", "bcd"]


def test_abort_cancels_in_the_generator(run):
    loop, generator = run({"a": itertools.repeat(step("x")), "b": [step("ok"), end("max_new_tokens", 1)]})
    request, sink = submit(loop, "a")
    while not sink.items:
        pass
    loop.cancel(request)
    submit(loop, "b")[1].wait()  # the loop goes on serving
    assert "a" in generator.cancelled and loop.stats()["busy"] == 0
    assert all(i.finish_reason is None for i in sink.items)


def test_refused_job_and_failed_step_are_errors_and_the_loop_survives(run):
    loop, generator = run({"big": None, "a": itertools.repeat(step("x")),
                           "b": [step("ok"), end("max_new_tokens", 1)]})
    refused = submit(loop, "big")[1].wait()
    assert isinstance(refused[-1], BackendError) and "refused" in str(refused[-1])
    generator.fail_next = True
    failed = submit(loop, "a")[1].wait()
    assert isinstance(failed[-1], RuntimeError) and "illegal memory access" in str(failed[-1])
    assert text_of(submit(loop, "b")[1].wait()) == "ok"


def test_complete_grammar_ends_at_once_and_matcher_errors_fail(run, folder):
    grammars = MatcherCache(tokenizer_for(TokenizerFiles(folder), [END_ID]))
    boolean = Grammar('start: "true" | "false"', 'start: "true" | "false"', "a boolean")
    done = GuidanceMask(grammars.matcher(boolean), N_VOCAB, [END_ID])
    done.feed(258)  # exllamav2 feeds the filter before it reports the token's result
    loop, generator = run({"g": [step("true"), step("never"), end("max_new_tokens", 3)],
                           "e": [step("x"), end("max_new_tokens", 2)]})
    items = submit(loop, "g", mask=done)[1].wait()
    assert text_of(items) == "true" and items[-1].finish_reason == "stop" and generator.cancelled == ["g"]
    broken = GuidanceMask(grammars.matcher(boolean), N_VOCAB, [END_ID])
    broken.feed(ord("x"))
    failed = submit(loop, "e", mask=broken)[1].wait()
    assert isinstance(failed[-1], BackendError) and "grammar enforcement failed" in str(failed[-1])


def test_close_fails_what_is_left(run):
    loop, _ = run({"a": itertools.repeat(step("x"))})
    _, sink = submit(loop, "a")
    while not sink.items:
        pass
    loop.close()
    assert isinstance(sink.wait()[-1], RuntimeError)
