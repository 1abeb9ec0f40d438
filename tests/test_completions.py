"""The legacy /v1/completions endpoint."""

from __future__ import annotations

import openai
import pytest

PROMPT = "The three primary colors are"


def test_completion_non_stream(client):
    completion = client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=12, temperature=0)
    choice = completion.choices[0]
    assert choice.text
    assert choice.finish_reason in ("stop", "length")
    assert completion.object == "text_completion"
    assert completion.usage.completion_tokens <= 12


def test_completion_default_max_tokens_is_16(client):
    completion = client.completions.create(model="smollm2", prompt="Count: one, two, three,", temperature=0)
    assert completion.usage.completion_tokens <= 16


def test_completion_stream_matches_non_stream(client):
    kwargs = {"model": "smollm2", "prompt": PROMPT, "max_tokens": 20, "temperature": 0}
    whole = client.completions.create(**kwargs)
    parts, finish, usage = [], None, None
    for chunk in client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs):
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            parts.append(choice.text)
            finish = choice.finish_reason or finish
    assert "".join(parts) == whole.choices[0].text
    assert finish == whole.choices[0].finish_reason
    assert usage.completion_tokens == whole.usage.completion_tokens


def test_completion_echo_and_stop(client):
    kwargs = {"model": "smollm2", "prompt": PROMPT, "max_tokens": 20, "temperature": 0}
    text = client.completions.create(**kwargs).choices[0].text
    stop = text.strip().split()[1]
    stopped = client.completions.create(stop=[stop], echo=True, **kwargs).choices[0]
    assert stopped.text == PROMPT + text[: text.find(stop)]
    assert stopped.finish_reason == "stop"


def test_completion_length(client):
    completion = client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=3, temperature=0)
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == 3


def test_completion_from_token_ids(client):
    completion = client.completions.create(model="smollm2", prompt=[504, 1371, 3590, 4199], max_tokens=4,
                                           temperature=0)
    assert completion.usage.prompt_tokens == 4
    assert completion.usage.completion_tokens == 4


def test_completion_token_ids_outside_the_vocabulary_are_a_400(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="smollm2", prompt=[1, 2, 10**7], max_tokens=4)
    assert caught.value.body["param"] == "prompt"
