"""JSON Schema grammars: compact JSON valid against the schema, nothing else; unsupported keywords refused."""

from __future__ import annotations

import datetime
import enum
import json
import re
from fractions import Fraction
from typing import Any, Literal

import jsonschema
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, Field

from gallama_kernel.grammar.core import Grammar, GrammarBuilder, GrammarError
from gallama_kernel.grammar.json_schema import (
    JSON_NUMBER,
    MAX_INT_DIGITS,
    JsonSchemaCompiler,
    any_json_value,
    json_object_grammar,
    json_schema_grammar,
    number_regex,
)

try:
    import llguidance
except ImportError:  # pragma: no cover - the engine's library is optional for these tests
    llguidance = None

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def grammar_of(schema: Any) -> Grammar:
    """The schema's grammar, checked by llguidance too where it is installed."""
    grammar = json_schema_grammar(schema)
    if llguidance is not None:
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar.llguidance)
        assert not is_error, messages
    return grammar


def accepts(grammar: Grammar, value: Any) -> bool:
    return grammar.matches(compact(value))


def check(schema: Any, good: list[Any], bad: list[Any]) -> None:
    """``good`` values are accepted (and valid); ``bad`` ones are rejected."""
    grammar = grammar_of(schema)
    for value in good:
        jsonschema.validate(value, schema if isinstance(schema, dict) else {})
        assert accepts(grammar, value), value
    for value in bad:
        assert not accepts(grammar, value), value


# --- keywords, one by one -------------------------------------------------------------------------------------


def test_any_value_for_true_and_empty_schema() -> None:
    values = [1, -2.5e-3, "x", None, True, [], {}, {"a": [1, {"b": None}]}, [[[]]]]
    for schema in (True, {}, {"description": "anything"}):
        check(schema, values, [])
    grammar = grammar_of({})
    for text in ('{"a": 1}', "[1, 2]", "01", "1.", "tru", '"a\nb"', "", "{,}"):
        assert not grammar.matches(text), text


def test_false_schema_is_refused() -> None:
    with pytest.raises(GrammarError):
        json_schema_grammar(False)


def test_json_object_grammar() -> None:
    grammar = json_object_grammar()
    for value in ({}, {"a": 1}, {"a": {"b": [1, "x", None]}, "c": True}):
        assert accepts(grammar, value)
    for value in ([], "x", 1, None):
        assert not accepts(grammar, value)
    assert not grammar.matches('{"a": 1}')


def test_type_single_and_list() -> None:
    check({"type": "string"}, ["", "x", 'a"b\\c\n\té😀\x00'], [1, None, [], {}])
    check({"type": "integer"}, [0, -7, 12345678901234567890], [1.5, "1", True])
    check({"type": "number"}, [0, -7, 1.5, -0.001, 1e100, 2.5e-8], ["1", None])
    check({"type": "boolean"}, [True, False], [0, "true", None])
    check({"type": "null"}, [None], [0, "", False])
    check({"type": ["string", "null"]}, ["x", None], [1, False])
    check({"type": ["integer", "number"]}, [1, 1.5], ["x"])
    check({"type": "object"}, [{}, {"a": 1}], [[], "x"])
    check({"type": "array"}, [[], [1, "x", None]], [{}, "x"])


def test_strings_are_json_strings() -> None:
    grammar = grammar_of({"type": "string"})
    for text in ('"a\nb"', '"a\\qb"', '"\\u12"', '"a"b"', '"a', "a", "'a'"):
        assert not grammar.matches(text), text
    for text in ('"\\u00e9\\/"', '"\\"\\\\\\b\\f\\n\\r\\t"'):
        assert grammar.matches(text), text


def test_string_length() -> None:
    check({"type": "string", "minLength": 2, "maxLength": 4}, ["ab", "abcd", "\n\n", 'é"\\'], ["a", "abcde", ""])
    check({"type": "string", "minLength": 1}, ["a", "x" * 100], [""])
    check({"type": "string", "maxLength": 0}, [""], ["a"])
    check({"type": "string", "minLength": 3, "maxLength": 3}, ["abc"], ["ab", "abcd"])


