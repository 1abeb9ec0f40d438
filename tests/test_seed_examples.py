"""The original README's code samples, run as written against a live ``gallama run``.

Each test below holds one sample of the original README (sections "OpenAI Compatible Server", "Function
Calling", "Artifact System", "Thinking Method", "Multiple Concurrent Models", "OpenAI Embedding Endpoint",
"Legacy OpenAI Completion Endpoint", "Format Enforcement", "Streaming", "Remote Model Management") verbatim but
for the base URL, followed by checks of what it got. The samples name models this machine does not have
(``mistral``, ``codestral``, ``Alibaba-NLP/gte-large-en-v1.5`` …): the server's ``model_config.yaml`` has entries
of those names that point at the embedded models (SmolLM2-135M for chat, all-MiniLM-L6-v2 for embeddings), as a
user's file points them at real ones. Samples that send no ``max_tokens`` get none added: the server must end
them by itself (end of turn, or the context limit); the time each took is printed (``pytest -s``).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from conftest import GALLAMA, RunningServer, free_port
from openai import OpenAI

from gallama_kernel.config import DEFAULT_ENTRY, EMBEDDING_ENTRY

CHAT_NAMES = ["mistral", "codestral", "llama-3.1-8B", "qwen-2-72B", "gemma-2-9b", "qwen2-72B", "Llama3.1-8B"]
EMBEDDING_NAMES = ["Alibaba-NLP/gte-large-en-v1.5", "multilingual-e5-large-instruct"]


def seed_home(home: Path) -> Path:
    """A GALLAMA_HOME_PATH whose model_config.yaml names the seed's models (``codestral`` an alias of
    ``mistral``: one worker serves both)."""
    chat = {"model_id": DEFAULT_ENTRY["model_id"], "backend": "llama_cpp"}
    config: dict[str, Any] = {name: dict(chat) for name in CHAT_NAMES if name != "codestral"}
    config["mistral"]["aliases"] = ["codestral"]
    config.update({name: dict(EMBEDDING_ENTRY) for name in EMBEDDING_NAMES})
    (home / "model_config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return home


@pytest.fixture(scope="module")
def seed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """The seed's "Multiple Concurrent Models" command, with the seed's embedding model beside it."""
    home = seed_home(tmp_path_factory.mktemp("seed-home"))
    server = RunningServer(home, "-id", "model_id=llama-3.1-8B", "-id", "model_id=mistral",
                           "-id", "model_id=Alibaba-NLP/gte-large-en-v1.5 backend=embedding")
    yield server
    server.stop()


@pytest.fixture()
def client(seed: RunningServer, monkeypatch: pytest.MonkeyPatch) -> OpenAI:
    """The seed's client setup: the key from the environment, only the base URL given."""
    monkeypatch.setenv("OPENAI_API_KEY", "test")  # restored after the test
    os.environ['OPENAI_API_KEY'] = 'test'
    client = OpenAI(base_url=f'{seed.base_url}/v1')
    return client


class Timer:
    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> Timer:
        self.start = time.monotonic()
        return self

    def __exit__(self, *_: object) -> None:
        self.seconds = time.monotonic() - self.start
        print(f"\n[{self.what}: {self.seconds:.1f} s]")


# -- OpenAI Compatible Server -------------------------------------------------------------------------------
def test_openai_compatible_server(client: OpenAI) -> None:
    messages = [{"role": "user", "content": "Which is faster in terms of reaction speed: a cat or a dog?"}]

    with Timer("OpenAI Compatible Server, no max_tokens"):
        completion = client.chat.completions.create(
            model="mistral",
            messages=messages,
            tool_choice="auto"
        )

    print(completion)
    choice = completion.choices[0]
    assert choice.message.content and not choice.message.tool_calls
    assert choice.finish_reason in ("stop", "length")


