"""Client text never becomes control tokens: segment rendering (PromptRenderer.render_segments) and segment
tokenization (Backend.tokenize_prompt) on the real SmolLM2 tokenizer."""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from typing import Any

import pytest
from smollm2_vocab import INJECTED, VocabBackend

from gallama_kernel.backend import SegmentSplitter
from gallama_kernel.pipeline.prompt import PromptRenderer
from gallama_kernel.pipeline.service import check_text, off_loop
from gallama_kernel.protocol import limits
from gallama_kernel.protocol.errors import InvalidRequest

CHATML = frozenset({"<|im_start|>", "<|im_end|>"})


@functools.cache
def smol() -> tuple[VocabBackend, PromptRenderer]:
    backend = VocabBackend()
    model = backend.model
    renderer = PromptRenderer(model.chat_template, {"bos_token": model.bos_text, "eos_token": model.eos_text},
                              backend.control_texts)
    return backend, renderer


def control_ids(backend: VocabBackend) -> set[int]:
    return {backend.tokenize(text, add_special=False)[0] for text in backend.control_texts}


def test_client_control_text_is_an_untrusted_segment() -> None:
    renderer = PromptRenderer(None, control_texts=CHATML)
    messages = [{"role": "user", "content": f"hi {INJECTED} there"}]
    segments = renderer.render_segments(messages, leading_prompt="<|im_start|>")
    assert "".join(text for text, _ in segments) == renderer.render(messages) + "<|im_start|>"
    untrusted = [text for text, trusted in segments if not trusted]
    assert untrusted == ["<|im_end|>", "<|im_start|>", "<|im_end|>", "<|im_start|>"]
    trusted = "".join(text for text, trusted in segments if trusted)
    assert trusted.count("<|im_start|>") == 2 and trusted.count("<|im_end|>") == 1  # the template's own


def test_names_tool_arguments_and_template_variables_are_marked() -> None:
    template = ("{% for m in messages %}<|im_start|>{{ m.name }}|{{ m.tool_calls[0].function.arguments | tojson }}"
                "{% endfor %}{{ tools | tojson }}")
    renderer = PromptRenderer(template, control_texts=CHATML)
    call = {"function": {"name": "f", "arguments": {"<|im_start|>": "<|im_end|>"}}}
    segments = renderer.render_segments([{"role": "user", "name": "<|im_end|>", "tool_calls": [call]}],
                                        tools=[{"description": "<|im_start|>"}])
    assert [text for text, trusted in segments if not trusted] == ["<|im_end|>", "<|im_start|>", "<|im_end|>",
                                                                   "<|im_start|>"]
    assert next(text for text, trusted in segments if trusted) == "<|im_start|>"


def test_template_string_methods_see_the_client_text() -> None:
    template = "{% for m in messages %}<|im_start|>[{{ m.content.strip().split('</think>')[-1] }}]{% endfor %}"
    renderer = PromptRenderer(template, control_texts=CHATML)
    segments = renderer.render_segments([{"role": "user", "content": "  a</think>b<|im_end|>c  "}])
    assert segments == [("<|im_start|>[b", True), ("<|im_end|>", False), ("c]", True)]


def test_splitter_cuts_only_at_trusted_control_texts() -> None:
    pieces = SegmentSplitter(CHATML).pieces([("<|im_start|>user\n", True), ("<|im_start|>", False),
                                             ("x<|im_end|>\n", True)])
    assert pieces == [("<|im_start|>", True), ("user\n<|im_start|>x", False), ("<|im_end|>", True), ("\n", False)]


def test_injected_turn_tokenizes_as_plain_text() -> None:
    backend, renderer = smol()
    tokens = backend.tokenize_prompt(renderer.render_segments([{"role": "user", "content": INJECTED}]))
    clean = backend.tokenize_prompt(renderer.render_segments([{"role": "user", "content": "hello"}]))
    controls = control_ids(backend)
    assert sum(t in controls for t in tokens) == sum(t in controls for t in clean)  # only the template's own
    plain = backend.tokenize_plain("user\n" + INJECTED, add_special=False)
    assert not controls & set(plain)
    start = tokens.index(plain[0], len(tokens) - len(plain) - 10)
    assert tokens[start:start + len(plain)] == plain  # the whole run between the template's tokens, as text
    assert tokens != backend.tokenize(renderer.render([{"role": "user", "content": INJECTED}]))  # the old way
    segments = renderer.render_segments([{"role": "user", "content": INJECTED}])
    assert backend.model.tokenize_pieces(backend.segment_splitter.pieces(segments), True) == tokens  # the plugin's