@pytest.mark.parametrize(("fmt", "good", "bad"), [
    ("date", ["2024-02-29", "2000-02-29", "0001-12-31", "2023-04-30"],
     ["2024-2-29", "2024-13-01", "2024-01-32", "24-01-01", "2024-01-01T", "2023-02-29", "1900-02-29", "2023-04-31",
      "0000-01-01"]),
    ("time", ["12:30:00Z", "23:59:59.123+02:00", "00:00:00-11:30"], ["12:30:00", "24:00:00Z", "12:60:00Z"]),
    ("date-time", ["2024-01-02T03:04:05Z", "2024-01-02T03:04:05.5+01:00"],
     ["2024-01-02 03:04:05Z", "2024-01-02T03:04:05", "2024-01-02"]),
    ("uuid", ["123e4567-e89b-12d3-a456-426614174000", "123E4567-E89B-12D3-A456-426614174000"],
     ["123e4567e89b12d3a456426614174000", "123e4567-e89b-12d3-a456-42661417400g"]),
    ("email", ["a.b+c@example.com", "x@sub.example.org"], ["a@b", "@example.com", "a b@example.com", "ab"]),
])
def test_string_formats(fmt: str, good: list[str], bad: list[str]) -> None:
    check({"type": "string", "format": fmt}, good, bad)


def test_string_enum_and_const() -> None:
    check({"type": "string", "enum": ["red", "green", 'say "hi"', "é"]}, ["red", 'say "hi"', "é"],
          ["blue", "Red", "e"])
    check({"const": "only"}, ["only"], ["other", ""])
    check({"enum": ["ab", "abc"], "maxLength": 2}, ["ab"], ["abc"])  # members are checked against siblings


def test_enum_and_const_of_any_value() -> None:
    check({"enum": [1, 2.5, None, True, [1, "a"], {"k": [None]}, "x"]},
          [1, 2.5, None, True, [1, "a"], {"k": [None]}, "x"], [False, 3, [1], {"k": []}, "y"])
    check({"const": {"a": [1, {"b": "c"}]}}, [{"a": [1, {"b": "c"}]}], [{"a": [1]}])
    check({"type": ["integer", "null"], "enum": [1, "1", None]}, [1, None], ["1"])
    check({"type": "integer", "enum": [1, 5, 10], "minimum": 2}, [5, 10], [1])


@pytest.mark.parametrize("schema", [{"enum": []}, {"type": "string", "enum": [1, 2]}, {"const": 1, "enum": [2]},
                                    {"enum": "abc"}])
def test_enum_contradictions(schema: dict[str, Any]) -> None:
    with pytest.raises(GrammarError):
        json_schema_grammar(schema)


