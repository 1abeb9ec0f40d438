r"""Shortest completions: what to append to a prefix of a grammar's language so that the whole text parses.

When a token budget runs out in the middle of structured output, appending the shortest valid completion
(``{"a":[1`` → ``]}``) keeps JSON, tool calls and regex output parseable. :class:`Closer` computes it for a
:class:`~.core.Grammar`; :class:`Progress` follows one output as it grows, a few characters at a time, and
answers :meth:`Progress.closing` at any point.

The language is the one :meth:`.core.Grammar.matches` reads, as :func:`.gbnf.expression_rules` writes it:
every rule and terminal of the Lark grammar as character-level expressions (character classes, sequences,
alternatives, repetitions, rule references), look-ahead terminals of ``text_until`` as their KMP automata
(the artifact feature's text without some tags as the automaton of :mod:`.lookahead`),
repetition counts up to :data:`MAX_COUNT` (nested counts multiplied; llama.cpp's smaller limit does not apply).

How it works:

1. **Productions.** The expressions become BNF productions over nonterminals and terminals (a terminal is
   one character class). A sequence is flattened into its production; an alternative inside a sequence gets
   a nonterminal of its own; ``x*`` is ``N → ε | N x`` and ``x+`` is ``N → x | N x`` (left recursion, which
   an Earley parser runs in constant work per character, where right recursion costs work proportional to
   the repetitions so far). ``x{m,n}`` is ``m`` copies of ``x`` followed by ``O(n - m)``, at most ``n - m``
   more. Up to :data:`NESTED_LIMIT` more, ``O(k)`` is ``ε | x O(k-1)``: nothing to predict in advance, and
   each copy costs as many steps as copies so far (a few digits of a number). A larger ``k = q·s + r``, with
   ``s = ⌊√k⌋`` and ``B = x{s}`` a block, is ``O(q-1) over B, then O(s-1) over x`` or ``q blocks, then
   O(r) over x``: each count from 0 to ``k`` once, in productions of about √k symbols, at a cost per
   character that does not grow with ``k`` (``maxLength: 5000`` stays as cheap as ``maxLength: 50``). The
   ``m`` copies are written out up to :data:`LINEAR_LIMIT`, and as blocks beyond.
2. **Shortest strings.** The minimum length of every nonterminal, with the production that achieves it, by
   Knuth's generalization of Dijkstra's algorithm to grammars: a production's cost is known once all its
   nonterminals are, and nonterminals are settled cheapest first. Nonterminals with no finite string, and
   productions using them, are dropped, as are those the start cannot reach; then every item the parser
   keeps can be completed, so a chart column that is not empty means a viable prefix.
3. **Recognition.** An Earley recognizer reads the text one character at a time, one chart column per
   character. An item is a dotted production and the column where it started, packed into one integer.
   Nullable nonterminals follow Aycock and Horspool: predicting a nullable ``A`` also moves the predicting
   item over ``A``, so completions of empty derivations never need to look back into the column being built.
   A column records, per nonterminal, the items waiting for it (the completer reads them later) and, per
   character class, the items that read a character next (the scanner's next step).
4. **Closing.** Finishing a nonterminal ``A`` that started in column ``i`` costs the cheapest way to go on
   from there: for an item ``[B → g • A d, h]`` of column ``i``, the minimum length of ``d`` plus the cost
   of finishing ``B`` from column ``h`` (the start symbol costs nothing). That cost depends on columns up to
   ``i`` only, which never change, so each column's table is computed once, right after the column is built:
   a small Dijkstra over the column's own nonterminals (``h = i`` links them inside the column), seeded from
   the tables of earlier columns. (Computed on demand instead, the first closing after long free text would
   go back through every column of it.) The shortest completion of the text is then the cheapest item of
   the last column (the minimum length of what follows its dot plus the cost of finishing its nonterminal
   from its origin; only items that read a character next need to be tried, unless the text is complete
   already), spelled out by following the recorded choices back to the start symbol. Each table
   entry points at the first choice on its way that writes something, so spelling takes one step per piece
   written, not one per column passed (free text read by ``text_until``'s automaton passes every column).

A character class is spelled by one of its characters: a letter or digit if it has one, else printable
ASCII, else the smallest code point from U+0020 on (never a surrogate), else its smallest.

Costs, measured on two shared cores (CPython 3.11) with outputs of 3,300 to 5,000 characters fed 1 to 10 at a
time: preparing a JSON schema of nested objects and arrays (formats, patterns, enums, bounds) 8 to 18 ms, 45
properties with 100-member enums included; reading 5 to 11 µs a character (JSON, tool calls, free text,
``maxLength`` 50 to 5,000); a closing 0.002 ms on average, under 0.1 ms at worst; about 700 bytes of chart a
character, shared by copies.

Refused (:class:`~.core.GrammarError`, from :meth:`Closer.for_grammar`): what :func:`.gbnf.expression_rules`
refuses (``%ignore``, look-arounds other than those two forms, back-references, …), and a grammar whose
language is empty. Text holding NUL or a lone surrogate is never a viable prefix (the expressions' classes
leave them out, as no model output holds them).
"""

