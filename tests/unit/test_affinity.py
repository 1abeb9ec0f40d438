"""Cache-affine routing (gallama_kernel/gateway/affinity.py): the keys the gateway derives from a request body, their
bounds on hostile bodies, and the routing rule over replicas with memories."""

from __future__ import annotations

import asyncio
import itertools
import json
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gallama_kernel.gateway import affinity
from gallama_kernel.gateway.affinity import (
    HIT,
    MISS,
    OVERFLOW,
    Key,
    ReplicaMemory,
    Router,
    request_key,
    response_id,
)
from gallama_kernel.gateway.app import Gateway
from gallama_kernel.gateway.pool import ModelGroup, Pool, Worker
from gallama_kernel.protocol.errors import ServiceUnavailable
from gallama_kernel.testing import free_port

CHAT = "/v1/chat/completions"
SYSTEM = {"role": "system", "content": "You are a careful assistant."}


def turns(opening: str, count: int) -> list[list[dict]]:
    """The message lists of ``count`` successive turns of one conversation (each repeats the one before)."""
    history = [SYSTEM]
    out = []
    for turn in range(count):
        history = [*history, {"role": "user", "content": f"{opening}: question {turn}"}]
        out.append(history)
        history = [*history, {"role": "assistant", "content": f"answer {turn}"}]
    return out


def chat_chain(messages: list, **extra) -> tuple[int, ...]:
    key = request_key(CHAT, {}, {"model": "m", "messages": messages, **extra})
    assert key is not None
    return key.chain


