"""Shortest completions (:mod:`gallama_kernel.grammar.closing`): every prefix of a valid output, completed with
:meth:`Progress.closing`, parses with the grammar's own parser (``grammar.matches``), and no shorter completion
exists (checked by brute force over the characters a small grammar tells apart)."""

from __future__ import annotations

import itertools
import random
import re
import threading
from collections.abc import Callable

import pytest

from gallama_kernel.grammar.closing import LINEAR_LIMIT, NESTED_LIMIT, Closer, Progress
from gallama_kernel.grammar.core import Grammar, GrammarBuilder, GrammarError, user_grammar
from gallama_kernel.grammar.gbnf import expression_rules
from gallama_kernel.grammar.json_schema import any_json_object, json_object_grammar, json_schema_grammar
from gallama_kernel.grammar.regex import prefix_grammar, regex_grammar
from gallama_kernel.grammar.tools import ToolSpec, call_text, grammar_for_tools

# --- grammars and valid documents --------------------------------------------------------------------------------

ORDER_SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "string", "format": "uuid"},
        "created": {"type": "string", "format": "date"},
        "owner": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "minLength": 2, "maxLength": 40},
                "age": {"type": "integer", "minimum": 18, "maximum": 130},
                "email": {"type": "string", "format": "email"},
            },
            "required": ["name", "age"],
        },
        "status": {"enum": ["draft", "active", "archived", None]},
        "items": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2,4}$"},
                    "qty": {"type": "integer", "minimum": 1},
                    "price": {"type": "number", "minimum": 0, "maximum": 1000},
                    "tags": {"type": "array", "items": {"type": "string"}},
                },
                "required": ["sku", "qty"],
            },
        },
        "total": {"type": "number"},
    },
    "required": ["id", "created", "owner", "items"],
}
ORDER_DOCUMENTS = [
    '{"id":"123e4567-e89b-12d3-a456-426614174000","created":"2024-02-29","owner":{"name":"Ada","age":36,'
    '"email":"ada@example.org"},"status":"active","items":[{"sku":"ABC-12","qty":3,"price":9.99,'
    '"tags":["a\\"b","\\u00e9t\\u00e9"]},{"sku":"XYZ-9876","qty":10}],"total":-1.5e3}',
    '{"id":"00000000-0000-0000-0000-000000000000","created":"1999-12-31","owner":{"name":"Bo","age":130},'
    '"status":null,"items":[{"sku":"QQQ-00","qty":1,"tags":[]}]}',
]

TOOLS = [
    ToolSpec("get_weather", {
        "type": "object",
        "properties": {"city": {"type": "string", "minLength": 1}, "unit": {"enum": ["celsius", "fahrenheit"]},
                       "days": {"type": "integer", "minimum": 1, "maximum": 14}},
        "required": ["city"],
    }),
    ToolSpec("noop", {}),
]
WEATHER = call_text("get_weather", '{"city":"Paris","unit":"celsius","days":3}')
NOOP = call_text("noop", "{}")

ARITHMETIC = user_grammar(
    "start: expr\n"
    'expr: expr "+" term | expr "-" term | term\n'  # left recursion
    'term: term "*" factor | factor\n'
    'factor: "(" expr ")" | NUMBER | "-" factor\n'
    "NUMBER: /[0-9]+/\n"
)
BALANCED = user_grammar('start: s\ns: s s | "(" s ")" | "[" s "]" |\n')  # nullable, ambiguous, left recursive
INDIRECT = user_grammar(  # indirect left recursion through a nullable rule
    "start: a\n"
    'a: b "x" | "y"\n'
    'b: a c | c\n'
    'c: "z" |\n'
)


def _thinking_grammar() -> Grammar:
    builder = GrammarBuilder()
    thought = builder.text_until("</think>", "think")
    return builder.build(f'"<think>" {thought} {any_json_object(builder)}')


