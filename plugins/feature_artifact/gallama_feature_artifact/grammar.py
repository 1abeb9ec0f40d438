"""The grammar of an artifact-mode answer, and the grammar of the planning pass of ``Slow`` mode (after
``<plan>``: one to eight bullet lines ``- …`` of at most 120 characters without ``<``, then ``</plan>``).

An answer is::

    <answer>
    <text>prose</text>
    <artifact identifier="quicksort-python" type="code" language="python" title="Quicksort in Python">
    code
    </artifact>
    </answer>

``<answer>`` holds one or more segments, text or artifact, in any order, with at most a little whitespace
between them. Each body is free text that ends at the first closing tag of its own kind (a lazy lexeme), so a
body can never contain its closing tag early. Prose never contains a tag of the format (``<text …>``,
``<artifact …>``, ``<answer…>`` and their closing tags); an artifact body never contains ``<answer…>``,
``</answer>`` or ``<artifact …>`` but may contain ``<text>`` (SVG, XML). Any other ``<`` (``a < b``,
``List<int>``, HTML) is allowed. The attributes of ``<artifact>`` come in a fixed order: ``identifier``
(kebab-case), ``type`` (``code`` or ``self_contained_text``), ``language`` (may be empty) and ``title``;
values hold no quotes, angle brackets or line breaks and are bounded in length.
"""

from __future__ import annotations

from gallama_kernel.plugin import (
    Constraint,
    Grammar,
    GrammarBuilder,
    compile_constraint,
    escape_regex,
    literal,
    regex_literal,
)

ARTIFACT_TYPES = ("code", "self_contained_text")
"""Values of the ``type`` attribute."""

IDENTIFIER_PATTERN = r"[a-z0-9]{1,24}(-[a-z0-9]{1,24}){0,7}"
"""Kebab-case identifier: lowercase words of letters and digits joined by single hyphens (at most 8 words)."""

LANGUAGE_PATTERN = r"[^\x22<>\r\n]{1,32}"
"""A ``language`` value (the attribute may also be empty): no quote, angle bracket or line break."""

TITLE_PATTERN = r"[^\x22<>\r\n]{1,80}"
"""A ``title`` value: no quote, angle bracket or line break, 1 to 80 characters."""

SEPARATOR_PATTERN = r"[ \t\r\n]{1,4}"
"""Whitespace allowed between segments (bounded, so a model cannot loop on blank lines)."""

ANY = r"(.|\n)*"
"""Any text, newlines included (both regex dialects)."""

TAG_END = r"[ \t\r\n>]"
"""What follows a tag name when it really opens a tag (``<artifacts`` or ``<textarea`` is just text)."""

TEXT_FORBIDDEN = (f"<answer{TAG_END}", escape_regex("</answer>"), f"<text{TAG_END}", f"<artifact{TAG_END}",
                  escape_regex("</artifact>"))
"""Patterns a text body never contains: no tag of the format (with or without attributes) appears in prose."""

ARTIFACT_FORBIDDEN = (f"<answer{TAG_END}", escape_regex("</answer>"), f"<artifact{TAG_END}")
"""Patterns an artifact body never contains. ``<text>`` and ``</text>`` stay allowed: they are SVG/XML."""

ANSWER_KEY = "gallama-feature-artifact/answer/v3"
PLAN_KEY = "gallama-feature-artifact/plan/v2"
PLAN_OPEN = "<plan>\n"
PLAN_CLOSE = "</plan>"
PLAN_LINE_PATTERN = r"- [^\r\n<]{1,120}\n"
"""One line of the plan of ``Slow`` mode: a bullet point of at most 120 characters."""
PLAN_MAX_LINES = 8


def build_answer(builder: GrammarBuilder) -> str:
    """Add the rules of an artifact answer to ``builder``; return the start expansion."""
    separator = builder.terminal("artifact_separator", SEPARATOR_PATTERN)
    identifier = builder.terminal("artifact_identifier", IDENTIFIER_PATTERN)
    language = builder.terminal("artifact_language", LANGUAGE_PATTERN)
    title = builder.terminal("artifact_title", TITLE_PATTERN)
    text_body = text_until_without(builder, "</text>", TEXT_FORBIDDEN, "text_body")
    artifact_body = text_until_without(builder, "</artifact>", ARTIFACT_FORBIDDEN, "artifact_body")
    kinds = " | ".join(literal(kind) for kind in ARTIFACT_TYPES)
    text_segment = builder.rule("text_segment", f"{literal('<text>')} {text_body}")
    artifact_segment = builder.rule("artifact_segment", " ".join([
        literal('<artifact identifier="'), identifier,
        literal('" type="'), f"({kinds})",
        literal('" language="'), f"{language}?",
        literal('" title="'), title,
        literal('">'), artifact_body,
    ]))
    segment = builder.rule("segment", f"{text_segment} | {artifact_segment}")
    return f"{literal('<answer>')} ({separator}? {segment})+ {separator}? {literal('</answer>')}"


def text_until_without(builder: GrammarBuilder, marker: str, forbidden: tuple[str, ...], hint: str) -> str:
    """Like ``builder.text_until(marker)`` (free text up to and including the first ``marker``), but the text
    never contains a match of a ``forbidden`` regex: for llguidance a lazy lexeme intersected with the
    complement of "contains a forbidden pattern", for Python's Lark a negative look-ahead at every character.
    """
    name = builder.fresh(hint)
    end = escape_regex(marker)
    banned = "|".join(forbidden)
    guidance = f"{regex_literal(ANY + end)} & ~{regex_literal(f'{ANY}({banned}){ANY}')}"
    python = regex_literal(f"((?!{end}|{banned})(.|\\n))*{end}")
    builder.lazy[name] = (guidance, python)
    return name


def build_plan(builder: GrammarBuilder) -> str:
    """Add the rules of the planning pass; return the start: 1 to :data:`PLAN_MAX_LINES` bullet lines, then
    ``</plan>``. Bounded, so the plan always ends; without ``<``, so it holds no tags."""
    line = builder.terminal("plan_line", PLAN_LINE_PATTERN)
    return " ".join([line, *[f"{line}?"] * (PLAN_MAX_LINES - 1), literal(PLAN_CLOSE)])


def answer_constraint() -> Constraint:
    """The constraint of an artifact-mode answer."""
    return Constraint.custom(ANSWER_KEY, build_answer, "artifact answer", param="artifact")


def plan_constraint() -> Constraint:
    """The constraint of the planning pass of ``Slow`` mode."""
    return Constraint.custom(PLAN_KEY, build_plan, "artifact plan", param="artifact")


def answer_grammar() -> Grammar:
    """The compiled answer grammar, as the kernel compiles it for a request (cached)."""
    return compile_constraint(answer_constraint())
