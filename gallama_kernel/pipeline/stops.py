"""Stop strings that never leak: text is held back while it could still be the start of a stop string."""

from __future__ import annotations


class StopMatcher:
    """Feed generated text; get back what is safe to emit, and whether a stop string was completed.

    Every backend uses this one matcher, so stop semantics are the same on every engine.
    """

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self._held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Return ``(emit, stopped)``. After ``stopped`` the rest of the stream must be dropped."""
        if not self.stops:
            return text, False
        buffer = self._held + text
        cut = min((i for i in (buffer.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self._held = ""
            return buffer[:cut], True
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