# -- Function Calling -----------------------------------------------------------------------------------------
SEED_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_current_weather",
            "description": "Get the current weather in a given location",
            "parameters": {
                "type": "object",
                "properties": {
                    "location": {
                        "type": "string",
                        "description": "The city and state, e.g. San Francisco, CA",
                    },
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["location"],
            },
        }
    }
]


def check_weather_call(completion: Any) -> None:
    call = completion.choices[0].message.tool_calls[0]
    assert call.function.name == "get_current_weather"
    arguments = json.loads(call.function.arguments)
    assert isinstance(arguments["location"], str) and set(arguments) <= {"location", "unit"}
    assert completion.choices[0].finish_reason == "tool_calls"


def test_function_calling(client: OpenAI) -> None:
    """With ``tool_choice="auto"`` the model decides. SmolLM2-135M does not choose to call here (0 calls in 20
    sampled answers, none greedy), so the sample's last line, which assumes a call, runs only when one came;
    either way ``auto`` must give a clean answer or valid calls, never a half of each."""
    tools = SEED_TOOLS

    messages = [{"role": "user", "content": "What's the weather like in Boston today?"}]

    completion = client.chat.completions.create(
        model="mistral",
        messages=messages,
        tools=tools,
        tool_choice="auto"
    )

    message = completion.choices[0].message
    if message.tool_calls:
        print(completion.choices[0].message.tool_calls[0].function)
        check_weather_call(completion)
    else:
        assert message.content and "<tool_call>" not in message.content
        assert completion.choices[0].finish_reason in ("stop", "length")


def test_function_calling_required(client: OpenAI) -> None:
    """The same sample with ``tool_choice="required"``: the call its last line reads is always there."""
    tools = SEED_TOOLS

    messages = [{"role": "user", "content": "What's the weather like in Boston today?"}]

    completion = client.chat.completions.create(
        model="mistral",
        messages=messages,
        tools=tools,
        tool_choice="required"
    )

    print(completion.choices[0].message.tool_calls[0].function)

    check_weather_call(completion)


# -- Artifact System ------------------------------------------------------------------------------------------
def test_artifact_non_streaming(client: OpenAI) -> None:
    with Timer("Artifact System (non-streaming), no max_tokens"):
        completion = client.chat.completions.create(
            model="codestral",
            messages=[{"role": "user",
                       "content": "Explain in one liner what quicksort is and write me quicksort in python and Java"}],
            extra_body={
                "artifact": "Fast",
            }
        )

    for choice in completion.choices:
        print("-------------------------------\n")
        print(choice.message.artifact_meta)
        print(choice.message.content)

    assert completion.choices
    for choice in completion.choices:
        assert choice.message.artifact_meta["tag_type"] in ("text", "artifact")


def test_artifact_streaming(client: OpenAI) -> None:
    with Timer("Artifact System (streaming), no max_tokens"):
        completion = client.chat.completions.create(
          model="codestral",
            messages=[{"role": "user",
                       "content": "Explain in one liner what quicksort is and write me quicksort in python and Java"}],
          stream=True,
          extra_body= {
              "artifact": "Fast",
          }
        )

        seen: list[tuple[str, str]] = []
        current_content_type = None
        for chunk in completion:
          if current_content_type != chunk.choices[0].delta.artifact_meta["tag_type"]:
              print("\n------------------------------")
              print(chunk.choices[0].delta.artifact_meta)
              print("\n------------------------------")
              current_content_type = chunk.choices[0].delta.artifact_meta["tag_type"]
          print(chunk.choices[0].delta.content, end='')
          seen.append((current_content_type, chunk.choices[0].delta.content or ""))

    assert "".join(text for _, text in seen)
    assert {kind for kind, _ in seen} <= {"text", "artifact"}


