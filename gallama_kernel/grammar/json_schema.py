"""JSON Schema as Lark rules: structured output and tool arguments, enforced token by token.

The grammar writes **compact JSON**: no whitespace anywhere (``{"a":1,"b":[true,null]}``). This is deliberate:
compact JSON costs fewer tokens, and a grammar without optional whitespace leaves a greedy decoder no room to
loop on newlines or spaces. Parsers and clients read it like any other JSON.

A grammar may accept fewer documents than its schema does (it *narrows*): it only has to make every output
valid, not to be able to write every valid document. The narrowings:

* properties are written in the order ``properties`` lists them; with ``properties`` given, other keys are
  never written, whatever ``additionalProperties`` says (keys listed in ``required`` but not in
  ``properties`` are written after them, with the ``additionalProperties`` schema);
* an object schema with neither ``properties`` nor ``required`` (``{"type": "object"}``) takes any keys, with
  values of its ``additionalProperties`` schema (any value when absent); duplicate keys are not prevented;
* a schema without ``type`` takes the types its keywords are about (``{"minimum": 0}`` is a number); one
  without any such keyword takes any JSON value;
* ``oneOf`` is enforced as ``anyOf`` (a document matching several branches is not refused); keywords beside
  ``anyOf``/``oneOf``/``$ref``/a one-member ``allOf`` hold in each branch (merged into it; a keyword given on
  both sides, other than ``type`` and ``required``, is refused);
* ``enum``/``const`` members are written as given (compact), those failing the scalar keywords beside them
  (``type``, lengths, bounds, ``pattern``, ``format``) left out; OpenAPI's ``nullable: true`` adds ``null``;
* integers are written as integers (never ``1.0``); the integer part of a number has at most
  :data:`MAX_INT_DIGITS` digits, its fraction at most :data:`MAX_FRACTION_DIGITS`, its exponent at most
  :data:`MAX_EXPONENT_DIGITS`, so that a greedy decoder cannot write digits forever. An explicit bound beyond
  ``10**MAX_INT_DIGITS`` constrains nothing within that cap and is treated as absent; a bound below it is
  exact. Bounded numbers are written without exponent; integer bounds and any decimal number bound are exact;
* ``pattern`` is unanchored in JSON Schema: a branch starting with ``^`` matches from the start of the
  string, one ending with ``$`` up to its end, and otherwise any text may come before or after;
* ``minLength``/``maxLength`` count characters, an escape (``\\n``, ``\\u00e9``) being one character; they
  cannot be combined with ``pattern`` or ``format`` (refused);
* formats: ``date`` (``YYYY-MM-DD``, a real day of years 0001 to 9999), ``time`` (``HH:MM:SS[.fraction]``, no leap
  second, and an offset ``Z`` or ``±HH:MM``, as RFC 3339 requires), ``date-time`` (``date`` + ``T`` + ``time``),
  ``uuid`` (8-4-4-4-12 hex digits) and ``email`` (a simple ``local@domain.tld`` subset);
* strings, enum members and keys are written with non-ASCII characters as themselves.

Budgets (:mod:`.limits`, checked before compiling): nesting depth, subschema count, property count, enum
size and string lengths; a schema over one, or one that no value satisfies (``minLength`` over ``maxLength``, an
empty ``enum``, a ``$ref`` cycle without input in between such as ``{"$ref": "#"}``), is refused.

Everything else a schema may say is either an annotation (:data:`ANNOTATIONS`, ignored: it constrains
nothing) or refused with a :class:`~.core.GrammarError` naming the keyword and where it is (a JSON pointer
such as ``/properties/age``): a constraint is never dropped silently.
"""

from __future__ import annotations

import json
import math
import re
from fractions import Fraction
from typing import Any
from urllib.parse import unquote

from .core import Grammar, GrammarBuilder, GrammarError, literal
from .limits import MAX_SCHEMA_DEPTH, schema_budget_error

__all__ = [
    "ANNOTATIONS",
    "FORMATS",
    "MAX_EXPONENT_DIGITS",
    "MAX_FRACTION_DIGITS",
    "MAX_INT_DIGITS",
    "JsonSchemaCompiler",
    "any_json_object",
    "any_json_value",
    "json_object_grammar",
    "json_schema_grammar",
    "number_regex",
]

MAX_INT_DIGITS = 20
"""Most digits in the integer part of a number left unbounded above (``2**64`` has 20 digits)."""
MAX_FRACTION_DIGITS = 24
"""Most digits after the decimal point (Python writes floats with up to 21)."""
MAX_EXPONENT_DIGITS = 3
"""Most digits in an exponent (doubles end at ``1e308``)."""

ANNOTATIONS = frozenset({
    "title", "description", "examples", "example", "default", "$comment", "$schema", "$id", "deprecated",
    "readOnly", "writeOnly", "discriminator", "strict", "$defs", "definitions",
})
"""Keywords that constrain nothing; ignored (so are OpenAPI-style ``x-…`` extensions).

``$defs``/``definitions`` only hold schemas for ``$ref``; ``discriminator`` (OpenAPI) only names the property
that tells ``oneOf`` branches apart, which the branches themselves enforce; ``strict`` is OpenAI's flag for
schemas that are enforced anyway."""

