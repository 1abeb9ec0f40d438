"""StopMatcher: stop strings never leak, whatever the chunking of the generated text."""

from __future__ import annotations

import itertools

from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from gallama_kernel.pipeline.stops import StopMatcher

ALPHABET = "ab<>/"  # small, so that stop strings and their prefixes occur often
texts = st.text(alphabet=ALPHABET, max_size=40)
stop_lists = st.lists(st.text(alphabet=ALPHABET, min_size=1, max_size=5), max_size=4)


@st.composite
def chunkings(draw: st.DrawFn, text: str) -> list[str]:
    cuts = sorted(draw(st.sets(st.integers(min_value=0, max_value=len(text)), max_size=len(text) + 1)))
    edges = [0, *cuts, len(text)]
    return [text[a:b] for a, b in itertools.pairwise(edges)]  # may include empty chunks


def run(stops: list[str], chunks: list[str]) -> tuple[list[str], bool]:
    """Feed the chunks like a backend does; return what was emitted (flush included) and whether it stopped."""
    matcher = StopMatcher(stops)
    emitted: list[str] = []
    for chunk in chunks:
        out, stopped = matcher.feed(chunk)
        emitted.append(out)
        if stopped:
            return emitted, True
    emitted.append(matcher.flush())
    return emitted, False


def first_stop(text: str, stops: list[str]) -> int:
    """Index of the earliest occurrence of any stop string, or -1."""
    return min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)


def no_stop_is_substring_of_another(stops: list[str]) -> bool:
    stops = [s for s in set(stops) if s]
    return not any(a != b and a in b for a in stops for b in stops)


def assert_no_leak(emitted: list[str], stops: list[str]) -> None:
    for stop in filter(None, stops):
        for piece in emitted:
            assert stop not in piece
        assert stop not in "".join(emitted)


@settings(max_examples=400, deadline=None)
@given(data=st.data(), text=texts, stops=stop_lists)
@example(data=None, text="ab</s>ba", stops=["</s>"])
def test_emitted_text_is_text_cut_at_first_stop(data: st.DataObject | None, text: str, stops: list[str]) -> None:
    assume(no_stop_is_substring_of_another(stops))
    chunks = data.draw(chunkings(text)) if data is not None else ["ab<", "/", "s>b", "a"]
    emitted, stopped = run(stops, chunks)
    cut = first_stop(text, stops)
    expected = text[:cut] if cut >= 0 else text
    assert "".join(emitted) == expected
    assert stopped == (cut >= 0)
    assert_no_leak(emitted, stops)


@settings(max_examples=400, deadline=None)
@given(data=st.data(), text=texts, stops=stop_lists)
def test_no_leak_for_any_stop_set(data: st.DataObject, text: str, stops: list[str]) -> None:
    """Even when one stop string contains another: nothing leaks, output is a prefix, nothing is lost."""
    emitted, stopped = run(stops, data.draw(chunkings(text)))
    joined = "".join(emitted)
    assert text.startswith(joined)
    assert_no_leak(emitted, stops)
    cut = first_stop(text, stops)
    assert stopped == (cut >= 0)
    if cut < 0:
        assert joined == text


@settings(max_examples=200, deadline=None)
@given(text=texts, stops=stop_lists)
def test_one_character_at_a_time_matches_whole_text(text: str, stops: list[str]) -> None:
    assume(no_stop_is_substring_of_another(stops))
    assert "".join(run(stops, list(text))[0]) == "".join(run(stops, [text])[0])


# -- explicit cases --------------------------------------------------------------------------------------

def test_stop_split_across_chunks() -> None:
    matcher = StopMatcher(["</s>"])
    assert matcher.feed("Hello <") == ("Hello ", False)
    assert matcher.feed("/") == ("", False)
    assert matcher.feed("s> and the rest") == ("", True)
    assert matcher.flush() == ""


def test_stop_split_across_three_chunks_with_text_before() -> None:
    matcher = StopMatcher(["STOP"])
    assert matcher.feed("abcST") == ("abc", False)
    assert matcher.feed("O") == ("", False)
    assert matcher.feed("Pxyz") == ("", True)


def test_partial_prefix_that_is_not_a_stop_is_released() -> None:
    matcher = StopMatcher(["</s>"])
    assert matcher.feed("a </") == ("a ", False)
    assert matcher.feed("b> c") == ("</b> c", False)
    assert matcher.flush() == ""


def test_held_prefix_is_flushed_at_the_end() -> None:
    matcher = StopMatcher(["<|im_end|>"])
    assert matcher.feed("done <|im") == ("done ", False)
    assert matcher.flush() == "<|im"
    assert matcher.flush() == ""


def test_overlapping_restart_of_a_stop() -> None:
    """'aab' in 'aaab': the held 'aa' must shift by one, not be dropped."""
    emitted, stopped = run(["aab"], list("aaab"))
    assert stopped
    assert "".join(emitted) == "a"


def test_earliest_of_several_stops_wins() -> None:
    matcher = StopMatcher(["world", "lo"])
    assert matcher.feed("hello world") == ("hel", True)


def test_no_stops_and_empty_stops_pass_through() -> None:
    for stops in ([], [""]):
        matcher = StopMatcher(stops)
        assert matcher.feed("any <text>") == ("any <text>", False)
        assert matcher.flush() == ""


def test_stop_at_the_very_start() -> None:
    assert StopMatcher(["\n\n"]).feed("\n\nhello") == ("", True)


def test_output_does_not_depend_on_chunking_with_nested_stops() -> None:
    stops = ["abcd", "bc"]
    whole = "".join(run(stops, ["xabcd"])[0])
    split = "".join(run(stops, ["xabc", "d"])[0])
    assert whole == split == "xa"  # 'bc' is the first stop string completed as the text grows
