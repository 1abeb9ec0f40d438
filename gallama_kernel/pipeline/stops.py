"""Stop strings that never leak: text is held back while it could still be the start of a stop string."""

from __future__ import annotations


class StopMatcher:
    """Feed generated text; get back what is safe to emit, and whether a stop string was completed.

    Every backend uses this one matcher, so stop semantics are the same on every engine. Generation ends
    at the first stop string to be completed as the text grows (for ``["abcd", "bc"]`` and ``"xabcd"`` that is
    ``"bc"``: the output is ``"xa"``), so the result never depends on how the text was split into tokens.
    """

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self._held = ""
        self.matched: str | None = None
        """The stop string that ended the generation, once ``feed`` said ``stopped`` (a backend reports it in
        :attr:`GenerationEvent.stop_sequence`)."""

    def feed(self, text: str) -> tuple[str, bool]:
        """Return ``(emit, stopped)``. After ``stopped`` the rest of the stream must be dropped."""
        if not self.stops:
            return text, False
        buffer = self._held + text
        found = [(i + len(s), i, s) for s in self.stops if (i := buffer.find(s)) >= 0]
        if found:
            self._held = ""
            _, start, self.matched = min(found)
            return buffer[:start], True
        keep = self._partial_suffix(buffer)
        self._held = buffer[len(buffer) - keep:] if keep else ""
        return buffer[: len(buffer) - keep], False

    def _partial_suffix(self, buffer: str) -> int:
        """Length of the longest suffix of ``buffer`` that is a proper prefix of some stop string."""
        longest = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(buffer)), longest, -1):
                if buffer.endswith(stop[:size]):
                    longest = size
                    break
        return longest

    def flush(self) -> str:
        """Text still held back when generation ends without a stop string."""
        held, self._held = self._held, ""
        return held
