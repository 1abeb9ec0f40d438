"""The prompts of artifact mode: a system prompt with the format's rules and one example exchange.

The system prompt is appended to the request's system message (or opens the conversation as one). The example
exchange (a question and an answer in artifact format) is placed right before the conversation, so even a
small model sees the format used once, closing tags included.
"""

from __future__ import annotations

from typing import Any

from gallama_kernel.plugin import add_system_text

ANSWER_FORMAT = """\
Reply in artifact format. It separates what you say to the user from artifacts: self-contained pieces \
of content the user may want to copy, save, run or reuse, such as source code, a script, a configuration \
file, a document, a letter or a poem.

Your whole reply is one <answer> element holding <text> and <artifact> elements, as many as needed, in any \
order (at least one):

<answer>
<text>prose for the user</text>
<artifact identifier="kebab-case-name" type="code" language="python" title="Short title">
the content, as is
</artifact>
</answer>

Rules:
- <text> holds prose for the user (explanations, short remarks). Do not put code blocks in it.
- Each <artifact> holds exactly one self-contained piece of content, written as is, without markdown fences.
- Attributes of <artifact>, in this order:
  identifier: a short kebab-case name, unique within the reply (lowercase words joined by hyphens: \
"quicksort-java");
  type: "code" for source code, scripts and configuration; "self_contained_text" for any other standalone \
text (documents, essays, letters, poems);
  language: the programming language of code (python, java, bash, …) or the format of text (markdown, \
plain);
  title: a short human-readable title.
  Attribute values contain no double quotes and no line breaks.
- Close every element: </text>, </artifact>, and </answer> at the end.
- Write a separate artifact for each file, program or document, for example one per programming language.
- A reply that needs no artifact is a single <text> element."""

PLANNING = """\
Before the reply, you think it through in a private plan that the user never sees: after <plan>, write a \
few short bullet lines (each starting with "- ", at most 8) saying what the text must say and which \
artifacts the reply needs, with their identifier, type, language and title, in order; then close the plan \
with </plan> and write the reply in artifact format."""

EXAMPLE_QUESTION = "In one line, what is binary search? Write it in Python."

EXAMPLE_PLAN = """\
<plan>
- text: one line on binary search
- artifact: binary-search-python, code, python, "Binary search in Python"
- text: its cost
</plan>
"""

EXAMPLE_ANSWER = """\
<answer>
<text>Binary search finds a value in a sorted list by halving the range it looks at, step by step.</text>
<artifact identifier="binary-search-python" type="code" language="python" title="Binary search in Python">
def binary_search(items, value):
    low, high = 0, len(items) - 1
    while low <= high:
        middle = (low + high) // 2
        if items[middle] == value:
            return middle
        if items[middle] < value:
            low = middle + 1
        else:
            high = middle - 1
    return -1
</artifact>
<text>It needs O(log n) comparisons.</text>
</answer>"""


def system_prompt(mode: str) -> str:
    """The system prompt for ``mode`` (``Fast`` or ``Slow``)."""
    return ANSWER_FORMAT if mode != "Slow" else f"{ANSWER_FORMAT}\n\n{PLANNING}"


def example_exchange(mode: str) -> list[dict[str, Any]]:
    """One question and its answer in artifact format (with its plan in ``Slow`` mode)."""
    answer = f"{EXAMPLE_PLAN}{EXAMPLE_ANSWER}" if mode == "Slow" else EXAMPLE_ANSWER
    return [{"role": "user", "content": EXAMPLE_QUESTION}, {"role": "assistant", "content": answer}]


def with_prompts(messages: list[dict[str, Any]], mode: str) -> list[dict[str, Any]]:
    """``messages`` with the system prompt added and the example exchange placed before the conversation.

    The example goes after the system message and only when the conversation then opens with a user message,
    so the roles keep alternating as chat templates expect.
    """
    messages = add_system_text(messages, system_prompt(mode))
    start = next((i for i, m in enumerate(messages) if m["role"] != "system"), len(messages))
    if start < len(messages) and messages[start]["role"] == "user":
        messages = [*messages[:start], *example_exchange(mode), *messages[start:]]
    return messages
