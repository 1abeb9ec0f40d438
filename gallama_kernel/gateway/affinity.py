"""Cache-affine routing: send a request to the replica of its model that already holds its prompt's prefix.

Why. A llama.cpp replica keeps, in each slot, the KV of the last prompt the slot served, and a request whose
prompt starts with those tokens computes only the rest. An agent's turn N+1 repeats turn N (its messages, the
answer, one new message), so it is cheap on the replica that served turn N and a full prefill on any other. The
gateway relays raw bodies and never renders a prompt, so it keys requests by what it has already parsed.

Keys (:func:`request_key`), both optional:

* a **sticky key** names a conversation outright: the ``x-session-id`` header; on ``/v1/messages`` the body's
  ``metadata.user_id``; on ``/v1/responses`` the ``previous_response_id`` (the gateway reads the id of every
  response a replica produces from the first bytes of its answer, :func:`response_id`, and files it under that
  replica). Sticky keys map to a replica in one LRU map per model.
* a **prefix chain** ``h0, h1, …``: ``h_i`` is a hash of the first ``i + 1`` blocks of the prompt's source, each
  hash folding the previous one in, so the chains of two requests agree exactly as far as their sources do. For
  chat completions, Anthropic messages and Responses input items a block is a message (its JSON value walked in
  order: role, content, tool calls …; ``cache_control`` markers left out, so a marker that moves to the newest
  message between turns does not change the older ones). The first block also holds the tool names,
  the system prompt (leading system/developer messages, Anthropic's ``system``, Responses' ``instructions``) *and
  the first user message*: a system prompt alone, shared by every conversation of an application, would otherwise
  pull all of them onto one replica, more conversations than its slots can keep. ``/v1/completions``: blocks of
  :data:`COMPLETION_BLOCK_CHARS` characters of the prompt (full blocks only, so turn N's last block is in turn N+1's
  chain; a prompt shorter than one block is one block).

Cost is bounded whatever the body: at most :data:`MAX_KEY_CHARS` characters of strings, :data:`MAX_KEY_NODES` JSON
values, :data:`MAX_KEY_MESSAGES` blocks and :data:`MAX_KEY_DEPTH` levels are hashed; the chain ends with the block in
which a bound was reached (so the same long conversation still gives the same chain). Strings are hashed with
Python's own ``hash`` (SipHash, salted per process: the tables live in this process only). Any failure gives no key,
never a failed request.

Memory (:class:`ReplicaMemory`, one per replica, emptied when its worker dies, which also drops the sticky keys that
mapped to it): the chain hashes of the requests routed to it, an LRU of :data:`PREFIXES_PER_REPLICA` entries (a
request's shorter prefixes are refreshed last, so eviction takes long tails first and a match stays a prefix), and a
model of its slots: the last chain tip of each of the last ``slots`` conversations placed there (a request that
continues a conversation replaces its tip).

The rule (:meth:`Router.choose`), per request of a model, among its ready replicas:

1. the **preferred** replica: the one its sticky key maps to when that key is known; otherwise the one whose memory
   holds the longest prefix of its chain (at least one block; ties: fewest outstanding requests, then rotation);
2. the preferred replica serves it if its outstanding requests are below its slots (a *hit*);
3. otherwise (no preferred replica: a *miss*; preferred but saturated or not ready: an *overflow*) the replica with
   the fewest outstanding requests, ties broken by the fewest conversations in its slot model, then the stalest
   one, then rotation — so new conversations spread over the replicas' slots even one at a time;
4. the chosen replica remembers the chain, and the sticky key now maps to it.

"Outstanding" counts a request from the moment it is routed (app.py's ``Gateway.forward``), so a burst routed in
one turn of the event loop sees itself and still overflows at the slot count.

``GALLAMA_ROUTING=least_outstanding`` turns all of this off: no keys, the fewest outstanding requests, ties rotate.
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

log = logging.getLogger("gallama.gateway")

AFFINITY = "affinity"
LEAST_OUTSTANDING = "least_outstanding"
ROUTINGS = (AFFINITY, LEAST_OUTSTANDING)

SESSION_HEADER = "x-session-id"
MAX_KEY_CHARS = 256 * 1024
"""Characters of strings hashed per request (about 64k tokens of prompt); beyond, the chain ends."""
MAX_KEY_NODES = 1024
"""JSON values (objects, arrays, strings, numbers) visited per request (a message of strings only counts one)."""
MAX_KEY_MESSAGES = 256
"""Blocks (messages, prompt blocks) per chain."""
MAX_KEY_DEPTH = 24
"""Nesting levels walked inside a message; deeper values count as one marker."""
COMPLETION_BLOCK_CHARS = 512
"""``/v1/completions``: characters per block of the prompt text (token-id prompts: a quarter as many ids)."""
MAX_TOOL_NAMES = 256
PREFIXES_PER_REPLICA = 8192
"""Chain hashes each replica remembers (LRU)."""
STICKY_ENTRIES = 16_384
"""Sticky keys (sessions, response ids) each model remembers (LRU)."""
RESPONSE_HEAD_BYTES = 2048
"""Bytes of a ``/v1/responses`` answer searched for its id."""
VOLATILE_KEYS = frozenset({"cache_control"})
"""Message keys left out of the hash: clients move them between messages from turn to turn."""
SYSTEM_ROLES = frozenset({"system", "developer"})

_RESPONSE_ID = re.compile(rb'"id"\s*:\s*"(resp_[A-Za-z0-9_-]{1,128})"')
_CUT = object()  # the marker hashed where a bound stopped the walk


@dataclass(frozen=True, slots=True)
class Key:
    """What the router knows of a request: a sticky key, a prefix chain, and whether the answer names a response
    (``/v1/responses``) whose id should be filed under the replica."""

    sticky: int | None = None
    chain: tuple[int, ...] = ()
    answers_response: bool = False


class _Budget:
    __slots__ = ("chars", "cut", "nodes")

    def __init__(self) -> None:
        self.chars = MAX_KEY_CHARS
        self.nodes = MAX_KEY_NODES
        self.cut = False


def _fold(h: int, value: Any, budget: _Budget, depth: int = 0) -> int:
    """``h`` with ``value`` folded in: strings, numbers, booleans, ``null``; objects in key order (without
    :data:`VOLATILE_KEYS`) and arrays in order, within ``budget``."""
    budget.nodes -= 1
    if budget.nodes < 0 or depth > MAX_KEY_DEPTH:
        budget.cut = True
        return hash((h, _CUT))
    if isinstance(value, str):
        if len(value) > budget.chars:
            value, budget.cut = value[:budget.chars], True
        budget.chars -= len(value)
        return hash((h, value))
    if isinstance(value, dict):
        if len(value) <= 64 and not VOLATILE_KEYS.isdisjoint(value):
            value = {name: item for name, item in value.items() if name not in VOLATILE_KEYS}
        # the common case, {"role": ..., "content": "..."}: its pairs in one tuple hash (when a value is not a
        # string, it has no len or no hash: walked below)
        try:
            size = sum(map(len, value.values()))
            if size <= budget.chars:
                folded = hash((h, tuple(value.items())))
                budget.chars -= size
                return folded
        except TypeError:
            pass
        for name, item in value.items():
            if name in VOLATILE_KEYS:
                continue
            h = _fold(_fold(h, name, budget, depth + 1), item, budget, depth + 1)
            if budget.cut:
                break
        return hash((h, "}"))
    if isinstance(value, list):
        for item in value:
            h = _fold(h, item, budget, depth + 1)
            if budget.cut:
                break
        return hash((h, "]"))
    if isinstance(value, int | float):  # bool included
        return hash((h, value))
    return hash((h, None))


def _tool_names(tools: Any) -> list[str]:
    """The names of ``tools`` (OpenAI's ``function.name``, Anthropic's and Responses' ``name``)."""
    names: list[str] = []
    if isinstance(tools, list):
        for tool in tools[:MAX_TOOL_NAMES]:
            if isinstance(tool, dict):
                function = tool.get("function")
                name = function.get("name") if isinstance(function, dict) else tool.get("name")
                if isinstance(name, str):
                    names.append(name[:256])
    return names


def message_chain(head: Sequence[Any], messages: Sequence[Any], system_roles: bool = True) -> tuple[int, ...]:
    """The prefix chain of a conversation: ``head`` (tool names, system prompt) and the leading system messages
    (when ``system_roles``) and the first other message make the first block; each later message one more."""
    budget = _Budget()
    h = _fold(0, list(head), budget)
    chain: list[int] = []
    opening = True
    for message in messages[:MAX_KEY_MESSAGES]:
        h = _fold(h, message, budget)
        if opening and system_roles and isinstance(message, dict) and message.get("role") in SYSTEM_ROLES \
                and not budget.cut:
            continue
        opening = False
        chain.append(h)
        if budget.cut:
            break
    return tuple(chain)


def text_chain(prompt: Any) -> tuple[int, ...]:
    """The prefix chain of a ``/v1/completions`` prompt: a string (or the first of a list of strings) in blocks of
    :data:`COMPLETION_BLOCK_CHARS` characters, a token-id list in blocks of a quarter as many ids."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch: the first prompt
    if isinstance(prompt, str):
        size, text = COMPLETION_BLOCK_CHARS, prompt[:MAX_KEY_CHARS]
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt[:64]):
        size, text = COMPLETION_BLOCK_CHARS // 4, prompt[:MAX_KEY_CHARS // 4]
    else:
        return ()
    if len(text) < size:
        return (hash((0, text if isinstance(text, str) else tuple(text))),)
    chain: list[int] = []
    h = 0
    for start in range(0, min(len(text) - size + 1, size * MAX_KEY_MESSAGES), size):
        block = text[start:start + size]
        h = hash((h, block if isinstance(block, str) else tuple(block)))
        chain.append(h)
    return tuple(chain)


def _sticky(kind: str, value: Any) -> int | None:
    return hash((kind, value)) if isinstance(value, str) and value else None


def response_key(response_id: str) -> int:
    """The sticky key a ``previous_response_id`` of ``response_id`` looks up."""
    return hash(("response", response_id))


def _key(path: str, headers: Mapping[str, str], body: dict[str, Any]) -> Key | None:
    sticky = _sticky("session", headers.get(SESSION_HEADER))
    if path == "/v1/chat/completions":
        messages = body.get("messages")
        chain = message_chain(_tool_names(body.get("tools")), messages) if isinstance(messages, list) else ()
        return Key(sticky, chain)
    if path == "/v1/messages":
        metadata = body.get("metadata")
        if sticky is None and isinstance(metadata, dict):
            sticky = _sticky("user", metadata.get("user_id"))
        messages = body.get("messages")
        head = [_tool_names(body.get("tools")), body.get("system")]
        return Key(sticky, message_chain(head, messages, system_roles=False) if isinstance(messages, list) else ())
    if path == "/v1/responses":
        previous = body.get("previous_response_id")
        if sticky is None and isinstance(previous, str) and previous:
            sticky = response_key(previous)
        items = body.get("input")
        head = [_tool_names(body.get("tools")), body.get("instructions")]
        if isinstance(items, str):
            items = [items]
        chain = message_chain(head, items) if isinstance(items, list) else ()
        return Key(sticky, chain, answers_response=True)
    if path == "/v1/completions":
        return Key(sticky, text_chain(body.get("prompt")))
    return None


def request_key(path: str, headers: Mapping[str, str], body: Any) -> Key | None:
    """The routing key of a request to ``path`` (its headers and parsed body), or ``None`` (no key: routed by load).
    Bounded work (see the module docstring); never raises."""
    if not isinstance(body, dict):
        return None
    try:
        return _key(path, headers, body)
    except Exception as error:  # a key is an optimisation: a body it cannot read is routed by load
        log.debug("no routing key for a request to %s: %s", path, error)
        return None


def response_id(head: bytes) -> str | None:
    """The response id at the start of a ``/v1/responses`` answer (a JSON body or its first stream events)."""
    found = _RESPONSE_ID.search(head[:RESPONSE_HEAD_BYTES])
    return found.group(1).decode("ascii") if found else None


# -- the router --------------------------------------------------------------------------------------------------

HIT, MISS, OVERFLOW = "hit", "miss", "overflow"


@dataclass
class ReplicaMemory:
    """What one replica is believed to hold: chain hashes it served (LRU) and a model of its slots (the tip of each
    conversation placed there, least recently used first), with its affinity counters."""

    prefixes: OrderedDict[int, None] = field(default_factory=OrderedDict)
    tips: OrderedDict[int, int] = field(default_factory=OrderedDict)  # chain tip -> tick when placed
    hits: int = 0
    misses: int = 0
    overflows: int = 0

    def match(self, chain: Sequence[int]) -> int:
        """Blocks of ``chain`` this replica holds (the longest remembered prefix)."""
        prefixes = self.prefixes
        for index in range(len(chain) - 1, -1, -1):
            if chain[index] in prefixes:
                return index + 1
        return 0

    def remember(self, chain: Sequence[int], tick: int, slots: int) -> None:
        prefixes = self.prefixes
        for h in reversed(chain):  # the shortest prefix ends most recent: eviction takes the tails first
            prefixes[h] = None
            prefixes.move_to_end(h)
        while len(prefixes) > PREFIXES_PER_REPLICA:
            prefixes.popitem(last=False)
        if chain:
            members = set(chain)
            for tip in [t for t in self.tips if t in members]:  # the conversation it continues
                del self.tips[tip]
            self.tips[chain[-1]] = tick
            while len(self.tips) > max(slots, 1):
                self.tips.popitem(last=False)

    def crowding(self) -> tuple[int, int]:
        """How full its slot model is: (conversations held, when the least recently placed one was placed)."""
        return len(self.tips), next(iter(self.tips.values()), 0)

    def forget(self) -> None:
        self.prefixes.clear()
        self.tips.clear()

    def count(self, outcome: str) -> None:
        if outcome == HIT:
            self.hits += 1
        elif outcome == OVERFLOW:
            self.overflows += 1
        else:
            self.misses += 1

    def counters(self) -> dict[str, int]:
        return {"affinity_hits": self.hits, "affinity_misses": self.misses, "affinity_overflows": self.overflows}


class Replica(Protocol):
    replica: int
    outstanding: int
    slots: int | None
    memory: ReplicaMemory


@dataclass
class Router:
    """The routing state of one model: its sticky keys (LRU) and a tick for the slot models."""

    sticky: OrderedDict[int, int] = field(default_factory=OrderedDict)  # sticky key -> replica index
    tick: int = 0

    @staticmethod
    def capacity(worker: Replica) -> int:
        return worker.slots or 1

    def choose(self, ready: Sequence[Replica], key: Key | None, turn: int, size: int) -> tuple[Any, str | None]:
        """The replica for a request with ``key`` among ``ready`` ones (``turn``: the rotation counter, ``size``:
        all replicas of the model), and the outcome (``hit``, ``miss``, ``overflow``; ``None`` without a key).
        The rule is the module docstring's."""
        preferred: Replica | None = None
        wanted = False
        if key is not None:
            index = self.sticky.get(key.sticky) if key.sticky is not None else None
            if index is not None:
                wanted = True
                preferred = next((w for w in ready if w.replica == index), None)
            elif key.chain:
                longest = 0
                for worker in sorted(ready, key=lambda w: (w.outstanding, (w.replica - turn) % size)):
                    held = worker.memory.match(key.chain)
                    if held > longest:
                        preferred, longest = worker, held
                wanted = preferred is not None
        if preferred is not None and preferred.outstanding < self.capacity(preferred):
            chosen, outcome = preferred, HIT
        else:
            chosen = min(ready, key=lambda w: (w.outstanding, w.memory.crowding(), (w.replica - turn) % size))
            outcome = OVERFLOW if wanted else MISS
        if key is None:
            return chosen, None
        self.tick += 1
        chosen.memory.remember(key.chain, self.tick, self.capacity(chosen))
        chosen.memory.count(outcome)
        if key.sticky is not None:
            self.file(key.sticky, chosen.replica)
        return chosen, outcome

    def file(self, sticky: int, replica: int) -> None:
        """Map ``sticky`` to ``replica`` (most recent in the LRU)."""
        self.sticky[sticky] = replica
        self.sticky.move_to_end(sticky)
        while len(self.sticky) > STICKY_ENTRIES:
            self.sticky.popitem(last=False)

    def learn_answer(self, replica: int, head: bytes) -> bool:
        """File the response id at the start of a ``/v1/responses`` answer under the replica that produced it; true
        when one was found."""
        try:
            found = response_id(head)
        except Exception:  # never fail a request over routing
            return False
        if found is None:
            return False
        self.file(response_key(found), replica)
        return True

    def forget(self, replica: int) -> None:
        """The replica restarted: its sticky keys go (its memory is emptied by its owner)."""
        for key in [k for k, r in self.sticky.items() if r == replica]:
            del self.sticky[key]