OBJECT_KEYWORDS = frozenset({"properties", "required", "additionalProperties"})
ARRAY_KEYWORDS = frozenset({"items", "prefixItems", "additionalItems", "minItems", "maxItems"})
STRING_KEYWORDS = frozenset({"minLength", "maxLength", "pattern", "format"})
NUMBER_KEYWORDS = frozenset({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"})
COMBINATORS = frozenset({"$ref", "anyOf", "oneOf", "allOf"})
SUPPORTED = (OBJECT_KEYWORDS | ARRAY_KEYWORDS | STRING_KEYWORDS | NUMBER_KEYWORDS | COMBINATORS
             | {"type", "enum", "const", "nullable"})

TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")

STRING_CHAR = r'(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})'
"""Regex for one character of a JSON string's content (itself, or an escape)."""
JSON_STRING = f'"{STRING_CHAR}*"'
JSON_NUMBER = (f"-?(?:0|[1-9][0-9]{{0,{MAX_INT_DIGITS - 1}}})(?:\\.[0-9]{{1,{MAX_FRACTION_DIGITS}}})?"
               f"(?:[eE][+\\-]?[0-9]{{1,{MAX_EXPONENT_DIGITS}}})?")

_TIME = r"(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]{1,9})?(?:Z|[+\-](?:[01][0-9]|2[0-3]):[0-5][0-9])"
_YEAR = r"(?:[1-9][0-9]{3}|0[1-9][0-9]{2}|00[1-9][0-9]|000[1-9])"
_LEAP_YEAR = r"(?:[0-9]{2}(?:0[48]|[2468][048]|[13579][26])|(?:0[48]|[2468][048]|[13579][26])00)"
_DATE = (f"(?:{_YEAR}-(?:(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])|(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)"
         f"|02-(?:0[1-9]|1[0-9]|2[0-8]))|{_LEAP_YEAR}-02-29)")
FORMATS = {
    "date": _DATE,
    "time": _TIME,
    "date-time": f"{_DATE}T{_TIME}",
    "uuid": r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}",
    "email": r"[A-Za-z0-9._%+\-]+@(?:[A-Za-z0-9\-]+\.)+[A-Za-z]{2,}",
}
"""Regexes (common dialect) for the supported ``format`` values; their strings never need escapes in JSON."""


def compact(value: Any) -> str:
    """``value`` as compact JSON, the way the grammars write it."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def any_json_value(builder: GrammarBuilder) -> str:
    """The rule for any JSON value (compact), added to ``builder`` once."""
    name = builder.memo(("json", "value"))
    if name is not None:
        return name
    name = builder.reserve("json_value")
    builder.remember(("json", "value"), name)
    string, number = _string_terminal(builder), _number_terminal(builder)
    member = builder.rule("json_member", f'{string} ":" {name}')
    obj = builder.rule("json_object", f'"{{" [{member} ("," {member})*] "}}"')
    builder.remember(("json", "object"), obj)
    array = builder.rule("json_array", f'"[" [{name} ("," {name})*] "]"')
    builder.define(name, f'{obj} | {array} | {string} | {number} | "true" | "false" | "null"')
    return name


def any_json_object(builder: GrammarBuilder) -> str:
    """The rule for any JSON object (compact)."""
    any_json_value(builder)
    return builder.memo(("json", "object")) or ""


def json_schema_grammar(schema: dict[str, Any] | bool, param: str = "response_format") -> Grammar:
    """The grammar of compact JSON documents valid against ``schema``; a 400 naming ``param`` if it cannot be."""
    builder = GrammarBuilder()
    start = JsonSchemaCompiler(builder, param=param).compile(schema)
    return builder.build(start, "JSON schema", param=param)


def json_object_grammar(param: str = "response_format") -> Grammar:
    """The grammar of any compact JSON object (``response_format: {"type": "json_object"}``)."""
    del param  # any object is always expressible
    builder = GrammarBuilder()
    return builder.build(any_json_object(builder), "JSON object")


def _string_terminal(builder: GrammarBuilder) -> str:
    return builder.terminal("json_string", JSON_STRING, key=("json", "string"))


def _number_terminal(builder: GrammarBuilder) -> str:
    return builder.terminal("json_number", JSON_NUMBER, key=("json", "number"))


class JsonSchemaCompiler:
    """Compiles JSON Schemas into rules of one :class:`GrammarBuilder`.

    One compiler (or several) may add many schemas to one builder (a tool-call grammar holds one per tool);
    equal subschemas share their rules, and each schema's ``$ref`` resolves against its own root.

    :param builder: where the rules go
    :param param: the request field named by errors (``response_format``, ``tools[0].function.parameters``)
    """

    def __init__(self, builder: GrammarBuilder, param: str = "response_format") -> None:
        self.builder = builder
        self.param = param
        self._root: dict[str, Any] | bool = True
        self._root_key = ""
        self._bare: set[str] = set()  # $ref targets being compiled since the last '{' or '[' (no input between)

    def compile(self, schema: dict[str, Any] | bool, root: dict[str, Any] | None = None) -> str:
        """Add rules for values valid against ``schema``; return the rule name (or atom) that matches them.

        :param root: the document that ``$ref``\\ s in ``schema`` point into (default: ``schema`` itself)
        """
        self._root = schema if root is None else root
        for document in (self._root, schema) if root is not None else (schema,):
            problem = schema_budget_error(document)
            if problem is not None:
                message, pointer, code = problem
                raise self._error(message, pointer, code=code)
        try:
            self._root_key = json.dumps(self._root, ensure_ascii=False)
        except (TypeError, ValueError, RecursionError):
            raise self._error("The schema is not valid JSON.", "") from None
        self._bare = set()
        try:
            return self._compile(schema, "")
        except RecursionError:  # the budgets should make this unreachable; never a 500
            raise self._error(f"the schema is nested too deeply (limit {MAX_SCHEMA_DEPTH}).", "") from None

    # -- errors ---------------------------------------------------------------------------------------------

    def _error(self, message: str, pointer: str, code: str | None = None) -> GrammarError:
        where = f"at {pointer}" if pointer else "at the schema root"
        return GrammarError(f"Invalid or unsupported JSON schema {where}: {message}", param=self.param, code=code)

    def _unsatisfiable(self, why: str, pointer: str) -> GrammarError:
        return self._error(f"{why} Nothing can satisfy this schema (it is unsatisfiable).", pointer,
                           code="unsatisfiable_schema")

    def _unsupported(self, keyword: str, pointer: str, why: str = "") -> GrammarError:
        where = f"at {pointer}" if pointer else "at the schema root"
        message = f"The JSON Schema keyword '{keyword}' {where} is not supported"
        return GrammarError(f"{message}: {why}" if why else f"{message}.", param=self.param)

    # -- dispatch -------------------------------------------------------------------------------------------

    def _compile(self, schema: Any, pointer: str, refs: frozenset[str] = frozenset()) -> str:
        """``refs``: the ``$ref`` targets merged into ``schema`` so far (to refuse circular merges)."""
        if schema is True:
            return any_json_value(self.builder)
        if schema is False:
            raise self._unsatisfiable("the schema 'false' accepts no value here.", pointer)
        if not isinstance(schema, dict):
            raise self._error("a schema must be an object or a boolean.", pointer)
        for keyword in schema:
            if keyword not in SUPPORTED and keyword not in ANNOTATIONS and not keyword.startswith("x-"):
                raise self._unsupported(keyword, pointer)
        key = self._memo_key(schema)
        name = self.builder.memo(key) if key is not None else None
        if name is not None:
            return name
        name = self._compile_object(schema, pointer, refs)
        if key is not None:
            self.builder.remember(key, name)
        return name

    def _memo_key(self, schema: dict[str, Any]) -> tuple[str, str | None, str] | None:
        try:
            text = json.dumps(schema, ensure_ascii=False)
        except (TypeError, ValueError):
            return None
        return "json_schema", self._root_key if "$ref" in text else None, text

    def _compile_object(self, schema: dict[str, Any], pointer: str, refs: frozenset[str]) -> str:
        if "$ref" in schema:
            return self._ref(schema, pointer, refs)
        if "allOf" in schema:
            members = self._schema_list(schema, "allOf", pointer)
            if len(members) != 1:
                raise self._unsupported("allOf", pointer, "only allOf with a single member is supported.")
            return self._compile(self._merge(members[0], _siblings(schema, "allOf"), pointer), pointer, refs)
        if "anyOf" in schema and "oneOf" in schema:
            raise self._unsupported("oneOf", pointer, "anyOf and oneOf cannot be combined.")
        for keyword in ("anyOf", "oneOf"):
            if keyword in schema:
                return self._union(schema, keyword, pointer, refs)
        if "const" in schema or "enum" in schema:
            return self._enum(schema, pointer)
        alternatives = [self._typed(schema, kind, pointer) for kind in self._types(schema, pointer)]
        return self._alternatives("json_union", alternatives)

    def _alternatives(self, hint: str, alternatives: list[str]) -> str:
        unique = list(dict.fromkeys(alternatives))
        if len(unique) == 1:
            return unique[0]
        return self.builder.rule(hint, " | ".join(unique), key=("json_alternatives", tuple(unique)))

    def _types(self, schema: dict[str, Any], pointer: str) -> list[str]:
        """The types a schema's values may have, ``integer`` dropped where ``number`` is there."""
        declared = schema.get("type")
        if declared is None:
            kinds = [kind for kind, keywords in (("object", OBJECT_KEYWORDS), ("array", ARRAY_KEYWORDS),
                                                  ("string", STRING_KEYWORDS), ("number", NUMBER_KEYWORDS))
                     if keywords & schema.keys()]
            if not kinds:
                return ["any"]
        else:
            kinds = [declared] if isinstance(declared, str) else declared
            if not isinstance(kinds, list) or not kinds or any(kind not in TYPES for kind in kinds):
                raise self._error(f"'type' must be one of {', '.join(TYPES)} or a non-empty list of them.",
                                  pointer)
        if schema.get("nullable") is True:
            kinds = [*kinds, "null"]
        elif schema.get("nullable", False) is not False:
            raise self._error("'nullable' must be a boolean.", pointer)
        kinds = list(dict.fromkeys(kinds))
        if "number" in kinds and "integer" in kinds:
            kinds.remove("integer")
        return kinds

    def _typed(self, schema: dict[str, Any], kind: str, pointer: str) -> str:
        if kind == "any":
            return any_json_value(self.builder)
        if kind == "null":
            return '"null"'
        if kind == "boolean":
            return self.builder.rule("json_boolean", '"true" | "false"', key=("json", "boolean"))
        if kind == "string":
            return self._string(schema, pointer)
        if kind in ("number", "integer"):
            return self._number(schema, pointer, integer=kind == "integer")
        bare, self._bare = self._bare, set()  # '[' or '{' comes first: a $ref cycle below consumes input
        try:
            return self._array(schema, pointer) if kind == "array" else self._object(schema, pointer)
        finally:
            self._bare = bare

    # -- $ref, combinators ----------------------------------------------------------------------------------

    def _ref(self, schema: dict[str, Any], pointer: str, refs: frozenset[str]) -> str:
        ref = schema["$ref"]
        if not isinstance(ref, str):
            raise self._error("'$ref' must be a string.", pointer)
        if not ref.startswith("#") or (len(ref) > 1 and not ref.startswith("#/")):
            raise self._unsupported("$ref", pointer, f"only local references ('#/$defs/…') are supported, not "
                                                     f"{ref!r}.")
        target_pointer = unquote(ref[1:])
        target = self._resolve(target_pointer, pointer, ref)
        siblings = _siblings(schema, "$ref")
        if siblings:  # a reference with constraints of its own: both hold
            if target_pointer in refs:
                raise self._error(f"the reference {ref!r} is circular.", pointer)
            merged = self._merge(target, siblings, pointer)
            return self._compile(merged, target_pointer, refs | {target_pointer})
        key = ("json_schema_ref", self._root_key, target_pointer)
        name = self.builder.memo(key)
        if name is None:  # reserved first, so that recursive schemas refer to it
            hint = target_pointer.rsplit("/", 1)[-1] if target_pointer else "root"
            name = self.builder.reserve("def_" + hint)
            self.builder.remember(key, name)
            self._bare.add(target_pointer)
            try:
                self.builder.define(name, self._compile(target, target_pointer))
            finally:
                self._bare.discard(target_pointer)
        elif target_pointer in self._bare:
            raise self._error(f"the reference {ref!r} is circular without any input in between (it would refer "
                              "to itself forever); nothing can satisfy it.", pointer, code="unsatisfiable_schema")
        return name

    def _resolve(self, target_pointer: str, pointer: str, ref: str) -> Any:
        node: Any = self._root
        for raw in target_pointer.split("/")[1:]:
            part = raw.replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                raise self._error(f"the reference {ref!r} points to nothing.", pointer)
        return node

    def _schema_list(self, schema: dict[str, Any], keyword: str, pointer: str) -> list[Any]:
        members = schema[keyword]
        if not isinstance(members, list) or not members:
            raise self._error(f"'{keyword}' must be a non-empty list of schemas.", pointer)
        return members

    def _union(self, schema: dict[str, Any], keyword: str, pointer: str, refs: frozenset[str]) -> str:
        """``anyOf``/``oneOf``: any member (other constraints of ``schema`` apply to each)."""
        siblings = _siblings(schema, keyword)
        alternatives = []
        for i, member in enumerate(self._schema_list(schema, keyword, pointer)):
            if member is False:
                continue
            here = f"{pointer}/{keyword}/{i}"
            alternatives.append(self._compile(self._merge(member, siblings, here), here, refs))
        if not alternatives:
            raise self._unsatisfiable(f"no member of '{keyword}' accepts a value.", pointer)
        return self._alternatives("json_any_of", alternatives)

    def _merge(self, schema: Any, extra: dict[str, Any], pointer: str) -> Any:
        """A schema requiring both ``schema`` and ``extra`` (constraining keywords only), where one dict says so."""
        if not extra:
            return schema
        if schema is True:
            return extra
        if not isinstance(schema, dict):
            raise self._error("a schema must be an object or a boolean.", pointer)
        merged = dict(schema)
        for keyword, value in extra.items():
            if keyword not in merged or merged[keyword] == value:
                merged[keyword] = value
            elif keyword == "type":
                mine = self._type_set(merged["type"])
                theirs = self._type_set(value)
                both = [kind for kind in TYPES if kind in mine and kind in theirs]
                if not both:
                    raise self._unsatisfiable("the types required here exclude each other.", pointer)
                merged["type"] = both
            elif keyword == "required" and isinstance(value, list) and isinstance(merged[keyword], list):
                merged["required"] = list(dict.fromkeys([*merged["required"], *value]))
            else:
                raise self._unsupported(keyword, pointer, "it is given both here and in a subschema or reference "
                                                          "that must hold too; such schemas cannot be combined.")
        return merged

    def _type_set(self, declared: Any) -> set[str]:
        kinds = {declared} if isinstance(declared, str) else set(declared) if isinstance(declared, list) else set()
        if "number" in kinds:
            kinds.add("integer")
        return kinds

    # -- enum / const ---------------------------------------------------------------------------------------

    def _enum(self, schema: dict[str, Any], pointer: str) -> str:
        if "const" in schema:
            values = [schema["const"]]
            if "enum" in schema:
                values = [v for v in values if self._in_enum(v, schema, pointer)]
        else:
            values = schema["enum"]
            if not isinstance(values, list):
                raise self._error("'enum' must be a non-empty list.", pointer)
            if not values:
                raise self._unsatisfiable("'enum' is empty.", pointer)
        kinds = None if "type" not in schema and "nullable" not in schema else self._types(schema, pointer)
        kept = [v for v in values if self._value_allowed(v, schema, kinds, pointer)]
        if not kept:
            raise self._unsatisfiable("no value of 'enum'/'const' satisfies the other keywords.", pointer)
        return self._alternatives("json_enum", [literal(compact(v)) for v in kept])

    def _in_enum(self, value: Any, schema: dict[str, Any], pointer: str) -> bool:
        if not isinstance(schema["enum"], list):
            raise self._error("'enum' must be a non-empty list.", pointer)
        return any(_json_equal(value, other) for other in schema["enum"])

    def _value_allowed(self, value: Any, schema: dict[str, Any], kinds: list[str] | None, pointer: str) -> bool:
        """Whether an enum member satisfies the schema's other (scalar) keywords."""
        kind = _json_type(value)
        if isinstance(value, float) and not math.isfinite(value):
            raise self._error("'enum'/'const' holds a number that JSON cannot write.", pointer)
        if kinds is not None and not _type_matches(value, kinds):
            return False
        if kind == "string":
            return self._string_allowed(value, schema, pointer)
        if kind in ("number", "integer"):
            low, low_excl, high, high_excl = self._bounds(schema, pointer)
            number = Fraction(repr(value)) if isinstance(value, float) else Fraction(value)
            too_low = low is not None and (number < low or (low_excl and number == low))
            too_high = high is not None and (number > high or (high_excl and number == high))
            return not (too_low or too_high)
        if kind in ("object", "array"):
            keywords = (OBJECT_KEYWORDS if kind == "object" else ARRAY_KEYWORDS) & schema.keys()
            if keywords:
                raise self._unsupported(min(keywords), pointer, "enum/const cannot be combined with it.")
        return True

    def _string_allowed(self, value: str, schema: dict[str, Any], pointer: str) -> bool:
        low, high = self._length_bounds(schema, pointer)
        if len(value) < low or (high is not None and len(value) > high):
            return False
        if "format" in schema and re.fullmatch(self._format(schema, pointer), value) is None:
            return False
        if "pattern" in schema:
            try:
                return re.search(schema["pattern"], value) is not None
            except (re.error, TypeError):
                raise self._error("'pattern' is not a valid regular expression.", pointer) from None
        return True

    # -- strings --------------------------------------------------------------------------------------------

    def _string(self, schema: dict[str, Any], pointer: str) -> str:
        low, high = self._length_bounds(schema, pointer)
        bounded = low > 0 or high is not None
        if "format" in schema:
            self._format(schema, pointer)  # an unknown format is refused first
        for keyword in ("pattern", "format"):
            if keyword in schema and bounded:
                raise self._unsupported(keyword, pointer, "it cannot be combined with minLength/maxLength.")
        if "pattern" in schema and "format" in schema:
            raise self._unsupported("pattern", pointer, "it cannot be combined with 'format'.")
        if "format" in schema:
            content = self._format(schema, pointer)
            return self.builder.terminal("json_" + schema["format"], f'"{content}"', key=("format", content))
        if "pattern" in schema:
            content = self._pattern(schema["pattern"], pointer)
            return self.builder.terminal("json_pattern", f'"{content}"', key=("pattern", content))
        if not bounded:
            return _string_terminal(self.builder)
        if high == 0:
            return literal('""')
        repeat = f"{{{low},}}" if high is None else f"{{{low}}}" if low == high else f"{{{low},{high}}}"
        return self.builder.terminal("json_sized_string", f'"{STRING_CHAR}{repeat}"', key=("string", low, high))

    def _length_bounds(self, schema: dict[str, Any], pointer: str) -> tuple[int, int | None]:
        low = self._count(schema, "minLength", pointer) or 0
        high = self._count(schema, "maxLength", pointer)
        if high is not None and low > high:
            raise self._unsatisfiable("minLength is greater than maxLength.", pointer)
        return low, high

    def _count(self, schema: dict[str, Any], keyword: str, pointer: str) -> int | None:
        value = schema.get(keyword)
        if value is None:
            return None
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise self._error(f"'{keyword}' must be a non-negative integer.", pointer)
        return value

    def _format(self, schema: dict[str, Any], pointer: str) -> str:
        fmt = schema["format"]
        if not isinstance(fmt, str) or fmt not in FORMATS:
            raise self._unsupported("format", pointer, f"the format {fmt!r} is not supported (supported: "
                                                       f"{', '.join(FORMATS)}).")
        return FORMATS[fmt]

    def _pattern(self, pattern: Any, pointer: str) -> str:
        """Regex for the JSON-encoded content of strings in which ``pattern`` finds a match."""
        if not isinstance(pattern, str):
            raise self._error("'pattern' must be a string.", pointer)
        from .regex import translate_regex  # imported here: the module is written alongside this one

        flags = _LEADING_FLAGS.match(pattern)
        prefix = flags.group(0) if flags else ""  # global flags hold in every branch
        around = f"{STRING_CHAR}*"
        branches = []
        for branch in _top_level_branches(pattern[len(prefix):]):
            start = 1 if branch.startswith("^") else 2 if branch.startswith("\\A") else 0
            end = 1 if _ends_with(branch, "$") else 2 if _ends_with(branch, "\\Z") else 0
            body = branch[start:len(branch) - end]
            if _has_anchor(body):
                raise self._unsupported("pattern", pointer, "anchors (^, $, \\A, \\Z) are supported only at the "
                                                            "start or end of the pattern or of its alternatives.")
            try:
                content = translate_regex(prefix + body, param=self.param, json_string=True) if body else ""
            except GrammarError as error:
                raise self._error(f"in 'pattern': {error.message}", pointer) from None
            if not content and not start and not end:
                branches.append(around)
                continue
            branches.append(("" if start else around) + (f"(?:{content})" if content else "")
                            + ("" if end else around))
        return "(?:" + "|".join(branches) + ")"

    # -- numbers --------------------------------------------------------------------------------------------

    def _number(self, schema: dict[str, Any], pointer: str, *, integer: bool) -> str:
        low, low_excl, high, high_excl = self._bounds(schema, pointer)
        if low is None and high is None and not integer:
            return _number_terminal(self.builder)
        pattern = number_regex(low, low_excl, high, high_excl, integer=integer)
        if pattern is None:
            raise self._unsatisfiable("no number lies between the bounds.", pointer)
        return self.builder.terminal("json_integer" if integer else "json_number", pattern, key=("number", pattern))

    def _bounds(self, schema: dict[str, Any], pointer: str) -> tuple[Fraction | None, bool, Fraction | None, bool]:
        """(lower, lower exclusive, upper, upper exclusive), the tightest of the bounds given."""

        def number(keyword: str) -> Fraction | None:
            value = schema.get(keyword)
            if value is None:
                return None
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise self._error(f"'{keyword}' must be a finite number.", pointer)
            return Fraction(repr(value)) if isinstance(value, float) else Fraction(value)

        low, high = number("minimum"), number("maximum")
        low_excl = high_excl = False
        for keyword, below in (("exclusiveMinimum", False), ("exclusiveMaximum", True)):
            value = schema.get(keyword)
            if isinstance(value, bool):  # draft 4: makes minimum/maximum exclusive
                if below:
                    high_excl = value and high is not None
                else:
                    low_excl = value and low is not None
                continue
            bound = number(keyword)
            if bound is None:
                continue
            if below and (high is None or bound <= high):
                high, high_excl = bound, True
            elif not below and (low is None or bound >= low):
                low, low_excl = bound, True
        return low, low_excl, high, high_excl

    # -- arrays ---------------------------------------------------------------------------------------------

    def _array(self, schema: dict[str, Any], pointer: str) -> str:
        items = schema.get("items", True)
        if isinstance(items, list):  # draft 2019 tuples: items + additionalItems
            prefix, prefix_keyword, rest, rest_keyword = items, "items", schema.get("additionalItems", True), \
                "additionalItems"
            if "prefixItems" in schema:
                raise self._unsupported("prefixItems", pointer, "it cannot be combined with 'items' as a list.")
        else:
            prefix, prefix_keyword, rest, rest_keyword = schema.get("prefixItems", []), "prefixItems", items, "items"
        if not isinstance(prefix, list):
            raise self._error(f"'{prefix_keyword}' must be a list of schemas.", pointer)
        low = self._count(schema, "minItems", pointer) or 0
        high = self._count(schema, "maxItems", pointer)
        for i, item in enumerate(prefix):
            if item is False:  # no array reaches this position
                high = i if high is None else min(high, i)
                prefix = prefix[:i]
                break
        if high is not None:
            prefix = prefix[:high]
        most = len(prefix) if rest is False else high  # None: unbounded
        if most is not None and low > most:
            raise self._unsatisfiable("minItems is greater than the number of items allowed.", pointer)
        slots = [self._compile(item, f"{pointer}/{prefix_keyword}/{i}") for i, item in enumerate(prefix)]
        extra = None
        if rest is not False and (most is None or most > len(prefix)):
            extra = self._compile(rest, f"{pointer}/{rest_keyword}")
        body = _array_body(slots, extra, low, most)
        return self.builder.rule("json_array", f'"[" {body} "]"' if body else '"[" "]"')

    # -- objects --------------------------------------------------------------------------------------------

    def _object(self, schema: dict[str, Any], pointer: str) -> str:
        properties = schema.get("properties", {})
        required = schema.get("required", [])
        additional = schema.get("additionalProperties")
        if not isinstance(properties, dict):
            raise self._error("'properties' must be an object.", pointer)
        if not isinstance(required, list) or not all(isinstance(name, str) for name in required):
            raise self._error("'required' must be a list of strings.", pointer)
        if additional is not None and not isinstance(additional, dict | bool):
            raise self._error("'additionalProperties' must be a schema.", pointer)
        if not properties and not required:
            if additional is None or additional is True:
                return any_json_object(self.builder)
            if additional is False:
                return literal("{}")
            value = self._compile(additional, f"{pointer}/additionalProperties")
            member = f'{_string_terminal(self.builder)} ":" {value}'
            return self.builder.rule("json_map", f'"{{" [{member} ("," {member})*] "}}"')
        members: list[tuple[str, bool]] = []
        for name, subschema in properties.items():
            here = f"{pointer}/properties/{_pointer_part(name)}"
            if subschema is False:
                if name in required:
                    raise self._error(f"the required property {name!r} has the schema 'false'.", here)
                continue
            members.append((f"{literal(compact(name) + ':')} {self._compile(subschema, here)}", name in required))
        for name in dict.fromkeys(required):
            if name in properties:
                continue
            if additional is False:
                raise self._error(f"the required property {name!r} is not in 'properties' and "
                                  "additionalProperties is false.", pointer)
            value = self._compile(True if additional is None else additional, f"{pointer}/additionalProperties")
            members.append((f"{literal(compact(name) + ':')} {value}", True))
        return self.builder.rule("json_object", _object_body(self.builder, members))


# -- helpers ------------------------------------------------------------------------------------------------


def _siblings(schema: dict[str, Any], keyword: str) -> dict[str, Any]:
    """The constraining keywords of ``schema`` other than ``keyword``."""
    return {k: v for k, v in schema.items()
            if k != keyword and k not in ANNOTATIONS and not k.startswith("x-")}


def _pointer_part(name: str) -> str:
    return name.replace("~", "~0").replace("/", "~1")


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _type_matches(value: Any, kinds: list[str]) -> bool:
    """Whether ``value`` has one of the JSON Schema types ``kinds`` (``any``: every type)."""
    kind = _json_type(value)
    if "any" in kinds or kind in kinds:
        return True
    if kind == "integer":
        return "number" in kinds
    return kind == "number" and "integer" in kinds and float(value).is_integer()


def _json_equal(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return a == b


def _object_body(builder: GrammarBuilder, members: list[tuple[str, bool]]) -> str:
    """``{…}`` with ``members`` (expansion, required) in order; commas right for any subset of optional ones.

    ``rest[i]``: members ``i…`` each preceded by a comma; ``first[i]``: a non-empty run of members from ``i``
    on, without a leading comma. At most two rules per member.
    """
    n = len(members)
    if n == 0:
        return literal("{}")
    rest: list[str] = [""] * (n + 1)
    for i in range(n - 1, 0, -1):
        expansion, required = members[i]
        step = f'"," {expansion}' if required else f'["," {expansion}]'
        if not rest[i + 1] and required:
            rest[i] = f"({step})"
        else:
            rest[i] = builder.rule("json_props", f"{step} {rest[i + 1]}".strip())
    first_required = next((i for i, (_, required) in enumerate(members) if required), None)
    stop = n - 1 if first_required is None else first_required
    first = f"{members[stop][0]} {rest[stop + 1]}".strip()
    for i in range(stop - 1, -1, -1):
        rule = builder.rule("json_props_from", first) if "|" in first else first
        first = f"{members[i][0]} {rest[i + 1]} | {rule}"
    if first_required is None:
        return f'"{{" [{first}] "}}"'
    return f'"{{" ({first}) "}}"' if "|" in first else f'"{{" {first} "}}"'


def _array_body(slots: list[str], extra: str | None, low: int, most: int | None) -> str:
    """Between ``[`` and ``]``: ``slots`` (positional item rules), then ``extra`` items; ``low…most`` items."""
    usable = slots if most is None else slots[:most]

    def tail(i: int, preceded: bool) -> str:
        comma = '"," ' if preceded else ""
        if i < len(usable):
            inner = f"{comma}{usable[i]} {tail(i + 1, True)}".strip()
            return inner if i < low else f"[{inner}]"
        if extra is None:
            return ""
        at_least = max(0, low - len(usable))
        at_most = None if most is None else most - len(usable)
        if at_most == 0:
            return ""
        if preceded:
            return _repeat(f'("," {extra})', at_least, at_most)
        more = _repeat(f'("," {extra})', max(0, at_least - 1), None if at_most is None else at_most - 1)
        inner = f"{extra} {more}".strip()
        return inner if at_least > 0 else f"[{inner}]"

    return tail(0, False)


def _repeat(atom: str, low: int, high: int | None) -> str:
    """Lark for ``low…high`` copies of ``atom`` (``high`` None: unbounded)."""
    if high is None:
        if low == 0:
            return f"{atom}*"
        if low == 1:
            return f"{atom}+"
        return f"{atom} ~ {low} {atom}*"
    if high == 0:
        return ""
    if low == high:
        return atom if low == 1 else f"{atom} ~ {low}"
    if low == 0:
        return f"[{atom}]" if high == 1 else f"[{atom} ~ 1..{high}]"
    return f"{atom} ~ {low}..{high}"


def _top_level_branches(pattern: str) -> list[str]:
    """``pattern`` split at its top-level ``|`` (outside groups, classes and escapes)."""
    branches, start, depth, i, in_class = [], 0, 0, 0, False
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\":
            i += 2
            continue
        if in_class:
            if ch == "]":
                in_class = False
        elif ch == "[":
            in_class = True
            if pattern[i + 1:i + 2] == "^":
                i += 1
            if pattern[i + 1:i + 2] == "]":  # a leading ']' is literal
                i += 1
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "|" and depth == 0:
            branches.append(pattern[start:i])
            start = i + 1
        i += 1
    branches.append(pattern[start:])
    return branches


def _ends_with(branch: str, anchor: str) -> bool:
    """Whether ``branch`` ends with ``anchor`` (``$`` or ``\\Z``) not escaped itself."""
    if not branch.endswith(anchor):
        return False
    before = branch[:-len(anchor)] if anchor == "$" else branch[:-1]
    backslashes = len(before) - len(before.rstrip("\\"))
    return backslashes % 2 == (0 if anchor == "$" else 1)


def _has_anchor(pattern: str) -> bool:
    """Whether ``pattern`` holds ``^``, ``$``, ``\\A`` or ``\\Z`` outside character classes."""
    i, in_class = 0, False
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\":
            if pattern[i + 1:i + 2] in ("A", "Z") and not in_class:
                return True
            i += 2
            continue
        if in_class:
            in_class = ch != "]"
        elif ch == "[":
            in_class = True
            i += 1 + (pattern[i + 1:i + 2] == "^")
            i += pattern[i:i + 1] == "]"  # a leading ']' is literal
            continue
        elif ch in "^$":
            return True
        i += 1
    return False


_LEADING_FLAGS = re.compile(r"(?:\(\?[aiLmsux]+\))+")

# -- number ranges ------------------------------------------------------------------------------------------


def number_regex(low: Fraction | None, low_exclusive: bool, high: Fraction | None, high_exclusive: bool, *,
                 integer: bool) -> str | None:
    """Regex for JSON numbers between the bounds (``None``: unbounded), written without exponent; None if none.

    Exact on the numbers written with at most :data:`MAX_FRACTION_DIGITS` decimals (for ``integer``: on
    integers); a side left unbounded, or bounded beyond ``10**MAX_INT_DIGITS``, is capped at
    :data:`MAX_INT_DIGITS` integer digits. Negative zero is never written.
    """
    digits = 0 if integer else MAX_FRACTION_DIGITS
    scale = 10**digits
    cap = 10**MAX_INT_DIGITS
    if high is not None and high >= cap:
        high = None
    if low is not None and low <= -cap:
        low = None
    # bounds in units of 10**-digits: the numbers written are exactly the multiples of that unit
    low_units = None if low is None else math.floor(low * scale) + 1 if low_exclusive else math.ceil(low * scale)
    high_units = None if high is None else math.ceil(high * scale) - 1 if high_exclusive else math.floor(high * scale)
    if low_units is not None and high_units is not None and low_units > high_units:
        return None
    alternatives = []
    if high_units is None or high_units >= 0:
        alternatives += _magnitudes(max(low_units or 0, 0), high_units, digits)
    if low_units is None or low_units < 0:
        negative = _magnitudes(1 if high_units is None else max(1, -high_units),
                               None if low_units is None else -low_units, digits)
        if negative:
            alternatives.append("-" + _group("|".join(negative)))
    return "|".join(alternatives) or None


def _magnitudes(low: int, high: int | None, digits: int) -> list[str]:
    """Alternatives for the numbers ``low…high`` units of ``10**-digits`` (``high`` None: capped), low ≥ 0."""
    if high is not None and low > high:
        return []
    scale = 10**digits
    low_int, low_frac = divmod(low, scale)
    high_int, high_frac = (None, scale - 1) if high is None else divmod(high, scale)
    if high_int == low_int:
        return [_with_fraction(low_int, low_int, low_frac, high_frac, digits)]
    alternatives = []  # longest integer parts first: Python's re takes the first alternative that matches
    if high_frac != scale - 1:
        alternatives.append(_with_fraction(high_int, high_int, 0, high_frac, digits))
    middle_low = low_int if low_frac == 0 else low_int + 1
    middle_high = high_int if high_frac == scale - 1 else high_int - 1  # type: ignore[operator]
    if middle_high is None or middle_low <= middle_high:
        alternatives.append(_with_fraction(middle_low, middle_high, 0, scale - 1, digits))
    if low_frac != 0:
        alternatives.append(_with_fraction(low_int, low_int, low_frac, scale - 1, digits))
    return alternatives


def _with_fraction(low: int, high: int | None, frac_low: int, frac_high: int, digits: int) -> str:
    """Integer part in ``low…high``, then a fraction whose digits (padded to ``digits``) lie in the range."""
    if digits == 0:
        return _uint_range(low, high)
    integer = _group(_uint_range(low, high))
    fraction, optional = _fraction(f"{frac_low:0{digits}d}", f"{frac_high:0{digits}d}")
    if not fraction:
        return integer
    return f"{integer}(?:\\.{_group(fraction)}){'?' if optional else ''}"


def _fraction(low: str, high: str) -> tuple[str, bool]:
    """Regex for the non-empty digit strings (at most ``len(low)`` long) that, padded with zeros to that length,
    lie in ``low…high``; and whether the empty string (all zeros) does too."""
    n = len(low)
    optional = set(low) <= {"0"}
    if n == 0:
        return "", True
    if optional and set(high) == {"9"}:
        return f"[0-9]{{1,{n}}}", True
    if set(high) == {"0"}:
        return f"0{{1,{n}}}", True

    def then(first: str, rest: tuple[str, bool]) -> str:
        pattern, empty_ok = rest
        if not pattern:
            return first
        return f"{first}(?:{pattern})?" if empty_ok else first + _group(pattern)

    zeros, nines = "0" * (n - 1), "9" * (n - 1)
    lo, hi = int(low[0]), int(high[0])
    if lo == hi:
        return then(low[0], _fraction(low[1:], high[1:])), optional
    alternatives = []
    if low[1:] != zeros:
        alternatives.append(then(low[0], _fraction(low[1:], nines)))
        lo += 1
    last = None
    if high[1:] != nines:
        last = then(high[0], _fraction(zeros, high[1:]))
        hi -= 1
    if lo <= hi:
        alternatives.append(_digit_class(lo, hi) + (f"[0-9]{{0,{n - 1}}}" if n > 1 else ""))
    if last:
        alternatives.append(last)
    return "|".join(alternatives), optional


def _uint_range(low: int, high: int | None) -> str:
    """Regex for the canonical decimal integers ``low…high`` (``high`` None: up to the digit cap), longest first."""
    if high is None:
        high = 10 ** max(MAX_INT_DIGITS, len(str(low))) - 1
    pieces: list[tuple[int, str | None]] = []  # (length, pattern or None when every number of that length)
    for length in range(len(str(high)), len(str(low)) - 1, -1):
        first = 10 ** (length - 1) if length > 1 else 0
        a, b = max(low, first), min(high, 10**length - 1)
        if a > b:
            continue
        if length > 1 and a == first and b == 10**length - 1:
            pieces.append((length, None))
        else:
            pieces.append((length, _digit_class(a, b) if length == 1 else _fixed(str(a), str(b))))
    alternatives: list[str] = []
    i = 0
    while i < len(pieces):
        length, pattern = pieces[i]
        if pattern is not None:
            alternatives.append(pattern)
            i += 1
            continue
        j = i
        while j + 1 < len(pieces) and pieces[j + 1][1] is None:
            j += 1
        shortest = pieces[j][0]
        count = _digits(length - 1) if shortest == length else f"[0-9]{{{shortest - 1},{length - 1}}}"
        alternatives.append(f"[1-9]{count}")
        i = j + 1
    return "|".join(alternatives)


def _fixed(low: str, high: str) -> str:
    """Regex for the digit strings of ``len(low)`` digits between ``low`` and ``high``."""
    n = len(low)
    if n == 0 or low == high:
        return low
    if low[0] == high[0]:
        return low[0] + _group(_fixed(low[1:], high[1:]))
    zeros, nines = "0" * (n - 1), "9" * (n - 1)
    lo, hi = int(low[0]), int(high[0])
    alternatives, last = [], None
    if low[1:] != zeros:
        alternatives.append(low[0] + _group(_fixed(low[1:], nines)))
        lo += 1
    if high[1:] != nines:
        last = high[0] + _group(_fixed(zeros, high[1:]))
        hi -= 1
    if lo <= hi:
        alternatives.append(_digit_class(lo, hi) + _digits(n - 1))
    if last:
        alternatives.append(last)
    return "|".join(alternatives)


def _digit_class(low: int, high: int) -> str:
    return str(low) if low == high else f"[{low}-{high}]"


def _digits(n: int) -> str:
    return "" if n == 0 else "[0-9]" if n == 1 else f"[0-9]{{{n}}}"


def _group(pattern: str) -> str:
    return f"(?:{pattern})" if "|" in pattern else pattern