def test_integer_bounds() -> None:
    check({"type": "integer", "minimum": -5, "maximum": 12}, [-5, 0, 7, 12], [-6, 13, 100, -50, 1.5])
    check({"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 100}, [1, 99], [0, 100, -1])
    check({"type": "integer", "minimum": 1000}, [1000, 99999], [999, 0, -1000])
    check({"type": "integer", "maximum": -10}, [-10, -11, -12345], [-9, 0, 10])
    check({"type": "integer", "minimum": 3, "maximum": 3}, [3], [2, 4])
    check({"type": "integer", "minimum": 0.5, "maximum": 2.5}, [1, 2], [0, 3])
    draft4 = "http://json-schema.org/draft-04/schema#"
    check({"$schema": draft4, "type": "integer", "minimum": 5, "exclusiveMinimum": True}, [6], [5])


def test_number_bounds() -> None:
    check({"type": "number", "minimum": 0, "maximum": 1}, [0, 0.5, 1, 1.0, 0.999], [-0.1, 1.01, 2, -1])
    check({"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1}, [0.5, 0.001], [0, 1, 0.0, 1.0])
    check({"type": "number", "minimum": -2.5, "maximum": 3.75}, [-2.5, -2.49, 3.75, 0], [-2.51, 3.76, 3.8])
    check({"type": "number", "exclusiveMinimum": 0.1}, [0.11, 5, 1e6], [0.1, 0.05, -1])
    grammar = grammar_of({"type": "number", "minimum": 0})
    assert grammar.matches("1.5") and not grammar.matches("1.5e3")  # bounded numbers have no exponent


@pytest.mark.parametrize("schema", [
    {"type": "integer", "minimum": 5, "maximum": 4}, {"type": "integer", "exclusiveMinimum": 1, "exclusiveMaximum": 2},
    {"type": "number", "minimum": 1, "exclusiveMaximum": 1}, {"type": "number", "minimum": "1"},
])
def test_empty_number_ranges_are_refused(schema: dict[str, Any]) -> None:
    with pytest.raises(GrammarError):
        json_schema_grammar(schema)


def test_digit_runs_are_capped() -> None:
    grammar = grammar_of({"type": "integer"})
    assert grammar.matches("9" * MAX_INT_DIGITS) and not grammar.matches("9" * (MAX_INT_DIGITS + 1))
    grammar = grammar_of({"type": "number"})
    assert not grammar.matches("1." + "0" * 100)
    assert not grammar.matches("1e" + "1" * 10)


@given(st.integers(-300, 300) | st.none(), st.booleans(), st.integers(-300, 300) | st.none(), st.booleans(),
       st.integers(-1000, 1000))
@settings(max_examples=300, deadline=None)
def test_integer_ranges_are_exact(low: int | None, low_excl: bool, high: int | None, high_excl: bool,
                                  value: int) -> None:
    pattern = number_regex(None if low is None else Fraction(low), low_excl, None if high is None else Fraction(high),
                           high_excl, integer=True)
    inside = (low is None or value > low or (value == low and not low_excl)) and (
        high is None or value < high or (value == high and not high_excl))
    assert (pattern is not None and re.fullmatch(pattern, str(value)) is not None) == inside


@given(st.integers(-3000, 3000) | st.none(), st.booleans(), st.integers(-3000, 3000) | st.none(), st.booleans(),
       st.integers(-40000, 40000), st.integers(0, 3))
@settings(max_examples=300, deadline=None)
def test_decimal_ranges_are_exact(low: int | None, low_excl: bool, high: int | None, high_excl: bool, value: int,
                                  places: int) -> None:
    lo = None if low is None else Fraction(low, 100)
    hi = None if high is None else Fraction(high, 100)
    pattern = number_regex(lo, low_excl, hi, high_excl, integer=False)
    number = Fraction(value, 1000)
    text = f"{float(number):.{places}f}"
    number = Fraction(text)
    if text.lstrip("-").strip("0.") == "" and text.startswith("-"):
        return  # negative zero is never written
    inside = (lo is None or number > lo or (number == lo and not low_excl)) and (
        hi is None or number < hi or (number == hi and not high_excl))
    assert (pattern is not None and re.fullmatch(pattern, text) is not None) == inside, (pattern, text)


NUMBER_PATTERNS = [JSON_NUMBER, number_regex(Fraction(-3, 2), False, Fraction(7), True, integer=False),
                   number_regex(None, False, None, False, integer=True),
                   number_regex(Fraction(0), True, None, False, integer=False)]


@given(st.text(alphabet="0123456789-+.eE", max_size=8))
@settings(max_examples=400, deadline=None)
def test_numbers_are_valid_json_numbers(text: str) -> None:
    for pattern in NUMBER_PATTERNS:
        if re.fullmatch(pattern, text):
            assert isinstance(json.loads(text), int | float), (pattern, text)


def test_object_properties_in_order_and_required() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"},
                                               "c": {"type": "boolean"}}, "required": ["b"]}
    good = [{"b": "x"}, {"a": 1, "b": "x"}, {"b": "x", "c": True}, {"a": 1, "b": "x", "c": False}]
    check(schema, good, [{}, {"a": 1}, {"a": 1, "c": True}, {"b": 1}, {"b": "x", "d": 1}])
    grammar = grammar_of(schema)
    assert not grammar.matches('{"b":"x","a":1}')  # properties come in schema order
    assert not grammar.matches('{"a":1,,"b":"x"}') and not grammar.matches('{,"b":"x"}')
    assert not grammar.matches('{"b":"x",}')


@pytest.mark.parametrize("required", [[], ["a"], ["d"], ["a", "d"], ["b", "c"], ["a", "b", "c", "d"]])
def test_optional_properties_any_subset(required: list[str]) -> None:
    names = ["a", "b", "c", "d"]
    schema = {"type": "object", "properties": {n: {"const": i} for i, n in enumerate(names)}, "required": required}
    grammar = grammar_of(schema)
    for mask in range(16):
        value = {n: i for i, n in enumerate(names) if mask >> i & 1}
        assert accepts(grammar, value) == (set(required) <= value.keys()), value
    assert grammar.lark.count("\n") <= 2 * len(names) + 6  # linear, not exponential


def test_many_optional_properties_stay_linear() -> None:
    schema = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(40)}}
    grammar = grammar_of(schema)
    assert grammar.lark.count("\n") < 100
    assert accepts(grammar, {"p3": 1, "p39": 2}) and accepts(grammar, {}) and accepts(grammar, {"p0": 0})


def test_additional_properties() -> None:
    check({"type": "object", "additionalProperties": {"type": "integer"}}, [{}, {"x": 1, "y": 2}],
          [{"x": "a"}, []])
    check({"type": "object", "additionalProperties": True}, [{}, {"x": [None]}], [[]])
    check({"type": "object", "additionalProperties": False}, [{}], [{"x": 1}])
    check({"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": False},
          [{}, {"a": 1}], [{"b": 1}])
    # with properties, other keys are never written (a narrowing); required keys outside them take the schema
    check({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["z"],
           "additionalProperties": {"type": "string"}}, [{"z": "x"}, {"a": 1, "z": "x"}], [{"z": 1}, {"a": 1}])
    check({"type": "object", "properties": {"a": {"type": "integer"}, "b": False}}, [{"a": 1}], [{"b": 1}])