def _cases() -> list[tuple[str, Grammar, list[str]]]:
    """(label, grammar, valid documents) for the prefix property."""
    return [
        ("schema", json_schema_grammar(ORDER_SCHEMA), ORDER_DOCUMENTS),
        ("json_object", json_object_grammar(), [
            '{"a":[1,-0.5,2E+10,{"b":{}},[],[[true]]],"c\\n":"\\\\\\/x\\u12aF","d":null,"e":false}',
            '{"":""}',
        ]),
        ("tools_required", grammar_for_tools(TOOLS, "required"), [WEATHER + NOOP, NOOP]),
        ("tools_auto", grammar_for_tools(TOOLS, "auto"), [WEATHER, "It is <b>sunny</b> today.", "<tool"]),
        ("tools_named", grammar_for_tools(TOOLS, "get_weather"), [call_text("get_weather", '{"city":"Rome"}')]),
        ("regex", regex_grammar(r"(?i)[a-z]{2,5}-\d{3}(\.\d+)?|x+"), ["Ab-123.45", "xxxx", "abCDe-000"]),
        ("regex_prefix", prefix_grammar(r"ans(wer)?: \d"), ["answer: 4 and more\ntext", "ans: 0"]),
        ("thinking", _thinking_grammar(), ['<think>a </thin<</think</think>{"k":[1]}']),
        ("arithmetic", ARITHMETIC, ["(1+23)*-4-5*(6)", "-(-(7))"]),
        ("balanced", BALANCED, ["([()][])", "[[[]]]()"]),
        ("indirect", INDIRECT, ["yzxzxx", "yxx"]),
    ]


CASES = _cases()


# --- helpers ------------------------------------------------------------------------------------------------------

def _brute_shortest(accepts: Callable[[str], bool], prefix: str, alphabet: str, limit: int) -> int | None:
    """The length of the shortest completion of ``prefix`` over ``alphabet`` up to ``limit`` characters, by
    trying every string in order of length (None: none that short)."""
    for size in range(limit + 1):
        for tail in itertools.product(alphabet, repeat=size):
            if accepts(prefix + "".join(tail)):
                return size
    return None


def _fed(closer: Closer, text: str) -> Progress:
    progress = closer.start()
    assert progress.feed(text), text
    return progress


# --- the prefix property ------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("label", "grammar", "documents"), CASES, ids=[case[0] for case in CASES])
def test_every_prefix_completes_to_a_parse(label: str, grammar: Grammar, documents: list[str]) -> None:
    closer = Closer.for_grammar(grammar)
    for document in documents:
        assert grammar.matches(document), document  # the test's own documents are valid
        progress = closer.start()
        for cut in range(len(document) + 1):
            if cut:
                assert progress.feed(document[cut - 1])
            closing = progress.closing()
            assert closing is not None
            assert grammar.matches(document[:cut] + closing), (document[:cut], closing)
        assert progress.closing() == ""


@pytest.mark.parametrize(("label", "grammar", "documents"), CASES, ids=[case[0] for case in CASES])
def test_chunked_feeding_and_copies_agree_with_one_character_at_a_time(label: str, grammar: Grammar,
                                                                       documents: list[str]) -> None:
    closer = Closer.for_grammar(grammar)
    chunks = random.Random(label)
    for document in documents:
        single = closer.start()
        lengths = []
        for char in document:
            lengths.append(len(single.closing() or ""))
            single.feed(char)
        progress, position, checkpoints = closer.start(), 0, []
        while position < len(document):
            checkpoints.append((position, progress.copy()))
            size = chunks.randint(1, 10)
            assert progress.feed(document[position:position + size])
            position = min(position + size, len(document))
            closing = progress.closing()
            assert closing is not None
            assert len(closing) == (lengths[position] if position < len(document) else 0)
        for position, checkpoint in checkpoints:  # snapshots are unaffected by what was fed after them
            closing = checkpoint.closing()
            assert closing is not None and len(closing) == lengths[position]
            assert checkpoint.feed(document[position:])
            assert checkpoint.closing() == ""


# --- minimality, by brute force -----------------------------------------------------------------------------------

SMALL = [  # (label, acceptor, grammar, alphabet, depth, the longest completion a dead input is tried with)
    ("arithmetic", ARITHMETIC.matches, ARITHMETIC, "1+*(-)", 3, 2),
    ("balanced", BALANCED.matches, BALANCED, "()[]", 4, 2),
    ("indirect", INDIRECT.matches, INDIRECT, "xyz", 4, 3),
]
REGEXES = [
    (r"(ab|c)*d{2,3}", "abcd"),
    (r"x[ab]{3,40}y", "abxy"),  # a counted repetition longer than NESTED_LIMIT: blocks
    (r"(a|bc?){2}(d|e{2,4})?f", "abcdef"),
    (r"[0-9]{1,3}(\.[0-9]{1,2})?%", "0.%a"),
]


@pytest.mark.parametrize(("label", "accepts", "grammar", "alphabet", "depth", "dead_limit"), SMALL,
                         ids=[s[0] for s in SMALL])