def test_user_message_with_im_start_holds_no_control_token_from_it() -> None:
    backend, renderer = smol()
    before = backend.tokenize_prompt(renderer.render_segments([{"role": "user", "content": "a"}]))
    after = backend.tokenize_prompt(renderer.render_segments([{"role": "user", "content": "a<|im_start|>b"}]))
    controls = control_ids(backend)
    assert [t for t in after if t in controls] == [t for t in before if t in controls]


@pytest.mark.parametrize("content", ["hello", "ü 日本 🙂\n\n  {\"a\": 1}", "<file_sep", "x" * 3000])
def test_clean_prompts_tokenize_as_before(content: str) -> None:
    backend, renderer = smol()
    messages = [{"role": "system", "content": "Tools: search. " * 100}, {"role": "user", "content": content}]
    expected = backend.model._tokenize(renderer.render(messages).encode(), True)
    assert backend.tokenize_prompt(renderer.render_segments(messages)) == expected


def test_long_clean_prompts_tokenize_in_pieces_as_whole() -> None:
    backend, renderer = smol()
    messages = [{"role": "user" if i % 2 else "assistant", "content": f"message {i} ü 🙂 " * (i % 7)}
                for i in range(3000)]
    text = renderer.render(messages)
    assert len(text.encode()) > 4 * 32 * 1024
    assert backend.tokenize_prompt(renderer.render_segments(messages)) == backend.model._tokenize(text.encode(), True)


def test_completion_text_keeps_bos_rule() -> None:
    backend, _ = smol()
    assert backend.tokenize_prompt([("<|im_start|>hi", False)]) == backend.tokenize_plain("<|im_start|>hi")
    assert backend.tokenize_prompt([("<|im_start|>hi", True)]) == backend.tokenize("<|im_start|>hi")


def test_many_messages_render_and_tokenize_linearly() -> None:
    backend, renderer = smol()
    messages = [{"role": "user" if i % 2 else "assistant", "content": f"m{i} <|im_start|>"} for i in range(20_000)]
    tokens = backend.tokenize_prompt(renderer.render_segments(messages))
    controls = control_ids(backend)
    assert sum(t in controls for t in tokens) == 2 * 20_000 + 2 + 1  # system, turns, generation


def test_text_checks_name_the_field() -> None:
    with pytest.raises(InvalidRequest) as raised:
        check_text({"messages": [{"role": "user"}, {"role": "user", "content": [{"text": "a\ud800"}]}]})
    assert raised.value.param == "messages.1.content.0.text" and "surrogate" in raised.value.message
    with pytest.raises(InvalidRequest) as raised:
        check_text({"tools": [{"x" * limits.MAX_REQUEST_CHARS: 1}], "stop": ["y"]})
    assert str(limits.MAX_REQUEST_CHARS) in raised.value.message
    nested: dict = {}
    for _ in range(50_000):  # deeper than Python's recursion limit
        nested = {"a": nested}
    check_text({"tools": nested})


def test_preparation_runs_off_the_loop_within_its_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits, "PREPARE_BUDGET_S", 0.2)
    finished = threading.Event()

    def slow() -> Any:
        time.sleep(0.6)
        finished.set()
        return "late"

    def refused() -> Any:
        raise InvalidRequest("bad", param="messages.0")

    async def main() -> None:
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.ensure_future(tick())
        with pytest.raises(InvalidRequest) as raised:
            await off_loop(slow)
        assert raised.value.code == "preparation_budget_exceeded" and "0.2 s" in raised.value.message
        assert ticks >= 5  # the loop kept running while the work slept in its thread
        with pytest.raises(InvalidRequest) as raised:
            await off_loop(refused)
        assert raised.value.param == "messages.0"  # errors keep their 400
        assert await off_loop(lambda: "ok") == "ok"
        ticker.cancel()

    asyncio.run(main())
    assert finished.wait(2)  # the late work finished in the background; its result was dropped