from __future__ import annotations

import heapq
import threading
from bisect import bisect_right
from collections import OrderedDict
from math import isqrt

from .core import Grammar, GrammarError
from .gbnf import Node, Ref, expression_rules
from .regex import Alt, Chars, Ranges, Repeat, Seq

__all__ = ["CACHE_SIZE", "LINEAR_LIMIT", "MAX_COUNT", "NESTED_LIMIT", "Closer", "Progress"]

CACHE_SIZE = 64
"""Most closers kept by :meth:`Closer.for_grammar` (least recently used ones are dropped)."""
MAX_COUNT = 1_000_000
"""Largest repetition count read (nested counts multiplied; ``maxLength: 5000`` is ``(…{4}){0,5000}``, 20,000).
Counts cost about their square root in productions, so this bounds preparation, not the language."""
NESTED_LIMIT = 24
"""Longest optional tail of a counted repetition written as nested optionals; longer ones are split in blocks."""
LINEAR_LIMIT = 64
"""Most copies of a counted repetition's fixed part written out one by one; more are split in blocks."""

_INFINITE = 1 << 62
_PREFERRED: tuple[tuple[int, int], ...] = (
    (0x61, 0x7A), (0x41, 0x5A), (0x30, 0x39),  # letters and digits
    (0x21, 0x7E), (0x20, 0x20),  # other printable ASCII, space last
    (0x20, 0xD7FF), (0xE000, 0x10FFFF),  # the smallest from U+0020 on, no surrogates
    (0x00, 0x1F),
)
"""Where a character class's spelling is looked for, in this order (the smallest member of the first span
the class meets)."""


def _spell(ranges: Ranges) -> str | None:
    """The character that stands for the class ``ranges`` in written completions (None: the class is empty)."""
    for low, high in _PREFERRED:
        for first, last in ranges:
            code = max(first, low)
            if code <= min(last, high):
                return chr(code)
    return None


# --- expressions → productions ---------------------------------------------------------------------------------

Symbol = int
"""A nonterminal (>= 0) or a terminal character class (< 0: class number ``~symbol``)."""