# -- Thinking Method ------------------------------------------------------------------------------------------
def test_thinking_method(client: OpenAI) -> None:
    thinking_template = """
<chain_of_thought>
  <problem>{problem_statement}</problem>
  <initial_state>{initial_state}</initial_state>
  <steps>
    <step>{action1}</step>
    <step>{action2}</step>
    <!-- Add more steps as needed -->
  </steps>
  <answer>Provide the answer</answer>
  <final_answer>Only the final answer, no need to provide the step by step problem solving</final_answer>
</chain_of_thought>
"""

    messages = [
        {"role": "user", "content": "I went to the market and bought 10 apples. I gave 2 apples to the neighbor and 2 to the repairman. I then went and bought 5 more apples and ate 1. How many apples did I remain with?"}  # noqa: E501
    ]

    completion = client.chat.completions.create(
        model="mistral",
        messages=messages,
        temperature=0.1,
        max_tokens=200,
        extra_body={
            "thinking_template": thinking_template,
        },
    )

    print(completion.choices[0].message.content)
    # 10 apples

    content = completion.choices[0].message.content
    assert content and "<chain_of_thought>" not in content and "<step>" not in content


# -- Multiple Concurrent Models -------------------------------------------------------------------------------
def test_multiple_concurrent_models(seed: RunningServer, client: OpenAI) -> None:
    """The fixture's server is the seed's ``gallama run -id "model_id=llama-3.1-8B" -id "model_id=mistral"``:
    both answer on one address, each in its own worker."""
    names = {model.id for model in client.models.list()}
    assert {"llama-3.1-8B", "mistral"} <= names
    for name in ("llama-3.1-8B", "mistral"):
        answer = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "Hi!"}],
                                                max_tokens=8)
        assert answer.model == name and answer.choices[0].message.content
    pids = {m["model_name"]: m["replicas"][0]["pid"] for m in httpx.get(f"{seed.base_url}/list_loaded_models")
            .json()["models"]}
    assert pids["llama-3.1-8B"] != pids["mistral"]