def shared(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


# -- keys ------------------------------------------------------------------------------------------------------


def test_each_turn_of_a_chat_shares_the_whole_previous_chain():
    chains = [chat_chain(m) for m in turns("fix the bug", 5)]
    for before, after in itertools.pairwise(chains):
        assert after[:len(before)] == before
        assert len(after) == len(before) + 2  # the answer and the new question
    # the same messages re-parsed from JSON (new string objects) give the same chain
    again = json.loads(json.dumps(turns("fix the bug", 5)[-1]))
    assert chat_chain(again) == chains[-1]


def test_the_first_block_holds_tools_system_and_the_first_message():
    one, two = turns("task one", 1)[0], turns("task two", 1)[0]
    assert shared(chat_chain(one), chat_chain(two)) == 0, "a shared system prompt alone is no match"
    assert len(chat_chain(one)) == 1
    tool = {"type": "function", "function": {"name": "read_file", "parameters": {}}}
    other = {"type": "function", "function": {"name": "write_file", "parameters": {}}}
    assert chat_chain(one, tools=[tool]) != chat_chain(one)
    assert chat_chain(one, tools=[tool]) != chat_chain(one, tools=[other])
    assert chat_chain(one, tools=[tool]) == chat_chain(one, tools=[tool], temperature=0.5), "only the prompt counts"
    assert chat_chain([{**SYSTEM, "content": "Another system prompt."}, *one[1:]]) != chat_chain(one)


def test_message_fields_are_hashed_in_full_but_cache_control_is_left_out():
    base = turns("t", 2)[1]
    call = {"role": "assistant", "content": None,
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"a\": 1}"}}]}
    other = json.loads(json.dumps(call))
    other["tool_calls"][0]["function"]["arguments"] = "{\"a\": 2}"
    assert chat_chain([*base, call]) != chat_chain([*base, other])
    assert chat_chain([*base, {"role": "user", "content": "x", "name": "a"}]) != chat_chain(
        [*base, {"role": "user", "content": "x", "name": "b"}])
    marked = [{"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}]}]
    plain = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    assert chat_chain(marked) == chat_chain(plain)


def test_anthropic_messages_use_metadata_user_id_as_session_and_system_in_the_first_block():
    body = {"model": "m", "max_tokens": 8, "system": [{"type": "text", "text": "Be brief.",
                                                       "cache_control": {"type": "ephemeral"}}],
            "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                         {"role": "user", "content": "again"}]}
    key = request_key("/v1/messages", {}, body)
    assert key is not None and key.sticky is None and len(key.chain) == 3
    other_system = request_key("/v1/messages", {}, {**body, "system": "Be long."})
    assert other_system is not None and shared(key.chain, other_system.chain) == 0
    with_user = request_key("/v1/messages", {}, {**body, "metadata": {"user_id": "u-1"}})
    same_user = request_key("/v1/messages", {}, {"model": "m", "messages": [], "metadata": {"user_id": "u-1"}})
    assert with_user is not None and same_user is not None
    assert with_user.sticky is not None and with_user.sticky == same_user.sticky
    header = request_key("/v1/messages", {"x-session-id": "s"}, {**body, "metadata": {"user_id": "u-1"}})
    assert header is not None and header.sticky != with_user.sticky, "the session header comes first"


def test_responses_previous_response_id_is_sticky_and_input_is_a_chain():
    first = request_key("/v1/responses", {}, {"model": "m", "instructions": "Be brief.", "input": "hello"})
    assert first is not None and first.answers_response and first.sticky is None and len(first.chain) == 1
    items = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"},
             {"role": "user", "content": "more"}]
    second = request_key("/v1/responses", {}, {"model": "m", "instructions": "Be brief.", "input": items})
    assert second is not None and len(second.chain) == 3
    follow = request_key("/v1/responses", {}, {"model": "m", "input": "more", "previous_response_id": "resp_ab12"})
    assert follow is not None and follow.sticky == affinity.response_key("resp_ab12")
    assert response_id(b'{"id":"resp_0123abcd","object":"response"}') == "resp_0123abcd"
    assert response_id(b'event: response.created\ndata: {"type":"response.created","sequence_number":0,'
                       b'"response":{"id":"resp_99ff","object":"response"}}') == "resp_99ff"
    assert response_id(b'{"error": {"message": "no"}}') is None


def test_completion_prompts_are_chained_in_fixed_blocks():
    size = affinity.COMPLETION_BLOCK_CHARS
    text = "".join(f"line {i}\n" for i in range(2000))
    turn1, turn2 = text[:5 * size + 100], text[:9 * size + 7]
    one = request_key("/v1/completions", {}, {"model": "m", "prompt": turn1})
    two = request_key("/v1/completions", {}, {"model": "m", "prompt": [turn2]})
    assert one is not None and two is not None
    assert len(one.chain) == 5 and len(two.chain) == 9  # full blocks only
    assert two.chain[:5] == one.chain, "turn 1's last full block is in turn 2's chain"
    short = request_key("/v1/completions", {}, {"model": "m", "prompt": "hi"})
    assert short is not None and len(short.chain) == 1
    ids = request_key("/v1/completions", {}, {"model": "m", "prompt": list(range(1000))})
    assert ids is not None and len(ids.chain) == 1000 // (size // 4)


def test_the_session_header_is_a_sticky_key_on_every_route():
    for path in (CHAT, "/v1/completions", "/v1/messages", "/v1/responses"):
        key = request_key(path, {"x-session-id": "abc"}, {"model": "m"})
        assert key is not None and key.sticky == request_key(CHAT, {"x-session-id": "abc"}, {}).sticky
    assert request_key("/v1/embeddings", {"x-session-id": "abc"}, {"model": "m", "input": "x"}) is None


@pytest.mark.parametrize("body", [
    {"model": "m", "messages": [{"role": "user", "content": "a" * 9_000_000}]},
    {"model": "m", "messages": [{"role": "user", "content": "hi"}] * 20_000},
    {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "x"}] * 200_000}]},
    {"model": "m", "messages": [{"role": "user", "content": "x" * 1000, "n": list(range(100_000))}] * 300},
    {"model": "m", "prompt": "abc " * 3_000_000},
    {"model": "m", "prompt": list(range(3_000_000))},
])
def test_hostile_bodies_are_keyed_within_the_bounds(body):
    path = CHAT if "messages" in body else "/v1/completions"
    key = request_key(path, {}, body)
    assert key is not None
    assert 1 <= len(key.chain) <= affinity.MAX_KEY_MESSAGES


