"""The exllama backend on a real GPU: skipped unless CUDA and exllamav2 are present. The model is
GALLAMA_EXLLAMA_TEST_MODEL (an ExLlamaV2 or FP16 safetensors folder) when set, else a tiny random-weight Llama
written on the spot (exllama_folder.make_tiny_llama): its text is noise, so the tests check behaviour only."""

from __future__ import annotations

import asyncio
import importlib.util
import os

import pytest
from exllama_folder import make_tiny_llama

from gallama_kernel.backend import GenerationRequest, SamplingParams
from gallama_kernel.config import ModelSpec
from gallama_kernel.grammar import Grammar


def _gpu() -> bool:
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("exllamav2") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


pytestmark = pytest.mark.skipif(not _gpu(), reason="needs CUDA and exllamav2")


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    from gallama_backend_exllama.backend import ExLlamaBackend

    model = os.environ.get("GALLAMA_EXLLAMA_TEST_MODEL") or str(make_tiny_llama(tmp_path_factory.mktemp("tiny")))
    loaded = ExLlamaBackend(ModelSpec(model_id=model, model_path=model, backend="exllama", max_seq_len=2048,
                                      max_concurrent_requests=4))
    loaded.load()
    yield loaded
    loaded.close()


def generate(backend, prompt: str, **keys) -> list:
    async def run() -> list:
        tokens = backend.tokenize(prompt)
        request = GenerationRequest(f"gpu-{id(keys)}-{len(prompt)}", tokens, keys.pop("max_tokens", 32),
                                    SamplingParams(temperature=0), **keys)
        return [event async for event in backend.stream(request)]

    return asyncio.run(run())


def test_greedy_generation_counts_ends_and_reuses_the_cache(backend):
    prompt = "The capital of France is Paris. " * 40  # beyond one 256-token page: the generator caches pages
    events = generate(backend, prompt, max_tokens=8)
    final = events[-1]
    assert final.finish_reason in ("stop", "length") and 0 < final.completion_tokens <= 8
    assert final.prompt_tokens == len(backend.tokenize(prompt)) > 256
    again = generate(backend, prompt, max_tokens=8)
    assert "".join(e.text for e in again) == "".join(e.text for e in events) and again[-1].cached_tokens >= 256


def test_grammar_is_enforced_and_ends_the_output(backend):
    boolean = Grammar('start: "yes" | "no"', 'start: "yes" | "no"', "yes or no")
    backend.validate_grammar(boolean)
    events = generate(backend, "Is water wet? Answer:", grammar=boolean, max_tokens=16)
    assert "".join(e.text for e in events) in ("yes", "no") and events[-1].finish_reason == "stop"


def test_stop_string_never_leaks(backend):
    events = generate(backend, "Count: 1, 2, 3,", stop=["5"], max_tokens=24)
    assert "5" not in "".join(e.text for e in events)


def test_concurrent_requests_all_finish(backend):
    async def many() -> list:
        async def one(i: int) -> list:
            tokens = backend.tokenize(f"Story {i}: once upon a time")
            request = GenerationRequest(f"gpu-many-{i}", tokens, 16, SamplingParams(temperature=0))
            return [event async for event in backend.stream(request)]

        return await asyncio.gather(*(one(i) for i in range(6)))

    results = asyncio.run(many())
    assert all(r[-1].finish_reason in ("stop", "length") for r in results)
    assert backend.health()["busy"] == 0
