"""Python regexes (``regex_pattern``, ``regex_prefix_pattern``, JSON Schema ``pattern``) as grammars.

A pattern is parsed by Python's own parser (``re._parser``) into a small tree of character sets, sequences,
alternations and repeats, and re-emitted in the regex dialect that Python's ``re`` and llguidance share
(see :mod:`.core`). The emitted regex never accepts a string that Python's ``re.fullmatch`` rejects; where
the dialects cannot say the same thing, it accepts less (a *narrowing*):

* ASCII characters are exact: every character set is evaluated by Python itself on all 128 ASCII characters
  (categories, ranges, negations and ``(?i)`` included).
* Beyond ASCII, ``\\d``, ``\\w`` and ``\\s`` are narrowed to their ASCII members (``[0-9]``,
  ``[0-9A-Za-z_]``, ``[ \\t\\n\\r\\f\\v\\x1c-\\x1f]``); their negations (``\\D``, ``[^\\d]``…) exclude the
  exact Unicode sets, so ``\\S+`` still takes any non-space text. A negated class inside another negated
  class (``[^\\D]``) is ASCII-only.
* ``(?i)`` is implemented by case expansion: exact in ASCII; a non-ASCII literal also takes its own upper and
  lower case; non-ASCII ranges take no case variants; a negated ``(?i)`` class that names a cased character
  accepts no non-ASCII character.
* Surrogates (U+D800 to U+DFFF) are never accepted: no engine can produce them; a pattern holding one is
  refused.

Budgets (:mod:`.limits`): a pattern longer than :data:`~.limits.MAX_REGEX_CHARS`, or with a repetition count
(nested counts multiplied) over :data:`~.limits.MAX_REPEAT`, is refused; so is one that no string matches.

Lazy quantifiers match the same strings as greedy ones. ``(?s)``, ``(?m)``, ``(?x)``, ``(?a)`` and ``(?u)``
are honoured. Anchors (``^``, ``$``, ``\\A``, ``\\Z``) are allowed only at the very start or end, where they
add nothing to a whole match. Refused, with a :class:`GrammarError` naming the construct and the field:
back-references and conditionals, look-ahead and look-behind, word boundaries, anchors elsewhere, and
possessive quantifiers and atomic groups (treated as ordinary groups they would accept strings Python
rejects: ``a*+a`` matches nothing).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache, lru_cache
from re import _constants as sre  # type: ignore[attr-defined]
from re import _parser  # type: ignore[attr-defined]
from typing import Any

from .core import REGEX_META, Grammar, GrammarBuilder, GrammarError
from .limits import MAX_REGEX_CHARS, MAX_REPEAT, first_surrogate, over

__all__ = ["matches_empty", "prefix_grammar", "regex_grammar", "translate_regex"]

Ranges = tuple[tuple[int, int], ...]
"""Sorted, disjoint, non-adjacent code-point intervals (inclusive)."""

MAX_CHAR = 0x10FFFF
UNIVERSE: Ranges = ((0, 0xD7FF), (0xE000, MAX_CHAR))
NON_ASCII: Ranges = ((0x80, 0xD7FF), (0xE000, MAX_CHAR))
CLASS_META = frozenset("\\]^-[&~")
"""Escaped inside character classes (``&`` and ``~`` so that Rust never sees ``&&`` or ``~~``)."""


# --- the tree -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Chars:
    """One character from ``ranges``; empty ranges match nothing."""

    ranges: Ranges


@dataclass(frozen=True)
class Seq:
    items: tuple[Node, ...]


@dataclass(frozen=True)
class Alt:
    options: tuple[Node, ...]


@dataclass(frozen=True)
class Repeat:
    node: Node
    low: int
    high: int | None  # None: unbounded


Node = Chars | Seq | Alt | Repeat
EMPTY = Seq(())
NOTHING = Chars(())


def _seq(items: list[Node]) -> Node:
    flat: list[Node] = []
    for item in items:
        if item == NOTHING:
            return NOTHING
        flat.extend(item.items if isinstance(item, Seq) else [item])
    return flat[0] if len(flat) == 1 else Seq(tuple(flat))


def _alt(options: list[Node]) -> Node:
    flat: list[Node] = []
    for option in options:
        for item in option.options if isinstance(option, Alt) else [option]:
            if item != NOTHING and item not in flat:
                flat.append(item)
    if EMPTY in flat and len(flat) > 1:
        return _repeat(_alt([item for item in flat if item != EMPTY]), 0, 1)
    return NOTHING if not flat else flat[0] if len(flat) == 1 else Alt(tuple(flat))


def _repeat(node: Node, low: int, high: int | None) -> Node:
    if high == 0 or node == EMPTY:
        return EMPTY
    if node == NOTHING:
        return EMPTY if low == 0 else NOTHING
    return node if (low, high) == (1, 1) else Repeat(node, low, high)


def _nullable(node: Node) -> bool:
    if isinstance(node, Chars):
        return False
    if isinstance(node, Seq):
        return all(map(_nullable, node.items))
    if isinstance(node, Alt):
        return any(map(_nullable, node.options))
    return node.low == 0 or _nullable(node.node)


def _nonempty(node: Node) -> Node:
    """The non-empty strings of ``node`` (for terminals: Python Lark refuses terminals that match empty)."""
    if isinstance(node, Chars):
        return node
    if isinstance(node, Alt):
        return _alt([_nonempty(option) for option in node.options])
    if isinstance(node, Seq):
        if not node.items:
            return NOTHING
        head, rest = node.items[0], _seq(list(node.items[1:]))
        options = [_seq([_nonempty(head), rest])]
        if _nullable(head):
            options.append(_nonempty(rest))
        return _alt(options)
    high = None if node.high is None else node.high - 1
    return _seq([_nonempty(node.node), _repeat(node.node, max(node.low - 1, 0), high)])


# --- rendering in the common dialect --------------------------------------------------------------------------

def _render(node: Node) -> str:
    if isinstance(node, Chars):
        return _class(node.ranges)
    if isinstance(node, Seq):
        return "".join(f"(?:{_render(item)})" if isinstance(item, Alt) else _render(item) for item in node.items)
    if isinstance(node, Alt):
        return "|".join(_render(option) for option in node.options)
    atom = _render(node.node) if isinstance(node.node, Chars) else f"(?:{_render(node.node)})"
    low, high = node.low, node.high
    quantifier = {(0, None): "*", (1, None): "+", (0, 1): "?"}.get((low, high))
    if quantifier is None:
        quantifier = f"{{{low},}}" if high is None else f"{{{low}}}" if low == high else f"{{{low},{high}}}"
    return atom + quantifier


def _class(ranges: Ranges) -> str:
    if not ranges:
        return r"[^\s\S]"
    if len(ranges) == 1 and ranges[0][0] == ranges[0][1]:
        return _char(ranges[0][0], REGEX_META)
    rest = _subtract(UNIVERSE, ranges)
    if not rest:
        return r"[\s\S]"
    if len(rest) < len(ranges):
        return "[^" + _class_items(rest) + "]"
    return "[" + _class_items(ranges) + "]"


def _class_items(ranges: Ranges) -> str:
    parts = []
    for low, high in ranges:
        sep = "" if high == low + 1 else "-"
        parts.append(_char(low, CLASS_META) if low == high else _char(low, CLASS_META) + sep + _char(high, CLASS_META))
    return "".join(parts)


def _char(code: int, meta: frozenset[str]) -> str:
    """One character for a regex; ``"`` as ``\\x22`` (Python Lark mangles ``\\\\"`` inside ``/…/``)."""
    char = chr(code)
    if char in meta:
        return "\\" + char
    if char in "\n\t\r":
        return {"\n": "\\n", "\t": "\\t", "\r": "\\r"}[char]
    if code < 0x20 or code == 0x7F or char == '"':
        return f"\\x{code:02x}"
    if code >= 0x80 and not char.isprintable():
        return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"
    return char


# --- code-point ranges ----------------------------------------------------------------------------------------

def _merge(ranges: Any) -> Ranges:
    out: list[tuple[int, int]] = []
    for low, high in sorted(ranges):
        if out and low <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], high))
        else:
            out.append((low, high))
    return tuple(out)


def _invert(ranges: Ranges) -> Ranges:
    out, start = [], 0
    for low, high in _merge(ranges):
        if low > start:
            out.append((start, low - 1))
        start = high + 1
    if start <= MAX_CHAR:
        out.append((start, MAX_CHAR))
    return tuple(out)


def _intersect(a: Ranges, b: Ranges) -> Ranges:
    return _invert(_invert(a) + _invert(b))


def _subtract(a: Ranges, b: Ranges) -> Ranges:
    return _intersect(a, _invert(b))


def _codes(codes: Any) -> Ranges:
    return _merge((code, code) for code in codes)


def _contains(ranges: Ranges, code: int) -> bool:
    return any(low <= code <= high for low, high in ranges)


# --- character sets -------------------------------------------------------------------------------------------

_CATEGORIES = {sre.CATEGORY_DIGIT: (r"\d", False), sre.CATEGORY_NOT_DIGIT: (r"\d", True),
               sre.CATEGORY_WORD: (r"\w", False), sre.CATEGORY_NOT_WORD: (r"\w", True),
               sre.CATEGORY_SPACE: (r"\s", False), sre.CATEGORY_NOT_SPACE: (r"\s", True)}
_FLAGS = re.IGNORECASE | re.DOTALL | re.ASCII


@cache
def _unicode_category(category: str) -> Ranges:
    """The non-ASCII characters that Python's ``\\d``, ``\\w`` or ``\\s`` matches (computed once)."""
    match = re.compile(category).fullmatch
    return _codes(c for low, high in NON_ASCII for c in range(low, high + 1) if match(chr(c)))


