"""Budgets on grammars, schemas and regexes, and client mistakes that must be 400s (never a crash or a 500)."""

from __future__ import annotations

import pytest

from gallama_kernel.grammar import limits
from gallama_kernel.grammar.core import GrammarBuilder, GrammarError, trim_engine_message, user_grammar
from gallama_kernel.grammar.json_schema import JsonSchemaCompiler, json_schema_grammar
from gallama_kernel.grammar.regex import prefix_grammar, regex_grammar
from gallama_kernel.pipeline.constraints import Constraint, compile_constraint
from gallama_kernel.protocol.errors import InvalidRequest


def chain(n: int) -> str:
    return "start: r0\n" + "".join(f'r{i}: "a" r{i + 1}\n' for i in range(n)) + f'r{n}: "a"\n'


def refused(call, *args, **kwargs) -> GrammarError:
    with pytest.raises(GrammarError) as caught:
        call(*args, **kwargs)
    assert isinstance(caught.value, InvalidRequest)  # a 400
    return caught.value


def objects(n: int) -> dict:
    return {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(n)}}


# -- Lark grammars ------------------------------------------------------------------------------------------


def test_chained_rules_refused_by_chain_depth() -> None:
    error = refused(user_grammar, chain(2500))  # within the rules count; crashed llguidance from ~3,000 on
    assert "rule reference chain depth" in error.message and "2502" in error.message
    assert str(limits.MAX_RULE_CHAIN) in error.message


def test_short_chain_accepted() -> None:
    assert user_grammar(chain(50)).matches("a" * 51)


def test_rules_count_limit() -> None:
    n = limits.MAX_RULES + 1
    text = "start: " + " | ".join(f"r{i}" for i in range(n)) + "\n" + "".join(f'r{i}: "x{i}"\n' for i in range(n))
    error = refused(user_grammar, text)
    assert "rules count" in error.message and str(n + 1) in error.message  # the rules and 'start'


def test_grammar_size_limit() -> None:
    text = 'start: "' + "a" * limits.MAX_GRAMMAR_CHARS + '"\n'
    error = refused(user_grammar, text)
    assert "grammar size" in error.message and str(limits.MAX_GRAMMAR_CHARS) in error.message


def test_nesting_limit() -> None:
    error = refused(user_grammar, "start: " + "(" * 1000 + '"a"' + ")" * 1000 + "\n")  # RecursionError in Lark
    assert "nesting depth" in error.message and "1000" in error.message


@pytest.mark.parametrize("directive", ["%import foo.X", "%import .local (X)", "%import lark.X",
                                       "%include other.lark"])
def test_imports_other_than_common_refused(directive: str) -> None:
    error = refused(user_grammar, f'{directive}\nstart: "a"\n')
    assert "%import common" in error.message and directive.split()[0] in error.message


def test_common_import_allowed() -> None:
    grammar = user_grammar('%import common.INT\n%import common (WS, WORD)\nstart: INT\n')
    assert grammar.matches("42")


def test_lark_regex_error_is_a_400() -> None:
    error = refused(user_grammar, "start: /[]/\n")  # the regex module's own error class, formerly a 500
    assert "Invalid Lark grammar" in error.message


def test_surrogate_in_grammar_refused() -> None:
    assert "surrogate" in refused(user_grammar, 'start: "\ud800"\n').message


# -- JSON schemas -------------------------------------------------------------------------------------------


