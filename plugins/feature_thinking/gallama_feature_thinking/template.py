"""Thinking templates: validation, the instructions shown to the model, and the grammar of the thinking pass.

A template is an XML document (one root element). It is checked with the standard library's XML parser
(expat, through :mod:`xml.parsers.expat` and :mod:`xml.etree.ElementTree`); a template that is not well-formed
is a 400 that names ``thinking_template`` and repeats the parser's message (with line and column). Comments
(``<!-- Add more steps as needed -->``) and placeholders (``{problem_statement}``) are ordinary XML content and
are shown to the model as written.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from xml.parsers import expat

from gallama_kernel.plugin import Constraint, GrammarBuilder, InvalidRequest

PARAM = "thinking_template"

MAX_TEMPLATE_CHARS = 32_000
"""Longest template accepted (characters, after stripping); a longer one is a 400."""

_START_TAG = re.compile(r"""<[^\s/>]+(?:\s+[^\s=/>]+\s*=\s*(?:"[^"]*"|'[^']*'))*\s*(/?)>""")
"""An XML start tag (attributes allowed) at the start of the text; group 1 is ``/`` for an empty-element tag."""

_TAG = re.compile(r"""<!--.*?-->|<!\[CDATA\[.*?\]\]>|<[?!][^>]*>|<(/?)([^\s/>!?]+)(?:"[^"]*"|'[^']*'|[^>"'])*?(/?)>""",
                  re.DOTALL)
"""Start, end and empty-element tags (groups: ``/`` of an end tag, name, ``/`` of an empty-element tag);
comments, CDATA sections and declarations match with empty groups."""

_UNFINISHED_TAG = re.compile(r"<(?:!--(?:(?!-->).)*|/?(?:[A-Za-z_:][^<>]*)?)\Z", re.DOTALL)
"""A tag or comment that the text ends inside of."""

INSTRUCTIONS = """\
Before you reply, think the request through by filling in the XML template below. Start with {opening}, \
replace the placeholders in braces and the descriptions inside the elements with your own thoughts, repeat \
elements where a comment allows it, and end with {closing}. After {closing}, write your reply to the user in \
plain words, without XML.

{template}"""
"""The text added to the system message (a ``str.format`` pattern: ``template``, ``opening``, ``closing``)."""


@dataclass(frozen=True)
class ThinkingTemplate:
    """A validated thinking template.

    :param source: the template as sent, without leading and trailing whitespace
    :param root: the root element's name as written (with its prefix, if any)
    :param opening: the root's start tag as written (attributes included), e.g. ``<chain_of_thought>``
    """

    source: str
    root: str
    opening: str

    @property
    def closing(self) -> str:
        """The root's end tag: the thinking ends there."""
        return f"</{self.root}>"

    def instructions(self) -> str:
        """What the model is told: the template, and to think by filling it in before its reply."""
        return INSTRUCTIONS.format(template=self.source, opening=self.opening, closing=self.closing)

    def close(self, text: str) -> tuple[str, str]:
        """Complete the thinking ``text`` (what the model wrote after :attr:`opening`).

        :return: ``(kept, suffix)``: the thinking block is ``opening + kept + suffix``. For text that ends with
            :attr:`closing` that is ``(text, "")``. Text cut short (the pass ran out of tokens) loses an
            unfinished tag at its end (``<ste``), and ``suffix`` closes every element still open, the root last,
            so the answer follows a well-formed block.
        """
        if text.endswith(self.closing):
            return text, ""
        kept = _UNFINISHED_TAG.sub("", text)
        stack = [self.root]
        for match in _TAG.finditer(kept):
            end, name, empty = match.groups()
            if empty:
                continue
            if not end:
                stack.append(name)
            elif name in stack[1:]:  # an end tag closes its element and anything left open inside it
                del stack[len(stack) - 1 - stack[::-1].index(name):]
        return kept, "\n" + "\n".join(f"</{name}>" for name in reversed(stack))

    def build_grammar(self, builder: GrammarBuilder) -> str:
        """Grammar rules of the thinking pass: free text up to and including the root's end tag, nothing after."""
        return builder.text_until(self.closing, hint="thinking")

    def constraint(self) -> Constraint:
        """The thinking pass's constraint (see :meth:`build_grammar`); its cache key is the end tag."""
        return Constraint.custom(f"thinking-template:{self.closing}", self.build_grammar,
                                 f"thinking template ending at {self.closing}", param=PARAM)


class _Refused(Exception):
    """Raised inside expat handlers to stop parsing with a message of ours."""


def parse_template(text: str) -> ThinkingTemplate:
    """Validate ``text`` as a thinking template.

    :raises InvalidRequest: (400, ``param="thinking_template"``) for an empty or overlong template, XML that is
        not well-formed (the parser's message, with line and column), a ``<!DOCTYPE>`` (entities and DTDs have
        no place in a template), or an empty root element (``<thinking/>``: nothing to fill in).
    """
    source = text.strip()
    if not source:
        raise InvalidRequest("thinking_template is empty: send an XML template such as "
                             "<thinking><step>...</step></thinking>.", param=PARAM)
    if len(source) > MAX_TEMPLATE_CHARS:
        raise InvalidRequest(f"thinking_template has {len(source)} characters; at most {MAX_TEMPLATE_CHARS} are "
                             "accepted.", param=PARAM)
    root, offset = _root_element(source)
    try:  # namespace-aware parse: also refuses undeclared prefixes
        ElementTree.fromstring(source)
    except ElementTree.ParseError as error:
        raise InvalidRequest(f"thinking_template is not well-formed XML: {error}", param=PARAM) from None
    match = _START_TAG.match(source, offset)
    if match is None:  # not expected for well-formed XML; fall back to the bare tag
        return ThinkingTemplate(source, root, f"<{root}>")
    if match.group(1):
        raise InvalidRequest(f"thinking_template's root element <{root}/> is empty: put the structure the model "
                             f"should fill in inside <{root}>...</{root}>.", param=PARAM)
    return ThinkingTemplate(source, root, match.group(0))


def _root_element(source: str) -> tuple[str, int]:
    """The root element's name as written and the character offset of its start tag (expat, no namespaces)."""
    found: list[tuple[str, int]] = []
    parser = expat.ParserCreate()

    def start(name: str, _attributes: dict[str, str]) -> None:
        if not found:
            found.append((name, parser.CurrentByteIndex))

    def doctype(*_args: object) -> None:
        raise _Refused("thinking_template must not contain a <!DOCTYPE> declaration.")

    parser.StartElementHandler = start
    parser.StartDoctypeDeclHandler = doctype
    try:
        parser.Parse(source, True)
    except expat.ExpatError as error:
        raise InvalidRequest(f"thinking_template is not well-formed XML: {error}", param=PARAM) from None
    except _Refused as error:
        raise InvalidRequest(str(error), param=PARAM) from None
    name, byte_index = found[0]  # a well-formed document has a root element
    return name, len(source.encode()[:byte_index].decode())
