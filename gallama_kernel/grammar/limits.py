"""Budgets for grammars and schemas: checked in Python before any native code (llguidance) sees a grammar.

A client's grammar, schema or regex is hostile input. llguidance (Rust) validates grammars recursively: a
long chain of rules referring to the next one overflows its stack and kills the worker with SIGSEGV, which no
``try`` catches. So every grammar the kernel hands to an engine is measured here first, and one beyond a
budget is a 400 (:class:`~.core.GrammarError`) naming the limit and the value.

Measured with llguidance 1.9.1 (``LLMatcher.validate_grammar``, 8 MiB stack, main thread and a Python thread):

* a chain ``start: r0``, ``r0: "a" r1``, … validates in 24 ms at 2,000 rules, 33 ms at 2,500, and crashes
  (SIGSEGV) from about 3,000 on; :data:`MAX_RULE_CHAIN` is 1,000, a margin of ~3x (smaller thread stacks);
* 50,000 rules side by side (no chain) validate in 1.8 s, 5,000 in 0.05 s: :data:`MAX_RULES` is 3,000;
* parentheses nested 20 deep validate; from about 25 on llguidance refuses ("too deeply nested"), and Python's
  Lark raises RecursionError at 1,000: :data:`MAX_NESTING` is 20;
* Python's Lark (Earley) builds a 2,000-rule chain in 0.5 s, so the text of a grammar is capped too
  (:data:`MAX_GRAMMAR_CHARS`). Worst measured within the budgets (2 shared cores): a client grammar of 2,999
  rules checks and builds in 1.7 s, a 999-rule chain in 0.3 to 0.6 s;
* an object of n optional properties is a chain of n rules (llguidance crashed at 3,000 properties, 2,500
  validate in 0.09 s), and Python's Lark, which reads finished output back, builds its parser in time
  quadratic in n: 100 properties 0.35 s, 256 2.2 s, 400 4.7 s, 800 17 s. :data:`MAX_PROPERTIES` is 256. The
  kernel's own compile is linear: 700 properties 0.03 s, 1,000 0.04 s, 5,000 0.2 s (budgets lifted; 29 s and
  96 s for 700 and 1,000 before rule naming was fixed).

JSON Schemas are budgeted before they are compiled (:func:`check_schema`), so that the Python compiler never
recurses without bound nor builds a grammar beyond the rule budgets.
"""

from __future__ import annotations

import re
from typing import Any

MAX_GRAMMAR_CHARS = 200_000
"""Longest grammar text (a client's Lark grammar, or one the kernel built)."""
MAX_RULES = 3_000
"""Most rules and terminals in one grammar (5,000 validate in 0.05 s; a 3,000-long chain crashes llguidance)."""
MAX_RULE_CHAIN = 1_000
"""Longest chain of rules each referring to the next (llguidance crashed at ~3,000, fine at 2,500)."""
MAX_SEQUENCE = 64
"""Most symbols in a row in one alternative of a rule: Python's Lark builds its parser in time steeply
superlinear in this (100 literals in a row 0.2 s, 150 0.6 s, 400 13 s; 400 rule names in a row 10 s)."""
MAX_NESTING = 20
"""Deepest nesting of ``(…)``/``[…]`` inside one rule (llguidance refuses from ~25 on)."""

MAX_SCHEMA_DEPTH = 64
"""Deepest nesting of JSON values in a schema document (an object property's schema is two levels down)."""
MAX_SCHEMA_NODES = 5_000
"""Most subschemas and values in one JSON schema document, all counted."""
MAX_PROPERTIES = 256
"""Most properties in one JSON schema document, all objects together (Python Lark's read-back parser is
built in time quadratic in this: 2.2 s at 256)."""
MAX_ENUM = 1_000
"""Most members of one ``enum``."""
MAX_STRING_CHARS = 10_000
"""Longest string in a schema (a pattern, an enum member, a key, a const)."""