def _item_ranges(item: tuple[Any, Any], flags: int, *, upper: bool) -> Ranges:
    """A class item's characters beyond ASCII: a subset of Python's (``upper``: a superset)."""
    op, value = item
    if op is sre.LITERAL:
        return ((value, value),)
    if op is sre.RANGE:
        return (value,)
    category, negated = _CATEGORIES[value]
    if flags & re.ASCII:
        return NON_ASCII if negated else ()
    if negated:
        return NON_ASCII if upper else _subtract(NON_ASCII, _unicode_category(category))
    return _unicode_category(category) if upper else ()


def _is_cased(char: str) -> bool:
    return char.lower() != char or char.upper() != char


def _item_cased(item: tuple[Any, Any]) -> bool:
    op, value = item
    if op is sre.LITERAL:
        return _is_cased(chr(value))
    if op is sre.RANGE:
        return value[1] - value[0] > 4096 or any(_is_cased(chr(c)) for c in range(value[0], value[1] + 1))
    return _CATEGORIES[value][0] == r"\w" or _CATEGORIES[value][1]


def _python_item(item: tuple[Any, Any]) -> str:
    op, value = item
    if op is sre.LITERAL:
        return re.escape(chr(value))
    if op is sre.RANGE:
        return re.escape(chr(value[0])) + "-" + re.escape(chr(value[1]))
    category, negated = _CATEGORIES[value]
    return category.upper() if negated else category


