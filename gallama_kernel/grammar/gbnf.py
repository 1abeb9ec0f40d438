r"""The kernel's grammars in llama.cpp's GBNF, for a remote ``llama-server`` (its ``grammar`` request field).

:func:`to_gbnf` reads a :class:`~.core.Grammar` in its Python Lark dialect (``grammar.lark``) and writes a GBNF
that accepts the same strings, or refuses with a :class:`~.core.GrammarError` (code ``constraint_not_supported``)
naming what GBNF cannot say exactly. It never returns a GBNF for a different language.

:func:`expression_rules` gives the same reading of a grammar before the rewrites that only llama.cpp needs:
rules of character-level expressions, which :mod:`.closing` runs its own parser over.

How the Lark grammar maps to GBNF:

* Lark's rule trees are read as EBNF (``?``, ``*``, ``+``, ``~ n..m``, ``[…]``, groups, ``"a".."z"``), never
  compiled to Lark's BNF (whose helper rules for ``x*`` are left-recursive). Rules and terminals both become
  GBNF rules (llama.cpp has no lexer); ``start`` becomes ``root``, other names keep their spelling with ``_``
  written ``-`` (GBNF names are ``[a-zA-Z0-9-]+``), a suffix ``-2``, ``-3``… telling apart names that would
  collide. Only rules reachable from ``start`` are written, each after the rule that first refers to it.
* Terminals are converted from the regex that Lark itself matches (``"abc"i`` and ``/…/imsx`` flags included),
  parsed by Python's ``re`` parser, with Python's semantics exactly: character classes (negations, ranges,
  ``\d\w\s`` with their full Unicode sets, ``(?a)``), ``(?i)`` by Python's own case folding (each cased
  character tested against the pattern), ``.`` with and without DOTALL, alternation, groups, counted
  repetition.
* The look-ahead terminal of :meth:`.core.GrammarBuilder.text_until` (``((?!M)(.|\n))*M``: text up to and
  including the first ``M``) becomes the KMP automaton of ``M``, one rule per matched prefix of ``M``. The
  artifact feature's ``((?!M|B)(.|\n))*M`` (the same text, holding no match of the regex ``B``) becomes the
  automaton of :mod:`.lookahead`, one rule per state.
* ``%import common.X`` (resolved by Lark), templates (expanded per distinct argument list), priorities, aliases
  and rule modifiers (which do not change the language) are supported. Direct left recursion
  (``a: a "+" b | b``) is rewritten as repetition (``a ::= b ("+" b)*``); any other left recursion is refused
  (llama.cpp refuses it). A repetition of something that may be empty repeats its non-empty part instead
  (llama.cpp refuses ``x*`` where ``x`` has an empty alternative, as left recursion).
* Anchors (``^``, ``$``, ``\A``, ``\Z``) are accepted only at the very start (end) of a terminal that only
  ever occurs where nothing can come before (after) it, where they hold anyway (the kernel's regex grammars
  end with ``\Z``).

Refused: ``%ignore`` (it would let ignored text appear anywhere), ``%declare``'d terminals, look-arounds other than
those two forms (so Lark's ``common.ESCAPED_STRING``), back-references, conditionals, word boundaries, anchors
elsewhere, possessive quantifiers and atomic groups, lazy quantifiers (Python Lark's lexer ends a terminal at the
shortest match of ``/.+?/``, so it reads fewer strings than the regex matches), a literal holding NUL (llama.cpp
ends strings at NUL and never matches it), a repetition count over :data:`~.limits.MAX_REPEAT` (nested counts
multiplied, as for the kernel's regexes; llama.cpp silently makes ``{m,n}`` unbounded beyond 2,000), and a result
over :data:`MAX_GBNF_CHARS`.

The language is the grammar's own: each terminal stands for every string its regex matches. Python Lark's
dynamic lexer reads a terminal as the first match that Python's ``re`` finds at a position (and, on a retry,
that match's prefixes), which is every match for the kernel's terminals (greedy, or closed by a quote or
``\Z``), but can stop short for a client's ``/a|ab/`` followed by more text.

Character classes: GBNF matches code points, and llama.cpp can never match NUL (its token text is C strings),
so classes are compared over the characters text can hold: U+0001 to U+10FFFF without surrogates. Where a
shorter class says the same thing over those characters, it is used (``[^\x00-\x1F"\\]``: NUL, surrogates
and values past U+10FFFF never occur in UTF-8 text). An empty class is never written (llama.cpp reads ``[]``
as the empty string); a class that matches nothing is ``[^\x00-\UFFFFFFFF]``; one that only NUL would match is
refused, like a NUL in a literal. A long class is written once, as a rule of its own.

Repetitions are written as GBNF quantifiers. llama.cpp refuses one where the symbols it creates inside the
repeated group times the count reach 2,000; such a group (see :data:`GROUP_BUDGET`) gets a rule of its own.
Results are cached by ``grammar.key``.
"""

from __future__ import annotations

import _sre  # type: ignore[import-not-found]
import re
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache, lru_cache
from re import _constants as sre  # type: ignore[attr-defined]
from re import _parser  # type: ignore[attr-defined]
from typing import Any

from lark import Tree
from lark.grammar import NonTerminal, Terminal
from lark.lexer import Pattern, PatternStr
from lark.load_grammar import GrammarBuilder as LarkGrammarBuilder
from lark.load_grammar import PrepareLiterals, TerminalTreeToPattern, nr_deepcopy_tree

from .core import Grammar, GrammarError
from .limits import MAX_GRAMMAR_CHARS, MAX_REPEAT, over
from .lookahead import END, text_without
from .regex import MAX_CHAR, Alt, Chars, Ranges, Repeat, Seq, _codes, _intersect, _merge, _subtract

__all__ = ["MAX_GBNF_CHARS", "Node", "Ref", "expression_rules", "to_gbnf"]

