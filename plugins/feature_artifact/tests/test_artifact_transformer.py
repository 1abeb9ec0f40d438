"""ArtifactTransformer: any chunking of a raw answer gives the same segments, tags never reach the content."""

from __future__ import annotations

import itertools
import re
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from gallama_feature_artifact.grammar import IDENTIFIER_PATTERN, answer_grammar
from gallama_feature_artifact.transformer import ArtifactTransformer
from gallama_kernel.pipeline.plan import SEGMENT

TAGS = ("<answer>", "</answer>", "<text>", "</text>", "<artifact", "</artifact>")

SAMPLE = (
    "<answer><text>Quicksort picks a pivot and sorts the parts around it, so a < b ends up left.</text>\n"
    '<artifact identifier="quicksort-python" type="code" language="python" title="Quicksort in Python">\n'
    "def quicksort(items):\n"
    "    if len(items) < 2:\n"
    "        return items\n"
    "    pivot, *rest = items\n"
    "    return quicksort([x for x in rest if x < pivot]) + [pivot] + quicksort([x for x in rest if x >= pivot])\n"
    "</artifact>\n"
    '<artifact identifier="quicksort-java" type="code" language="java" title="Quicksort in Java">\n'
    "static List<Integer> sort(List<Integer> xs) { return xs.size() < 2 ? xs : merge(xs); } // a </b\n"
    "</artifact>\n\n"
    "<text>Both run in O(n log n) on average.</text></answer>"
)
SAMPLE_SEGMENTS = [
    ({"tag_type": "text"}, "Quicksort picks a pivot and sorts the parts around it, so a < b ends up left."),
    ({"tag_type": "artifact", "artifact_type": "code", "identifier": "quicksort-python",
      "title": "Quicksort in Python", "language": "python"},
     "def quicksort(items):\n    if len(items) < 2:\n        return items\n    pivot, *rest = items\n"
     "    return quicksort([x for x in rest if x < pivot]) + [pivot] + quicksort([x for x in rest if x >= pivot])"),
    ({"tag_type": "artifact", "artifact_type": "code", "identifier": "quicksort-java",
      "title": "Quicksort in Java", "language": "java"},
     "static List<Integer> sort(List<Integer> xs) { return xs.size() < 2 ? xs : merge(xs); } // a </b"),
    ({"tag_type": "text"}, "Both run in O(n log n) on average."),
]


def run(chunks: list[str]) -> list[dict[str, Any]]:
    transformer = ArtifactTransformer()
    deltas: list[dict[str, Any]] = []
    for chunk in chunks:
        deltas += transformer.feed({"content": chunk})
    return deltas + transformer.finish()


def segments(deltas: list[dict[str, Any]]) -> list[tuple[dict[str, Any], str]]:
    """(meta, content) per segment, as the kernel splits a non-streamed response into choices."""
    found: list[list[Any]] = []
    for delta in deltas:
        assert "artifact_meta" in delta, delta
        if delta.get(SEGMENT):
            found.append([delta["artifact_meta"], ""])
        assert found, "content before the first segment"
        assert delta["artifact_meta"] == found[-1][0]
        found[-1][1] += delta.get("content") or ""
    return [(meta, text) for meta, text in found]


def split(text: str, cuts: list[int]) -> list[str]:
    points = sorted({c % (len(text) + 1) for c in cuts} | {0, len(text)})
    return [text[a:b] for a, b in itertools.pairwise(points)]


def layout(body: str) -> str:
    """What a body reads as: one line break after the opening and one before the closing tag are dropped."""
    body = body.removeprefix("\n")
    return body.removesuffix("\n")


@given(st.lists(st.integers(min_value=0, max_value=len(SAMPLE)), max_size=60))
@settings(max_examples=300, deadline=None)
def test_any_chunking_gives_the_same_segments(cuts: list[int]) -> None:
    deltas = run(split(SAMPLE, cuts))
    assert segments(deltas) == SAMPLE_SEGMENTS
    for delta in deltas:
        assert not any(tag in delta["content"] for tag in TAGS), delta


def test_every_character_alone() -> None:
    assert segments(run(list(SAMPLE))) == SAMPLE_SEGMENTS
    assert segments(run([SAMPLE])) == SAMPLE_SEGMENTS


def test_sample_is_a_valid_answer() -> None:
    assert answer_grammar().matches(SAMPLE)


PIECES = ["a", "x y", " ", "\n", "<", ">", "/", "</", "<t", "</tex", "</artifac", "text", "artifact", "answer",
          "List<int>", "a < b", "if (a<b) {}", "é", "\t", '"', "<div>", "</div>"]
FORMAT_TAG = re.compile(r"<(answer|text|artifact)[ \t\r\n>]|</(answer|text|artifact)>")
BODY = st.lists(st.sampled_from(PIECES), max_size=12).map("".join).filter(
    lambda body: not FORMAT_TAG.search(body) and not any(tag in body for tag in TAGS))