MAX_REGEX_CHARS = 10_000
"""Longest regex (``regex_pattern``, ``regex_prefix_pattern``, a schema ``pattern``)."""
MAX_REPEAT = 1_000
"""Largest repetition count in a regex (``a{1000}``); llguidance expands counts into automaton states."""
MAX_ERROR_CHARS = 300
"""Longest engine (llguidance) message passed on to a client."""


def over(limit: str, value: int, maximum: int) -> str:
    """A message naming the limit, its value and the maximum."""
    return f"the {limit} is {value}, over the limit of {maximum}."


def first_surrogate(text: str) -> int | None:
    """Index of the first lone surrogate in ``text`` (which no engine can encode), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        return error.start
    return None


_STRING_OR_REGEX = re.compile(r'"(?:[^"\\\n]|\\.)*"i?|/(?!/)(?:[^/\\\n]|\\.)+/[imslux]*')
_NAME = re.compile(r"[A-Za-z_][A-Za-z_0-9]*")
_TOKEN = re.compile(r"[A-Za-z_][A-Za-z_0-9]*|\x00|[()\[\]|]")
_DEFINITION = re.compile(r"^\s*[?!]?([A-Za-z_][A-Za-z_0-9]*)(?:\[[^\]\n]*\])?(?:\.-?\d+)?\s*:", re.MULTILINE)
_DIRECTIVE = re.compile(r"^\s*%(\w+)(.*)$", re.MULTILINE)
_COMMON_IMPORT = re.compile(r"\s*common(?:\.[A-Za-z_][A-Za-z_0-9]*(?:\s*->\s*[A-Za-z_][A-Za-z_0-9]*)?"
                            r"|\s*\(\s*[A-Za-z_0-9,\s]*\))\s*(?://.*)?$")


def grammar_shape(text: str) -> tuple[dict[str, set[str]], int, int]:
    """The rules of a Lark grammar text with the names each one refers to, the deepest bracket nesting, and
    the longest run of symbols in one alternative (a line's, split at ``|`` outside brackets).

    A lexical sketch, not a parser: string literals and ``/regex/`` terminals are skipped, names counted.
    """
    rules: dict[str, set[str]] = {}
    current: set[str] | None = None
    nesting = sequence = 0
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("//"):
            continue
        if stripped.startswith("%"):
            current = None
            continue
        definition = _DEFINITION.match(line)
        if definition is not None:
            current = rules.setdefault(definition.group(1), set())
            body = line[definition.end():]
        else:
            body = line
        body = _STRING_OR_REGEX.sub(" \x00 ", body).split("//", 1)[0]
        depth = run = 0
        for token in _TOKEN.findall(body):
            if token in "([":
                depth += 1
                nesting = max(nesting, depth)
            elif token in ")]":
                depth -= 1
            elif token == "|":
                run = 0 if depth <= 0 else run
            else:
                run += 1
                sequence = max(sequence, run)
        if current is not None:
            current.update(_NAME.findall(body))
    return rules, nesting, sequence


def rule_chain(rules: dict[str, set[str]], start: str = "start") -> int:
    """Length of the longest chain of references from ``start``, back edges (recursion) not followed.

    Iterative (a client's grammar must not exhaust Python's stack either); linear in rules and references.
    """
    if start not in rules:
        return 0
    depth: dict[str, int] = {}
    on_path: set[str] = set()
    stack: list[tuple[str, list[str]]] = [(start, sorted(rules[start]))]
    on_path.add(start)
    while stack:
        name, todo = stack[-1]
        while todo:
            child = todo.pop()
            if child in rules and child not in on_path and child not in depth:
                on_path.add(child)
                stack.append((child, sorted(rules[child])))
                break
        else:
            stack.pop()
            on_path.discard(name)
            depth[name] = 1 + max((depth[c] for c in rules[name] if c in depth and c != name), default=0)
    return depth.get(start, 0)


def refused_import(text: str) -> str | None:
    """The first ``%import`` that is not of Lark's bundled ``common`` grammar (or an unknown directive
    that could read a file, such as ``%include``), or None."""
    for match in _DIRECTIVE.finditer(text):
        directive, rest = match.group(1), match.group(2)
        if directive == "import":
            if _COMMON_IMPORT.match(rest) is None:
                return match.group(0).strip()
        elif directive not in ("ignore", "declare", "override", "extend", "llguidance"):
            return match.group(0).strip()
    return None


def grammar_budget_error(text: str, *, user: bool) -> str | None:
    """Why the grammar ``text`` is over a budget, or None. ``user``: a client's own grammar (directives
    checked)."""
    if len(text) > MAX_GRAMMAR_CHARS:
        return over("grammar size (characters)", len(text), MAX_GRAMMAR_CHARS)
    at = first_surrogate(text)
    if at is not None:
        return f"the grammar holds a lone surrogate (U+{ord(text[at]):04X}) at character {at}, which no text can hold."
    if user:
        directive = refused_import(text)
        if directive is not None:
            return (f"the directive {directive[:80]!r} is refused: only '%import common.NAME' (Lark's bundled "
                    "grammar) and '%ignore' may be used; nothing is read from files.")
    rules, nesting, sequence = grammar_shape(text)
    if len(rules) > MAX_RULES:
        return over("rules count", len(rules), MAX_RULES)
    if nesting > MAX_NESTING:
        return over("nesting depth of a rule expression", nesting, MAX_NESTING)
    if sequence > MAX_SEQUENCE:
        return over("number of symbols in a row in one alternative", sequence, MAX_SEQUENCE)
    chain = rule_chain(rules)
    if chain > MAX_RULE_CHAIN:
        return over("rule reference chain depth", chain, MAX_RULE_CHAIN)
    return None


def schema_budget_error(schema: Any) -> tuple[str, str, str] | None:
    """Why a JSON schema document is over a budget (or holds a lone surrogate), as (message, JSON pointer,
    error code), or None. Iterative: a schema nested thousands deep must not exhaust Python's stack."""
    nodes = properties = 0
    stack: list[tuple[Any, int, str]] = [(schema, 0, "")]
    while stack:
        value, depth, pointer = stack.pop()
        nodes += 1
        if nodes > MAX_SCHEMA_NODES:
            return over("schema nodes count", nodes, MAX_SCHEMA_NODES), "", "schema_too_large"
        if depth > MAX_SCHEMA_DEPTH:
            return over("schema nesting depth", depth, MAX_SCHEMA_DEPTH), pointer[:200], "schema_too_large"
        if isinstance(value, str):
            problem = _string_problem(value)
            if problem is not None:
                return problem[0], pointer, problem[1]
        elif isinstance(value, dict):
            props = value.get("properties")
            if isinstance(props, dict):
                properties += len(props)
                if properties > MAX_PROPERTIES:
                    return over("properties count", properties, MAX_PROPERTIES), pointer, "schema_too_large"
            enum = value.get("enum")
            if isinstance(enum, list) and len(enum) > MAX_ENUM:
                return over("enum size", len(enum), MAX_ENUM), pointer, "schema_too_large"
            for key, item in value.items():
                problem = _string_problem(key) if isinstance(key, str) else None
                if problem is not None:
                    return problem[0], pointer, problem[1]
                stack.append((item, depth + 1, f"{pointer}/{key}"))
        elif isinstance(value, list):
            stack.extend((item, depth + 1, f"{pointer}/{i}") for i, item in enumerate(value))
    return None


def _string_problem(text: str) -> tuple[str, str] | None:
    if len(text) > MAX_STRING_CHARS:
        return over("schema string length", len(text), MAX_STRING_CHARS), "schema_too_large"
    at = first_surrogate(text)
    if at is not None:
        return (f"a string holds a lone surrogate (U+{ord(text[at]):04X}), which no text can hold.",
                "invalid_schema")
    return None