def test_closing_is_shortest_for_every_short_input(label: str, accepts: Callable[[str], bool], grammar: Grammar,
                                                   alphabet: str, depth: int, dead_limit: int) -> None:
    """Every string over ``alphabet`` up to ``depth`` characters (the alphabet has one character of each kind
    the grammar tells apart): a viable one is completed by the closing and by nothing shorter; the first
    character that makes an input non-viable leaves no completion of up to ``dead_limit`` characters."""
    _check_short_inputs(Closer.for_grammar(grammar), accepts, alphabet, depth, dead_limit)


@pytest.mark.parametrize(("pattern", "alphabet"), REGEXES, ids=[r[0] for r in REGEXES])
def test_regex_closing_is_shortest_for_every_short_input(pattern: str, alphabet: str) -> None:
    grammar = regex_grammar(pattern)

    def accepts(text: str) -> bool:
        return re.fullmatch(pattern, text) is not None

    _check_short_inputs(Closer.for_grammar(grammar), accepts, alphabet, 5, dead_limit=5)
    assert grammar.matches(Closer.for_grammar(grammar).shortest())


def _check_short_inputs(closer: Closer, accepts: Callable[[str], bool], alphabet: str, depth: int,
                        dead_limit: int) -> None:
    viable_seen = dead_seen = 0
    level = [("", closer.start())]
    for _ in range(depth + 1):
        following = []
        for text, progress in level:
            closing = progress.closing()
            assert closing is not None
            assert accepts(text + closing), (text, closing)
            assert _brute_shortest(accepts, text, alphabet, len(closing) - 1) is None, (text, closing)
            viable_seen += 1
            for char in alphabet:
                child = progress.copy()
                if child.feed(char):
                    following.append((text + char, child))
                else:
                    dead_seen += 1
                    assert child.closing() is None
                    assert _brute_shortest(accepts, text + char, alphabet, dead_limit) is None, text + char
        level = following
    assert viable_seen > 10 and dead_seen > 3  # the walk met both kinds


WAYS_ON = [
    *("start: " + " | ".join(order) + '\nr: q "]]]"\nq: "wv" | q "wv"\n'
      for order in itertools.permutations(['"(" q ")"', '"(" q "))"', '"(" r'])),
    *("start: " + " | ".join(order) + '\nr: q ")"\ns: q "]]"\nq: q "wv" | "wv"\n'
      for order in itertools.permutations(['"(" r', '"(" s', '"(" q "))"'])),
]


@pytest.mark.parametrize("text", WAYS_ON)
def test_the_cheapest_of_several_ways_on_is_taken(text: str) -> None:
    """``q`` is waited for at the same place by several items, from the column before (``start``'s) and from
    the same column (``r``'s, ``s``'s), with different lengths to go; whatever the order of the alternatives,
    the cheapest way on is taken from inside ``q`` (where the closing goes through the column's table)."""
    closer = Closer.for_grammar(user_grammar(text))
    assert _fed(closer, "(").closing() == "wv)"
    assert _fed(closer, "(w").closing() == "v)"
    assert _fed(closer, "(wvw").closing() == "v)"


@pytest.mark.parametrize(("low", "high"), [(0, 1), (2, 24), (0, 25), (3, 26), (0, 48), (1, 50), (0, 63),
                                           (64, 64), (65, 65), (70, 100), (130, 131), (0, 1000), (7, 1100)])
def test_counted_repetitions_take_every_count_and_no_other(low: int, high: int) -> None:
    """Each count from 0 past ``high`` (the forms of step 1 of the closing module change at NESTED_LIMIT and
    LINEAR_LIMIT): ``a`` repeated that often is viable up to ``high`` and is closed by the missing copies."""
    assert NESTED_LIMIT < 25 and LINEAR_LIMIT < 65  # the parameters cross both limits
    grammar = user_grammar(f"start: A\nA: /a{{{low},{high}}}b/\n")  # a Lark terminal: no regex count limit
    closer = Closer.for_grammar(grammar)
    assert closer.shortest() == "a" * low + "b"
    progress = closer.start()
    for count in range(high + 1):
        assert progress.closing() == "a" * max(low - count, 0) + "b", count
        assert progress.copy().feed("b") == (count >= low)
        assert progress.feed("a") == (count < high), count
    assert progress.closing() is None


