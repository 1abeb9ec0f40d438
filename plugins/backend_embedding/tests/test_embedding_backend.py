"""The embedding backend in-process, on the embedded model (all-MiniLM-L6-v2): loading, token counts, vectors,
Matryoshka truncation, batching of concurrent requests, and the batching loop's lifecycle on event loops."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator
from pathlib import Path

import pytest

from gallama_backend_embedding.backend import EmbeddingBackend, is_matryoshka
from gallama_kernel.backend import BackendError, GenerationRequest
from gallama_kernel.config import build_spec

CAT = "A cat is sleeping on the warm windowsill."
CAT_PARAPHRASE = "On the sunny window ledge, a kitten naps."
UNRELATED = "Quarterly tax filings are due at the end of the month."


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def load(**values: object) -> EmbeddingBackend:
    backend = EmbeddingBackend(build_spec({"model_id": "all-minilm-l6-v2", **values}, {}, "test"))
    backend.load()
    return backend


@pytest.fixture(scope="module")
def backend(loop: asyncio.AbstractEventLoop) -> Iterator[EmbeddingBackend]:
    fractions: list[float] = []
    loaded = EmbeddingBackend(build_spec({"model_id": "all-minilm-l6-v2"}, {}, "test"))
    loaded.load(fractions.append)
    assert fractions[-1] == pytest.approx(1.0)
    yield loaded
    loaded.close()


def embed(loop: asyncio.AbstractEventLoop, backend: EmbeddingBackend, texts: list[str],
          dimensions: int | None = None) -> list[list[float]]:
    return loop.run_until_complete(backend.embed(texts, dimensions=dimensions))


def test_loads_the_embedded_model(backend: EmbeddingBackend) -> None:
    assert backend.context_length == 256
    assert backend.embedding_size == 384
    capabilities = backend.capabilities
    assert capabilities.embeddings and not capabilities.chat
    health = backend.health()
    assert health["status"] == "ok" and health["context_length"] == 256
    assert backend.vocab_size == 30522


def test_tokens_are_counted_with_special_tokens_and_never_truncated(backend: EmbeddingBackend) -> None:
    tokens = backend.tokenize("hello world")
    assert tokens == [101, 7592, 2088, 102]  # [CLS] hello world [SEP]
    assert backend.tokenize("hello world", add_special=False) == [7592, 2088]
    assert backend.detokenize(tokens[1:3]) == "hello world"
    assert len(backend.tokenize("word " * 600)) == 602  # beyond the model's 256: counted, not cut


def test_vectors_are_normalized_and_meaningful(loop: asyncio.AbstractEventLoop, backend: EmbeddingBackend) -> None:
    cat, again, paraphrase, unrelated = embed(loop, backend, [CAT, CAT, CAT_PARAPHRASE, UNRELATED])
    assert len(cat) == 384 and all(isinstance(v, float) for v in cat)
    assert math.sqrt(sum(v * v for v in cat)) == pytest.approx(1.0, abs=1e-5)
    assert cosine(cat, again) == pytest.approx(1.0, abs=1e-5)
    assert cosine(cat, paraphrase) > cosine(cat, unrelated) + 0.2
    [single] = embed(loop, backend, [CAT])
    assert cosine(single, cat) == pytest.approx(1.0, abs=1e-5)  # batching does not change a vector


def test_concurrent_requests_are_batched_and_each_gets_its_own_vectors(loop: asyncio.AbstractEventLoop,
                                                                        backend: EmbeddingBackend) -> None:
    texts = [f"Sentence number {i} is about {topic}." for i, topic in enumerate(["cats", "taxes", "rain"] * 6)]
    alone = embed(loop, backend, texts)

    async def together() -> list[list[list[float]]]:
        return await asyncio.gather(*(backend.embed([text]) for text in texts))

    for [vector], expected in zip(loop.run_until_complete(together()), alone, strict=True):
        assert cosine(vector, expected) == pytest.approx(1.0, abs=1e-4)


def test_a_cancelled_request_leaves_the_engine_serving(loop: asyncio.AbstractEventLoop,
                                                       backend: EmbeddingBackend) -> None:
    async def cancel_one() -> None:
        task = asyncio.ensure_future(backend.embed([CAT] * 64))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    loop.run_until_complete(cancel_one())
    assert len(embed(loop, backend, [UNRELATED])[0]) == 384


def test_dimensions_only_at_full_size_for_a_model_without_matryoshka(backend: EmbeddingBackend) -> None:
    assert backend.supports_dimensions(384)
    assert not backend.supports_dimensions(128)
    assert not backend.supports_dimensions(385)


def test_generation_is_refused(backend: EmbeddingBackend) -> None:
    with pytest.raises(BackendError, match="embeddings only"):
        backend.stream(GenerationRequest("x", [101], 4))


def test_matryoshka_tag_detection(tmp_path: Path) -> None:
    card = tmp_path / "README.md"
    assert not is_matryoshka(tmp_path)
    card.write_text("---\ntags:\n- sentence-transformers\n- loss:MatryoshkaLoss\n---\n# a model\n")
    assert is_matryoshka(tmp_path)
    card.write_text("---\ntags: [sentence-transformers]\n---\nTrained with Matryoshka loss, says the prose.\n")
    assert not is_matryoshka(tmp_path)
    card.write_text("no front matter\n---\ntags: [matryoshka]\n")
    assert not is_matryoshka(tmp_path)
    card.write_text("---\n: : bad yaml [\n---\n")
    assert not is_matryoshka(tmp_path)


def test_a_matryoshka_model_truncates_and_renormalizes(tmp_path: Path, backend: EmbeddingBackend) -> None:
    folder = tmp_path / "matryoshka-minilm"
    folder.mkdir()
    source = Path(backend.spec.model_path or "")
    for item in source.iterdir():
        if item.name != "README.md":
            (folder / item.name).symlink_to(item)
    (folder / "README.md").write_text("---\ntags:\n- loss:MatryoshkaLoss\n---\n")
    truncating = EmbeddingBackend(build_spec({"model_id": str(folder), "backend": "embedding"}, {}, "test"))
    truncating.load()
    loop = asyncio.new_event_loop()
    try:
        assert truncating.supports_dimensions(64) and not truncating.supports_dimensions(385)
        [full] = embed(loop, truncating, [CAT])
        [short] = embed(loop, truncating, [CAT], dimensions=64)
        assert len(short) == 64
        assert math.sqrt(sum(v * v for v in short)) == pytest.approx(1.0, abs=1e-5)
        assert cosine(short, full[:64]) == pytest.approx(1.0, abs=1e-5)
        assert len(embed(loop, truncating, [CAT], dimensions=384)[0]) == 384
    finally:
        truncating.close()
        loop.close()


def test_the_engine_follows_the_event_loop_and_close_stops_its_threads() -> None:
    backend = load(max_seq_len=64)
    assert backend.context_length == 64
    first = asyncio.new_event_loop()
    second = asyncio.new_event_loop()
    try:
        [a] = embed(first, backend, [CAT])
        handler = backend._engine._batch_handler
        first.close()  # the loop the engine started on is gone (a test's asyncio.run, a restarted server)
        [b] = embed(second, backend, [CAT])
        assert backend._engine._batch_handler is not handler
        assert not any(thread.is_alive() for thread in handler._threadpool._threads)
        assert cosine(a, b) == pytest.approx(1.0, abs=1e-5)
        handler = backend._engine._batch_handler
    finally:
        backend.close()
        second.close()
    assert not any(thread.is_alive() for thread in handler._threadpool._threads)
    assert backend.health()["status"] == "failed"


@pytest.mark.parametrize(("values", "message"), [
    ({"gpus": "8"}, "runs on the CPU"),
    ({"max_seq_len": 4096}, "exceeds the model's limit of 512"),
    ({"draft_model_id": "prompt_lookup"}, "the embedding backend has no speculative decoding; remove 'draft_model_id'"),
    ({"draft_model_id": "smollm2", "draft_gpus": "4", "draft_cache_size": 512},
     "no speculative decoding; remove 'draft_model_id', 'draft_gpus', 'draft_cache_size'$"),
    ({"draft_model_name": "x", "draft_cache_quant": "q8"}, "remove 'draft_model_name', 'draft_cache_quant'$"),
    ({"cache_size": 4096, "max_concurrent_requests": 4}, "no KV cache, slots or streams; remove 'cache_size', "
     "'max_concurrent_requests'$"),
    ({"cache_quant": "Q8"}, "remove 'cache_quant'$"),
    ({"tp": True}, "remove 'tp'$"),
    ({"stream_interval_ms": 0}, "remove 'stream_interval_ms'$"),
])
def test_load_errors_name_the_problem(values: dict[str, object], message: str) -> None:
    with pytest.raises(BackendError, match=message):
        load(**values)


def test_a_file_is_not_an_embedding_model(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF")
    backend = EmbeddingBackend(build_spec({"model_id": str(path), "backend": "embedding"}, {}, "test"))
    with pytest.raises(BackendError, match="is not a folder"):
        backend.load()