@pytest.mark.parametrize("schema", [
    {"type": "object", "properties": {"a": {}}, "required": ["b"], "additionalProperties": False},
    {"type": "object", "properties": {"a": False}, "required": ["a"]},
    {"type": "object", "required": "a"},
])
def test_object_contradictions(schema: dict[str, Any]) -> None:
    with pytest.raises(GrammarError):
        json_schema_grammar(schema)


def test_arrays() -> None:
    check({"type": "array", "items": {"type": "integer"}}, [[], [1], [1, 2, 3]], [["a"], [1, "a"], {}])
    check({"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 3}, [[1, 2], [1, 2, 3]],
          [[], [1], [1, 2, 3, 4]])
    check({"type": "array", "minItems": 1}, [[None], [1, "a"]], [[]])
    check({"type": "array", "maxItems": 0}, [[]], [[1]])
    check({"type": "array", "items": {"type": "string"}, "minItems": 3, "maxItems": 3}, [["a", "b", "c"]],
          [["a", "b"], ["a", "b", "c", "d"]])


def test_prefix_items() -> None:
    tuple_schema = {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}], "minItems": 2,
                    "maxItems": 2}
    check(tuple_schema, [[1, "a"]], [[1], ["a", 1], [1, "a", 2]])
    check({"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}], "items": False},
          [[], [1], [1, "a"]], [["a"], [1, "a", None]])
    check({"type": "array", "prefixItems": [{"type": "integer"}], "items": {"type": "boolean"}, "minItems": 2},
          [[1, True], [1, False, True]], [[1], [1, 2], [True, True]])
    draft7 = "http://json-schema.org/draft-07/schema#"
    check({"$schema": draft7, "type": "array", "items": [{"type": "integer"}], "additionalItems": False},
          [[], [1]], [[1, 2]])


@pytest.mark.parametrize("schema", [
    {"type": "array", "minItems": 3, "maxItems": 2},
    {"type": "array", "prefixItems": [{}], "items": False, "minItems": 2},
    {"type": "array", "minItems": -1},
])
def test_array_contradictions(schema: dict[str, Any]) -> None:
    with pytest.raises(GrammarError):
        json_schema_grammar(schema)


def test_any_of_one_of_all_of_nullable() -> None:
    check({"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 1}]}, [1, "a"], ["ab", None])
    check({"oneOf": [{"const": "a"}, {"type": "object", "properties": {"k": {"type": "null"}}}]}, ["a", {"k": None}],
          ["b", {"k": 1}])
    check({"allOf": [{"type": "integer", "minimum": 1}], "description": "x"}, [1], [0])
    check({"anyOf": [{"type": "string"}, {"type": "null"}], "default": None}, ["x", None], [1])
    nullable = grammar_of({"type": "integer", "nullable": True})  # OpenAPI's keyword, unknown to jsonschema
    assert accepts(nullable, 1) and accepts(nullable, None) and not accepts(nullable, "x")
    # constraints beside anyOf hold in every branch
    check({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
           "anyOf": [{"required": ["a"]}, {"required": ["b"]}]}, [{"a": 1}, {"b": 1}, {"a": 1, "b": 2}], [{}])
    check({"anyOf": [{"type": "integer"}, False]}, [1], ["x"])


def test_inference_of_types_from_keywords() -> None:
    check({"minimum": 0}, [0, 5.5], [-1, "x"])
    check({"properties": {"a": {"type": "integer"}}}, [{"a": 1}], [[], 1])
    check({"format": "date"}, ["2024-01-01"], [1])


def test_annotations_are_ignored() -> None:
    schema = {"type": "integer", "title": "T", "description": "d", "examples": [1], "default": 1, "$comment": "c",
              "$schema": "https://json-schema.org/draft/2020-12/schema", "$id": "urn:x", "deprecated": True,
              "readOnly": False, "writeOnly": False, "x-order": 3, "strict": True}
    check(schema, [1], ["1"])
    check({"oneOf": [{"type": "object", "properties": {"kind": {"const": "a"}}, "required": ["kind"]}],
           "discriminator": {"propertyName": "kind"}}, [{"kind": "a"}], [{"kind": "b"}])


def test_refs_and_recursion() -> None:
    tree = {"$defs": {"Node": {"type": "object", "properties": {
        "value": {"type": "integer"}, "children": {"type": "array", "items": {"$ref": "#/$defs/Node"}}},
        "required": ["value"]}}, "$ref": "#/$defs/Node"}
    deep = {"value": 1, "children": [{"value": 2}, {"value": 3, "children": [{"value": 4, "children": []}]}]}
    check(tree, [{"value": 1}, deep], [{}, {"value": 1, "children": [{}]}, {"value": 1, "children": [1]}])
    linked = {"definitions": {"List": {"anyOf": [{"type": "null"}, {"type": "object", "properties": {
        "head": {"type": "string"}, "tail": {"$ref": "#/definitions/List"}}, "required": ["head", "tail"]}]}},
        "$ref": "#/definitions/List"}
    check(linked, [None, {"head": "a", "tail": {"head": "b", "tail": None}}], [{"head": "a"}])
    check({"type": "array", "items": {"$ref": "#"}}, [[], [[], [[]]]], [[1]])
    check({"$defs": {"a/b": {"type": "integer"}}, "$ref": "#/$defs/a~1b"}, [1], ["x"])
    check({"$defs": {"Pos": {"type": "integer"}}, "$ref": "#/$defs/Pos", "minimum": 1}, [1], [0])


def test_refs_resolve_against_their_own_root() -> None:
    builder = GrammarBuilder()
    first = {"$defs": {"T": {"type": "integer"}}, "type": "object", "properties": {"x": {"$ref": "#/$defs/T"}}}
    second = {"$defs": {"T": {"type": "string"}}, "type": "object", "properties": {"x": {"$ref": "#/$defs/T"}}}
    a = JsonSchemaCompiler(builder, param="tools[0].function.parameters").compile(first)
    b = JsonSchemaCompiler(builder, param="tools[1].function.parameters").compile(second)
    grammar = builder.build(f'"A" {a} | "B" {b}')
    assert grammar.matches('A{"x":1}') and grammar.matches('B{"x":"s"}')
    assert not grammar.matches('A{"x":"s"}') and not grammar.matches('B{"x":1}')
    root = {"$defs": {"U": {"type": "boolean"}}}
    c = JsonSchemaCompiler(builder).compile({"$ref": "#/$defs/U"}, root=root)
    assert builder.build(c).matches("true")
    assert any_json_value(builder) == any_json_value(builder)


@pytest.mark.parametrize(("schema", "message"), [
    ({"$ref": "#/$defs/Missing"}, "points to nothing"),
    ({"$ref": "https://example.com/schema.json"}, "$ref"),
    ({"$ref": "other.json#/x"}, "$ref"),
    ({"$ref": "#anchor"}, "$ref"),
])
def test_bad_refs(schema: dict[str, Any], message: str) -> None:
    with pytest.raises(GrammarError, match=re.escape(message)):
        json_schema_grammar(schema)


UNSUPPORTED = [
    ({"type": "integer", "multipleOf": 5}, "multipleOf"),
    ({"type": "array", "uniqueItems": True}, "uniqueItems"),
    ({"not": {"type": "string"}}, "not"),
    ({"if": {"type": "string"}, "then": {"minLength": 1}}, "if"),
    ({"type": "object", "patternProperties": {"^a": {}}}, "patternProperties"),
    ({"type": "object", "propertyNames": {"maxLength": 3}}, "propertyNames"),
    ({"type": "object", "dependentRequired": {"a": ["b"]}}, "dependentRequired"),
    ({"type": "object", "dependentSchemas": {"a": {}}}, "dependentSchemas"),
    ({"type": "object", "dependencies": {"a": ["b"]}}, "dependencies"),
    ({"type": "array", "contains": {"type": "integer"}}, "contains"),
    ({"type": "array", "minContains": 1}, "minContains"),
    ({"type": "object", "minProperties": 1}, "minProperties"),
    ({"type": "object", "maxProperties": 1}, "maxProperties"),
    ({"type": "object", "unevaluatedProperties": False}, "unevaluatedProperties"),
    ({"type": "array", "unevaluatedItems": False}, "unevaluatedItems"),
    ({"type": "string", "format": "uri"}, "format"),
    ({"type": "string", "format": "ipv4"}, "format"),
    ({"type": "string", "contentEncoding": "base64"}, "contentEncoding"),
    ({"$dynamicRef": "#meta"}, "$dynamicRef"),
    ({"$anchor": "x", "type": "string"}, "$anchor"),
    ({"allOf": [{"type": "integer"}, {"minimum": 1}]}, "allOf"),
    ({"type": "string", "minLength": 1, "format": "date"}, "format"),
    ({"anyOf": [{}], "oneOf": [{}]}, "oneOf"),
    ({"fancyKeyword": 1}, "fancyKeyword"),
]


@pytest.mark.parametrize(("schema", "keyword"), UNSUPPORTED)
def test_unsupported_keywords_are_refused_with_their_location(schema: dict[str, Any], keyword: str) -> None:
    with pytest.raises(GrammarError) as error:
        json_schema_grammar(schema, param="response_format")
    assert f"'{keyword}'" in error.value.message
    assert error.value.param == "response_format"
    nested = {"type": "object", "properties": {"age": {"type": "array", "items": schema}}}
    with pytest.raises(GrammarError) as error:
        json_schema_grammar(nested, param="tools[2].function.parameters")
    assert f"'{keyword}'" in error.value.message and "/properties/age/items" in error.value.message
    assert error.value.param == "tools[2].function.parameters"


def test_unsupported_keyword_in_a_definition_names_its_location() -> None:
    schema = {"$defs": {"Age": {"type": "integer", "multipleOf": 2}}, "type": "object",
              "properties": {"age": {"$ref": "#/$defs/Age"}}}
    with pytest.raises(GrammarError, match=r"'multipleOf' at /\$defs/Age"):
        json_schema_grammar(schema)


def test_whitespace_is_never_allowed() -> None:
    grammar = grammar_of({"type": "object", "properties": {"a": {"type": "array", "items": {"type": "integer"}}}})
    assert grammar.matches('{"a":[1,2]}')
    for text in ('{ "a":[1,2]}', '{"a": [1,2]}', '{"a":[1, 2]}', '{"a":[1,2]}\n', ' {"a":[1,2]}'):
        assert not grammar.matches(text), text


# --- a nested schema, with generated instances ----------------------------------------------------------------

NESTED: dict[str, Any] = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": -50, "maximum": 1000},
        "name": {"type": "string", "minLength": 1, "maxLength": 12},
        "status": {"enum": ["open", "closed", None]},
        "score": {"type": ["number", "null"], "minimum": 0, "maximum": 10},
        "lines": {"type": "array", "maxItems": 4, "items": {
            "type": "object",
            "properties": {
                "sku": {"type": "string"},
                "qty": {"type": "integer", "exclusiveMinimum": 0},
                "meta": {"type": "object", "properties": {"flag": {"type": "boolean"}, "note": {"type": "string"}},
                         "required": ["flag"], "additionalProperties": False},
            },
            "required": ["sku", "qty"],
            "additionalProperties": False,
        }},
        "when": {"type": "string", "format": "date"},
    },
    "required": ["id", "lines"],
    "additionalProperties": False,
}


def ordered(schema: dict[str, Any], value: dict[str, Any]) -> dict[str, Any]:
    return {name: value[name] for name in schema["properties"] if name in value}


def objects(schema: dict[str, Any], fields: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[dict[str, Any]]:
    required = {k: v for k, v in fields.items() if k in schema["required"]}
    optional = {k: v for k, v in fields.items() if k not in schema["required"]}
    return st.fixed_dictionaries(required, optional=optional).map(lambda value: ordered(schema, value))


plain_floats = st.floats(min_value=0, max_value=10).filter(lambda f: "e" not in repr(f))
line_schema = NESTED["properties"]["lines"]["items"]
meta = objects(line_schema["properties"]["meta"], {"flag": st.booleans(), "note": st.text(max_size=5)})
line = objects(line_schema, {"sku": st.text(max_size=6), "qty": st.integers(1, 10**12), "meta": meta})
nested_instances = objects(NESTED, {
    "id": st.integers(-50, 1000),
    "name": st.text(min_size=1, max_size=12),
    "status": st.sampled_from(["open", "closed", None]),
    "score": plain_floats | st.none() | st.integers(0, 10),
    "lines": st.lists(line, max_size=4),
    "when": st.dates().map(datetime.date.isoformat),
})
json_values = st.recursive(st.none() | st.booleans() | st.integers(-5, 2000) | st.text(max_size=3),
                           lambda inner: st.lists(inner, max_size=2) | st.dictionaries(st.text(max_size=3), inner,
                                                                                      max_size=2), max_leaves=4)


@st.composite
def mutated(draw: st.DrawFn, value: Any) -> Any:
    """``value`` with one change somewhere: a node replaced, a key dropped or added, an item added."""
    if isinstance(value, dict) and value and draw(st.booleans()):
        key = draw(st.sampled_from(sorted(value)))
        return {**value, key: draw(mutated(value[key]))}
    if isinstance(value, list) and value and draw(st.booleans()):
        i = draw(st.integers(0, len(value) - 1))
        return [*value[:i], draw(mutated(value[i])), *value[i + 1:]]
    action = draw(st.sampled_from(["replace", "drop", "add"]))
    if action == "drop" and isinstance(value, dict) and value:
        key = draw(st.sampled_from(sorted(value)))
        return {k: v for k, v in value.items() if k != key}
    if action == "add" and isinstance(value, dict):
        return {**value, draw(st.text(max_size=4)): draw(json_values)}
    if action == "add" and isinstance(value, list):
        return [*value, draw(json_values)]
    return draw(json_values)


@pytest.fixture(scope="module")
def nested_grammar() -> Grammar:
    return grammar_of(NESTED)


@given(nested_instances)
@SETTINGS
def test_generated_instances_are_accepted(nested_grammar: Grammar, instance: dict[str, Any]) -> None:
    jsonschema.validate(instance, NESTED)
    assert accepts(nested_grammar, instance), compact(instance)


@given(nested_instances.flatmap(mutated))
@SETTINGS
def test_invalid_mutations_are_rejected(nested_grammar: Grammar, instance: Any) -> None:
    try:
        jsonschema.validate(instance, NESTED)
    except jsonschema.ValidationError:
        assert not accepts(nested_grammar, instance), compact(instance)


# --- a pydantic model -----------------------------------------------------------------------------------------


class Color(enum.Enum):
    RED = "red"
    GREEN = "green"


class Address(BaseModel):
    street: str
    zip: str | None = None


class Person(BaseModel):
    name: str = Field(min_length=1, max_length=40)
    age: int = Field(ge=0, le=150)
    color: Color
    kind: Literal["a", "b"]
    fixed: Literal["only"] = "only"
    tags: list[str] = []
    address: Address | None = None
    friends: list[Address]
    score: float = Field(gt=0, lt=1)
    ratio: float
    born: datetime.date
    seen: datetime.datetime
    pair: tuple[int, str]
    extra: dict[str, int] = {}


PEOPLE = [
    Person(name="Al", age=3, color=Color.RED, kind="b", friends=[], score=0.25, ratio=-1.5e-7,
           born=datetime.date(2020, 1, 2), seen=datetime.datetime(2020, 1, 2, 3, 4, 5, tzinfo=datetime.UTC),
           pair=(1, "a")),
    Person(name='Zoë "Z"\n', age=150, color=Color.GREEN, kind="a", tags=["x", "y"], address=Address(street="s"),
           friends=[Address(street="q", zip="1"), Address(street="r")], score=0.999, ratio=12,
           born=datetime.date(1999, 12, 31),
           seen=datetime.datetime(2021, 6, 7, 8, 9, 10, 123456, tzinfo=datetime.timezone(datetime.timedelta(hours=2))),
           pair=(-7, ""), extra={"k": 1, "é": -2}),
]


def test_pydantic_schema() -> None:
    schema = Person.model_json_schema()
    grammar = grammar_of(schema)
    for person in PEOPLE:
        assert grammar.matches(person.model_dump_json()), person.model_dump_json()
        bad = json.loads(person.model_dump_json())
        for key, value in (("age", 151), ("color", "blue"), ("kind", "c"), ("score", 1), ("pair", [1, 2]),
                           ("born", "2020-1-2"), ("extra", {"k": "v"})):
            assert not accepts(grammar, {**bad, key: value}), key
        assert not accepts(grammar, {k: v for k, v in bad.items() if k != "name"})


# --- every grammar is valid for llguidance, and llguidance enforces it ----------------------------------------

SCHEMAS_FOR_LLGUIDANCE: list[Any] = [
    True, {}, NESTED, Person.model_json_schema(),
    {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
    {"type": "integer", "minimum": -123456, "maximum": 987654321},
    {"type": "string", "minLength": 5, "maxLength": 2000},
    {"type": "array", "items": {"type": "integer"}, "minItems": 3, "maxItems": 500},
    {"$defs": {"N": {"type": "object", "properties": {"c": {"type": "array", "items": {"$ref": "#/$defs/N"}}}}},
     "$ref": "#/$defs/N"},
    {"type": "object", "properties": {f"p{i}": {"enum": [i, None]} for i in range(30)}, "required": ["p29"]},
    *[{"type": "string", "format": fmt} for fmt in ("date", "time", "date-time", "uuid", "email")],
]


@pytest.mark.parametrize("schema", SCHEMAS_FOR_LLGUIDANCE)
def test_llguidance_validates_every_grammar(schema: Any) -> None:
    lg = pytest.importorskip("llguidance")
    is_error, messages = lg.LLMatcher.validate_grammar_with_warnings(json_schema_grammar(schema).llguidance)
    assert not is_error, messages
    is_error, messages = lg.LLMatcher.validate_grammar_with_warnings(json_object_grammar().llguidance)
    assert not is_error, messages




def llguidance_accepts(tokenizer: Any, grammar: Grammar, text: str) -> bool:
    import llguidance as lg

    matcher = lg.LLMatcher(tokenizer, grammar.llguidance, log_level=0)
    return matcher.consume_tokens(tokenizer.tokenize_str(text)) and matcher.is_accepting()


def test_llguidance_enforces_the_grammar(tokenizer: Any, nested_grammar: Grammar) -> None:
    valid = [
        {"id": 0, "lines": []},
        {"id": -50, "name": "é\"\n", "status": None, "score": 9.75, "lines": [
            {"sku": "a", "qty": 3, "meta": {"flag": True, "note": "x"}}, {"sku": "", "qty": 1}], "when": "2024-02-29"},
        {"id": 1000, "status": "open", "score": None, "lines": [{"sku": "z", "qty": 123456789012}]},
    ]
    invalid = [{"id": 1001, "lines": []}, {"lines": []}, {"id": 0}, {"id": 0, "lines": [{"sku": "a"}]},
               {"id": 0, "lines": [], "name": ""}, {"id": 0, "lines": [], "score": 10.5},
               {"id": 0, "lines": [], "when": "2024-02-30x"}, {"id": 0, "lines": [], "other": 1}]
    for value in valid:
        assert llguidance_accepts(tokenizer, nested_grammar, compact(value)), value
        assert nested_grammar.matches(compact(value))
    for value in invalid:
        assert not llguidance_accepts(tokenizer, nested_grammar, compact(value)), value
        assert not nested_grammar.matches(compact(value))
    assert not llguidance_accepts(tokenizer, nested_grammar, '{"id": 0, "lines": []}')  # no whitespace
    people = grammar_of(Person.model_json_schema())
    for person in PEOPLE:
        assert llguidance_accepts(tokenizer, people, person.model_dump_json())


@given(nested_instances)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_llguidance_accepts_generated_instances(tokenizer: Any, nested_grammar: Grammar,
                                                instance: dict[str, Any]) -> None:
    text = compact(instance)
    assume(tokenizer.decode_bytes(tokenizer.tokenize_str(text)) == text.encode())  # the tokenizer round-trips it
    assert llguidance_accepts(tokenizer, nested_grammar, text), text


# --- pattern (needs the regex translator) ---------------------------------------------------------------------


@pytest.mark.parametrize(("pattern", "good", "bad"), [
    ("^[a-z]+$", ["abc"], ["ab1", "", "Abc"]),
    ("[0-9]{3}", ["x123y", "123"], ["12", "1a2b3"]),
    ("^ab", ["ab", "abzz"], ["zab"]),
    ("c$", ["abc", "c"], ["cab"]),
    ("^$", [""], ["a"]),
    ("", ["", "anything"], []),
    ('^"x"\\\\$', ['"x"\\'], ['"x"', "x"]),
    ("(?i)^ab$|^c", ["AB", "ab", "cde"], ["xab", "abc"]),
    ("\\Aa\\Z", ["a"], ["ba", "ab"]),
    ("^\\d{2}\\n$", ["12\n"], ["12", "123\n"]),
])
def test_pattern(pattern: str, good: list[str], bad: list[str]) -> None:
    pytest.importorskip("gallama_kernel.grammar.regex")
    check({"type": "string", "pattern": pattern}, good, bad)


@pytest.mark.parametrize("pattern", ["(a)\\1", "a(?=b)", "(^a)", "(?:^a|^b)", "a\\bc"])
def test_unsupported_patterns_are_refused(pattern: str) -> None:
    pytest.importorskip("gallama_kernel.grammar.regex")
    with pytest.raises(GrammarError) as error:
        json_schema_grammar({"type": "object", "properties": {"code": {"type": "string", "pattern": pattern}}})
    assert "/properties/code" in error.value.message


def test_pattern_under_llguidance(tokenizer: Any) -> None:
    pytest.importorskip("gallama_kernel.grammar.regex")
    grammar = grammar_of({"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{2}-\\d+$"}},
                          "required": ["code"]})
    assert llguidance_accepts(tokenizer, grammar, '{"code":"AB-12"}')
    assert not llguidance_accepts(tokenizer, grammar, '{"code":"AB-"}')
    assert not llguidance_accepts(tokenizer, grammar, '{"code":"ab-1"}')
