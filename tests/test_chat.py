"""Chat completions through the official openai client against the real server and model."""

from __future__ import annotations

from pydantic import BaseModel, Field

STORY = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]


def stream_text(client, **kwargs) -> tuple[list[str], str | None, object]:
    chunks, finish, usage = [], None, None
    for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                chunks.append(choice.delta.content)
            finish = choice.finish_reason or finish
    return chunks, finish, usage


def test_non_stream_chat(client):
    completion = client.chat.completions.create(model="smollm2", messages=STORY, max_tokens=24, temperature=0)
    choice = completion.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    assert completion.model == "smollm2"
    assert completion.usage.prompt_tokens > 0
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens


def test_alias_default_serves_the_same_model(client):
    completion = client.chat.completions.create(model="default", messages=STORY, max_tokens=4, temperature=0)
    assert completion.model == "smollm2"


def test_stream_equals_non_stream(client):
    kwargs = {"model": "smollm2", "messages": STORY, "max_tokens": 40, "temperature": 0}
    whole = client.chat.completions.create(**kwargs)
    chunks, finish, usage = stream_text(client, **kwargs)
    assert len(chunks) > 5, "the stream must arrive in pieces"
    assert "".join(chunks) == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason
    assert usage.completion_tokens == whole.usage.completion_tokens
    assert usage.prompt_tokens == whole.usage.prompt_tokens


def test_max_tokens_gives_length_and_exact_usage(client):
    completion = client.chat.completions.create(model="smollm2", messages=STORY, max_tokens=7, temperature=0)
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == 7
    _, finish, usage = stream_text(client, model="smollm2", messages=STORY, max_tokens=7, temperature=0)
    assert finish == "length"
    assert usage.completion_tokens == 7


def test_max_completion_tokens_is_honoured(client):
    completion = client.chat.completions.create(model="smollm2", messages=STORY, max_completion_tokens=3,
                                                temperature=0)
    assert completion.usage.completion_tokens == 3


def test_stop_string_across_chunk_edges_never_leaks(client):
    kwargs = {"model": "smollm2", "messages": STORY, "max_tokens": 60, "temperature": 0}
    chunks, _, _ = stream_text(client, **kwargs)
    text = "".join(chunks)
    # A stop string that starts inside one streamed chunk and ends inside a later one.
    edge = len(chunks[0]) + len(chunks[1]) + len(chunks[2])
    stop = text[edge - 2: edge + 3]
    assert len(stop) == 5 and text.find(stop) < edge
    expected = text[: text.find(stop)]
    got, finish, usage = stream_text(client, stop=[stop], **kwargs)
    assert "".join(got) == expected
    assert finish == "stop"
    assert usage.completion_tokens < 60
    assert all(stop not in c for c in got)
    whole = client.chat.completions.create(stop=stop, **kwargs)
    assert whole.choices[0].message.content == expected
    assert whole.choices[0].finish_reason == "stop"


def test_stop_words_is_an_alias_of_stop(client):
    kwargs = {"model": "smollm2", "messages": STORY, "max_tokens": 40, "temperature": 0}
    text = client.chat.completions.create(**kwargs).choices[0].message.content
    stop = text.split()[3]
    via_alias = client.chat.completions.create(extra_body={"stop_words": [stop]}, **kwargs)
    assert via_alias.choices[0].message.content == text[: text.find(stop)]
    assert via_alias.choices[0].finish_reason == "stop"


def test_leading_prompt_steers_and_is_not_returned(client):
    lead = "Once upon a time, in the city of Zanzibar,"
    completion = client.chat.completions.create(model="smollm2", messages=STORY, max_tokens=20, temperature=0,
                                                extra_body={"leading_prompt": lead})
    content = completion.choices[0].message.content
    assert not content.startswith(lead)
    plain = client.chat.completions.create(model="smollm2", messages=STORY, max_tokens=20, temperature=0)
    assert content != plain.choices[0].message.content
    assert completion.usage.prompt_tokens > plain.usage.prompt_tokens


def test_seed_makes_sampling_repeatable(client):
    kwargs = {"model": "smollm2", "messages": STORY, "max_tokens": 20, "temperature": 1.0, "seed": 1234}
    first = client.chat.completions.create(**kwargs).choices[0].message.content
    second = client.chat.completions.create(**kwargs).choices[0].message.content
    assert first == second
    others = {client.chat.completions.create(**{**kwargs, "seed": s}).choices[0].message.content for s in (1, 2, 3)}
    assert len(others | {first}) > 1


def test_sampling_parameters_are_accepted(client):
    completion = client.chat.completions.create(
        model="smollm2", messages=STORY, max_tokens=8, temperature=0.7, top_p=0.9, presence_penalty=0.5,
        frequency_penalty=0.5, seed=7, extra_body={"top_k": 20, "min_p": 0.05, "repeat_penalty": 1.1})
    assert completion.usage.completion_tokens >= 1


def test_second_turn_reuses_cached_prefix(client):
    first = client.chat.completions.create(model="smollm2", messages=STORY, max_tokens=16, temperature=0)
    history = [*STORY, {"role": "assistant", "content": first.choices[0].message.content},
               {"role": "user", "content": "Now give the robot a name."}]
    second = client.chat.completions.create(model="smollm2", messages=history, max_tokens=8, temperature=0)
    assert second.usage.prompt_tokens_details.cached_tokens > 0


def test_models_list_and_retrieve(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["smollm2"]
    assert client.models.retrieve("smollm2").id == "smollm2"


class Pet(BaseModel):
    name: str = Field(max_length=12)
    species: str = Field(max_length=12)


def test_a_parsed_message_goes_back_as_it_came(client):
    """The openai SDK's parse() message carries ``parsed``, ``tool_calls`` and friends: the next turn takes it."""
    messages = [{"role": "user", "content": "Invent a pet."}]
    completion = client.chat.completions.parse(model="smollm2", messages=messages, response_format=Pet,
                                               max_tokens=60, temperature=0)
    message = completion.choices[0].message
    assert isinstance(message.parsed, Pet)
    messages += [message, {"role": "user", "content": "Describe it in one sentence."}]
    second = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=16, temperature=0)
    assert second.choices[0].message.content
    assert second.usage.prompt_tokens_details.cached_tokens > 0


def test_a_stream_helper_message_goes_back_as_it_came(client):
    """The stream helper's final message carries ``refusal``, ``annotations``, ``audio``, ``function_call``,
    ``parsed`` (all null): the next turn takes it."""
    messages = [{"role": "user", "content": "Say hello."}]
    # the helper refuses to finish a completion cut at max_tokens: a stop string ends it first
    with client.chat.completions.stream(model="smollm2", messages=messages, max_tokens=48, stop=[".", "!", "?"],
                                        temperature=0) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    message = final.choices[0].message
    assert message.content
    messages += [message, {"role": "user", "content": "Now say goodbye."}]
    second = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=16, temperature=0)
    assert second.choices[0].finish_reason in ("stop", "length")
    assert second.choices[0].message.content


def test_fields_without_effect_on_the_output_change_nothing(client):
    kwargs = {"model": "smollm2", "messages": STORY, "max_tokens": 12, "temperature": 0}
    plain = client.chat.completions.create(**kwargs).choices[0].message.content
    tagged = client.chat.completions.create(
        metadata={"run": "e2e"}, store=False, user="u1", service_tier="auto", prompt_cache_key="story",
        safety_identifier="hash-1", **kwargs).choices[0].message.content
    assert tagged == plain
