r"""Free text up to a marker that never holds some patterns, as a finite automaton.

The artifact feature's bodies are "any text up to and including the first ``</text>``, holding no tag of the
format": for Python's Lark the terminal ``((?!M|B)(.|\n))*M`` (a negative look-ahead at every character), for
llguidance the lazy lexeme ``(.|\n)*M & ~((.|\n)*B(.|\n)*)``. Neither a GBNF engine nor the closer
(:mod:`.closing`) reads a look-ahead, but the language is regular: :func:`text_without` builds its automaton,
which :mod:`.gbnf` writes as one rule per state, each reading one character.

The language is llguidance's, which the kernel's engines enforce: a string ``w M`` where ``M`` (a literal) occurs
only at the end and no match of ``B`` (a regex) lies anywhere inside ``w M``. Python's look-ahead form reads the
same strings whenever no match of ``B`` can overlap the end of ``w M`` (true of the artifact feature's tags,
which start with ``<`` and hold no other ``<``, while ``M`` starts with ``<``).

How: ``M`` and ``B`` become one Thompson NFA (character-class edges and empty moves); a state of the automaton is
the set of NFA states reached, with both starts added before every character (a match may start anywhere). A
character that completes ``B`` leads nowhere; one that completes ``M`` (and not ``B``) ends the text. Characters
are taken in classes that every edge treats alike, so a state has one transition per class of characters that
lead to the same place.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise

from .core import GrammarError
from .regex import Alt, Chars, Ranges, Repeat, Seq, _intersect, _merge

__all__ = ["MAX_STATES", "MAX_WORK", "text_without"]

MAX_STATES = 2_000
"""Most automaton states (and most NFA states) built for one such terminal; a larger one is refused."""
MAX_WORK = 2_000_000
"""Most steps (an NFA edge followed for one class of characters) spent on one automaton, so that a client's
hostile look-ahead is refused in about a second at most."""

END = -1
"""The transition target that ends the text (the marker was just read)."""

Node = Chars | Seq | Alt | Repeat
Refuse = Callable[[str], GrammarError]


@dataclass(frozen=True)
class Automaton:
    """``states[i]`` lists ``(characters, target)`` pairs: reading one of ``characters`` in state ``i`` leads to
    state ``target`` (:data:`END`: the text is complete). Characters with no pair lead nowhere. State 0 is
    the start."""

    states: tuple[tuple[tuple[Ranges, int], ...], ...]


class _Nfa:
    def __init__(self, refuse: Refuse) -> None:
        self.refuse = refuse
        self.edges: list[list[tuple[Ranges, int]]] = []
        self.empty: list[list[int]] = []

    def state(self) -> int:
        if len(self.edges) >= MAX_STATES:
            raise self.refuse(f"a look-ahead pattern too large to read (over {MAX_STATES} states)")
        self.edges.append([])
        self.empty.append([])
        return len(self.edges) - 1

    def build(self, node: object, start: int) -> int:
        """States for ``node`` from ``start``; returns the state reached after a match."""
        if isinstance(node, Chars):
            end = self.state()
            if node.ranges:
                self.edges[start].append((node.ranges, end))
            return end
        if isinstance(node, Seq):
            for item in node.items:
                start = self.build(item, start)
            return start
        if isinstance(node, Alt):
            end = self.state()
            for option in node.options:
                self.empty[self.build(option, start)].append(end)
            return end
        if isinstance(node, Repeat):
            for _ in range(node.low):
                start = self.build(node.node, start)
            if node.high is None:
                loop = self.state()
                self.empty[start].append(loop)
                self.empty[self.build(node.node, loop)].append(loop)
                return loop
            end = self.state()
            for _ in range(node.high - node.low):
                self.empty[start].append(end)
                start = self.build(node.node, start)
            self.empty[start].append(end)
            return end
        raise self.refuse("a rule reference inside a look-ahead")

    def closure(self, states: set[int]) -> frozenset[int]:
        todo = list(states)
        seen = set(states)
        while todo:
            for target in self.empty[todo.pop()]:
                if target not in seen:
                    seen.add(target)
                    todo.append(target)
        return frozenset(seen)


def _classes(edges: list[list[tuple[Ranges, int]]], universe: Ranges) -> list[Ranges]:
    """``universe`` cut into intervals that every edge's class either holds whole or misses."""
    cuts = {low for low, _ in universe} | {high + 1 for _, high in universe}
    for outgoing in edges:
        for ranges, _ in outgoing:
            for low, high in ranges:
                cuts.update((low, high + 1))
    points = sorted(cuts)
    pieces: list[Ranges] = []
    for low, high in pairwise(points):
        piece = _intersect(((low, high - 1),), universe)
        if piece:
            pieces.append(piece)
    return pieces


def text_without(marker: Node, banned: Node, universe: Ranges, refuse: Refuse) -> Automaton:
    """The automaton of text up to and including the first match of ``marker``, holding no match of
    ``banned`` (see the module docstring), over the characters ``universe``."""
    nfa = _Nfa(refuse)
    marker_start, banned_start = nfa.state(), nfa.state()
    marker_end, banned_end = nfa.build(marker, marker_start), nfa.build(banned, banned_start)
    starts = nfa.closure({marker_start, banned_start})
    if banned_end in starts:  # Lark and llguidance disagree on what that means
        raise refuse("a look-ahead pattern that matches the empty string")
    pieces = _classes(nfa.edges, universe)
    firsts = [piece[0][0] for piece in pieces]
    # each edge as the numbers of the pieces its class holds (the pieces refine every class)
    covers = [[(_covered(ranges, firsts), target) for ranges, target in outgoing] for outgoing in nfa.edges]
    numbers: dict[frozenset[int], int] = {starts: 0}
    order = [starts]
    closures: dict[frozenset[int], frozenset[int]] = {}
    states: list[tuple[tuple[Ranges, int], ...]] = []
    work = 0
    while len(states) < len(order):
        moved: dict[int, set[int]] = {}
        for state in order[len(states)]:
            for covered, target in covers[state]:
                work += len(covered)
                for index in covered:
                    moved.setdefault(index, set()).add(target)
        if work > MAX_WORK:
            raise refuse("a look-ahead pattern too large to read (its automaton takes too long to build)")
        targets: dict[int, list[Ranges]] = {0: [pieces[i] for i in range(len(pieces)) if i not in moved]}
        for index, reached_from in moved.items():
            key = frozenset(reached_from)
            reached = closures.get(key)
            if reached is None:
                reached = closures[key] = nfa.closure(set(key))
            if banned_end in reached:
                continue
            if marker_end in reached:
                number = END
            else:
                following = reached | starts
                number = numbers.get(following, -2)
                if number == -2:
                    if len(order) >= MAX_STATES:
                        raise refuse(f"a look-ahead pattern too large to read (over {MAX_STATES} states)")
                    number = numbers[following] = len(order)
                    order.append(following)
            targets.setdefault(number, []).append(pieces[index])
        states.append(tuple((_merge(tuple(r for piece in group for r in piece)), number)
                            for number, group in targets.items() if group))
    return Automaton(tuple(states))


def _covered(ranges: Ranges, firsts: list[int]) -> list[int]:
    """The numbers of the pieces (first characters ``firsts``, sorted) that the class ``ranges`` holds."""
    covered: list[int] = []
    for low, high in ranges:
        covered.extend(range(bisect_left(firsts, low), bisect_right(firsts, high)))
    return covered
