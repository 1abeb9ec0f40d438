"""PromptRenderer: ChatML by default, model templates in a sandbox, template failures become 400s."""

from __future__ import annotations

import json
from datetime import datetime

import pytest
from jinja2 import TemplateSyntaxError

from gallama_kernel.pipeline.prompt import CHATML_TEMPLATE, PromptRenderer
from gallama_kernel.protocol.errors import InvalidRequest

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]


def test_no_template_renders_chatml() -> None:
    renderer = PromptRenderer(None)
    assert not renderer.uses_model_template
    assert renderer.source == CHATML_TEMPLATE
    assert renderer.render(MESSAGES) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n")
    assert renderer.render(MESSAGES, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n")


def test_model_template_gets_special_tokens_and_extra_vars() -> None:
    template = "{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}{{ suffix }}"
    renderer = PromptRenderer(template, {"bos_token": "<s>", "eos_token": "</s>"})
    assert renderer.uses_model_template
    assert renderer.render(MESSAGES, suffix="!") == "<s>[system]Be brief.[user]Hi!"


def test_raise_exception_becomes_invalid_request() -> None:
    template = ("{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation must start with a user "
                "message') }}{% endif %}{{ messages[0]['content'] }}")
    renderer = PromptRenderer(template)
    assert renderer.render([{"role": "user", "content": "ok"}]) == "ok"
    with pytest.raises(InvalidRequest) as caught:
        renderer.render(MESSAGES)
    error = caught.value
    assert error.status == 400
    assert error.param == "messages"
    assert "Conversation must start with a user message" in error.message
    assert error.body()["error"]["type"] == "invalid_request_error"


def test_undefined_access_becomes_invalid_request() -> None:
    renderer = PromptRenderer("{% for m in messages %}{{ m.tool_calls[0].function.name }}{% endfor %}")
    with pytest.raises(InvalidRequest) as caught:
        renderer.render(MESSAGES)
    assert caught.value.status == 400
    assert caught.value.param == "messages"
    assert "chat template failed" in caught.value.message


def test_message_without_content_in_chatml_is_invalid_request() -> None:
    with pytest.raises(InvalidRequest):
        PromptRenderer(None).render([{"role": "user"}])


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__ }}",
    "{% set _ = messages.append({'role': 'x'}) %}",
])
def test_sandbox_refusals_are_invalid_requests(template: str) -> None:
    messages = [dict(m) for m in MESSAGES]
    with pytest.raises(InvalidRequest):
        PromptRenderer(template).render(messages)
    assert messages == MESSAGES


def test_tojson_filter() -> None:
    renderer = PromptRenderer("{{ messages | tojson }}|{{ data | tojson(indent=2) }}|"
                              "{{ data | tojson(sort_keys=true) }}")
    data = {"b": "é", "a": [1, None, True]}
    first, indented, sorted_ = renderer.render(MESSAGES, data=data).split("|")
    assert json.loads(first) == MESSAGES
    assert json.loads(indented) == data
    assert "\n  " in indented
    assert "é" in indented  # not escaped to \\u00e9
    assert sorted_ == '{"a": [1, null, true], "b": "é"}'


def test_loopcontrols_and_strftime_now() -> None:
    template = ("{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}{{ m.content }}"
                "{% break %}{% endfor %}|{{ strftime_now('%Y') }}")
    content, year = PromptRenderer(template).render(MESSAGES).split("|")
    assert content == "Hi"
    assert year == str(datetime.now().year)


def test_syntax_error_is_raised_when_the_template_is_loaded() -> None:
    with pytest.raises(TemplateSyntaxError):
        PromptRenderer("{% for m in messages %}")
