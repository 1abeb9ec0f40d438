"""Chat prompts rendered with the model's own Jinja template (ChatML when the model has none)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..backend import PromptSegment
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


_MARKERS = 0x100000  # Supplementary Private Use Area-B: one character stands for one control-token text


class ClientText:
    """Keeps client text from becoming control tokens when a template renders it.

    Every control-token text (``<|im_start|>``…) inside a client string is replaced, before rendering, by one
    private-use character that stands for it; after rendering, each such character becomes an untrusted
    segment holding that text again. The template sees the client's strings otherwise unchanged (``strip``,
    ``split``, ``tojson`` work as before) and its own markup stays trusted. Client text that itself holds those
    private-use characters (U+100000…) has them read back as the control texts they stand for, untrusted.
    """

    def __init__(self, control_texts: Iterable[str]) -> None:
        texts = sorted({t for t in control_texts if t}, key=lambda t: (-len(t), t))
        self._marker = {text: chr(_MARKERS + i) for i, text in enumerate(texts)}
        self._text = {marker: text for text, marker in self._marker.items()}
        self._find = re.compile("|".join(re.escape(t) for t in texts)) if texts else None
        self._split = re.compile("([" + "".join(self._text) + "]+)") if texts else None

    def mark(self, value: Any) -> Any:
        """``value`` (strings, and lists and dicts of them, keys included) with control texts replaced."""
        if self._find is None:
            return value
        if isinstance(value, str):
            return self._find.sub(lambda m: self._marker[m.group()], value)
        if isinstance(value, list | tuple):
            return [self.mark(item) for item in value]
        if isinstance(value, dict):
            return {self.mark(k) if isinstance(k, str) else k: self.mark(v) for k, v in value.items()}
        return value

    def segments(self, rendered: str) -> list[PromptSegment]:
        """Rendered text as (text, trusted) segments: the markers become untrusted control texts."""
        if self._split is None:
            return [(rendered, True)] if rendered else []
        out: list[PromptSegment] = []
        for index, part in enumerate(self._split.split(rendered)):
            if not part:
                continue
            if index % 2:
                out.append(("".join(self._text[c] for c in part), False))
            else:
                out.append((part, True))
        return out


class PromptRenderer:
    """Compiles a chat template once; renders conversations into prompt text."""

    def __init__(self, template: str | None, special_tokens: dict[str, str] | None = None,
                 control_texts: Iterable[str] = ()) -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        env.filters["tojson"] = _tojson
        self.source = template or CHATML_TEMPLATE
        self.uses_model_template = template is not None
        self._template = env.from_string(self.source)
        self._special = special_tokens or {}
        self.client_text = ClientText(control_texts)

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

    def render_segments(self, messages: list[dict[str, Any]], *, leading_prompt: str = "", opening: str = "",
                        add_generation_prompt: bool = True, **extra: Any) -> list[PromptSegment]:
        """The prompt as (text, trusted) segments: the messages, ``extra`` template variables (tools…) and
        ``leading_prompt`` are client text, never read as control tokens; the template's own markup and
        ``opening`` (a plugin's, after ``leading_prompt``) are trusted."""
        mark = self.client_text.mark
        rendered = self.render(mark(messages), add_generation_prompt=add_generation_prompt,
                               **{key: mark(value) for key, value in extra.items()})
        return self.client_text.segments(rendered + mark(leading_prompt)) + ([(opening, True)] if opening else [])