def test_many_properties_refused_by_limit_before_compiling(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(GrammarBuilder, "fresh", lambda *args, **kwargs: calls.append(args) or "r")
    error = refused(json_schema_grammar, objects(5000))
    assert "properties count" in error.message and str(limits.MAX_PROPERTIES) in error.message
    assert calls == []  # refused before any rule is made


class CountingDict(dict):
    """Counts the names read by iterating over the rules (the old naming read them all for every candidate)."""

    reads = 0

    def __iter__(self):
        for key in super().__iter__():
            CountingDict.reads += 1
            yield key


def test_fresh_names_are_near_linear(monkeypatch: pytest.MonkeyPatch) -> None:
    """Naming used to rebuild every name per candidate (quadratic and worse): count the names read."""
    monkeypatch.setattr(limits, "MAX_PROPERTIES", 3000)
    monkeypatch.setattr(limits, "MAX_RULE_CHAIN", 5000)
    monkeypatch.setattr(limits, "MAX_RULES", 10_000)
    monkeypatch.setattr(limits, "MAX_GRAMMAR_CHARS", 10**7)
    n = 2000  # formerly minutes; Python's Lark (quadratic here) is not asked to read it back
    builder = GrammarBuilder(rules=CountingDict(), lazy=CountingDict())
    CountingDict.reads = 0
    start = JsonSchemaCompiler(builder).compile(objects(n))
    assert CountingDict.reads < 4 * n
    assert '"\\"p1999\\":"' in builder.build(start).llguidance


def test_fresh_names_stay_unique() -> None:
    builder = GrammarBuilder()
    names = [builder.fresh("a b") for _ in range(50)] + [builder.fresh("A_B", terminal=True) for _ in range(50)]
    assert len({name.upper() for name in names}) == 100
    builder.rules["x_2"] = '"by hand"'
    assert builder.fresh("x") == "x" and builder.fresh("x") == "x_3"


def test_schema_depth_limit_no_recursion_error() -> None:
    schema: dict = {"type": "object"}
    node = schema
    for _ in range(5000):  # formerly a RecursionError (500)
        node["properties"] = {"x": {"type": "object"}}
        node = node["properties"]["x"]
    error = refused(json_schema_grammar, schema)
    assert "schema nesting depth" in error.message and str(limits.MAX_SCHEMA_DEPTH) in error.message


def test_schema_nodes_limit() -> None:
    schema = {"type": "array", "items": {"anyOf": [{"const": i} for i in range(limits.MAX_SCHEMA_NODES)]}}
    assert "schema nodes count" in refused(json_schema_grammar, schema).message


def test_enum_size_limit() -> None:
    error = refused(json_schema_grammar, {"enum": list(range(limits.MAX_ENUM + 1))})
    assert "enum size" in error.message and str(limits.MAX_ENUM + 1) in error.message


def test_pattern_length_limit() -> None:
    error = refused(json_schema_grammar, {"type": "string", "pattern": "a" * (limits.MAX_STRING_CHARS + 1)})
    assert "schema string length" in error.message


@pytest.mark.parametrize("schema", [
    {"type": "string", "minLength": 5, "maxLength": 2},
    {"enum": []},
    {"allOf": [{"type": "string"}], "type": "integer"},
    {"type": "integer", "minimum": 5, "maximum": 2},
    {"type": "array", "minItems": 3, "maxItems": 1},
    {"anyOf": [False, False]},
])
def test_unsatisfiable_schema(schema: dict) -> None:
    error = refused(json_schema_grammar, schema)
    assert "unsatisfiable" in error.message and error.code == "unsatisfiable_schema"


@pytest.mark.parametrize("schema", [
    {"$ref": "#"},
    {"$defs": {"A": {"$ref": "#/$defs/B"}, "B": {"$ref": "#/$defs/A"}}, "$ref": "#/$defs/A"},
    {"$defs": {"A": {"anyOf": [{"$ref": "#/$defs/A"}, {"type": "null"}]}}, "$ref": "#/$defs/A"},
])
def test_ref_cycle_without_input_refused(schema: dict) -> None:
    assert "circular without any input" in refused(json_schema_grammar, schema).message


def test_recursive_ref_through_object_allowed() -> None:
    schema = {"$defs": {"node": {"type": "object", "properties": {"next": {"$ref": "#/$defs/node"}}}},
              "$ref": "#/$defs/node"}
    assert json_schema_grammar(schema).matches('{"next":{"next":{}}}')


@pytest.mark.parametrize("schema", [{"enum": ["\ud800"]}, {"const": "a\udfff"},
                                    {"type": "string", "pattern": "\ud800"}, {"properties": {"\ud800": {}}}])
def test_surrogates_in_schema_refused(schema: dict) -> None:
    assert "surrogate" in refused(json_schema_grammar, schema).message


def test_tool_parameters_are_budgeted_too() -> None:
    constraint = Constraint("json_schema", "response_format.json_schema.schema", objects(5000))
    error = refused(compile_constraint, constraint)
    assert error.param == "response_format.json_schema.schema" and "properties count" in error.message


def test_generated_grammar_over_chain_budget_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits, "MAX_RULE_CHAIN", 100)
    error = refused(json_schema_grammar, objects(200), param="tools[0].function.parameters")
    assert "rule reference chain depth" in error.message and error.param == "tools[0].function.parameters"


