"""Artifact mode end to end: the real server, the embedded SmolLM2-135M model, the official openai client.

The model is tiny: the grammar guarantees the structure, not the quality. The client code is the product
README's (model name, ``temperature``/``max_tokens`` added to keep it deterministic and short).
"""

from __future__ import annotations

import re
from typing import Any

import openai
import pytest

from gallama_feature_artifact.grammar import IDENTIFIER_PATTERN

MODEL = "smollm2"
PROMPT = "Explain in one liner what quicksort is and write me quicksort in python and Java"
MESSAGES = [{"role": "user", "content": PROMPT}]
FORMAT_TAGS = ("<answer>", "</answer>", "<artifact ", "</artifact>")
TEXT_TAGS = (*FORMAT_TAGS, "<text>", "</text>")
"""Never in any content; ``<text>``/``</text>`` are allowed in an artifact (SVG, XML), never in text."""
LIMITS = {"Fast": 300, "Slow": 150}

Segments = list[tuple[dict[str, Any], str]]


def check_meta(meta: Any) -> None:
    assert isinstance(meta, dict), meta
    if meta["tag_type"] == "text":
        assert meta == {"tag_type": "text"}
        return
    assert meta["tag_type"] == "artifact"
    assert set(meta) == {"tag_type", "artifact_type", "identifier", "title", "language"}
    assert meta["artifact_type"] in ("code", "self_contained_text")
    assert re.fullmatch(IDENTIFIER_PATTERN, meta["identifier"])
    assert 1 <= len(meta["title"]) <= 80 and not set(meta["title"]) & set('"<>\n')
    assert isinstance(meta["language"], str) and not set(meta["language"]) & set('"<>\n')


def check_content(meta: dict[str, Any], content: str | None) -> None:
    tags = TEXT_TAGS if meta["tag_type"] == "text" else FORMAT_TAGS
    assert not any(tag in (content or "") for tag in tags), content


def runs(items: Segments) -> Segments:
    """Segments as a streaming client can tell them apart: empty ones left out, neighbours with equal meta joined."""
    joined: Segments = []
    for meta, content in items:
        if not content:
            continue
        if joined and joined[-1][0] == meta:
            joined[-1] = (meta, joined[-1][1] + content)
        else:
            joined.append((meta, content))
    return joined


def ask(client: openai.OpenAI, mode: str) -> Segments:
    """The README's non-streaming snippet; returns (meta, content) per choice."""
    completion = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user",
                   "content": "Explain in one liner what quicksort is and write me quicksort in python and Java"}],
        extra_body={"artifact": mode},
        temperature=0, max_tokens=LIMITS[mode],
    )
    for choice in completion.choices:
        print("-------------------------------\n")
        print(choice.message.artifact_meta)
        print(choice.message.content)
    assert completion.choices
    found = []
    for index, choice in enumerate(completion.choices):
        assert choice.index == index
        check_meta(choice.message.artifact_meta)
        check_content(choice.message.artifact_meta, choice.message.content)
        found.append((choice.message.artifact_meta, choice.message.content))
    details = completion.usage.completion_tokens_details
    reasoning = details.reasoning_tokens if details is not None and details.reasoning_tokens else 0
    assert (reasoning > 0) == (mode == "Slow"), completion.usage  # Slow: the hidden plan counts as reasoning
    return found


def ask_streaming(client: openai.OpenAI, mode: str) -> Segments:
    """The README's streaming snippet; returns the (meta, content) runs it printed under each header."""
    completion = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user",
                   "content": "Explain in one liner what quicksort is and write me quicksort in python and Java"}],
        stream=True,
        extra_body={"artifact": mode},
        temperature=0, max_tokens=LIMITS[mode],
    )
    current_content_type = None
    found: Segments = []
    chunks = 0
    for chunk in completion:
        chunks += 1
        meta = chunk.choices[0].delta.artifact_meta
        if current_content_type != chunk.choices[0].delta.artifact_meta["tag_type"]:
            print("\n------------------------------")
            print(chunk.choices[0].delta.artifact_meta)
            print("\n------------------------------")
            current_content_type = chunk.choices[0].delta.artifact_meta["tag_type"]
        print(chunk.choices[0].delta.content, end="")
        check_meta(meta)
        check_content(meta, chunk.choices[0].delta.content)
        found.append((meta, chunk.choices[0].delta.content or ""))
    assert chunks > 3
    return runs(found)


