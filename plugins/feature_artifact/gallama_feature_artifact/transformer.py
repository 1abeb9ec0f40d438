"""Turns the raw text of an artifact-mode answer into content deltas that carry ``artifact_meta``.

The raw stream (``{"content": "<answer><text>Quick…"}``, chunked anywhere, tags split across chunks) becomes
deltas ``{"content": "...", "artifact_meta": {...}}``; the first delta of each segment also carries the
kernel's ``SEGMENT`` key, so a non-streamed response has one choice per segment. The tags never reach the
content: only text that could still be the start of a tag is held back until the next chunk decides. Whitespace
between segments is dropped, and so is one line break right inside each tag (``<artifact …>\ncode\n</artifact>``
holds ``code``).

The reader mirrors the grammar (:mod:`gallama_feature_artifact.grammar`): inside a body only that body's
closing tag ends it, so any other ``<`` is content. It is also lenient where the grammar is strict: text
outside any segment (should a model run without the grammar) becomes an implicit text segment rather than
being lost, and stray tags there are dropped.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from gallama_kernel.plugin import SEGMENT, Delta

ArtifactMeta = dict[str, Any]
"""``{"tag_type": "text"}`` or ``{"tag_type": "artifact", "artifact_type", "identifier", "title", "language"}``."""

TEXT_META: ArtifactMeta = {"tag_type": "text"}

CLOSING_TAGS = {"text": "</text>", "artifact": "</artifact>"}
OUTSIDE_TAGS = ("<answer>", "</answer>", "<text>", "</text>", "</artifact>")
"""Tags recognised between segments, besides ``<artifact …>``."""

ARTIFACT_OPEN = "<artifact"
MAX_OPEN_TAG = 1024
"""An ``<artifact`` longer than this without its ``>`` is not a tag (its text becomes content)."""

WHITESPACE = " \t\r\n"
_ATTRIBUTE = re.compile(r'([A-Za-z_][\w:.-]*)\s*=\s*"([^"]*)"')

State = Literal["outside", "text", "artifact"]


def artifact_meta(attributes: dict[str, str]) -> ArtifactMeta:
    """The ``artifact_meta`` of an artifact segment from the attributes of its opening tag."""
    return {"tag_type": "artifact", "artifact_type": attributes.get("type"),
            "identifier": attributes.get("identifier"), "title": attributes.get("title"),
            "language": attributes.get("language")}


def parse_attributes(text: str) -> dict[str, str]:
    """``name="value"`` pairs of a tag (the first of a repeated name wins)."""
    found: dict[str, str] = {}
    for match in _ATTRIBUTE.finditer(text):
        found.setdefault(match.group(1), match.group(2))
    return found


def partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that is a proper beginning of ``tag`` (0 if none)."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:size]):
            return size
    return 0


class ArtifactTransformer:
    """The response transformer of artifact mode (one per request; see the module docstring).

    ``feed`` takes raw deltas; ``finish`` flushes what was held back (a partial closing tag at the very end,
    as left by a truncated answer, is dropped); ``annotate`` adds the current ``artifact_meta`` to the deltas
    the kernel sends by itself. Deltas without content (tool calls …) pass through with ``artifact_meta``
    added, so every streamed chunk carries it.
    """

    def __init__(self) -> None:
        self._buffer = ""
        self._state: State = "outside"
        self._loose = False  # outside: text outside the tags is being passed on as an implicit text segment
        self._meta: ArtifactMeta = dict(TEXT_META)
        self._opened = False  # a segment was opened at least once
        self._body_start = False  # a body was just opened: a line break may still be dropped

    @property
    def meta(self) -> ArtifactMeta:
        """A copy of the current segment's metadata (``{"tag_type": "text"}`` before any segment)."""
        return dict(self._meta)

    # -- the ResponseTransformer protocol ---------------------------------------------------------------
    def feed(self, delta: Delta) -> list[Delta]:
        out: list[Delta] = []
        others = {key: value for key, value in delta.items() if key != "content"}
        if others:
            out.append(self._with_meta(others))
        content = delta.get("content")
        if content:
            self._buffer += content
            self._scan(out, final=False)
        return _merge(out)

    def finish(self) -> list[Delta]:
        out: list[Delta] = []
        self._scan(out, final=True)
        if not self._opened:  # nothing at all: still one (empty) text segment, so the choice has its meta
            self._open(out, dict(TEXT_META))
        return _merge(out)

    def annotate(self, delta: Delta) -> Delta:
        """A delta the kernel sends by itself (opening, closing) with the current ``artifact_meta`` and, if it
        has none, an empty ``content`` (clients that print every chunk's content then print no ``None``)."""
        return {"content": "", **self._with_meta(delta)}

    def _with_meta(self, delta: Delta) -> Delta:
        if "artifact_meta" in delta:
            return delta
        return {**delta, "artifact_meta": self.meta}

    # -- reading ------------------------------------------------------------------------------------------
    def _scan(self, out: list[Delta], final: bool) -> None:
        """Turn as much of the buffer into deltas as can be decided now (everything when ``final``)."""
        while self._buffer:
            if self._state != "outside":
                if not self._scan_body(out, CLOSING_TAGS[self._state], final):
                    return
            elif not self._scan_outside(out, final):
                return

    def _scan_body(self, out: list[Delta], closing: str, final: bool) -> bool:
        """Inside a body; return whether the closing tag was consumed (so scanning goes on).

        One line break right after the opening tag and one right before the closing tag are layout, not
        content (``<artifact …>\ncode\n</artifact>`` holds ``code``).
        """
        if self._body_start:
            self._body_start = False
            if self._buffer.startswith("\n"):
                self._buffer = self._buffer[1:]
                if not self._buffer:
                    return False
        index = self._buffer.find(closing)
        if index >= 0:
            body = self._buffer[:index]
            self._emit(out, body[:-1] if body.endswith("\n") else body)
            self._buffer = self._buffer[index + len(closing):]
            self._state = "outside"
            self._loose = False
            return True
        held = partial_suffix(self._buffer, closing)
        if final:
            held = 0 if held == 1 else held  # a lone "<" at the very end is text, a longer tag start is not
        elif self._buffer[:len(self._buffer) - held].endswith("\n"):
            held += 1  # may be the line break before the closing tag
        self._emit(out, self._buffer[:len(self._buffer) - held])
        self._buffer = "" if final else self._buffer[len(self._buffer) - held:]
        return False

    def _scan_outside(self, out: list[Delta], final: bool) -> bool:
        """Between segments; return whether scanning goes on."""
        if not self._loose:
            self._buffer = self._buffer.lstrip(WHITESPACE)  # whitespace between segments is dropped
            if not self._buffer:
                return False
        if not self._buffer.startswith("<"):
            end = self._buffer.find("<")
            end = len(self._buffer) if end < 0 else end
            self._loose_text(out, self._buffer[:end])
            self._buffer = self._buffer[end:]
            return True
        match = self._match_tag(self._buffer)
        if match is None:  # a "<" that starts no tag
            self._loose_text(out, "<")
            self._buffer = self._buffer[1:]
            return True
        if match == "partial":
            if final:  # an unfinished tag at the very end: not content
                self._buffer = ""
            return False
        length, meta = match
        self._buffer = self._buffer[length:]
        self._loose = False
        if meta is not None:
            self._state = "text" if meta["tag_type"] == "text" else "artifact"
            self._body_start = True
            self._open(out, meta)
        return True

    @staticmethod
    def _match_tag(buffer: str) -> tuple[int, ArtifactMeta | None] | Literal["partial"] | None:
        """The tag at the start of ``buffer``: (length, meta of the segment it opens or None), ``"partial"``
        when more text is needed to tell, or None when ``buffer`` does not start with a tag."""
        for tag in OUTSIDE_TAGS:
            if buffer.startswith(tag):
                return len(tag), (dict(TEXT_META) if tag == "<text>" else None)
            if tag.startswith(buffer):
                return "partial"
        if buffer.startswith(ARTIFACT_OPEN):
            rest = buffer[len(ARTIFACT_OPEN):]
            if not rest:
                return "partial"
            if rest[0] == ">":
                return len(ARTIFACT_OPEN) + 1, artifact_meta({})
            if rest[0] not in WHITESPACE:
                return None
            end = rest.find(">")
            if end < 0:
                return "partial" if len(buffer) < MAX_OPEN_TAG else None
            return len(ARTIFACT_OPEN) + end + 1, artifact_meta(parse_attributes(rest[:end]))
        if ARTIFACT_OPEN.startswith(buffer):
            return "partial"
        return None

    # -- writing ------------------------------------------------------------------------------------------
    def _open(self, out: list[Delta], meta: ArtifactMeta) -> None:
        self._meta = meta
        self._opened = True
        out.append({"content": "", "artifact_meta": self.meta, SEGMENT: True})

    def _emit(self, out: list[Delta], text: str) -> None:
        if text:
            if not self._opened:
                self._open(out, dict(TEXT_META))
            out.append({"content": text, "artifact_meta": self.meta})

    def _loose_text(self, out: list[Delta], text: str) -> None:
        if not self._loose:
            self._loose = True
            self._open(out, dict(TEXT_META))
        self._emit(out, text)


def _merge(deltas: list[Delta]) -> list[Delta]:
    """Join consecutive content deltas of one segment (fewer, larger chunks; same text)."""
    merged: list[Delta] = []
    for delta in deltas:
        last = merged[-1] if merged else None
        if (last is not None and set(delta) == {"content", "artifact_meta"} and "content" in last
                and set(last) <= {"content", "artifact_meta", SEGMENT}
                and last["artifact_meta"] == delta["artifact_meta"]):
            merged[-1] = {**last, "content": last["content"] + delta["content"]}
        else:
            merged.append(delta)
    return merged