@lru_cache(maxsize=4096)
def _charset(items: tuple[tuple[Any, Any], ...], negate: bool, flags: int) -> Ranges:
    """The characters accepted for a class (``negate``: its complement), a subset of what Python accepts."""
    if not negate and not flags & re.IGNORECASE and all(op is sre.LITERAL for op, _ in items):
        return _codes(value for _, value in items)
    source = "[" + "^" * negate + "".join(map(_python_item, items)) + "]" if items else r"[\s\S]"
    match = re.compile(source, flags).fullmatch
    ascii_part = _codes(c for c in range(0x80) if match(chr(c)))
    ignorecase = bool(flags & re.IGNORECASE)
    if negate:
        excluded = _merge(r for item in items for r in _item_ranges(item, flags, upper=True))
        rest = () if ignorecase and any(map(_item_cased, items)) else _subtract(NON_ASCII, excluded)
    else:
        rest = _intersect(NON_ASCII, _merge(r for item in items for r in _item_ranges(item, flags, upper=False)))
        if ignorecase:
            chars = [chr(value) for op, value in items if op is sre.LITERAL and value >= 0x80]
            variants = {v for c in chars for v in (c.lower(), c.upper(), c.swapcase()) if len(v) == 1 and match(v)}
            rest = _merge(rest + _codes(map(ord, variants)))
    return _intersect(UNIVERSE, _merge(ascii_part + rest))


_JSON_SHORT = {0x22: '"', 0x5C: "\\", 0x08: "b", 0x0C: "f", 0x0A: "n", 0x0D: "r", 0x09: "t"}
_JSON_SPECIAL: Ranges = ((0, 0x1F), (0x22, 0x22), (0x5C, 0x5C))


def _lit(text: str) -> Node:
    return _seq([Chars(((ord(c), ord(c)),)) for c in text])


def _json_chars(ranges: Ranges) -> Node:
    """One character of ``ranges`` as ``json.dumps(..., ensure_ascii=False)`` writes it inside a string."""
    special = [c for low, high in _intersect(ranges, _JSON_SPECIAL) for c in range(low, high + 1)]
    options: list[Node] = [Chars(_subtract(ranges, _JSON_SPECIAL))]
    short = [ord(_JSON_SHORT[c]) for c in special if c in _JSON_SHORT]
    if short:
        options.append(_seq([_lit("\\"), Chars(_codes(short))]))
    for high in (0, 1):
        lows = [ord(f"{c & 15:x}") for c in special if c not in _JSON_SHORT and c >> 4 == high]
        if lows:
            options.append(_seq([_lit(f"\\u00{high}"), Chars(_codes(lows))]))
    return _alt(options)