def assert_read_back(server: Any) -> None:
    """The kernel parses every finished constrained output with its grammar and logs when it does not parse."""
    assert "does not parse" not in server.log.read_text()


def test_fast_readme_snippets(client: openai.OpenAI, artifact_server: Any) -> None:
    """Stream and non-stream are compared once the prompt is in the KV cache, so that both compute the same
    tokens in the same batches: llama.cpp's logits depend slightly on how a prompt was batched (beyond 256 KV
    cells even with flash attention), and greedy paths of the tiny model diverge at near ties."""
    ask(client, "Fast")
    choices = ask(client, "Fast")
    streamed = ask_streaming(client, "Fast")
    assert streamed == runs(choices), "greedy decoding: the stream must read as the non-streamed choices"
    # with the example exchange even the 135M model writes prose and code apart (greedy, so stable)
    assert {meta["tag_type"] for meta, _ in choices} == {"text", "artifact"}, choices
    assert_read_back(artifact_server)


def test_slow_readme_snippets(client: openai.OpenAI, artifact_server: Any) -> None:
    """Slow: the same structure after a hidden plan. Stream and non-stream are not compared: the answer's
    prompt holds the plan re-tokenized and reuses the KV cache differently from one request to the next, and
    llama.cpp's logits depend slightly on how a prompt is batched, so greedy paths of the tiny model diverge."""
    assert ask(client, "Slow")
    assert ask_streaming(client, "Slow")
    assert_read_back(artifact_server)


def test_answers_cut_at_max_tokens_are_closed(client: openai.OpenAI, artifact_server: Any) -> None:
    """At every size from the smallest allowed upward, an answer cut off by ``max_tokens`` ends with the closing
    tags it needs: each segment's meta is whole, no tag leaks into content, and the output parses."""
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, extra_body={"artifact": "Fast"})
    assert caught.value.code == "max_tokens_too_small"
    smallest = int(re.search(r"has (\d+) tokens", caught.value.body["message"]).group(1))
    for size in (smallest, smallest + 1, smallest + 7, 45, 90, 160):
        completion = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=size,
                                                    extra_body={"artifact": "Fast"})
        assert completion.usage.completion_tokens <= size
        last = completion.choices[-1]
        if last.finish_reason == "length":
            assert last.model_extra.get("output_closed") is True, completion
        for choice in completion.choices:
            check_meta(choice.message.artifact_meta)
            check_content(choice.message.artifact_meta, choice.message.content)
        closed = None
        for chunk in client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=size,
                                                    stream=True, extra_body={"artifact": "Fast"}):
            for choice in chunk.choices:
                check_meta(choice.delta.artifact_meta)
                check_content(choice.delta.artifact_meta, choice.delta.content)
                closed = choice.model_extra.get("output_closed", closed)
        assert closed is (True if last.finish_reason == "length" else None)
    assert_read_back(artifact_server)


def test_no_is_plain_chat(client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = {"model": MODEL, "messages": MESSAGES, "temperature": 0, "max_tokens": 40}
    plain = client.chat.completions.create(**kwargs)
    explicit = client.chat.completions.create(**kwargs, extra_body={"artifact": "No"})
    assert len(explicit.choices) == 1
    assert explicit.choices[0].message.content == plain.choices[0].message.content
    assert getattr(explicit.choices[0].message, "artifact_meta", None) is None
    for chunk in client.chat.completions.create(**kwargs, stream=True, extra_body={"artifact": "No"}):
        assert getattr(chunk.choices[0].delta, "artifact_meta", None) is None


def test_unknown_mode_is_refused(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, extra_body={"artifact": "Maybe"})
    assert caught.value.body["param"] == "artifact"
    assert "Fast" in caught.value.body["message"]


@pytest.mark.parametrize("extra", [
    {"tools": [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]},
    {"response_format": {"type": "json_object"}},
])
def test_other_constraints_are_refused(client: openai.OpenAI, extra: dict[str, Any]) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, **extra, extra_body={"artifact": "Fast"})
    assert caught.value.body["param"] == "artifact"
    assert next(iter(extra)) in caught.value.body["message"]


def test_disabled_plugin_names_the_package(start_server: Any) -> None:
    server = start_server("--disable-plugin", "artifact")
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=60)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, extra_body={"artifact": "Fast"})
    assert caught.value.body["param"] == "artifact"
    assert "gallama-feature-artifact" in caught.value.body["message"]
    server.stop()