def test_multiple_concurrent_models_gpu_split_is_refused_on_the_cpu(seed: RunningServer) -> None:
    """The seed's "Customize GPUs split" command: this machine has no GPU, so the split cannot be honoured and
    `gallama run` says so, naming the setting, instead of loading the models somewhere else."""
    home = seed.log.parent  # the seed server's GALLAMA_HOME_PATH, with its model_config.yaml
    done = subprocess.run([str(GALLAMA), "run", "--host", "127.0.0.1", "--port", str(free_port()),
                           "-id", "model_id=qwen2-72B gpus=20,15,15,0", "-id", "model_id=Llama3.1-8B gpus=0,0,0,20"],
                          env={**os.environ, "GALLAMA_HOME_PATH": str(home)}, capture_output=True, text=True,
                          timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert "gpus" in output and "qwen2-72B" in output, output


# -- OpenAI Embedding Endpoint --------------------------------------------------------------------------------
def test_embedding_endpoint(client: OpenAI) -> None:
    response = client.embeddings.create(
        input="Your text string for embedding goes here",
        model="Alibaba-NLP/gte-large-en-v1.5"
    )

    print(response.data[0].embedding)

    assert len(response.data[0].embedding) == 384  # all-MiniLM-L6-v2 behind the seed's model name


# -- Legacy OpenAI Completion Endpoint ------------------------------------------------------------------------
def test_legacy_completion_endpoint(client: OpenAI) -> None:
    with Timer("Legacy Completion, max_tokens=1000"):
        completion = client.completions.create(
            model="mistral",
            prompt="Tell me a story about a Llama in 200 words",
            max_tokens=1000,
            temperature=0
        )

    assert completion.choices[0].text
    assert completion.choices[0].finish_reason in ("stop", "length")
    assert completion.usage.completion_tokens <= 1000


# -- Format Enforcement ---------------------------------------------------------------------------------------
def test_format_enforcement(client: OpenAI) -> None:
    completion = client.chat.completions.create(
        model="mistral",
        messages=[{"role": "user", "content": "Is smoking bad for health? Answer with Yes or No"}],
        temperature=0.1,
        max_tokens=200,
        extra_body={
            # "leading_prompt": leading_prompt,         # prefix the generation with some string
            # "regex_pattern": regex_pattern,           # define the regex for the whole generation
            # "regex_prefix_pattern": '(Yes|No)\.',     # define the regex to match the starting words
            # "stop_words": stop_words,                 # define the word to stop generation
        },
    )

    assert completion.choices[0].message.content


def test_format_enforcement_regex_prefix(client: OpenAI) -> None:
    """The same sample with its ``regex_prefix_pattern`` line uncommented."""
    completion = client.chat.completions.create(
        model="mistral",
        messages=[{"role": "user", "content": "Is smoking bad for health? Answer with Yes or No"}],
        temperature=0.1,
        max_tokens=200,
        extra_body={
            "regex_prefix_pattern": r'(Yes|No)\.',     # define the regex to match the starting words
        },
    )

    content = completion.choices[0].message.content
    assert content.startswith(("Yes.", "No.")), content


# -- Streaming ------------------------------------------------------------------------------------------------
def test_streaming(client: OpenAI) -> None:
    messages = [{"role": "user", "content": "Tell me a 200-word story about a Llama"}]

    with Timer("Streaming, no max_tokens"):
        completion = client.chat.completions.create(
            model="mistral",
            messages=messages,
            stream=True,
            temperature=0.1,
        )

        pieces = []
        finish = None
        for chunk in completion:
            print(chunk.choices[0].delta.content, end='')
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish

    assert "".join(pieces) and finish in ("stop", "length")


# -- Remote Model Management ----------------------------------------------------------------------------------
def loaded(base_url: str) -> dict[str, Any]:
    return {m["model_name"]: m for m in httpx.get(f"{base_url}/list_loaded_models").json()["models"]}


def wait_settled(base_url: str, names: list[str], timeout: float = 240) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        models = loaded(base_url)
        if all(models[n]["state"] in ("ready", "failed") for n in names):
            return models
        time.sleep(0.5)
    raise AssertionError(f"models did not settle: {loaded(base_url)}")


def test_remote_model_management(seed: RunningServer) -> None:
    """The sample as written asks for GPU memory on each model; on this CPU-only machine every one of them is
    refused at load with a message naming ``gpus``, and the server goes on serving its other models. The same
    models without ``gpus`` then load and answer, and are removed again."""
    import requests

    api_url = f"{seed.base_url}/add_model"

    payload = [
        {
            "model_id": "qwen-2-72B",
            "gpus": [22,22,4,0],
            "cache_size": 32768,
        },
        {
            "model_id": "gemma-2-9b",
            "gpus": [0,0,0,12],
            "cache_size": 32768,
        },
        {
            "model_id": "multilingual-e5-large-instruct",
            "gpus": [0,0,0,5],
        },
    ]

    response = requests.post(api_url, json=payload)

    assert response.status_code == 202, response.text
    names = [m["model_name"] for m in response.json()["models"]]
    assert names == ["qwen-2-72B", "gemma-2-9b", "multilingual-e5-large-instruct"]
    models = wait_settled(seed.base_url, names)
    for name in names:
        assert models[name]["state"] == "failed"
        assert "gpus" in json.dumps(models[name]), models[name]
    httpx.post(f"{seed.base_url}/remove_model", json={"model_name": names}, timeout=60).raise_for_status()

    client = OpenAI(base_url=f"{seed.base_url}/v1", api_key="test")
    assert client.chat.completions.create(model="mistral", messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=4).choices[0].message.content

    without_gpus = [{k: v for k, v in item.items() if k != "gpus"} for item in payload]
    response = requests.post(api_url + "?wait=true", json=without_gpus, timeout=300)
    assert response.status_code == 200, response.text
    answer = client.chat.completions.create(model="gemma-2-9b", messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=4)
    assert answer.choices[0].message.content
    assert client.embeddings.create(model="multilingual-e5-large-instruct", input="llamas").data[0].embedding
    httpx.post(f"{seed.base_url}/remove_model", json={"model_name": names}, timeout=60).raise_for_status()
    assert not set(names) & set(loaded(seed.base_url))