# --- translation ----------------------------------------------------------------------------------------------

_BEGIN = (sre.AT_BEGINNING, sre.AT_BEGINNING_STRING)
_END = (sre.AT_END, sre.AT_END_STRING)


class _Translator:
    def __init__(self, param: str, json_string: bool) -> None:
        self.param = param
        self.json_string = json_string
        self.end_anchored = False
        self.scale = 1  # product of the counts of the repetitions around the current node

    def refuse(self, construct: str) -> GrammarError:
        return GrammarError(f"The regex in '{self.param}' uses {construct}, which cannot be enforced during "
                            "generation.", param=self.param)

    def sequence(self, items: list[tuple[Any, Any]], flags: int, start: bool, end: bool) -> Node:
        count = len(items)
        lead = next((i for i, (op, v) in enumerate(items) if not (op is sre.AT and v in _BEGIN)), count)
        trail = next((i for i, (op, v) in enumerate(reversed(items)) if not (op is sre.AT and v in _END)), count)
        nodes = []
        for i, (op, value) in enumerate(items):
            at_start, at_end = start and i <= lead, end and i >= count - 1 - trail
            if op is sre.AT:
                if value in (sre.AT_BOUNDARY, sre.AT_NON_BOUNDARY):
                    raise self.refuse(r"a word boundary (\b or \B)")
                if not ((value in _BEGIN and at_start) or (value in _END and at_end)):
                    raise self.refuse(r"an anchor (^, $, \A or \Z) that is not at the very start or end")
                self.end_anchored |= value in _END
                continue
            nodes.append(self.node(op, value, flags, at_start, at_end))
        return _seq(nodes)

    def node(self, op: Any, value: Any, flags: int, start: bool, end: bool) -> Node:
        if op in (sre.LITERAL, sre.NOT_LITERAL, sre.ANY, sre.IN):
            return self.chars(op, value, flags)
        if op is sre.BRANCH:
            return _alt([self.sequence(list(branch), flags, start, end) for branch in value[1]])
        if op is sre.SUBPATTERN:
            _, add, remove, body = value
            return self.sequence(list(body), (flags | add) & ~remove, start, end)
        if op in (sre.MAX_REPEAT, sre.MIN_REPEAT):
            low, high, body = value
            count = max(low, 0 if high is sre.MAXREPEAT else high)
            if self.scale * max(count, 1) > MAX_REPEAT:
                raise GrammarError(f"The regex in '{self.param}' is too large: " + over(
                    "repetition count (nested counts multiplied)", self.scale * count, MAX_REPEAT),
                    param=self.param, code="regex_too_large")
            outer, self.scale = self.scale, self.scale * max(count, 1)
            try:
                return _repeat(self.sequence(list(body), flags, False, False), low,
                               None if high is sre.MAXREPEAT else high)
            finally:
                self.scale = outer
        refused = {sre.GROUPREF: r"a back-reference (\1 or (?P=name))",
                   sre.GROUPREF_EXISTS: "a conditional group on a back-reference ((?(1)…|…))",
                   sre.POSSESSIVE_REPEAT: "a possessive quantifier (*+, ++, ?+ or {m,n}+)",
                   sre.ATOMIC_GROUP: "an atomic group ((?>…))"}
        if op in (sre.ASSERT, sre.ASSERT_NOT):
            raise self.refuse("a look-ahead ((?=…) or (?!…))" if value[0] == 1 else "a look-behind ((?<=…) or (?<!…))")
        raise self.refuse(refused.get(op, f"the construct {op}"))

    def chars(self, op: Any, value: Any, flags: int) -> Node:
        if op is sre.IN:
            negate = bool(value) and value[0][0] is sre.NEGATE
            items = tuple(value[1:] if negate else value)
        else:
            negate = op is not sre.LITERAL
            items = () if op is sre.ANY and flags & re.DOTALL else ((sre.LITERAL, 10 if op is sre.ANY else value),)
        ranges = _charset(items, negate, flags & _FLAGS)
        return _json_chars(ranges) if self.json_string else Chars(ranges)