class _Productions:
    """BNF productions for character-level rules (step 1 of the module docstring).

    Every named rule is a nonterminal; anonymous sub-expressions get nonterminals of their own, shared between
    equal expressions. ``start`` is an extra nonterminal with the single production ``start → root``.
    """

    def __init__(self, rules: dict[str, Node], root: str) -> None:
        self.rules = rules
        self.lhs: list[Symbol] = []
        self.rhs: list[tuple[Symbol, ...]] = []
        self.count = 0  # nonterminals handed out
        self.classes: list[Ranges] = []
        self.class_ids: dict[Ranges, int] = {}
        self.named: dict[str, Symbol] = {}
        self.memo: dict[object, Symbol] = {}
        self.todo: list[str] = []
        self.start = self.fresh()
        self.add(self.start, (self.name(root),))
        while self.todo:
            name = self.todo.pop()
            body = rules.get(name)
            if body is not None:  # an undefined name has no production: it matches nothing
                for sequence in self.alternatives(body):
                    self.add(self.named[name], sequence)

    def fresh(self) -> Symbol:
        self.count += 1
        return self.count - 1

    def add(self, lhs: Symbol, rhs: tuple[Symbol, ...]) -> None:
        self.lhs.append(lhs)
        self.rhs.append(rhs)

    def name(self, name: str) -> Symbol:
        symbol = self.named.get(name)
        if symbol is None:
            symbol = self.named[name] = self.fresh()
            self.todo.append(name)  # defined from the work list: rules refer to each other in cycles
        return symbol

    def terminal(self, ranges: Ranges) -> Symbol:
        number = self.class_ids.get(ranges)
        if number is None:
            number = self.class_ids[ranges] = len(self.classes)
            self.classes.append(ranges)
        return ~number

    def symbol(self, node: Node) -> Symbol:
        """One symbol that matches what ``node`` matches."""
        if isinstance(node, Chars):
            return self.terminal(node.ranges)
        if isinstance(node, Ref):
            return self.name(node.name)
        symbol = self.memo.get(node)
        if symbol is None:
            sequences = self.alternatives(node)
            if len(sequences) == 1 and len(sequences[0]) == 1:
                symbol = sequences[0][0]  # a repetition that is one helper already (x*, x+)
            else:
                symbol = self.fresh()
                for sequence in sequences:
                    self.add(symbol, sequence)
            self.memo[node] = symbol
        return symbol

    def alternatives(self, node: Node) -> list[tuple[Symbol, ...]]:
        if isinstance(node, Alt):
            return [self.sequence(option) for option in node.options]
        return [self.sequence(node)]

    def sequence(self, node: Node) -> tuple[Symbol, ...]:
        if isinstance(node, Seq):
            return tuple(symbol for item in node.items for symbol in self.sequence(item))
        if isinstance(node, Repeat):
            return self.repeat(node)
        return (self.symbol(node),)

    def repeat(self, node: Repeat) -> tuple[Symbol, ...]:
        item = self.symbol(node.node)
        if node.high is None:
            if node.low == 0:
                return (self.star(item),)
            return (*self.exactly(item, node.low - 1), self.plus(item))
        extra = node.high - node.low
        return self.exactly(item, node.low) + ((self.optional(item, extra),) if extra else ())

    def helper(self, key: object) -> tuple[Symbol, bool]:
        """The nonterminal remembered under ``key`` (True: it is new, its productions are the caller's)."""
        symbol = self.memo.get(key)
        if symbol is not None:
            return symbol, False
        symbol = self.memo[key] = self.fresh()
        return symbol, True

    def star(self, item: Symbol) -> Symbol:
        symbol, new = self.helper(("*", item))
        if new:
            self.add(symbol, ())
            self.add(symbol, (symbol, item))
        return symbol

    def plus(self, item: Symbol) -> Symbol:
        symbol, new = self.helper(("+", item))
        if new:
            self.add(symbol, (item,))
            self.add(symbol, (symbol, item))
        return symbol

    def exactly(self, item: Symbol, count: int) -> tuple[Symbol, ...]:
        """``count`` copies of ``item``: written out, or beyond :data:`LINEAR_LIMIT` as about √count blocks of
        √count copies and the rest (so that no production is longer than about 2√count)."""
        if count <= LINEAR_LIMIT:
            return (item,) * count
        size = isqrt(count)
        return (self.block(item, size),) * (count // size) + (item,) * (count % size)

    def block(self, item: Symbol, size: int) -> Symbol:
        symbol, new = self.helper(("=", item, size))
        if new:
            self.add(symbol, (item,) * size)
        return symbol

    def optional(self, item: Symbol, count: int) -> Symbol:
        """At most ``count`` copies of ``item`` (step 1 of the module docstring)."""
        symbol, new = self.helper(("?", item, count))
        if not new:
            return symbol
        if count <= NESTED_LIMIT:  # O_count → ε | item O_{count-1}, O_0 being ε
            self.add(symbol, ())
            self.add(symbol, (item, self.optional(item, count - 1)) if count > 1 else (item,))
            return symbol
        # With count = q·size + r (r < size): fewer than q blocks then fewer than size copies give each count
        # below q·size once; q blocks then at most r copies give the others.
        size = isqrt(count)
        blocks, rest = divmod(count, size)
        block = self.block(item, size)
        self.add(symbol, (self.optional(block, blocks - 1), self.optional(item, size - 1)))
        self.add(symbol, (block,) * blocks + ((self.optional(item, rest),) if rest else ()))
        return symbol


def _minimum_lengths(productions: _Productions, class_lengths: list[int]) -> tuple[list[int], list[int]]:
    """Each nonterminal's minimum length (:data:`_INFINITE` when it matches nothing) and a production that
    achieves it (-1: none), by Knuth's algorithm (step 2 of the module docstring)."""
    count = productions.count
    length = [_INFINITE] * count
    best = [-1] * count
    waiting_for = [0] * len(productions.rhs)  # nonterminal occurrences not settled yet
    partial = [0] * len(productions.rhs)  # the lengths of the settled symbols so far
    uses: list[list[int]] = [[] for _ in range(count)]  # nonterminal -> productions using it, once a use
    heap: list[tuple[int, int]] = []
    for number, rhs in enumerate(productions.rhs):
        total = 0
        for symbol in rhs:
            if symbol < 0:
                total += class_lengths[~symbol]
            else:
                waiting_for[number] += 1
                uses[symbol].append(number)
        partial[number] = total
        if not waiting_for[number] and total < _INFINITE:
            heapq.heappush(heap, (total, number))
    settled = [False] * count
    while heap:
        total, number = heapq.heappop(heap)
        symbol = productions.lhs[number]
        if settled[symbol]:
            continue
        settled[symbol] = True
        length[symbol], best[symbol] = total, number
        for user in uses[symbol]:
            partial[user] += total
            waiting_for[user] -= 1
            if not waiting_for[user] and partial[user] < _INFINITE:
                heapq.heappush(heap, (partial[user], user))
    return length, best


# --- the chart ---------------------------------------------------------------------------------------------------

class _Column:
    """One chart column: what the items after a character (or at the start) need later, never changed once
    built.

    ``waiting``: per nonterminal, (the cheapest length that finishes it from this column, how: see
    :meth:`Closer._finish_table`, the items waiting for it, which the completer of later columns reads);
    ``scans``: (character class, the items that read a character of it next) pairs; ``accepted``: whether the
    text so far is a string of the language. The other items (completed ones) are not kept: a shortest closing
    either is empty or starts with a character that some item of ``scans`` reads. One dict and tuples of
    integers (which Python's garbage collector stops tracking): about 700 bytes a column for JSON or free
    text, where a dict more would cost some 250.
    """

    __slots__ = ("accepted", "scans", "waiting")

    def __init__(self, waiting: dict[Symbol, tuple[int, int, tuple[int, ...]]],
                 scans: tuple[tuple[Symbol, tuple[int, ...]], ...], accepted: bool) -> None:
        self.waiting = waiting
        self.scans = scans
        self.accepted = accepted


class Closer:
    """A grammar prepared for shortest completions (see the module docstring). Get one with
    :meth:`for_grammar`; it is immutable but for caches that are only ever filled with the same values, so
    threads may share it (each output needs its own :class:`Progress`)."""

    _cache: OrderedDict[tuple[str, str], Closer | GrammarError] = OrderedDict()
    _lock = threading.Lock()

    def __init__(self, rules: dict[str, Node], root: str, description: str = "grammar") -> None:
        """Prepare the rules of :func:`.gbnf.expression_rules` (``root`` names the start rule).

        :raises GrammarError: when the language is empty
        """
        productions = _Productions(rules, root)
        spellings = [_spell(ranges) for ranges in productions.classes]
        class_lengths = [1 if spelling is not None else _INFINITE for spelling in spellings]
        length, best = _minimum_lengths(productions, class_lengths)
        start = productions.start
        if length[start] >= _INFINITE:
            raise GrammarError(f"The {description} matches no text, so no output can be completed.",
                               code="constraint_not_supported")

        def usable(rhs: tuple[Symbol, ...]) -> bool:
            return all(class_lengths[~s] < _INFINITE if s < 0 else length[s] < _INFINITE for s in rhs)

        by_lhs: dict[Symbol, list[int]] = {}
        for number, rhs in enumerate(productions.rhs):
            if usable(rhs):
                by_lhs.setdefault(productions.lhs[number], []).append(number)
        reachable = {start}
        stack = [start]
        while stack:
            for number in by_lhs.get(stack.pop(), ()):
                for symbol in productions.rhs[number]:
                    if symbol >= 0 and symbol not in reachable:
                        reachable.add(symbol)
                        stack.append(symbol)

        # Dotted productions, numbered so that moving the dot one step adds 1.
        self._done = productions.count  # the "next symbol" of a dotted production whose dot is at its end
        self._next: list[Symbol] = []
        self._lhs: list[Symbol] = []
        self._rest: list[int] = []  # minimum length of what follows the dot
        self._starts: list[tuple[int, ...]] = [()] * productions.count
        self._best: dict[Symbol, tuple[Symbol, ...]] = {}  # the production of a shortest string
        for symbol in sorted(reachable):
            starts = []
            for number in by_lhs.get(symbol, ()):
                rhs = productions.rhs[number]
                starts.append(len(self._next))
                lengths = [class_lengths[~s] if s < 0 else length[s] for s in rhs]
                for dot in range(len(rhs) + 1):
                    self._next.append(rhs[dot] if dot < len(rhs) else self._done)
                    self._lhs.append(symbol)
                    self._rest.append(sum(lengths[dot:]))
            self._starts[symbol] = tuple(starts)
            self._best[symbol] = productions.rhs[best[symbol]]
        self._size = len(self._next)
        self._start = start
        self._start_item = self._starts[start][0]
        self._nullable = [length[s] == 0 for s in range(productions.count)]
        self._spellings = spellings
        self._classes = [_Matcher(ranges) for ranges in productions.classes]
        self._texts: dict[Symbol, str] = {}
        self._suffixes: dict[int, str] = {}
        self._empty = self._column(0, [self._start_item], [])

    @classmethod
    def for_grammar(cls, grammar: Grammar) -> Closer:
        """The closer for ``grammar``, cached by ``grammar.key`` (the :data:`CACHE_SIZE` most recently used).

        :raises GrammarError: (code ``constraint_not_supported``) when the grammar cannot be read as
            character-level rules (see :func:`.gbnf.expression_rules`) or matches nothing
        """
        key = (grammar.key, grammar.description)
        with cls._lock:
            found = cls._cache.get(key)
            if found is not None:
                cls._cache.move_to_end(key)
        if found is None:  # built outside the lock: two threads may build the same one, the first kept
            try:
                rules, root = expression_rules(grammar, max_repeat=MAX_COUNT)
                found = cls(rules, root, grammar.description)
            except GrammarError as error:
                found = error
            with cls._lock:
                found = cls._cache.setdefault(key, found)
                cls._cache.move_to_end(key)
                while len(cls._cache) > CACHE_SIZE:
                    cls._cache.popitem(last=False)
        if isinstance(found, GrammarError):
            raise GrammarError(found.message, code=found.code)
        return found

    def shortest(self) -> str:
        """A shortest string of the language."""
        return self._text(self._start)

    def start(self) -> Progress:
        """A :class:`Progress` at the empty text."""
        return Progress(self, [self._empty], True)

    # --- recognition ---------------------------------------------------------------------------------------

    def _column(self, index: int, seeds: list[int], columns: list[_Column]) -> _Column:
        """Column ``index`` from the items that read its character (``seeds``); ``columns``: those before it.

        Items are ``origin * size + dotted production``, so ``item + 1`` is the item with its dot moved on.
        """
        size, following, lhs, starts, nullable, done = (self._size, self._next, self._lhs, self._starts,
                                                        self._nullable, self._done)
        accepting = self._start_item + 1  # the start's production, read whole (its origin is always 0)
        accepted = False
        base = index * size
        items = set(seeds)
        agenda = list(items)
        waiting: dict[Symbol, list[int]] = {}
        scans: dict[Symbol, list[int]] = {}
        while agenda:
            item = agenda.pop()
            dotted = item % size
            symbol = following[dotted]
            if symbol < 0:
                found = scans.get(symbol)
                if found is None:
                    scans[symbol] = [item]
                else:
                    found.append(item)
            elif symbol == done:
                if item == accepting:  # nothing waits for the start symbol
                    accepted = True
                    continue
                origin = item // size
                if origin != index:  # empty derivations were moved over when predicted (Aycock and Horspool)
                    for parent in columns[origin].waiting[lhs[dotted]][2]:
                        parent += 1
                        if parent not in items:
                            items.add(parent)
                            agenda.append(parent)
            else:
                found = waiting.get(symbol)
                if found is None:
                    waiting[symbol] = [item]
                    for first in starts[symbol]:
                        first += base
                        if first not in items:
                            items.add(first)
                            agenda.append(first)
                else:
                    found.append(item)
                if nullable[symbol]:
                    item += 1
                    if item not in items:
                        items.add(item)
                        agenda.append(item)
        table = self._finish_table(columns, waiting, index)
        return _Column({symbol: (*table[symbol], tuple(found)) for symbol, found in waiting.items()},
                       tuple((symbol, tuple(found)) for symbol, found in scans.items()), accepted)

    def _scan(self, column: _Column, code: int) -> list[int]:
        """The items of ``column`` that read the character ``code``, their dots moved over it."""
        seeds: list[int] = []
        classes = self._classes
        for symbol, items in column.scans:
            if classes[~symbol].has(code):
                seeds.extend(item + 1 for item in items)
        return seeds

    # --- closing -------------------------------------------------------------------------------------------

    def _finish_table(self, columns: list[_Column], waiting: dict[Symbol, list[int]],
                      index: int) -> dict[Symbol, tuple[int, int]]:
        """The table of column ``index``, whose items ``waiting`` wait for nonterminals (``columns``: those
        before it).

        An entry is (length, item): the cheapest length that finishes the nonterminal from this column, and the
        first item on that way whose remainder is not empty (-1: none before the start symbol), so that
        spelling a closing takes a step per non-empty piece, not one per column (``text_until``'s automaton
        goes back through every column of the text it read)."""
        size, lhs, rest, start = self._size, self._lhs, self._rest, self._start
        inside: dict[Symbol, list[tuple[Symbol, int, int]]] = {}  # B -> (A, length, item [B → g • A d, index])
        heap: list[tuple[int, Symbol, int]] = []
        for symbol, items in waiting.items():
            cheapest, via = _INFINITE, -1
            for item in items:
                dotted, origin = item % size, item // size
                owner, after = lhs[dotted], rest[dotted + 1]
                if owner == start:
                    total = after
                elif origin < index:
                    total = after + columns[origin].waiting[owner][0]
                else:
                    inside.setdefault(owner, []).append((symbol, after, item))
                    continue
                if total < cheapest:
                    cheapest, via = total, item
            if via >= 0:
                heap.append((cheapest, symbol, via))
        heapq.heapify(heap)
        table: dict[Symbol, tuple[int, int]] = {}
        while heap:
            total, symbol, via = heapq.heappop(heap)
            if symbol in table:
                continue
            dotted, origin = via % size, via // size
            owner = lhs[dotted]
            if rest[dotted + 1]:
                step = via
            elif owner == start:
                step = -1
            else:  # nothing to write here: go on where the item's own nonterminal goes on
                step = (columns[origin].waiting if origin < index else table)[owner][1]
            table[symbol] = (total, step)
            for waiter, after, item in inside.get(symbol, ()):
                if waiter not in table:
                    heapq.heappush(heap, (total + after, waiter, item))
        return table

    def _closing(self, columns: list[_Column]) -> str:
        size, lhs, rest, start = self._size, self._lhs, self._rest, self._start
        last = columns[-1]
        if last.accepted:
            return ""
        cheapest, chosen = _INFINITE, -1
        for _, items in last.scans:
            for item in items:
                dotted = item % size
                owner = lhs[dotted]
                total = rest[dotted]
                if owner != start:
                    total += columns[item // size].waiting[owner][0]
                if total < cheapest:
                    cheapest, chosen = total, item
        dotted = chosen % size
        pieces = [self._suffix(dotted)]
        owner, origin = lhs[dotted], chosen // size
        while owner != start:
            step = columns[origin].waiting[owner][1]
            if step < 0:
                break
            dotted = step % size
            pieces.append(self._suffix(dotted + 1))
            owner, origin = lhs[dotted], step // size
        return "".join(pieces)

    # --- spelling ------------------------------------------------------------------------------------------

    def _suffix(self, dotted: int) -> str:
        """A shortest string for what follows the dot of a dotted production."""
        text = self._suffixes.get(dotted)
        if text is None:
            symbols = []
            at = dotted
            while self._next[at] != self._done:
                symbols.append(self._next[at])
                at += 1
            text = self._suffixes[dotted] = "".join(map(self._text, symbols))
        return text

    def _text(self, symbol: Symbol) -> str:
        """A shortest string of ``symbol``: built bottom-up along the productions chosen by
        :func:`_minimum_lengths` (each uses only nonterminals settled before its own, so this ends)."""
        if symbol < 0:
            return self._spellings[~symbol] or ""
        texts, best = self._texts, self._best
        stack = [symbol]
        while stack:
            top = stack[-1]
            if top in texts:
                stack.pop()
                continue
            missing = [s for s in best[top] if s >= 0 and s not in texts]
            if missing:
                stack.extend(missing)
                continue
            texts[top] = "".join(self._spellings[~s] or "" if s < 0 else texts[s] for s in best[top])
            stack.pop()
        return texts[symbol]


class _Matcher:
    """Membership in one character class: a bit mask for ASCII, binary search above."""

    __slots__ = ("ascii", "highs", "lows")

    def __init__(self, ranges: Ranges) -> None:
        self.ascii = 0
        for low, high in ranges:
            for code in range(low, min(high, 127) + 1):
                self.ascii |= 1 << code
        self.lows = [low for low, _ in ranges]
        self.highs = [high for _, high in ranges]

    def has(self, code: int) -> bool:
        if code < 128:
            return bool(self.ascii >> code & 1)
        at = bisect_right(self.lows, code) - 1
        return at >= 0 and code <= self.highs[at]


class Progress:
    """One output read so far, character by character (see :meth:`Closer.start`); used by one thread at a time."""

    __slots__ = ("_closer", "_columns", "_viable")

    def __init__(self, closer: Closer, columns: list[_Column], viable: bool) -> None:
        self._closer = closer
        self._columns = columns
        self._viable = viable

    def feed(self, text: str) -> bool:
        """Read ``text`` after what was read before. Returns whether everything read so far is still a prefix
        of some string of the language; once False, it stays False (and nothing more is read)."""
        if not self._viable:
            return False
        closer, columns = self._closer, self._columns
        for char in text:
            seeds = closer._scan(columns[-1], ord(char))
            if not seeds:
                self._viable = False
                return False
            columns.append(closer._column(len(columns), seeds, columns))
        return True

    def closing(self) -> str | None:
        """A shortest text that, appended to what was read, makes a string of the language: ``""`` when that
        is one already, None when what was read is no prefix of any."""
        if not self._viable:
            return None
        return self._closer._closing(self._columns)

    def copy(self) -> Progress:
        """An independent snapshot (the chart's columns are shared: they never change once built)."""
        return Progress(self._closer, list(self._columns), self._viable)