MAX_GBNF_CHARS = 5 * MAX_GRAMMAR_CHARS
"""Longest GBNF written (a client's ``\\w`` is a class of ~700 ranges, and ``(?i)`` turns letters into classes)."""
GROUP_BUDGET = 1_000
"""A repeated group is written as a rule of its own where (1 + its :func:`_weight`) times the repetition's
count reaches this (llama.cpp refuses 2,000: ``n_prev_rules * total_rules`` in ``parse_sequence``)."""
MAX_TEMPLATE_INSTANCES = 1_000
"""Most distinct instances of Lark templates in one grammar (a template can instantiate itself without end)."""
CODE = "constraint_not_supported"

TEXT: Ranges = ((1, 0xD7FF), (0xE000, MAX_CHAR))
"""The characters that llama.cpp can match in text: every Unicode scalar value but NUL."""
NEWLINE: Ranges = ((10, 10),)


# --- the tree: GBNF expressions ------------------------------------------------------------------------------

# Chars, Seq, Alt and Repeat are regex.py's nodes; a GBNF expression may also name a rule.


@dataclass(frozen=True)
class Ref:
    """A reference to another rule of the same rules."""

    name: str  # a GBNF rule name


Node = Chars | Seq | Alt | Repeat | Ref
EMPTY = Seq(())
NOTHING = Chars(())


def _seq(items: Iterable[Node]) -> Node:
    flat: list[Node] = []
    for item in items:
        if item == NOTHING:
            return NOTHING
        flat.extend(item.items if isinstance(item, Seq) else [item])
    return flat[0] if len(flat) == 1 else Seq(tuple(flat))


def _alt(options: Iterable[Node]) -> Node:
    flat: list[Node] = []
    seen: set[Node] = set()
    chars: int | None = None  # where the options that are one character went, as one set
    for option in options:
        for item in option.options if isinstance(option, Alt) else [option]:
            if isinstance(item, Chars):
                if not item.ranges:
                    continue
                if chars is None:
                    chars = len(flat)
                    flat.append(item)
                else:
                    flat[chars] = Chars(_merge(flat[chars].ranges + item.ranges))  # type: ignore[union-attr]
            elif item not in seen:
                seen.add(item)
                flat.append(item)
    if EMPTY in flat and len(flat) > 1:
        return _repeat(_alt(item for item in flat if item != EMPTY), 0, 1)
    return NOTHING if not flat else flat[0] if len(flat) == 1 else Alt(tuple(flat))


def _repeat(node: Node, low: int, high: int | None) -> Node:
    if high == 0 or node == EMPTY:
        return EMPTY
    if node == NOTHING:
        return EMPTY if low == 0 else NOTHING
    if isinstance(node, Repeat) and node.low <= 1 and low <= 1 and (high, node.high) != (1, 1) \
            and None in (high, node.high):  # (x+)? is x*, (x*)+ is x*, (x?)* is x*, (x+)+ is x+
        return Repeat(node.node, low * node.low, None)
    if isinstance(node, Repeat) and (low, high) == (0, 1) and node.low == 1:  # (x{1,n})? is x{0,n}
        return Repeat(node.node, 0, node.high)
    return node if (low, high) == (1, 1) else Repeat(node, low, high)


def _literal(text: str) -> Node:
    return _seq(Chars(((ord(c), ord(c)),)) for c in text)


def _nullable(node: Node, rules: set[str]) -> bool:
    """Whether ``node`` matches the empty string (``rules``: the rules that do)."""
    if isinstance(node, Chars):
        return False
    if isinstance(node, Ref):
        return node.name in rules
    if isinstance(node, Seq):
        return all(_nullable(item, rules) for item in node.items)
    if isinstance(node, Alt):
        return any(_nullable(option, rules) for option in node.options)
    return node.low == 0 or _nullable(node.node, rules)


def _children(node: Node) -> tuple[Node, ...]:
    if isinstance(node, Seq):
        return node.items
    if isinstance(node, Alt):
        return node.options
    if isinstance(node, Repeat):
        return (node.node,)
    return ()


# --- code-point ranges (the helpers regex.py uses for the same intervals) ------------------------------

def _members(ranges: Ranges) -> Iterable[int]:
    for low, high in ranges:
        yield from range(low, high + 1)


# --- Python's character sets, exactly ------------------------------------------------------------------------

_CATEGORIES = {sre.CATEGORY_DIGIT: (r"\d", False), sre.CATEGORY_NOT_DIGIT: (r"\d", True),
               sre.CATEGORY_WORD: (r"\w", False), sre.CATEGORY_NOT_WORD: (r"\w", True),
               sre.CATEGORY_SPACE: (r"\s", False), sre.CATEGORY_NOT_SPACE: (r"\s", True)}
_FLAGS = re.IGNORECASE | re.DOTALL | re.ASCII


@cache
def _category(category: str, ascii_only: bool) -> Ranges:
    """The characters of :data:`TEXT` that Python's ``\\d``, ``\\w`` or ``\\s`` matches (computed once)."""
    pattern = re.compile(category + "+", re.ASCII if ascii_only else 0)
    out = []
    for low, high in ((1, 0x7F),) if ascii_only else TEXT:
        text = "".join(map(chr, range(low, high + 1)))
        out.extend((low + m.start(), low + m.end() - 1) for m in pattern.finditer(text))
    return _merge(out)


@cache
def _cased(ascii_only: bool) -> Ranges:
    """The characters whose match ``(?i)`` may change: those Python's regex engine calls cased (2,927 in
    Unicode 15; in ASCII mode the ASCII letters). Any other character matches a pattern with ``(?i)`` exactly
    when it matches without."""
    if ascii_only:
        return ((65, 90), (97, 122))
    return _codes(c for c in _members(TEXT) if _sre.unicode_iscased(c))


def _source(op: Any, value: Any) -> str:
    """One character-set node back as Python regex source (to be tested with ``(?i)``)."""
    def char(code: int) -> str:
        return f"\\U{code:08x}"

    def item(entry: tuple[Any, Any]) -> str:
        kind, arg = entry
        if kind is sre.LITERAL:
            return char(arg)
        if kind is sre.RANGE:
            return char(arg[0]) + "-" + char(arg[1])
        category, negated = _CATEGORIES[arg]
        return category.upper() if negated else category

    if op is sre.LITERAL:
        return char(value)
    if op is sre.NOT_LITERAL:
        return "[^" + char(value) + "]"
    if op is sre.ANY:
        return "."
    negate = bool(value) and value[0][0] is sre.NEGATE
    items = value[1:] if negate else value
    return "[" + "^" * negate + "".join(map(item, items)) + "]" if items else "[^\\s\\S]"


