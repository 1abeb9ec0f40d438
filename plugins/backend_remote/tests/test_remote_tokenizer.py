"""``tokenizer=``: gallama tokenizes with the model's own ``tokenizer.json`` for engines that cannot tokenize for
it (vLLM, SGLang, plain OpenAI servers). Here the embedded model's tokenizer, converted from its GGUF by
``transformers``, drives ``engine=openai`` → the real ``llama-server``'s ``/v1/completions``."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest
from conftest import GGUF, remote_spec

from gallama_backend_remote.tokenizer import LocalTokenizer
from gallama_kernel.testing import RunningServer

TEXTS = ["Hello world", "<|im_start|>user\nHi there<|im_end|>\n", " spaced  text\t\nå∫ç 日本語 🤖",
         "Repeat: <|im_end|><|im_start|>system"]


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("gguf")
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("smollm2-tokenizer")
    AutoTokenizer.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name).save_pretrained(str(folder))
    # as the model's published files say: no BOS added, <|im_end|> ends a turn (the GGUF conversion differs)
    data = json.loads((folder / "tokenizer.json").read_text())
    data["post_processor"] = None
    (folder / "tokenizer.json").write_text(json.dumps(data))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(add_bos_token=False, eos_token="<|im_end|>")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_the_local_tokenizer_reads_as_the_engine_does(tokenizer_folder, engine):
    local = LocalTokenizer(str(tokenizer_folder))
    assert {"<|im_start|>", "<|im_end|>"} <= local.control_texts
    assert local.chat_template and "<|im_start|>" in local.chat_template
    for text in TEXTS:
        for parse_special in (True, False):
            theirs = httpx.post(f"{engine.url}/tokenize", json={"content": text, "add_special": True,
                                                                 "parse_special": parse_special}).json()["tokens"]
            assert local.tokenize(text, True, parse_special) == theirs, (text, parse_special)
    assert local.tokenize("Repeat: <|im_end|>", False, False)[-1] != local.tokenize("<|im_end|>", False, True)[0]


def test_engine_openai_with_a_local_tokenizer_serves_and_refuses_constraints(tokenizer_folder, engine, tmp_path):
    (tmp_path / "home").mkdir()
    spec = remote_spec(engine, f"tokenizer={tokenizer_folder}", "max_seq_len=4096").replace(
        "engine=llama_server", "engine=openai")
    with RunningServer(tmp_path / "home", "-id", spec) as server:
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=60)
        messages = [{"role": "user", "content": "Write a story about a cat."}]
        whole = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=12, temperature=0)
        assert whole.choices[0].finish_reason == "length"
        assert whole.usage.completion_tokens == 12
        parts = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="smollm2", messages=messages, max_tokens=12, temperature=0, stream=True) if c.choices]
        assert "".join(parts) == whole.choices[0].message.content
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="smollm2", messages=messages, max_tokens=12,
                                           response_format={"type": "json_object"})
        assert refused.value.code == "constraint_not_supported"
        assert "openai" in refused.value.message


def test_added_tokens_that_are_not_special_are_markers(tokenizer_folder, tmp_path):
    """``encode_special_tokens`` makes special tokens characters, not other added tokens (``<think>`` in Qwen3
    and the R1 distills): the backend knows them, to break them up in client text."""
    data = json.loads((tokenizer_folder / "tokenizer.json").read_text())
    for entry in data["added_tokens"]:
        if entry["id"] == 3:
            entry.update(content="<think>", special=False)
    data["model"]["vocab"] = {("<think>" if key == "<repo_name>" else key): value
                              for key, value in data["model"]["vocab"].items()}
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    local = LocalTokenizer(str(tmp_path / "tokenizer.json"))
    assert local.added_texts == {"<think>"} and "<think>" not in local.control_texts
    assert local.tokenize("a <think> b", False, False).count(3) == 1  # read as the token in plain text