# -- regexes ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", ["[]", "a{5,2}"])
def test_invalid_regex(pattern: str) -> None:
    assert "Invalid regex" in refused(regex_grammar, pattern).message


@pytest.mark.parametrize("pattern", [r"[^\s\S]", "\ud800"])
def test_regex_that_nothing_matches(pattern: str) -> None:
    error = refused(regex_grammar, pattern)
    assert "no string can match" in error.message or "surrogate" in error.message


@pytest.mark.parametrize("pattern", ["a{100000}", "(a{100}){100}", "x{2000,}"])
def test_regex_repeat_limit(pattern: str) -> None:
    error = refused(prefix_grammar, pattern)
    assert "repetition count" in error.message and str(limits.MAX_REPEAT) in error.message


def test_regex_length_limit() -> None:
    error = refused(regex_grammar, "a" * (limits.MAX_REGEX_CHARS + 1))
    assert "regex length" in error.message


def test_regex_within_limits_still_works() -> None:
    assert regex_grammar("a{1000}").matches("a" * 1000)


# -- engine messages ----------------------------------------------------------------------------------------


def test_engine_message_trimmed() -> None:
    native = ("at 1(8): unknown name: \"nope\"\n   1 | start: \"a\" nope\n              ^\n"
              "stack backtrace:\n   0: llguidance::api::compile\n"
              "             at /home/runner/work/llguidance/src/api.rs:42\n"
              + "   9: frame\n" * 2000)
    message = trim_engine_message(native)
    assert message.startswith('at 1(8): unknown name: "nope"')
    assert "/home" not in message and "backtrace" not in message
    assert len(message) <= limits.MAX_ERROR_CHARS


def test_engine_message_capped_and_paths_hidden() -> None:
    message = trim_engine_message("panicked at /rustc/abc/library/core/src/x.rs:1:2: " + "y" * 5000)
    assert len(message) <= limits.MAX_ERROR_CHARS and "/rustc" not in message


@pytest.mark.parametrize("body", ['"b" ' * 400, "y " * 400, " ".join(f'"b{i}"' for i in range(100))])
def test_long_sequence_refused(body: str) -> None:
    """Python's Lark took 13 s to build a parser for 400 literals in a row."""
    error = refused(user_grammar, f'start: x\nx: {body}\ny: "b"\n')
    assert "symbols in a row" in error.message and str(limits.MAX_SEQUENCE) in error.message


def test_many_alternatives_are_not_a_sequence() -> None:
    assert user_grammar("start: x\nx: " + " | ".join(['"b" "c"'] * 400) + "\n").matches("bc")


def test_engine_message_keeps_the_cause() -> None:
    native = ('at 1(8): invalid regex "a(?=b)b" (in regex): regex parse error:\n    a(?=b)b\n     ^^^\n'
              "error: look-around, including look-ahead and look-behind, is not supported\n"
              "   1 | start: /a(?=b)b/\n              ^\n")
    assert trim_engine_message(native).endswith("regex parse error: look-around, including look-ahead and "
                                                "look-behind, is not supported")
