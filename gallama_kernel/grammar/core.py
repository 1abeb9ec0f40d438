"""The kernel's grammar IR: a Lark grammar, rendered for the engine (llguidance) and for Python's Lark.

Every constraint (JSON schema, regex, tool calls, a user's own Lark grammar) becomes one :class:`Grammar`.
Backends enforce ``grammar.llguidance`` token by token; the kernel parses finished output with
``grammar.parse`` (Python Lark, Earley), so structured results are read back by a parser.

The two renderings differ in one construct only: free text that ends at a marker (``</think>``), which is
a lazy lexeme for llguidance and a look-ahead regex for Python's Lark.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import lark

from ..protocol.errors import InvalidRequest
from .limits import MAX_ERROR_CHARS, grammar_budget_error

ANY_TEXT = r"(.|\n)+"
"""Regex (in both dialects) for any non-empty text, newlines included.

Terminals never match the empty string (Python Lark's Earley refuses them): make them optional in the rule
instead (``[TEXT]``)."""


COMPLETE_LEX_MAX_CHARS = 2000
"""Longest output the read-back retries with every shorter terminal match (see :meth:`Grammar.parse`)."""


class GrammarError(InvalidRequest):
    """A constraint that cannot be compiled or enforced: a 400 naming the request field."""


def trim_engine_message(message: str, limit: int = MAX_ERROR_CHARS) -> str:
    """An engine's or parser's error cut to its first line (and the line that says ``error: …``), without
    source excerpts, native backtraces or file paths, at most ``limit`` characters."""
    lines = []
    for line in (line.strip() for line in message.strip().splitlines()):
        if re.match(r"(stack backtrace|backtrace:|note: run with|\d+: \S+::)", line, re.IGNORECASE):
            break
        if line:
            lines.append(line)
    if not lines:
        return "the grammar was refused"
    text = lines[0]
    cause = next((line for line in lines[1:] if line.lower().startswith("error:")), None)
    if cause is not None and cause not in text:
        text = f"{text.rstrip(':')}: {cause[len('error:'):].strip()}"
    text = _PATH.sub("<path>", text)
    return text if len(text) <= limit else text[:limit - 1].rstrip() + "…"


_PATH = re.compile(r"(?<![\w.])(?:/[\w.+@-]+){2,}/?(?::\d+)*")
"""An absolute file path (a native build path such as ``/home/runner/.cargo/…/lib.rs:12``)."""


def literal(text: str) -> str:
    """``text`` as a Lark string literal."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    escaped = escaped.replace("\t", "\\t")
    return f'"{escaped}"'


def regex_literal(pattern: str) -> str:
    """``pattern`` (a regex in the common dialect) as a Lark ``/…/`` terminal."""
    return "/" + pattern.replace("/", "\\/") + "/"


def escape_regex(text: str) -> str:
    """``text`` matched literally, in the regex dialect that Python's ``re`` and llguidance share."""
    return "".join("\\" + ch if ch in REGEX_META else _escape_char(ch) for ch in text)


REGEX_META = frozenset("\\.+*?()|[]{}^$#&-~")
"""Characters escaped in regexes. Never ``<`` or ``>``: the Rust regex crate reads ``\\<`` as a word boundary."""


def _escape_char(ch: str) -> str:
    """Control characters as escapes; everything else as itself."""
    if ch == '"':  # Python Lark reads \\" inside /…/ as an escaped quote: never write a raw quote
        return "\\x22"
    if ch == "\n":
        return "\\n"
    if ch == "\t":
        return "\\t"
    if ch == "\r":
        return "\\r"
    if ord(ch) < 0x20 or ord(ch) == 0x7F:
        return f"\\x{ord(ch):02x}"
    return ch


def not_starting_with(word: str) -> str:
    """Regex for any non-empty text that does not start with ``word``.

    Used where text and a structure that opens with ``word`` are alternatives: once the output starts with
    ``word``, only the structure may follow, so free text can never pass for a malformed call.
    """
    if not word:
        raise ValueError("word must not be empty")
    branches = []
    for i, ch in enumerate(word):
        branches.append(escape_regex(word[:i]) + "[^" + _class_char(ch) + "]")
    diverge = "(" + "|".join(branches) + ")" + r"(.|\n)*"
    prefixes = "|".join(escape_regex(word[:i]) for i in range(len(word) - 1, 0, -1))  # longest first
    return f"{diverge}|{prefixes}" if prefixes else diverge


def _class_char(ch: str) -> str:
    return "\\" + ch if ch in "\\]^-[" else _escape_char(ch)


@dataclass(frozen=True)
class Grammar:
    """One compiled constraint.

    :param lark: the grammar in Python Lark's dialect (used to parse finished output)
    :param llguidance: the same grammar in llguidance's Lark dialect (enforced by the engine)
    :param description: what the grammar stands for, for messages
    """

    lark: str
    llguidance: str
    description: str = "grammar"
    special: tuple[tuple[str, str], ...] = ()
    """``(rule, text)`` of each text the model writes as one special token of its vocabulary (a tool-call marker
    such as Mistral's ``[TOOL_CALLS]``): see :meth:`GrammarBuilder.special_token` and :meth:`for_vocabulary`."""

    def for_vocabulary(self, token_of: Callable[[str], int | None]) -> str:
        """The llguidance grammar with each :attr:`special` rule matching the special token ``token_of(text)``
        (``<[id]>``) instead of the text's characters; a text the vocabulary has no special token for stays text."""
        text = self.llguidance
        for rule, special in self.special:
            token = token_of(special)
            if token is not None:
                text = text.replace(f"\n{rule}: {literal(special)}\n", f"\n{rule}: <[{token}]>\n", 1)
        return text

    @cached_property
    def key(self) -> str:
        """Stable identity for caches (engines cache compiled matchers by it)."""
        return hashlib.sha256(self.llguidance.encode()).hexdigest()

    def parse(self, text: str) -> lark.Tree:
        """Parse finished output; raises :class:`lark.exceptions.LarkError` when it does not match.

        Lark's dynamic lexer takes one match per terminal and position (Python's ``re`` picks the first
        alternative, not the longest); when that reading fails, every shorter match is tried too.
        """
        try:
            return _parser(self.lark, "dynamic").parse(text)
        except lark.exceptions.LarkError:
            if len(text) > COMPLETE_LEX_MAX_CHARS:  # trying every shorter match grows too fast beyond this
                raise
            return _parser(self.lark, "dynamic_complete").parse(text)

    def matches(self, text: str) -> bool:
        try:
            self.parse(text)
        except lark.exceptions.LarkError:
            return False
        return True


_PARSERS: dict[tuple[str, str], lark.Lark] = {}


def _parser(text: str, lexer: str = "dynamic") -> lark.Lark:
    parser = _PARSERS.get((text, lexer))
    if parser is None:
        parser = lark.Lark(text, parser="earley", lexer=lexer, propagate_positions=True,
                           keep_all_tokens=True, ambiguity="resolve")
        if len(_PARSERS) > 256:
            _PARSERS.clear()
        _PARSERS[text, lexer] = parser
    return parser


@dataclass
class GrammarBuilder:
    """Collects rules and terminals under fresh names and renders both dialects.

    Rule bodies are Lark expansions in the common dialect; rule names are lowercase, terminal names uppercase.
    """

    rules: dict[str, str] = field(default_factory=dict)
    lazy: dict[str, tuple[str, str]] = field(default_factory=dict)  # name -> (llguidance body, lark body)
    special: dict[str, str] = field(default_factory=dict)  # rule -> text written as one special token
    _memo: dict[Any, str] = field(default_factory=dict)
    _used: set[str] = field(default_factory=set)  # upper-cased names handed out by fresh
    _counters: dict[str, int] = field(default_factory=dict)  # base name -> last suffix handed out

    def fresh(self, hint: str, terminal: bool = False) -> str:
        """A name not used yet (case-insensitively), derived from ``hint``.

        A counter per base name and a set of the names handed out keep this O(1) per call: schemas with
        thousands of properties ask for thousands of names with the same hint.
        """
        base = re.sub(r"[^a-z0-9_]", "_", hint.lower()).strip("_") or "r"
        if base[0].isdigit():
            base = "r_" + base
        base = base[:40]
        name, n = base, self._counters.get(base, 1)
        if n > 1:
            name = f"{base}_{n}"
        while self._is_taken(name):
            n += 1
            name = f"{base}_{n}"
        self._counters[base] = n
        self._used.add(name.upper())
        return name.upper() if terminal else name

    def _is_taken(self, name: str) -> bool:
        upper = name.upper()
        # rules or lazy rules a caller added by hand (not through fresh) count too
        return upper in self._used or name in self.rules or upper in self.rules or name in self.lazy \
            or upper in self.lazy

    def rule(self, hint: str, body: str, *, key: Any = None) -> str:
        """Add ``hint: body`` under a fresh name; with ``key``, an equal key returns the earlier rule."""
        if key is not None and key in self._memo:
            return self._memo[key]
        name = self.fresh(hint)
        self.rules[name] = body
        if key is not None:
            self._memo[key] = name
        return name

    def terminal(self, hint: str, pattern: str, *, key: Any = None) -> str:
        """Add a terminal matching ``pattern`` (a regex in the common dialect)."""
        if key is not None and key in self._memo:
            return self._memo[key]
        name = self.fresh(hint, terminal=True)
        self.rules[name] = regex_literal(pattern)
        if key is not None:
            self._memo[key] = name
        return name

    def memo(self, key: Any) -> str | None:
        return self._memo.get(key)

    def remember(self, key: Any, name: str) -> None:
        self._memo[key] = name

    def reserve(self, hint: str) -> str:
        """A fresh rule name whose body is given later with :meth:`define` (for recursive rules)."""
        name = self.fresh(hint)
        self.rules[name] = ""
        return name

    def define(self, name: str, body: str) -> None:
        self.rules[name] = body

    def special_token(self, text: str) -> str:
        """A rule for ``text`` that an engine enforces as the vocabulary's special token with that text, when it
        has one (see :meth:`Grammar.for_vocabulary`; the engine then also writes the token's text in the output),
        and as plain text otherwise. The read-back parses the text."""
        name = self.memo(("special", text))
        if name is None:
            name = self.rule("special", literal(text), key=("special", text))
            self.special[name] = text
        return name

    def spelled(self, text: str, specials: tuple[str, ...] = ()) -> str:
        """An expansion for the literal ``text`` in which each of ``specials`` it holds is a
        :meth:`special_token` (a marker the model's vocabulary may have as one token)."""
        if not specials:
            return literal(text)
        parts: list[str] = []
        at = 0
        for found in re.finditer("|".join(re.escape(special) for special in specials), text):
            if found.start() > at:
                parts.append(literal(text[at:found.start()]))
            parts.append(self.special_token(found.group()))
            at = found.end()
        if at < len(text) or not parts:
            parts.append(literal(text[at:]))
        return " ".join(parts)

    def text_until(self, marker: str, hint: str = "free_text") -> str:
        """A rule for free text up to and including the first ``marker``."""
        name = self.fresh(hint)
        marker_re = escape_regex(marker)
        self.lazy[name] = (regex_literal(r"(.|\n)*" + marker_re),
                           regex_literal(f"((?!{marker_re})(.|\\n))*{marker_re}"))
        return name

    def build(self, start: str, description: str = "grammar", *, param: str | None = None) -> Grammar:
        """Render with ``start`` as the start expansion; a 400 naming ``param`` if over a budget (see
        :mod:`.limits`)."""
        common = [f"{name}: {body}" for name, body in self.rules.items()]
        guidance = [f"start: {start}", *common, *(f"{n}[lazy]: {b[0]}" for n, b in self.lazy.items())]
        python = [f"start: {start}", *common, *(f"{n}: {b[1]}" for n, b in self.lazy.items())]
        grammar = Grammar("\n".join(python) + "\n", "\n".join(guidance) + "\n", description,
                          tuple(self.special.items()))
        problem = grammar_budget_error(grammar.llguidance, user=False)
        if problem is not None:
            raise GrammarError(f"The {description} cannot be enforced: {problem}", param=param,
                               code="grammar_too_large")
        return grammar


def user_grammar(text: str, param: str = "grammar") -> Grammar:
    """A Lark grammar sent by a client, checked by Lark itself; a broken one is a 400 with Lark's message."""
    if not text.strip():
        raise GrammarError("The grammar is empty.", param=param)
    problem = grammar_budget_error(text, user=True)
    if problem is not None:
        raise GrammarError(f"Invalid Lark grammar: {problem}", param=param, code="invalid_grammar")
    if re.search(r"^\s*start\s*:", text, re.MULTILINE) is None:
        raise GrammarError("The grammar needs a 'start' rule.", param=param)
    try:
        _parser(text)
    except Exception as error:  # Lark's own errors, the regex module's, RecursionError: never a 500
        raise GrammarError(trim_engine_message(f"Invalid Lark grammar: {error}"), param=param) from None
    return Grammar(text, text, "Lark grammar")