def test_deep_nesting_and_odd_types_give_a_key_or_none_never_an_error():
    deep: list = []
    inner = deep
    for _ in range(99):
        inner.append([])
        inner = inner[0]
    key = request_key(CHAT, {}, {"model": "m", "messages": [{"role": "user", "content": deep}]})
    assert key is not None and len(key.chain) == 1
    for body in ({"messages": "nope"}, {"messages": [1, None, True, 2.5]}, {"messages": [{"role": 3}], "tools": "x"},
                 {"prompt": [{"a": 1}] * 5}, {"prompt": [1] * 100 + [{"a": 1}] * 500}, {"input": 5},
                 {"metadata": "x", "messages": [[[]]]}, [], "text", None):
        for path in (CHAT, "/v1/completions", "/v1/messages", "/v1/responses"):
            request_key(path, {"x-session-id": ""}, body)  # must not raise


@settings(max_examples=300, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=8), inner,
                                                                                 max_size=6), max_leaves=60),
       st.sampled_from([CHAT, "/v1/completions", "/v1/messages", "/v1/responses"]))
def test_any_json_body_is_keyed_without_an_error(value, path):
    for body in (value, {"messages": value}, {"prompt": value}, {"input": value, "metadata": value},
                 {"messages": [value, {"role": "user", "content": value}], "tools": value, "system": value}):
        key = request_key(path, {}, body)
        assert key is None or len(key.chain) <= affinity.MAX_KEY_MESSAGES


# -- the rule --------------------------------------------------------------------------------------------------


@dataclass
class Replica:
    replica: int
    slots: int | None = 2
    outstanding: int = 0
    memory: ReplicaMemory = field(default_factory=ReplicaMemory)


def route(router: Router, replicas: list[Replica], key: Key | None, turn: int = 0) -> tuple[int, str | None]:
    chosen, outcome = router.choose(replicas, key, turn, len(replicas))
    return chosen.replica, outcome


def test_a_conversation_follows_its_longest_prefix():
    router, replicas = Router(), [Replica(0), Replica(1)]
    a = [chat_chain(m) for m in turns("agent a", 4)]
    b = [chat_chain(m) for m in turns("agent b", 4)]
    home_a, outcome = route(router, replicas, Key(chain=a[0]))
    assert outcome == MISS
    home_b, outcome = route(router, replicas, Key(chain=b[0]), turn=home_a)  # rotation would pick home_a again
    assert outcome == MISS and home_b != home_a, "a new conversation goes to the replica with a free slot"
    for turn in range(1, 4):
        for chain, home in ((a[turn], home_a), (b[turn], home_b)):
            assert route(router, replicas, Key(chain=chain), turn=turn) == (home, HIT)
    assert (replicas[home_a].memory.hits, replicas[home_b].memory.hits) == (3, 3)


def test_the_longest_match_wins_over_a_shorter_one():
    router, replicas = Router(), [Replica(0), Replica(1)]
    chains = [chat_chain(m) for m in turns("x", 3)]
    replicas[0].memory.remember(chains[0], 1, 2)
    replicas[1].memory.remember(chains[1], 2, 2)
    assert replicas[0].memory.match(chains[2]) == 1 and replicas[1].memory.match(chains[2]) == 3
    assert route(router, replicas, Key(chain=chains[2])) == (1, HIT)
    assert list(replicas[1].memory.tips) == [chains[2][-1]], "the continued conversation's tip was replaced"


def test_a_saturated_replica_overflows_to_the_least_busy_one():
    router, replicas = Router(), [Replica(0, slots=1), Replica(1, slots=1)]
    chain = chat_chain(turns("x", 1)[0])
    home, _ = route(router, replicas, Key(chain=chain))
    replicas[home].outstanding = 1
    other, outcome = route(router, replicas, Key(chain=chain))
    assert other != home and outcome == OVERFLOW
    assert replicas[other].memory.overflows == 1


def test_sessions_are_sticky_and_move_with_an_overflow():
    router, replicas = Router(), [Replica(0), Replica(1)]
    session = Key(sticky=hash(("session", "s1")), chain=chat_chain(turns("one", 1)[0]))
    home, outcome = route(router, replicas, session)
    assert outcome == MISS
    for turn in range(6):  # different prompts, same session: the same replica
        key = Key(sticky=session.sticky, chain=chat_chain(turns(f"other {turn}", 1)[0]))
        assert route(router, replicas, key, turn=turn) == (home, HIT)
    replicas[home].outstanding = 2
    moved, outcome = route(router, replicas, session)
    assert moved != home and outcome == OVERFLOW
    replicas[home].outstanding = 0
    assert route(router, replicas, session) == (moved, HIT), "the session stays where it went"