def test_a_long_max_length_string_is_read() -> None:
    """``maxLength: 5000`` is ``(…\\u[0-9a-fA-F]{4}…){0,5000}``: 20,000 counted, over llama.cpp's limit."""
    schema = {"type": "object", "properties": {"s": {"type": "string", "maxLength": 5000}}, "required": ["s"]}
    grammar = json_schema_grammar(schema)
    closer = Closer.for_grammar(grammar)
    assert closer.shortest() == '{"s":""}'
    progress = _fed(closer, '{"s":"' + "\\u00e9" + "q" * 4998)
    assert progress.closing() == '"}'
    assert not progress.copy().feed("qq")
    assert progress.feed("\\n") and progress.closing() == '"}'
    assert not progress.copy().feed("q")
    assert progress.feed('"}') and progress.closing() == ""


RandomRules = dict[str, list[list[str]]]
"""Rule name -> alternatives, each a list of rule names and literals (a literal in double quotes)."""
LETTERS = "xy"
TERMINALS = ['"x"', '"y"', '"xy"', '"yyx"']


def _random_rules(rng: random.Random) -> RandomRules:
    """Four rules over :data:`TERMINALS`: empty alternatives, left, right and indirect recursion, ambiguity."""
    names = ["start", "a", "b", "c"]
    rules: RandomRules = {}
    for name in names:
        rules[name] = [[rng.choice(names[1:] + TERMINALS) for _ in range(rng.randint(0, 3))]
                       for _ in range(rng.randint(1, 3))]
    return rules


def _lark(rules: RandomRules) -> str:
    return "".join(f"{name}: " + " | ".join(" ".join(alt) for alt in alts) + "\n" for name, alts in rules.items())


def _language(rules: RandomRules, limit: int) -> set[str]:
    """The strings of ``start`` up to ``limit`` characters, by a fixpoint over sets of strings."""
    found: dict[str, set[str]] = {name: set() for name in rules}
    changed = True
    while changed:
        changed = False
        for name, alternatives in rules.items():
            for alternative in alternatives:
                strings = {""}
                for symbol in alternative:
                    options = found[symbol] if symbol in rules else {symbol.strip('"')}
                    strings = {a + b for a in strings for b in options if len(a) + len(b) <= limit}
                if not strings <= found[name]:
                    found[name] |= strings
                    changed = True
    return found["start"]


@pytest.mark.parametrize("seed", range(8))
def test_closing_is_shortest_for_random_grammars(seed: int) -> None:
    """Random grammars against the strings their rules derive (no parser involved): for every input over
    their letters up to 5 characters, a completion within the length bound exists exactly when the closer
    finds one that short, and the closer's is a shortest one."""
    rng = random.Random(seed)
    limit, compared = 9, 0
    for _ in range(25):
        rules = _random_rules(rng)
        language = _language(rules, limit)
        try:
            closer = Closer(*expression_rules(Grammar(_lark(rules), _lark(rules))))
        except GrammarError as error:
            assert "matches no text" in error.message and not language
            continue
        level = [("", closer.start())]
        for _ in range(6):
            following = []
            for text, progress in level:
                completions = [len(s) - len(text) for s in language if s.startswith(text)]
                closing = progress.closing()
                if closing is None:
                    assert not completions, (rules, text)
                    continue
                if len(text) + len(closing) <= limit:
                    assert text + closing in language, (rules, text, closing)
                    assert len(closing) == min(completions), (rules, text, closing)
                    compared += 1
                else:
                    assert not completions, (rules, text, closing)
                for char in LETTERS:
                    child = progress.copy()
                    child.feed(char)
                    following.append((text + char, child))
            level = following
    assert compared > 100


# --- shortest documents of schemas ----------------------------------------------------------------------------

