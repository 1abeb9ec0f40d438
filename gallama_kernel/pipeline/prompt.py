"""Chat prompts rendered with the model's own Jinja template (ChatML when the model has none)."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..protocol.errors import InvalidRequest

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class TemplateRaised(Exception):
    """``raise_exception`` inside a chat template: the conversation does not fit the template."""


def _raise(message: str) -> None:
    raise TemplateRaised(message)


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, sort_keys: bool = False) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


class PromptRenderer:
    """Compiles a chat template once; renders conversations into prompt text."""

    def __init__(self, template: str | None, special_tokens: dict[str, str] | None = None) -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        env.filters["tojson"] = _tojson
        self.source = template or CHATML_TEMPLATE
        self.uses_model_template = template is not None
        self._template = env.from_string(self.source)
        self._special = special_tokens or {}

    def render(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
               **extra: Any) -> str:
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **self._special, **extra)
        except TemplateRaised as error:
            raise InvalidRequest(f"The conversation does not fit the model's chat template: {error}",
                                 param="messages") from None
        except (TemplateError, TypeError, ValueError, KeyError, AttributeError) as error:
            # model templates index messages freely; a conversation they cannot handle is the client's to fix
            raise InvalidRequest(f"The chat template failed on this conversation: {error}",
                                 param="messages") from None