def test_a_restart_forgets_the_replica():
    router, replicas = Router(), [Replica(0), Replica(1)]
    chain = chat_chain(turns("x", 1)[0])
    sticky = hash(("session", "s"))
    home, _ = route(router, replicas, Key(sticky=sticky, chain=chain))
    replicas[home].memory.forget()
    router.forget(home)
    assert replicas[home].memory.match(chain) == 0 and sticky not in router.sticky
    assert route(router, replicas, Key(chain=chain))[1] == MISS


def test_response_ids_are_filed_under_the_replica_that_answered():
    router, replicas = Router(), [Replica(0), Replica(1)]
    assert router.learn_answer(1, b'{"id":"resp_77","object":"response"}')
    assert not router.learn_answer(1, b"garbage")
    follow = request_key("/v1/responses", {}, {"input": "next", "previous_response_id": "resp_77"})
    for turn in range(4):
        assert route(router, replicas, follow, turn=turn) == (1, HIT)


def test_memories_and_sticky_maps_are_bounded(monkeypatch):
    monkeypatch.setattr(affinity, "PREFIXES_PER_REPLICA", 50)
    monkeypatch.setattr(affinity, "STICKY_ENTRIES", 20)
    router, replicas = Router(), [Replica(0, slots=3)]
    for n in range(100):
        route(router, replicas, Key(sticky=n, chain=tuple(range(n * 10, n * 10 + 7))))
    memory = replicas[0].memory
    assert len(memory.prefixes) == 50 and len(router.sticky) == 20 and len(memory.tips) == 3
    last = tuple(range(990, 997))
    assert memory.match(last) == 7
    assert memory.match(tuple(range(0, 7))) == 0


def test_new_conversations_spread_over_the_slot_models():
    router, replicas = Router(), [Replica(0), Replica(1)]
    homes = [route(router, replicas, Key(chain=chat_chain(turns(f"agent {n}", 1)[0])), turn=0)[0] for n in range(4)]
    assert sorted(homes) == [0, 0, 1, 1], "same rotation turn every time: the slot models decide"


def test_no_key_is_the_least_outstanding_rule():
    router, replicas = Router(), [Replica(0, outstanding=3), Replica(1, outstanding=1)]
    assert route(router, replicas, None) == (1, None)
    assert replicas[1].memory.hits == replicas[1].memory.misses == 0


def test_the_pool_routes_by_affinity_unless_told_otherwise():
    with pytest.raises(ValueError, match="routing"):
        Pool({}, routing="random")
    chain = chat_chain(turns("x", 1)[0])
    for routing, expected in (("affinity", [0, 0, 0, 0]), ("least_outstanding", [0, 1, 0, 1])):
        pool = Pool({}, routing=routing)
        spec = type("Spec", (), {"name": "m", "aliases": []})()
        workers = [Worker(spec, i, state="ready", slots=2) for i in range(2)]  # type: ignore[arg-type]
        group = ModelGroup("m", spec, workers)  # type: ignore[arg-type]
        assert [pool.pick(group, Key(chain=chain)).replica for _ in range(4)] == expected
        counters = workers[0].describe()
        assert counters["affinity_hits"] == (3 if routing == "affinity" else 0)


def test_a_forwarded_request_counts_from_the_call_on(tmp_path):
    """A burst of requests picked in one turn of the event loop must see each other's counts (the saturation
    rule); a forward cancelled before it ran, or failing, gives its count back."""

    async def main() -> None:
        gateway = Gateway(Pool({}), tmp_path)
        spec = type("Spec", (), {"name": "m", "aliases": []})()
        worker = Worker(spec, 0, state="ready", slots=1, port=free_port())  # type: ignore[arg-type]
        try:
            task = gateway.forward(worker, "/v1/chat/completions", b"{}", False)
            assert worker.outstanding == 1
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            assert worker.outstanding == 0
            with pytest.raises(ServiceUnavailable):  # nothing listens on the port
                await gateway.forward(worker, "/v1/chat/completions", b"{}", False)
            assert worker.outstanding == 0
        finally:
            gateway.upstream.close()

    asyncio.run(main())