def _translate(pattern: str, param: str, json_string: bool = False) -> tuple[Node, bool]:
    """The pattern's tree and whether it ends with an end anchor; a 400 for one that nothing matches."""
    if not isinstance(pattern, str):
        raise GrammarError(f"The regex in '{param}' must be a string.", param=param)
    if len(pattern) > MAX_REGEX_CHARS:
        raise GrammarError(f"The regex in '{param}' is too large: " + over(
            "regex length (characters)", len(pattern), MAX_REGEX_CHARS), param=param, code="regex_too_large")
    at = first_surrogate(pattern)
    if at is not None:
        raise GrammarError(f"The regex in '{param}' holds a lone surrogate (U+{ord(pattern[at]):04X}) at "
                           f"position {at}: no text can hold one.", param=param)
    try:
        re.compile(pattern)
        parsed = _parser.parse(pattern)
        translator = _Translator(param, json_string)
        node = translator.sequence(list(parsed), parsed.state.flags, True, True)
    except re.error as error:
        raise GrammarError(f"Invalid regex in '{param}': {error}", param=param) from None
    except (RecursionError, OverflowError):
        raise GrammarError(f"The regex in '{param}' is nested too deeply or is too large.", param=param) from None
    if node == NOTHING:
        raise GrammarError(f"The regex in '{param}' is unsatisfiable: no string can match it.", param=param)
    return node, translator.end_anchored


def translate_regex(pattern: str, *, param: str = "regex_pattern", json_string: bool = False,
                    nonempty: bool = False) -> str:
    """A regex in the common dialect whose full matches are full matches of Python regex ``pattern``.

    :param param: the request field named in errors
    :param json_string: match the JSON-encoded form of matching strings (the text between the quotes, as
        ``json.dumps(s, ensure_ascii=False)`` writes it: ``\\"``, ``\\\\``, ``\\n``, ``\\u001f``…)
    :param nonempty: match only the non-empty matches (for terminals; see :func:`matches_empty`); a pattern
        that matches only the empty string then gives ``[^\\s\\S]``, which matches nothing
    :raises GrammarError: for invalid or unsupported patterns (see the module docstring)
    """
    node, _ = _translate(pattern, param, json_string)
    return _render(_nonempty(node) if nonempty else node)


def matches_empty(pattern: str, *, param: str = "regex_pattern") -> bool:
    """Whether ``pattern`` matches the empty string (then a terminal needs ``nonempty=True`` and ``[…]``)."""
    return _nullable(_translate(pattern, param)[0])


def regex_grammar(pattern: str, param: str = "regex_pattern") -> Grammar:
    """A grammar for output that ``re.fullmatch(pattern, output)`` accepts."""
    return _terminal_grammar(_whole(pattern, param), "regex pattern")


def prefix_grammar(pattern: str, param: str = "regex_prefix_pattern") -> Grammar:
    """A grammar for output that starts with a match of ``pattern``, then any text (newlines included).

    A pattern that ends with an end anchor (``$``, ``\\Z``) allows no text after the match.
    """
    return _terminal_grammar(_prefixed(pattern, param), "regex prefix pattern")


def add_regex(builder: GrammarBuilder, pattern: str, param: str, *, prefix: bool = False) -> str:
    """Add a terminal for ``pattern`` (whole output, or with ``prefix`` its opening then any text) to
    ``builder``; return the expansion (optional when the empty string matches)."""
    node = _prefixed(pattern, param) if prefix else _whole(pattern, param)
    optional = _nullable(node)
    name = builder.terminal("regex", _render(_nonempty(node) if optional else node))
    return f"[{name}]" if optional else name


def _whole(pattern: str, param: str) -> Node:
    return _translate(pattern, param)[0]


def _prefixed(pattern: str, param: str) -> Node:
    node, end_anchored = _translate(pattern, param)
    anything = _repeat(Chars(UNIVERSE), 0, None)
    if not end_anchored:
        node = anything if _nullable(node) else _seq([node, anything])
    return node


def _terminal_grammar(node: Node, description: str) -> Grammar:
    """``start: REGEX`` (``[REGEX]`` when the empty output is allowed).

    Python's Lark takes the terminal as ``(?:…)\\Z``: its lexer keeps the first match that ``re`` finds,
    which for ``a|ab`` stops short of a longer full match.
    """
    optional = _nullable(node)
    regex = _render(_nonempty(node) if optional else node)
    renderings = []
    for terminal in (rf"(?:{regex})\Z", regex):
        builder = GrammarBuilder()
        name = builder.terminal("regex", terminal)
        renderings.append(builder.build(f"[{name}]" if optional else name, description))
    return Grammar(renderings[0].lark, renderings[1].llguidance, description)
