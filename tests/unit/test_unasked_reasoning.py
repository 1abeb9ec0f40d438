"""A free answer that opens a reasoning block unasked (:class:`UnaskedReasoning`): the block is reasoning, the
rest the answer, whatever the chunking; and the vocabulary recognises a syntax the template does not name."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gallama_kernel.pipeline.reasoning import HARMONY, ReasoningSyntax, UnaskedReasoning, detect

THINK = ReasoningSyntax("<think>", "</think>")

CASES = [
    ("<think>\nStep one.\n</think>\n\nSix.", "Step one.", "Six."),
    ("  <think> add 3 and 3 </think> formula", "add 3 and 3", "formula"),
    ("<think>never ended", "never ended", ""),
    ("<think>a </thin b</think>c", "a </thin b", "c"),
    ("<think></think>", "", ""),
    ("Plain answer with <think> inside.", "", "Plain answer with <think> inside."),
    ("<thin", "", "<thin"),
    ("  ", "", "  "),
    ("", "", ""),
    ("<think>x</think>  \n", "x", ""),
    ("<think>a\n\n</think>b </think> c", "a", "b </think> c"),
]


def split(text: str, cuts: list[int], include: bool = True) -> tuple[str, str, UnaskedReasoning]:
    reader = UnaskedReasoning(THINK, include)
    deltas = []
    start = 0
    for cut in [*sorted({min(c, len(text)) for c in cuts}), len(text)]:
        deltas += reader.feed(text[start:cut])
        start = cut
    deltas += reader.finish()
    reasoning = "".join(d.get("reasoning_content", "") for d in deltas)
    content = "".join(d.get("content", "") for d in deltas)
    assert all(len(d) == 1 and next(iter(d.values())) for d in deltas), deltas
    return reasoning, content, reader


@pytest.mark.parametrize(("text", "reasoning", "content"), CASES)
def test_the_block_is_reasoning_and_the_rest_the_answer(text: str, reasoning: str, content: str) -> None:
    assert split(text, [])[:2] == (reasoning, content)
    for cut in range(len(text) + 1):
        assert split(text, [cut])[:2] == (reasoning, content), cut
    assert split(text, list(range(len(text))))[:2] == (reasoning, content)


@given(st.sampled_from(CASES), st.lists(st.integers(0, 40), max_size=8))
def test_any_chunking_reads_the_same(case: tuple[str, str, str], cuts: list[int]) -> None:
    text, reasoning, content = case
    assert split(text, cuts)[:2] == (reasoning, content)


def test_hidden_reasoning_is_still_read_and_counted() -> None:
    reasoning, content, reader = split("<think>secret</think>answer", [3, 9], include=False)
    assert (reasoning, content, reader.reasoning, reader.opened) == ("", "answer", "secret", True)
    assert not split("answer", [])[2].opened


def test_the_vocabulary_names_a_syntax_the_template_does_not() -> None:
    older_r1 = "{{ message.content.split('</think>')[-1] }}"  # names only the end marker
    assert detect(older_r1) is None
    assert detect(older_r1, vocabulary=frozenset({"<think>", "</think>", "<|im_end|>"})) == THINK
    assert detect(None, vocabulary=frozenset({"<think>"})) is None  # both markers, or none
    assert detect(None, vocabulary=frozenset({"<|channel|>", "<|message|>", "<|end|>"})) == HARMONY
    assert detect(None, "none", vocabulary=frozenset({"<think>", "</think>"})) is None  # the key decides
    assert detect("<seed:think></seed:think>", vocabulary=frozenset({"<think>", "</think>"})).start == "<seed:think>"