SEPARATOR = st.sampled_from(["", " ", "\n", "\n\n", " \n"])
VALUE = st.text(st.characters(blacklist_characters='"<>\r\n', blacklist_categories=("Cs", "Cc")),
                min_size=1, max_size=20)


@st.composite
def answers(draw: st.DrawFn) -> tuple[str, list[tuple[dict[str, Any], str]]]:
    """A raw answer the grammar accepts, with the segments it must read as."""
    raw, expected = "<answer>", []
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        raw += draw(SEPARATOR)
        body = draw(BODY)
        if draw(st.booleans()):
            raw += f"<text>{body}</text>"
            expected.append(({"tag_type": "text"}, layout(body)))
        else:
            meta = {"tag_type": "artifact", "artifact_type": draw(st.sampled_from(["code", "self_contained_text"])),
                    "identifier": draw(st.from_regex(IDENTIFIER_PATTERN, fullmatch=True)),
                    "title": draw(VALUE), "language": draw(st.one_of(st.just(""), VALUE))}
            raw += (f'<artifact identifier="{meta["identifier"]}" type="{meta["artifact_type"]}" '
                    f'language="{meta["language"]}" title="{meta["title"]}">{body}</artifact>')
            expected.append((meta, layout(body)))
    return raw + draw(SEPARATOR) + "</answer>", expected


@given(answers(), st.lists(st.integers(min_value=0, max_value=2000), max_size=40))
@settings(max_examples=300, deadline=None)
def test_generated_answers_any_chunking(answer: tuple[str, list[Any]], cuts: list[int]) -> None:
    raw, expected = answer
    deltas = run(split(raw, cuts))
    assert segments(deltas) == expected
    assert segments(run([raw])) == expected
    for delta in deltas:
        assert not any(tag in delta["content"] for tag in TAGS), delta


@given(answers())
@settings(max_examples=25, deadline=None)
def test_generated_answers_match_the_grammar(answer: tuple[str, list[Any]]) -> None:
    assert answer_grammar().matches(answer[0])


def test_angle_brackets_in_code_are_content() -> None:
    raw = ('<answer><artifact identifier="generic" type="code" language="java" title="Generics">'
           "Map<String, List<Integer>> m; if (a <b && c</d) {} <text>x</text></artifact></answer>")
    [(meta, text)] = segments(run(list(raw)))
    assert meta["identifier"] == "generic"
    assert text == "Map<String, List<Integer>> m; if (a <b && c</d) {} <text>x</text>"


def test_other_deltas_pass_through_with_meta() -> None:
    transformer = ArtifactTransformer()
    call = {"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}
    assert transformer.feed(call) == [{**call, "artifact_meta": {"tag_type": "text"}}]
    transformer.feed({"content": '<answer><artifact identifier="a" type="code" language="c" title="t">'})
    out = transformer.feed({"reasoning_content": "hm", "content": "int x;"})
    assert out[0] == {"reasoning_content": "hm", "artifact_meta": transformer.meta}
    assert out[1]["content"] == "int x;"


def test_annotate_carries_the_current_meta() -> None:
    transformer = ArtifactTransformer()
    assert transformer.annotate({"role": "assistant", "content": ""}) == {
        "role": "assistant", "content": "", "artifact_meta": {"tag_type": "text"}}
    assert transformer.annotate({}) == {"content": "", "artifact_meta": {"tag_type": "text"}}
    transformer.feed({"content": '<answer><artifact identifier="a-b" type="self_contained_text" language="" '
                                 'title="Poem">roses'})
    closing = transformer.annotate({})
    assert closing["content"] == ""
    assert closing["artifact_meta"] == {"tag_type": "artifact", "artifact_type": "self_contained_text",
                                        "identifier": "a-b", "title": "Poem", "language": ""}


def test_truncated_answer_drops_the_partial_tag() -> None:
    deltas = run(['<answer><artifact identifier="a" type="code" language="c" title="t">\nint x;\n</arti'])
    assert segments(deltas)[-1][1] == "int x;\n"
    deltas = run(["<answer><text>a <"])
    assert segments(deltas) == [({"tag_type": "text"}, "a <")]
    deltas = run(["<answer><text>done</text><arti"])
    assert segments(deltas) == [({"tag_type": "text"}, "done")]


def test_empty_output_is_one_empty_text_segment() -> None:
    assert segments(run([])) == [({"tag_type": "text"}, "")]


def test_text_outside_the_tags_is_an_implicit_text_segment() -> None:
    deltas = run(["Hello <b>world</b>", "<answer><text>hi</text></answer> bye"])
    assert segments(deltas) == [({"tag_type": "text"}, "Hello <b>world</b>"), ({"tag_type": "text"}, "hi"),
                                ({"tag_type": "text"}, "bye")]