def _freeze(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return tuple(_freeze(item) for item in value)
    return value


@lru_cache(maxsize=4096)
def _charset(op: Any, value: Any, flags: int) -> Ranges:
    """The characters of :data:`TEXT` that one character-set node matches, as Python's ``re`` does."""
    ascii_only = bool(flags & re.ASCII)
    if op is sre.LITERAL and flags & re.IGNORECASE and not any(lo <= value <= hi for lo, hi in _cased(ascii_only)):
        flags &= ~re.IGNORECASE  # an uncased character matches itself only
    if op is sre.ANY:
        return TEXT if flags & re.DOTALL else _subtract(TEXT, NEWLINE)
    if op in (sre.LITERAL, sre.NOT_LITERAL):
        negate, items = op is sre.NOT_LITERAL, ((sre.LITERAL, value),)
    else:
        negate = bool(value) and value[0][0] is sre.NEGATE
        items = value[1:] if negate else value
    parts: list[tuple[int, int]] = []
    for kind, arg in items:
        if kind is sre.LITERAL:
            parts.append((arg, arg))
        elif kind is sre.RANGE:
            parts.append(arg)
        elif kind is sre.CATEGORY and arg in _CATEGORIES:
            category, negated = _CATEGORIES[arg]
            members = _category(category, ascii_only)
            parts.extend(_subtract(TEXT, members) if negated else members)
        else:
            raise ValueError(f"character set item {kind} {arg}")
    ranges = _intersect(TEXT, _merge(parts))
    if negate:
        ranges = _subtract(TEXT, ranges)
    if flags & re.IGNORECASE:
        cased = _cased(ascii_only)
        match = re.compile(_source(op, value), flags & _FLAGS).fullmatch
        ranges = _merge(_subtract(ranges, cased) + _codes(c for c in _members(cased) if match(chr(c))))
    return ranges


# --- regexes -------------------------------------------------------------------------------------------------

_BEGIN = (sre.AT_BEGINNING, sre.AT_BEGINNING_STRING)
_END = (sre.AT_END, sre.AT_END_STRING)
_LAZY_HEAD = "((?!"
_LAZY_MIDDLES = (")(.|\\n))*", ")(.|\n))*")  # Lark turns a /…/ literal's \n into a newline


def lazy_parts(pattern: str) -> tuple[str, str] | None:
    """``(M, B)`` when ``pattern`` is text up to the first ``M`` (a literal) holding no match of the regex ``B``:
    ``((?!M|B)(.|\\n))*M`` (the artifact feature's bodies), or ``(M, "")`` for ``text_until``'s
    ``((?!M)(.|\\n))*M``; else None."""
    if not pattern.startswith(_LAZY_HEAD):
        return None
    for middle in _LAZY_MIDDLES:
        at = pattern.rfind(middle)  # M, escaped, never holds the middle's unescaped brackets
        if at < len(_LAZY_HEAD):
            continue
        escaped, inner = pattern[at + len(middle):], pattern[len(_LAZY_HEAD):at]
        if inner == escaped:
            banned = ""
        elif escaped and inner.startswith(escaped + "|"):
            banned = inner[len(escaped) + 1:]
        else:
            continue
        try:
            parsed = _parser.parse(escaped)
            if banned:
                re.compile(banned)  # balanced on its own, so the "|" before it is the look-ahead's own
        except (re.error, RecursionError, OverflowError):
            return None
        if not escaped or parsed.state.flags & _FLAGS or not all(op is sre.LITERAL for op, _ in parsed):
            return None
        return "".join(chr(value) for _, value in parsed), banned
    return None


Refuse = Callable[[str], GrammarError]
"""Makes the error that names a construct GBNF cannot say exactly."""


@dataclass
class _RegexResult:
    node: Node
    anchored_start: bool
    anchored_end: bool


@dataclass(frozen=True)
class _RepeatLimit:
    """The largest repetition count read (nested counts multiplied), and what it is the limit of."""

    count: int = MAX_REPEAT
    of: str = "llama.cpp's GBNF"


class _Regex:
    """One Python regex as a :data:`Node`, exactly."""

    def __init__(self, refuse: Refuse, limit: _RepeatLimit) -> None:
        self.refuse = refuse
        self.limit = limit
        self.anchored_start = self.anchored_end = False
        self.scale = 1  # product of the counts of the repetitions around the current node

    def translate(self, pattern: str) -> _RegexResult:
        try:
            re.compile(pattern)
            parsed = _parser.parse(pattern)
        except (re.error, OverflowError) as error:
            raise self.refuse(f"an invalid regex ({error})") from None
        node = self.sequence(list(parsed), parsed.state.flags, True, True)
        return _RegexResult(node, self.anchored_start, self.anchored_end)

    def sequence(self, items: list[tuple[Any, Any]], flags: int, start: bool, end: bool) -> Node:
        count = len(items)
        lead = next((i for i, (op, v) in enumerate(items) if not (op is sre.AT and v in _BEGIN)), count)
        trail = next((i for i, (op, v) in enumerate(reversed(items)) if not (op is sre.AT and v in _END)), count)
        nodes = []
        for i, (op, value) in enumerate(items):
            at_start, at_end = start and i <= lead, end and i >= count - 1 - trail
            if op is sre.AT:
                if value in (sre.AT_BOUNDARY, sre.AT_NON_BOUNDARY):
                    raise self.refuse(r"a word boundary (\b or \B) in a regex")
                if value in _BEGIN and at_start:
                    self.anchored_start = True
                elif value in _END and at_end:
                    self.anchored_end = True
                else:
                    raise self.refuse(r"an anchor (^, $, \A or \Z) that is not at the very start or end of a regex")
                continue
            nodes.append(self.node(op, value, flags, at_start, at_end))
        return _seq(nodes)

    def node(self, op: Any, value: Any, flags: int, start: bool, end: bool) -> Node:
        if op in (sre.LITERAL, sre.NOT_LITERAL, sre.ANY, sre.IN):
            try:
                ranges = _charset(op, _freeze(value), flags & _FLAGS)
            except ValueError as error:
                raise self.refuse(f"a regex {error}") from None
            if not ranges and re.fullmatch(_source(op, value), "\x00", flags & _FLAGS):
                raise self.refuse("a NUL character in a regex, which llama.cpp never matches")
            return Chars(ranges)
        if op is sre.BRANCH:
            return _alt(self.sequence(list(branch), flags, start, end) for branch in value[1])
        if op is sre.SUBPATTERN:
            _, add, remove, body = value
            return self.sequence(list(body), (flags | add) & ~remove, start, end)
        if op in (sre.MAX_REPEAT, sre.MIN_REPEAT):
            low, high, body = value
            if op is sre.MIN_REPEAT and low != high:
                raise self.refuse("a lazy quantifier (*?, +?, ?? or {m,n}?) in a regex: Python Lark's lexer ends "
                                  "such a terminal at its shortest match, so it reads fewer strings than the "
                                  "regex matches")
            unbounded = high is sre.MAXREPEAT
            count = max(low, 0 if unbounded else high)
            if self.scale * max(count, 1) > self.limit.count:
                raise self.refuse(f"a regex repetition count too large for {self.limit.of}: " + over(
                    "repetition count (nested counts multiplied)", self.scale * count, self.limit.count))
            outer, self.scale = self.scale, self.scale * max(count, 1)
            try:
                return _repeat(self.sequence(list(body), flags, False, False), low, None if unbounded else high)
            finally:
                self.scale = outer
        refused = {sre.GROUPREF: r"a back-reference (\1 or (?P=name))",
                   sre.GROUPREF_EXISTS: "a conditional group ((?(1)…|…))",
                   sre.POSSESSIVE_REPEAT: "a possessive quantifier (*+, ++, ?+ or {m,n}+)",
                   sre.ATOMIC_GROUP: "an atomic group ((?>…))"}
        if op in (sre.ASSERT, sre.ASSERT_NOT):
            what = "a look-ahead ((?=…) or (?!…))" if value[0] == 1 else "a look-behind ((?<=…) or (?<!…))"
            raise self.refuse(what + " in a regex (only text_until's ((?!M)(.|\\n))*M and the artifact feature's "
                              "((?!M|B)(.|\\n))*M are converted)")
        raise self.refuse(refused.get(op, f"the regex construct {op}") + " in a regex")


# --- names ---------------------------------------------------------------------------------------------------

class _Names:
    """GBNF rule names (``[a-zA-Z0-9-]+``), each handed out once."""

    def __init__(self) -> None:
        self.used: set[str] = set()
        self.counters: dict[str, int] = {}

    def fresh(self, hint: str) -> str:
        base = re.sub(r"-+", "-", re.sub(r"[^a-zA-Z0-9]", "-", hint)).strip("-") or "r"
        name, n = base, self.counters.get(base, 1)
        if n > 1:
            name = f"{base}-{n}"
        while name in self.used:
            n += 1
            name = f"{base}-{n}"
        self.counters[base] = n
        self.used.add(name)
        return name


# --- Lark grammar → rules ------------------------------------------------------------------------------------

class _Converter:
    def __init__(self, text: str, refuse: Refuse, limit: _RepeatLimit) -> None:
        self.refuse = refuse
        self.limit = limit
        builder = LarkGrammarBuilder()
        builder.load_grammar(text, "<string>")
        builder.validate()
        if builder._ignore_names:
            raise refuse("%ignore (ignored text may appear between any two terminals, which GBNF cannot say)")
        self.definitions = builder._definitions
        if "start" not in self.definitions or self.definitions["start"].is_term:
            raise refuse("no 'start' rule")
        self.names = _Names()
        self.lark_names: dict[str, str] = {"start": self.names.fresh("root")}
        for name, definition in self.definitions.items():
            if name != "start" and not definition.params:  # templates are named per instance
                self.lark_names[name] = self.names.fresh(name)
        self.rules: dict[str, Node] = {}
        self.anchored_start: set[str] = set()
        self.anchored_end: set[str] = set()
        self.templates: dict[tuple[str, tuple[Node, ...]], str] = {}
        self.todo: list[tuple[str, str, dict[str, Node]]] = []  # (GBNF name, Lark name, template arguments)
        self.queued: set[str] = set()
        self.root = self.lark_names["start"]

    def convert(self) -> None:
        self.symbol("start")
        while self.todo:
            name, lark_name, env = self.todo.pop()
            self.define(name, lark_name, env)

    def symbol(self, lark_name: str) -> Ref:
        name = self.lark_names[lark_name]
        if name not in self.queued:
            self.queued.add(name)
            self.todo.append((name, lark_name, {}))
        return Ref(name)

    def define(self, name: str, lark_name: str, env: dict[str, Node]) -> None:
        definition = self.definitions[lark_name]
        if definition.tree is None:
            raise self.refuse(f"the %declare'd symbol {lark_name} (it has no definition)")
        single = _single_literal(definition.tree)
        if definition.is_term and single is None:
            transformer = PrepareLiterals() * TerminalTreeToPattern()
            pattern = transformer.transform(nr_deepcopy_tree(definition.tree))
            body = self.pattern(pattern, lark_name, own=name)
        elif single is not None:
            body = self.pattern(_to_pattern(single), lark_name, own=name)
        else:
            body = self.expression(definition.tree, env, lark_name)
        if body is not None:
            self.rules[name] = body
        if definition.is_term and name in self.rules and _nullable(self.rules[name], set()):
            raise self.refuse(f"the terminal {lark_name}, which matches the empty string")

    def expression(self, tree: Any, env: dict[str, Node], where: str) -> Node:
        if isinstance(tree, NonTerminal):
            if tree.name in env:
                return env[tree.name]
            if self.definitions[tree.name].params:
                raise self.refuse(f"the template {tree.name} without arguments")
            return self.symbol(tree.name)
        if isinstance(tree, Terminal):
            return self.symbol(tree.name)
        if not isinstance(tree, Tree):
            raise self.refuse(f"the grammar element {tree!r}")
        data, children = tree.data, tree.children
        if data == "expansions":
            return _alt(self.expression(child, env, where) for child in children)
        if data == "expansion":
            return _seq(self.expression(child, env, where) for child in children)
        if data == "alias":
            return self.expression(children[0], env, where)
        if data == "value":
            return self.expression(children[0], env, where)
        if data == "maybe":
            return _repeat(self.expression(children[0], env, where), 0, 1)
        if data in ("literal", "range"):
            node = self.pattern(_to_pattern(tree), where)
            assert node is not None
            return node
        if data == "template_usage":
            return self.template(children[0], children[1:], env, where)
        if data == "expr":
            atom = self.expression(children[0], env, where)
            op = children[1]
            if op.type == "OP":
                low, high = {"?": (0, 1), "*": (0, None), "+": (1, None)}[str(op)]
            else:
                numbers = [int(n) for n in children[2:]]
                low, high = numbers[0], numbers[-1]
                if high < low:
                    raise self.refuse(f"a repetition range {low}..{high} (in {where}) that matches nothing")
                if high > self.limit.count:
                    raise self.refuse(f"a repetition (~) in {where} too large for {self.limit.of}: " + over(
                        "repetition count", high, self.limit.count))
            return _repeat(atom, low, high)
        raise self.refuse(f"the Lark construct '{data}'")

    def template(self, head: Any, arguments: list[Any], env: dict[str, Node], where: str) -> Node:
        if not isinstance(head, NonTerminal) or head.name in env:
            raise self.refuse(f"a template passed as an argument (in {where})")
        definition = self.definitions[head.name]
        values = tuple(self.expression(argument, env, where) for argument in arguments)
        key = (head.name, values)
        name = self.templates.get(key)
        if name is None:
            if len(self.templates) >= MAX_TEMPLATE_INSTANCES:
                raise self.refuse(f"more than {MAX_TEMPLATE_INSTANCES} template instances (does a template "
                                  "instantiate itself without end?)")
            name = self.templates[key] = self.names.fresh(head.name)
            self.queued.add(name)
            self.todo.append((name, head.name, dict(zip(definition.params, values, strict=True))))
        return Ref(name)

    def pattern(self, pattern: Pattern, where: str, own: str | None = None) -> Node | None:
        """A terminal pattern as a node; with ``own``, as the body of the rule ``own`` (then None is returned
        when the rules were defined already)."""
        if isinstance(pattern, PatternStr) and not pattern.flags:
            return self.literal(pattern.value, where)
        regex = pattern.to_regexp()
        parts = lazy_parts(regex)
        if parts is not None:
            marker, banned = parts
            self.literal(marker, where)  # NUL and lone surrogates refused
            state0 = own or self.names.fresh(where)
            if banned:
                self.lazy_without(marker, banned, state0, where)
            else:
                self.lazy(marker, state0)
            return None if own else Ref(state0)
        result = _Regex(self.refuse, self.limit).translate(regex)
        if not (result.anchored_start or result.anchored_end):
            return result.node
        name = own or self.names.fresh(where)
        if result.anchored_start:
            self.anchored_start.add(name)
        if result.anchored_end:
            self.anchored_end.add(name)
        if own:
            return result.node
        self.rules[name] = result.node
        return Ref(name)

    def literal(self, text: str, where: str) -> Node:
        for char in text:
            if char == "\x00":
                raise self.refuse(f"a NUL character (in {where}), which llama.cpp never matches")
            if 0xD800 <= ord(char) <= 0xDFFF:
                raise self.refuse(f"a lone surrogate (in {where}), which no text holds")
        return _literal(text)

    def lazy(self, marker: str, state0: str) -> None:
        """Rules for text up to and including the first ``marker``: the KMP automaton of ``marker``, one rule
        per matched prefix (``state0`` the empty one), each reading one character."""
        size = len(marker)
        fail = [0] * (size + 1)
        k = 0
        for i in range(1, size):
            while k and marker[i] != marker[k]:
                k = fail[k]
            if marker[i] == marker[k]:
                k += 1
            fail[i + 1] = k
        names = [state0] + [self.names.fresh(f"{state0}-{q}") for q in range(1, size)]
        alphabet = sorted(set(marker))
        for q in range(size):
            targets: dict[int, list[int]] = {}
            for char in alphabet:
                state = q
                while state and marker[state] != char:
                    state = fail[state]
                state = state + 1 if marker[state] == char else 0
                if state:
                    targets.setdefault(state, []).append(ord(char))
            options: list[Node] = []
            for state, codes in sorted(targets.items(), reverse=True):
                chars = Chars(_codes(codes))
                options.append(chars if state == size else _seq([chars, Ref(names[state])]))
            explicit = _codes(c for codes in targets.values() for c in codes)
            options.append(_seq([Chars(_subtract(TEXT, explicit)), Ref(names[0])]))
            self.rules[names[q]] = _alt(options)


    def lazy_without(self, marker: str, banned: str, state0: str, where: str) -> None:
        """Rules for text up to and including the first ``marker`` that holds no match of the regex ``banned``:
        the automaton of :func:`.lookahead.text_without`, one rule per state (``state0`` the start)."""
        result = _Regex(self.refuse, self.limit).translate(banned)
        if result.anchored_start or result.anchored_end:
            raise self.refuse(f"an anchor in the look-ahead of {where}")
        automaton = text_without(_literal(marker), result.node, TEXT, self.refuse)
        names = [state0] + [self.names.fresh(f"{state0}-{q}") for q in range(1, len(automaton.states))]
        for name, moves in zip(names, automaton.states, strict=True):
            self.rules[name] = _alt([Chars(chars) if target == END else _seq([Chars(chars), Ref(names[target])])
                                     for chars, target in moves])


def _single_literal(tree: Any) -> Tree | None:
    """The one literal a definition consists of, if so."""
    while isinstance(tree, Tree) and tree.data in ("expansions", "expansion", "value", "alias") \
            and len(tree.children) == 1 + (tree.data == "alias"):
        tree = tree.children[0]
    return tree if isinstance(tree, Tree) and tree.data == "literal" else None


def _to_pattern(tree: Tree) -> Pattern:
    prepared = PrepareLiterals().transform(tree)
    return prepared.children[0]


# --- analyses and rewrites ------------------------------------------------------------------------------------

def _nullable_rules(rules: dict[str, Node]) -> set[str]:
    nullable: set[str] = set()
    changed = True
    while changed:
        changed = False
        for name, body in rules.items():
            if name not in nullable and _nullable(body, nullable):
                nullable.add(name)
                changed = True
    return nullable


def _only_empty_rules(rules: dict[str, Node]) -> set[str]:
    """The rules that match nothing but the empty string (if anything)."""
    result = set(rules)
    changed = True
    while changed:
        changed = False
        for name in list(result):
            if not _only_empty(rules[name], result):
                result.discard(name)
                changed = True
    return result


def _only_empty(node: Node, rules: set[str]) -> bool:
    if isinstance(node, Chars):
        return False
    if isinstance(node, Ref):
        return node.name in rules
    if isinstance(node, Repeat):
        return node.high == 0 or _only_empty(node.node, rules)
    return all(_only_empty(child, rules) for child in _children(node))


def _edge_rules(rules: dict[str, Node], root: str, at_start: bool) -> set[str]:
    """The rules that only ever occur where nothing can come before them (``at_start``) or after them."""
    empty = _only_empty_rules(rules)
    occurrences: dict[str, list[tuple[str, bool]]] = {name: [] for name in rules}

    def walk(owner: str, node: Node, edge: bool) -> None:
        if isinstance(node, Ref):
            occurrences.setdefault(node.name, []).append((owner, edge))
        elif isinstance(node, Seq):
            items = node.items if at_start else tuple(reversed(node.items))
            for i, item in enumerate(items):
                walk(owner, item, edge and all(_only_empty(x, empty) for x in items[:i]))
        elif isinstance(node, Alt):
            for option in node.options:
                walk(owner, option, edge)
        elif isinstance(node, Repeat):
            walk(owner, node.node, edge and node.high is not None and node.high <= 1)

    for name, body in rules.items():
        walk(name, body, True)
    result = {name for name in rules if name == root or occurrences.get(name)}
    changed = True
    while changed:
        changed = False
        for name in list(result):
            if any(not edge or owner not in result for owner, edge in occurrences.get(name, [])):
                result.discard(name)
                changed = True
    return result


def _remove_direct_left_recursion(rules: dict[str, Node]) -> None:
    """``a: a x | a y | b | c`` as ``a: (b | c) (x | y)*``: the same strings, without left recursion."""
    for name, body in list(rules.items()):
        options = body.options if isinstance(body, Alt) else (body,)
        recursive, others = [], []
        for option in options:
            items = option.items if isinstance(option, Seq) else (option,)
            if items and items[0] == Ref(name):
                recursive.append(_seq(items[1:]))
            else:
                others.append(option)
        if recursive:
            rules[name] = _seq([_alt(others), _repeat(_alt(recursive), 0, None)])


class _NonEmpty:
    """Rewrites repetitions of something that may be empty into repetitions of its non-empty part."""

    def __init__(self, rules: dict[str, Node], names: _Names) -> None:
        self.rules = rules
        self.names = names
        self.nullable = _nullable_rules(rules)
        self.plus: dict[str, str] = {}  # rule -> the rule for its non-empty strings

    def run(self) -> None:
        for name in list(self.rules):
            self.rules[name] = self.fix(self.rules[name])

    def fix(self, node: Node) -> Node:
        if isinstance(node, Seq):
            return _seq(self.fix(item) for item in node.items)
        if isinstance(node, Alt):
            return _alt(self.fix(option) for option in node.options)
        if isinstance(node, Repeat):
            body = self.fix(node.node)
            if not _nullable(body, self.nullable):
                return _repeat(body, node.low, node.high)
            if node.high == 1:
                return body
            return _repeat(self.nonempty(body), 0, node.high)
        return node

    def nonempty(self, node: Node) -> Node:
        """The non-empty strings of ``node``, whose repetitions are fixed already (no nullable bodies)."""
        if isinstance(node, Chars):
            return node
        if isinstance(node, Ref):
            if node.name not in self.nullable:
                return node
            name = self.plus.get(node.name)
            if name is None:
                name = self.plus[node.name] = self.names.fresh(node.name + "-nonempty")
                self.rules[name] = EMPTY  # placeholder while the body is built (recursion)
                self.rules[name] = self.nonempty(self.fix(self.rules[node.name]))
            return Ref(name)
        if isinstance(node, Alt):
            return _alt(self.nonempty(option) for option in node.options)
        if isinstance(node, Seq):
            if not node.items:
                return NOTHING
            head, rest = node.items[0], _seq(node.items[1:])
            options = [_seq([self.nonempty(head), rest])]
            if _nullable(head, self.nullable):
                options.append(self.nonempty(rest))
            return _alt(options)
        assert isinstance(node, Repeat) and not _nullable(node.node, self.nullable)  # fixed: see fix
        high = None if node.high is None else node.high - 1
        return _seq([node.node, _repeat(node.node, max(node.low - 1, 0), high)])


def _left_recursion(rules: dict[str, Node]) -> str | None:
    """A rule that can start with itself (which llama.cpp refuses), or None."""
    nullable = _nullable_rules(rules)

    def first(node: Node) -> Iterable[str]:
        if isinstance(node, Ref):
            yield node.name
        elif isinstance(node, Seq):
            for item in node.items:
                yield from first(item)
                if not _nullable(item, nullable):
                    break
        elif isinstance(node, Alt):
            for option in node.options:
                yield from first(option)
        elif isinstance(node, Repeat) and node.high != 0:
            yield from first(node.node)

    edges = {name: sorted(set(first(body))) for name, body in rules.items()}
    state: dict[str, int] = {}  # 1: on the path, 2: done
    for start in rules:
        if start in state:
            continue
        stack = [(start, iter(edges[start]))]
        state[start] = 1
        while stack:
            name, children = stack[-1]
            for child in children:
                if state.get(child) == 1:
                    return child
                if child not in state and child in edges:
                    state[child] = 1
                    stack.append((child, iter(edges[child])))
                    break
            else:
                state[name] = 2
                stack.pop()
    return None


# --- rendering -----------------------------------------------------------------------------------------------

def _spans(ranges: Ranges) -> Ranges:
    """``ranges`` widened over characters no text holds (NUL, surrogates), where that makes fewer ranges."""
    out = list(ranges)
    if out and out[0][0] == 1:
        out[0] = (0, out[0][1])
    merged: list[tuple[int, int]] = []
    for low, high in out:
        if merged and merged[-1][1] == 0xD7FF and low == 0xE000:
            merged[-1] = (merged[-1][0], high)
        else:
            merged.append((low, high))
    return tuple(merged)


def _char(code: int, in_class: bool) -> str:
    char = chr(code)
    if char in ("\\[]-" if in_class else '\\"'):
        return "\\" + char
    if char in "\n\t\r":
        return {"\n": "\\n", "\t": "\\t", "\r": "\\r"}[char]
    if code < 0x20 or code == 0x7F:
        return f"\\x{code:02X}"
    if code >= 0x80 and (code > MAX_CHAR or 0xD800 <= code <= 0xDFFF or not char.isprintable()):
        return f"\\u{code:04X}" if code <= 0xFFFF else f"\\U{code:08X}"
    return char


def _class_items(ranges: Ranges) -> str:
    parts = []
    for low, high in ranges:
        if low == high:
            parts.append(_char(low, True))
        else:
            parts.append(_char(low, True) + ("" if high == low + 1 else "-") + _char(high, True))
    text = "".join(parts)
    return "\\x5E" + text[1:] if text.startswith("^") else text  # a leading ^ would negate


def _class(ranges: Ranges) -> str:
    if not ranges:
        return "[^\\x00-\\UFFFFFFFF]"  # matches nothing (``[]`` would match the empty string)
    if ranges == TEXT:
        return "."
    if len(ranges) == 1 and ranges[0][0] == ranges[0][1]:
        return '"' + _char(ranges[0][0], False) + '"'
    positive = "[" + _class_items(_spans(ranges)) + "]"
    negative = "[^" + _class_items(_spans(_subtract(TEXT, ranges))) + "]"
    return negative if len(negative) < len(positive) else positive


def _single(node: Node) -> int | None:
    if isinstance(node, Chars) and len(node.ranges) == 1 and node.ranges[0][0] == node.ranges[0][1]:
        return node.ranges[0][0]
    return None


def _is_literal(node: Node) -> bool:
    return isinstance(node, Seq) and all(_single(item) is not None for item in node.items)


def _weight(node: Node) -> int:
    """At most how many symbols llama.cpp creates while it reads ``node`` inside a group: a name seen for the
    first time, a nested group, and the rules that a repetition expands into."""
    if isinstance(node, Chars):
        return 1  # a long class is written as a rule
    if isinstance(node, Ref):
        return 1
    if isinstance(node, Repeat):
        body = node.node
        inner = _weight(body) + (0 if isinstance(body, Chars | Ref) or _is_literal(body) else 1)
        return inner + (1 if node.high is None else node.high - node.low)
    nested = sum(1 for child in _children(node) if isinstance(child, Alt))
    return nested + sum(_weight(child) for child in _children(node))


def _multiplier(low: int, high: int | None) -> int:
    """What llama.cpp multiplies a group's symbols by for a repetition (it refuses products from 2,000 on)."""
    return high if high else max(low, 1)


def _quantifier(low: int, high: int | None) -> str:
    named = {(0, 1): "?", (0, None): "*", (1, None): "+"}.get((low, high))
    if named:
        return named
    return f"{{{low},}}" if high is None else f"{{{low}}}" if low == high else f"{{{low},{high}}}"


class _Renderer:
    def __init__(self, rules: dict[str, Node], root: str, names: _Names, tokens: dict[str, int]) -> None:
        self.rules = rules
        self.root = root
        self.names = names
        self.tokens = tokens  # rules written as one token of the vocabulary (``<[id]>``)
        self.shared: dict[Ranges, str] = {}  # long classes written once, as a rule
        self.lines: list[str] = []
        self.done: set[str] = set()
        self.todo: deque[str] = deque()
        self.found: list[str] = []  # rules first referred to by the rule being written
        self.owner = root

    def render(self) -> str:
        self.todo.append(self.root)
        self.done.add(self.root)
        while self.todo:
            name = self.todo.popleft()
            self.owner = name
            body = self.rules[name]
            if name in self.tokens:
                text = f"<[{self.tokens[name]}]>"
            else:
                text = self.chars(body, share=False) if isinstance(body, Chars) else self.alternatives(body)
            self.lines.append(f"{name} ::= {text}")
            self.todo.extendleft(reversed(self.found))  # depth first: a rule's new references right after it
            self.found = []
        return "\n".join(self.lines) + "\n"

    def ref(self, name: str) -> str:
        if name not in self.done:
            self.done.add(name)
            self.found.append(name)
        return name

    def helper(self, node: Node, hint: str) -> str:
        name = self.names.fresh(hint)
        self.rules[name] = node
        return self.ref(name)

    def chars(self, node: Chars, share: bool = True) -> str:
        text = _class(node.ranges)
        if not share or len(text) <= 80:
            return text
        name = self.shared.get(node.ranges)
        if name is None:
            name = self.shared[node.ranges] = self.helper(node, "chars")
        return name

    def alternatives(self, node: Node) -> str:
        if isinstance(node, Alt):
            return " | ".join(self.sequence(option) for option in node.options)
        return self.sequence(node)

    def sequence(self, node: Node) -> str:
        items = node.items if isinstance(node, Seq) else (node,)
        if not items:
            return '""'
        parts: list[str] = []
        run: list[int] = []
        for item in [*items, None]:
            code = None if item is None else _single(item)
            if code is not None:
                run.append(code)
                continue
            if run:
                parts.append('"' + "".join(_char(c, False) for c in run) + '"')
                run = []
            if item is not None:
                parts.append(self.item(item))
        return " ".join(parts)

    def item(self, node: Node) -> str:
        if isinstance(node, Chars):
            return self.chars(node)
        if isinstance(node, Ref):
            return self.ref(node.name)
        if isinstance(node, Repeat):
            return self.atom(node.node, _multiplier(node.low, node.high)) + _quantifier(node.low, node.high)
        return "(" + self.alternatives(node) + ")"

    def atom(self, node: Node, multiplier: int) -> str:
        """``node`` as one symbol to repeat. llama.cpp refuses a repetition where the symbols created inside its
        group times its count reach 2,000: such a group gets a rule of its own (a name counts once)."""
        if isinstance(node, Chars | Ref):
            return self.item(node)
        if _is_literal(node):
            return self.sequence(node)
        if (1 + _weight(node)) * multiplier >= GROUP_BUDGET:
            return self.helper(node, self.owner)
        return "(" + self.alternatives(node) + ")"


# --- entry point ---------------------------------------------------------------------------------------------

_CACHE: dict[tuple[str, str, tuple[tuple[str, int], ...]], tuple[bool, str, str | None]] = {}
"""(``grammar.key``, description, special tokens) -> (converted, the GBNF or the error message, the error code)."""


def to_gbnf(grammar: Grammar, *, param: str | None = None,
            token_of: Callable[[str], int | None] | None = None) -> str:
    """``grammar`` in llama.cpp's GBNF (root rule ``root``), accepting exactly the strings it accepts.

    ``token_of`` gives the id of the vocabulary's special token with a text (None: it has none): each of the
    grammar's :attr:`~.core.Grammar.special` rules is then that token (``<[id]>``, which llama.cpp matches as
    the token alone, not as its characters); without it, or for a text without a token, the rule is the text.

    :raises GrammarError: (code ``constraint_not_supported``, naming ``param``) when GBNF cannot say the same
        thing; see the module docstring for what is converted and what is refused
    """
    tokens = tuple((rule, token) for rule, text in grammar.special
                   if token_of is not None and (token := token_of(text)) is not None)
    key = (grammar.key, grammar.description, tokens)
    cached = _CACHE.get(key)
    if cached is None:
        try:
            cached = (True, _convert(grammar, dict(tokens)), None)
        except GrammarError as error:
            cached = (False, error.message, error.code)
        if len(_CACHE) > 256:
            _CACHE.clear()
        _CACHE[key] = cached
    ok, text, code = cached
    if not ok:
        raise GrammarError(text, param=param, code=code)
    return text


def expression_rules(grammar: Grammar, *, max_repeat: int = MAX_REPEAT) -> tuple[dict[str, Node], str]:
    """``grammar`` as character-level expressions: (rules, the root rule's name), the same language.

    The rules are read as for :func:`to_gbnf` (terminals expanded from their regexes, ``text_until``'s look-ahead
    terminal as a KMP automaton, anchors checked), but before the rewrites only llama.cpp needs: left recursion
    (direct or not) is kept as written, and a repetition may repeat something that can be empty. Each call
    returns new rules (the caller may change them). Names are GBNF rule names (``root`` for ``start``).

    ``max_repeat`` is the largest repetition count accepted (nested counts multiplied, a Lark ``~ n..m`` by its
    own): :data:`~.limits.MAX_REPEAT` is llama.cpp's, a reader that does not expand counts may accept more.

    :raises GrammarError: (code ``constraint_not_supported``) for the constructs :func:`to_gbnf` refuses for
        reasons other than llama.cpp's own (``%ignore``, look-arounds other than ``text_until``'s,
        back-references, …; see the module docstring)
    """
    description = grammar.description

    def refuse(construct: str) -> GrammarError:
        return GrammarError(f"The {description} cannot be read as character-level rules: it uses {construct}.",
                            code=CODE)

    with _reading(refuse):
        converter = _read(grammar.lark, refuse, _RepeatLimit(max_repeat, "character-level rules"))
    return converter.rules, converter.root


@contextmanager
def _reading(refuse: Refuse) -> Iterator[None]:
    """Turns any error but a :class:`GrammarError` raised while a grammar is read into a refusal."""
    try:
        yield
    except GrammarError:
        raise
    except RecursionError:
        raise refuse("nesting too deep to convert") from None
    except Exception as error:  # Lark's own errors on a grammar it cannot read, the regex module's: never a 500
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise refuse(f"a grammar that cannot be read ({first})") from None


def _read(text: str, refuse: Refuse, limit: _RepeatLimit) -> _Converter:
    """The Lark grammar ``text`` converted into rules, its anchors checked (each only where it holds anyway)."""
    converter = _Converter(text, refuse, limit)
    converter.convert()
    rules, root = converter.rules, converter.root
    for anchored, at_start in ((converter.anchored_start, True), (converter.anchored_end, False)):
        if anchored:
            edge = _edge_rules(rules, root, at_start)
            for name in sorted(anchored - edge):
                side, where = ("before", "start") if at_start else ("after", "end")
                raise refuse(f"a regex anchor in the terminal '{name}', which may occur where text can come "
                             f"{side} it (anchors are only converted at the {where} of the whole output)")
    return converter


def _convert(grammar: Grammar, tokens: dict[str, int]) -> str:
    description = grammar.description

    def refuse(construct: str) -> GrammarError:
        return GrammarError(f"The {description} cannot be enforced exactly by llama.cpp's GBNF: it uses "
                            f"{construct}.", code=CODE)

    with _reading(refuse):
        converter = _read(grammar.lark, refuse, _RepeatLimit())
        rules, root = converter.rules, converter.root
        _remove_direct_left_recursion(rules)
        _NonEmpty(rules, converter.names).run()
        recursive = _left_recursion(rules)
        if recursive is not None:
            raise refuse(f"left recursion (the rule '{recursive}' can start with itself), which llama.cpp "
                         "refuses")
        named = {converter.lark_names[rule]: token for rule, token in tokens.items() if rule in converter.lark_names}
        text = _Renderer(rules, root, converter.names, named).render()
    if len(text) > MAX_GBNF_CHARS:
        raise GrammarError(f"The {description} is too large for llama.cpp's GBNF: " + over(
            "GBNF size (characters)", len(text), MAX_GBNF_CHARS), code="grammar_too_large")
    return text