@pytest.mark.parametrize(("schema", "expected"), [
    ({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}}, "required": ["a"]},
     r'\{"a":[0-9]\}'),  # the optional property is left out, an integer is one digit
    ({"type": "object", "properties": {"name": {"type": "string", "minLength": 3},
                                       "tags": {"type": "array", "items": {"type": "integer", "minimum": 10},
                                                "minItems": 2}},
      "required": ["name", "tags"]},
     r'\{"name":"aaa","tags":\[[1-9][0-9],[1-9][0-9]\]\}'),
    ({"type": "object", "properties": {"e": {"enum": ["xyz", "ab", 7]}, "d": {"type": "string", "format": "date"}},
      "required": ["e", "d"]},
     r'\{"e":7,"d":"[0-9]{4}-[0-9]{2}-[0-9]{2}"\}'),
    ({"type": "string", "format": "uuid"}, r'"a{8}-a{4}-a{4}-a{4}-a{12}"'),  # letters before digits
    ({"type": "integer", "exclusiveMinimum": 99}, r"1[0-9][0-9]"),
    ({"type": "number", "minimum": -5.5, "maximum": -2}, r"-[2-5]"),
    ({"type": "array", "items": {"type": "boolean"}, "minItems": 1}, r"\[true\]"),
    ({"type": "object", "properties": {"x": {"type": "object", "properties": {"y": {"type": "null"}},
                                             "required": ["y"]}}, "required": ["x"]},
     r'\{"x":\{"y":null\}\}'),
    ({"type": "object"}, r"\{\}"),
])
def test_shortest_document_of_a_schema(schema: dict[str, object], expected: str) -> None:
    grammar = json_schema_grammar(schema)
    shortest = Closer.for_grammar(grammar).shortest()
    assert re.fullmatch(expected, shortest), shortest
    assert grammar.matches(shortest)
    assert Closer.for_grammar(grammar).start().closing() == shortest


def test_shortest_of_tool_calls_and_text() -> None:
    assert Closer.for_grammar(grammar_for_tools(TOOLS, "required")).shortest() == NOOP
    assert Closer.for_grammar(grammar_for_tools(TOOLS, "auto")).shortest() == ""  # the text is optional
    named = Closer.for_grammar(grammar_for_tools(TOOLS, "get_weather"))
    assert named.shortest() == call_text("get_weather", '{"city":"a"}')
    thinking = Closer.for_grammar(_thinking_grammar())
    assert thinking.shortest() == "<think></think>{}"
    assert _fed(thinking, "<think>so </th").closing() == "ink>{}"  # the marker's own start is taken up
    assert _fed(thinking, "<think><</").closing() == "think>{}"


# --- viability ----------------------------------------------------------------------------------------------------

def test_non_viable_prefix_stays_dead() -> None:
    grammar = json_object_grammar()
    closer = Closer.for_grammar(grammar)
    progress = closer.start()
    assert progress.feed('{"a":1')
    checkpoint = progress.copy()
    assert not progress.feed(",,")
    assert progress.closing() is None
    assert not progress.feed('"b":2}')  # valid text later does not revive it
    assert progress.closing() is None
    assert not progress.copy().feed("")
    assert checkpoint.closing() == "}"  # a snapshot taken before is unaffected
    assert not closer.start().feed("x")
    assert not closer.start().feed('{"a":1}x')  # nothing may follow a complete object
    assert not closer.start().feed('{"a":"\x00')  # a control character in a string


def test_tool_choice_refuses_other_text() -> None:
    required = Closer.for_grammar(grammar_for_tools(TOOLS, "required"))
    assert not required.start().feed("Hi")
    assert not required.start().feed('<tool_call>{"name":"missing"')
    assert not required.start().feed(WEATHER.replace("3}", "15}"))  # days is at most 14
    auto = Closer.for_grammar(grammar_for_tools(TOOLS, "auto"))
    assert _fed(auto, "Hi").closing() == ""
    assert not auto.start().feed("<tool_call>Hi")  # text may not start with the call's opening


# --- refusals and the cache ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", [
    "start: A\nA: /(?=a)[a-z]+/\n",  # a look-ahead
    "start: A\nA: /(a)\\1/\n",  # a back-reference
    'start: "a" "b"\n%ignore " "\n',
])
def test_constructs_the_expressions_cannot_say_are_refused(text: str) -> None:
    grammar = user_grammar(text)
    for _ in range(2):  # the second time from the cache
        with pytest.raises(GrammarError) as caught:
            Closer.for_grammar(grammar)
        assert caught.value.code == "constraint_not_supported"


def test_an_empty_language_is_refused() -> None:
    with pytest.raises(GrammarError, match="matches no text"):
        Closer.for_grammar(user_grammar('start: a\na: "x" a\n'))


def test_closers_are_cached_and_shared_between_threads() -> None:
    grammar = json_schema_grammar({"type": "object", "properties": {"q": {"type": "string"}}})
    found: list[Closer] = []

    def get() -> None:
        found.append(Closer.for_grammar(grammar))

    threads = [threading.Thread(target=get) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(found) == 4 and all(closer is found[0] for closer in found)
    assert Closer.for_grammar(grammar) is found[0]
