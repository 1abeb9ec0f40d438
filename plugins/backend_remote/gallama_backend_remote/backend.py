"""The ``remote`` backend: a model that another engine serves over HTTP, with gallama's semantics in front.

The kernel does what it does for a local engine: it renders the chat template, tokenizes (control tokens only
from the template, never from client text), compiles every constraint into its grammar and parses tool calls,
artifacts and thinking out of the finished text. This backend then sends the token ids, the sampling settings and
the constraint in the form the configured engine enforces (see :mod:`.engines`), relays the streamed text as it
arrives, and checks the finished output against the grammar: an engine that wrote outside it is a 502, never a
silently broken tool call.

Requests in flight are bounded by ``max_concurrent_requests`` (default: the engine's slots when it reports
them): the gateway queues the rest. A request is retried (at most ``retries`` times) only while no text went
to the client: when the engine cannot be reached or answers 502/503/504. Closing the stream (a client that
went away, a stop string matched here) closes the HTTP request, which engines take as a cancellation.

Errors keep OpenAI's shape: an engine that cannot be reached or is loading is a 503, one that breaks off or
answers an error a 502 with its message, one that stays silent beyond ``timeout_s`` a 504. The API key is read
from the environment variable ``api_key_env`` names; it is never written to the configuration or the logs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, ClassVar, Literal
from urllib.parse import urlsplit

import httpx
from pydantic import BaseModel, ConfigDict, Field, field_validator

from gallama_kernel.plugin import (
    Backend,
    BackendError,
    BadGateway,
    Capabilities,
    GatewayTimeout,
    GenerationEvent,
    GenerationRequest,
    ProgressCallback,
    ServiceUnavailable,
    StopMatcher,
    UpstreamClient,
    UpstreamError,
    UpstreamResponse,
    hold_text,
)

from .engines import KINDS, EngineInfo, EngineKind, EngineReplyError, Piece, error_message
from .tokenizer import LocalTokenizer

if TYPE_CHECKING:
    from gallama_kernel.plugin import Grammar, ModelSpec

log = logging.getLogger("gallama.remote")
logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per engine request would drown the server's log

SHARED_CPU_STREAM_INTERVAL_S = 0.02
ENGINE_KEEPALIVE_S = 4.0  # idle connections are dropped before the engines' own 5 s (llama-server, uvicorn)
DEFAULT_SLOTS = 8  # requests in flight when neither the spec nor the engine says
HEALTH_EVERY_S = 5.0
LOAD_POLL_S = 0.5
TOKEN_CACHE_CHARS = 4_000_000  # texts whose tokens are kept (template pieces, earlier messages of a conversation)
TOKEN_CACHE_MAX_TEXT = 65_536  # longer texts are tokenized each time
MAX_ERROR_BODY = 8192  # bytes of an engine's error answer read for its message
CONTROL_CANDIDATE = re.compile(r"<\|?[^\s<>|]{1,40}\|?>|\[/?[A-Z_]{2,30}\]|<<[A-Z]+>>")
"""Text in a chat template that may be a control token (``<|im_start|>``, ``<s>``, ``[INST]``, ``<<SYS>>``): the
engine's tokenizer decides which are (one token with special parsing, several without)."""
MARKER_SHAPE = re.compile(r"[<\[].{1,62}[>\]]", re.DOTALL)
"""What a marker token looks like (``<think>``, ``[TOOL_CALLS]``), as the llama.cpp backend tells them apart."""
COMMON_MARKERS = ("<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>")
"""Markers looked for even where the chat template does not write them (an older R1 distill's names only
``</think>``)."""


class RemoteOptions(BaseModel):
    """The ``remote`` backend's ``-id`` keys."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(description="The engine's OpenAI-compatible API, e.g. http://10.0.0.5:8080/v1.")
    engine: Literal["llama_server", "vllm", "sglang", "openai"] = Field(
        description="What serves it: llama_server, vllm, sglang, or openai (an engine without constraint "
        "support: constrained requests are refused).")
    tokenizer: str | None = Field(default=None, description="A local folder with the model's tokenizer.json "
                                  "(and tokenizer_config.json): gallama tokenizes with it. Required for vllm, sglang "
                                  "and openai; llama_server tokenizes on request without it.")
    api_key_env: str | None = Field(default=None, description="Environment variable holding the engine's API "
                                    "key (sent as a bearer token; never stored in the config).")
    timeout_s: float = Field(default=600.0, gt=0, description="Most seconds the engine may stay silent within a "
                             "request (then 504).")
    connect_timeout_s: float = Field(default=10.0, gt=0, description="Most seconds to open a connection.")
    retries: int = Field(default=2, ge=0, le=10, description="Retries of a request that failed before any text "
                         "went out (unreachable engine, 502/503/504).")
    load_wait_s: float = Field(default=60.0, ge=0, description="Most seconds the load waits for an engine that is "
                               "still starting (unreachable, or 503 while it loads its model).")

    @field_validator("url")
    @classmethod
    def _http(cls, value: str) -> str:
        if not re.match(r"^https?://[^\s/]+", value):
            raise ValueError("url must start with http:// or https:// and name a host")
        return value.rstrip("/")

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
            raise ValueError("api_key_env is the name of an environment variable, not the key itself")
        return value


class TokenCache:
    """Tokens of recent texts, bounded by their total length: a conversation's earlier messages and the template's
    pieces are tokenized by the engine once."""

    def __init__(self, max_chars: int = TOKEN_CACHE_CHARS) -> None:
        self.max_chars = max_chars
        self.chars = 0
        self.entries: OrderedDict[tuple[str, bool, bool], list[int]] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key: tuple[str, bool, bool]) -> list[int] | None:
        with self.lock:
            tokens = self.entries.get(key)
            if tokens is not None:
                self.entries.move_to_end(key)
            return tokens

    def put(self, key: tuple[str, bool, bool], tokens: list[int]) -> None:
        if len(key[0]) > TOKEN_CACHE_MAX_TEXT:
            return
        with self.lock:
            if key in self.entries:
                return
            self.entries[key] = tokens
            self.chars += len(key[0])
            while self.chars > self.max_chars and self.entries:
                old, _ = self.entries.popitem(last=False)
                self.chars -= len(old[0])


class RemoteBackend(Backend):
    """A model served by a remote engine (see the module docstring). ``model_id`` is the engine's name for it."""

    name = "remote"
    model_file: ClassVar[bool] = False
    spec_keys: ClassVar[frozenset[str] | None] = frozenset({"max_seq_len", "max_concurrent_requests",
                                                            "stream_interval_ms", "reasoning", "tool_format"})
    options_model = RemoteOptions

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec)
        self.kind: EngineKind | None = None
        self.info = EngineInfo()
        self.client: httpx.Client | None = None
        self.upstream: UpstreamClient | None = None
        self._auth: dict[str, str] = {}
        self.tokens = TokenCache()
        self.local: LocalTokenizer | None = None
        self.constraints: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._controls: frozenset[str] = frozenset()
        self._markers: frozenset[str] = frozenset()
        self._marker_at: re.Pattern[str] | None = None
        self._running: dict[str, UpstreamResponse | None] = {}
        self._aborted: set[str] = set()
        self._health: dict[str, object] = {"status": "loading"}
        self._closing = threading.Event()
        self._watcher: threading.Thread | None = None
        if spec.stream_interval_ms is not None:
            self.stream_interval_s = spec.stream_interval_ms / 1000
        elif _on_this_machine(self.opts.url):
            # an engine on this machine computes on the cores that relay its tokens: text generated within
            # 20 ms goes out in one chunk, as from the local llama.cpp backend on the CPU
            self.stream_interval_s = SHARED_CPU_STREAM_INTERVAL_S

    # -- loading -----------------------------------------------------------------------------------------
    @property
    def opts(self) -> RemoteOptions:
        return self.options  # type: ignore[no-any-return]

    def _headers(self) -> dict[str, str]:
        env = self.opts.api_key_env
        if env is None:
            return {}
        key = os.environ.get(env)
        if not key:
            raise BackendError(f"api_key_env names {env}, which is not set in the environment")
        return {"Authorization": f"Bearer {key}"}

    def _timeout(self) -> httpx.Timeout:
        return httpx.Timeout(self.opts.timeout_s, connect=self.opts.connect_timeout_s)

    def load(self, progress: ProgressCallback | None = None) -> None:
        opts = self.opts
        self.kind = KINDS[opts.engine](opts.url, self.spec.model_id)
        if opts.tokenizer is not None:
            self.local = LocalTokenizer(opts.tokenizer)
        elif not self.kind.tokenizes:
            raise BackendError(f"engine={opts.engine} needs tokenizer=<a local folder with the model's "
                               "tokenizer.json>: gallama tokenizes prompts itself, with client text kept plain, and "
                               "this engine cannot do that for it")
        self._auth = self._headers()
        self.client = httpx.Client(headers=self._auth, timeout=self._timeout())
        try:
            self.info = self.kind.info(self._get)
        except BackendError:
            self.client.close()
            raise
        if self.local is not None:
            self.info.chat_template = self.local.chat_template or self.info.chat_template
            self.info.bos_token = self.local.bos_token or self.info.bos_token
            self.info.eos_token = self.local.eos_token or self.info.eos_token
            self.info.vocab_size = self.info.vocab_size or self.local.vocab_size
        if self.info.context_length is None:
            self.info.context_length = self.spec.max_seq_len
        if self.info.context_length is None:
            raise BackendError(f"the engine at {opts.url} does not report its context length: give max_seq_len")
        if self.spec.max_seq_len is not None and self.spec.max_seq_len > self.info.context_length:
            raise BackendError(f"max_seq_len {self.spec.max_seq_len} exceeds the engine's context of "
                               f"{self.info.context_length} tokens per request")
        self._markers = self._find_markers()
        self._marker_at = re.compile("|".join(re.escape(t) for t in sorted(self._markers, key=len, reverse=True))) \
            if self._markers else None
        self._controls = self._find_control_texts() | self._markers
        self._health = {"status": "ok", "engine": opts.engine, "url": opts.url}
        self._watcher = threading.Thread(target=self._watch, name="gallama-remote-health", daemon=True)
        self._watcher.start()
        if progress is not None:
            progress(1.0)

    def _get(self, url: str) -> dict[str, Any]:
        """A JSON answer of the engine while loading; :class:`BackendError` naming the problem. An engine that is
        still starting (unreachable, or 503 while it loads) is waited for, up to ``load_wait_s``."""
        assert self.client is not None
        deadline = time.monotonic() + self.opts.load_wait_s
        while True:
            try:
                response = self.client.get(url)
            except httpx.HTTPError as error:
                if time.monotonic() < deadline and not self._closing.wait(LOAD_POLL_S):
                    continue
                raise BackendError(f"the engine at {url} cannot be reached: {error}") from None
            if response.status_code != 503 or time.monotonic() >= deadline or self._closing.wait(LOAD_POLL_S):
                break
        if response.status_code != 200:
            raise BackendError(f"the engine at {url} answered {response.status_code}: "
                               f"{_message(response.content)}")
        try:
            data = response.json()
        except ValueError:
            raise BackendError(f"the engine at {url} did not answer JSON") from None
        if not isinstance(data, dict):
            raise BackendError(f"the engine at {url} did not answer a JSON object")
        return data

    def _find_control_texts(self) -> frozenset[str]:
        """The control-token texts: the local tokenizer's special tokens, or those candidates in the chat template
        that the engine reads as one token with special parsing and as several without."""
        if self.local is not None:
            return self.local.control_texts
        texts = {t for t in (self.info.bos_token, self.info.eos_token) if t}
        texts |= set(CONTROL_CANDIDATE.findall(self.info.chat_template or ""))
        found = set()
        for text in sorted(texts):
            special = self._tokenize(text, False, True)
            if len(special) == 1 and self._tokenize(text, False, False) != special:
                found.add(text)
        return frozenset(found)

    def _find_markers(self) -> frozenset[str]:
        """Markup-shaped texts (``<think>``, ``<tool_call>``) that the engine's tokenizer reads as one token even
        in plain text (user-defined tokens, which neither llama.cpp's ``parse_special`` nor the ``tokenizers``
        library's ``encode_special_tokens`` turns off): client text must have them broken up, or a user message
        could write a reasoning block or a tool call. The candidates are the local tokenizer's added tokens, or
        the chat template's markup and the common reasoning markers."""
        if self.local is not None:
            candidates = set(self.local.added_texts)
        else:
            candidates = set(CONTROL_CANDIDATE.findall(self.info.chat_template or "")) | set(COMMON_MARKERS)
        return frozenset(text for text in candidates
                         if MARKER_SHAPE.fullmatch(text) and len(self._tokenize(text, False, False)) == 1)

    def _watch(self) -> None:
        """Keep :meth:`health` current: the engine's health endpoint, every few seconds, off the event loop."""
        assert self.kind is not None
        url = self.kind.url(self.kind.health_path)
        while not self._closing.wait(HEALTH_EVERY_S):
            client = self.client
            if client is None:
                return
            started = time.monotonic()
            try:
                response = client.get(url, timeout=min(self.opts.timeout_s, 5.0))
                status = "ok" if response.status_code == 200 else f"engine answered {response.status_code}"
            except httpx.HTTPError as error:
                status = f"unreachable: {type(error).__name__}"
            self._health = {"status": "ok" if status == "ok" else "degraded", "engine": self.opts.engine,
                            "url": self.opts.url, "engine_status": status,
                            "probe_ms": round((time.monotonic() - started) * 1000, 1)}

    # -- tokens -------------------------------------------------------------------------------------------
    def _tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        key = (text, add_special, parse_special)
        if self.local is not None:
            return self.local.tokenize(text, add_special, parse_special)
        cached = self.tokens.get(key)
        if cached is not None:
            return list(cached)
        assert self.kind is not None and self.client is not None
        url, body = self.kind.tokenize_request(text, add_special, parse_special)
        data = self._post(url, body)
        tokens = self.kind.tokenize_reply(data)
        self.tokens.put(key, tokens)
        return list(tokens)

    def _special_token(self, text: str) -> int | None:
        """The id of the engine's special token with ``text``: one token with special parsing, others without."""
        special = self._tokenize(text, False, True)
        return special[0] if len(special) == 1 and self._tokenize(text, False, False) != special else None

    def _post(self, url: str, body: dict[str, Any]) -> dict[str, Any]:
        assert self.client is not None
        try:
            response = self.client.post(url, json=body)
        except httpx.TimeoutException as error:
            raise GatewayTimeout(f"The engine did not answer in time ({type(error).__name__}).") from None
        except httpx.HTTPError as error:
            raise ServiceUnavailable(f"The engine cannot be reached: {type(error).__name__}.") from None
        if response.status_code != 200:
            raise BadGateway(f"The engine answered {response.status_code}: {_message(response.content)}")
        return response.json()  # type: ignore[no-any-return]

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        return self._tokenize(text, add_special, True)

    def tokenize_plain(self, text: str, *, add_special: bool = True) -> list[int]:
        """Client text as characters: control tokens off, and each marker's first character tokenized apart
        from the rest (see :meth:`_find_markers`)."""
        if self._marker_at is None or self._marker_at.search(text) is None:
            return self._tokenize(text, add_special, False)
        tokens: list[int] = []
        at = 0
        for found in self._marker_at.finditer(text):
            for piece in (text[at:found.start()], found.group()[:1]):
                if piece:
                    tokens += self._tokenize(piece, add_special and not tokens, False)
            tokens += self.tokenize_plain(found.group()[1:], add_special=False)
            at = found.end()
        return tokens + (self._tokenize(text[at:], False, False) if text[at:] else [])

    def detokenize(self, tokens: list[int]) -> str:
        if self.local is not None:
            return self.local.detokenize(tokens)
        assert self.kind is not None
        url, body = self.kind.detokenize_request(tokens)
        return self.kind.detokenize_reply(self._post(url, body))

    @property
    def control_texts(self) -> frozenset[str]:
        return self._controls

    @property
    def context_length(self) -> int:
        assert self.info.context_length is not None
        return min(self.spec.max_seq_len or self.info.context_length, self.info.context_length)

    @property
    def vocab_size(self) -> int | None:
        return self.info.vocab_size

    @property
    def chat_template(self) -> str | None:
        return self.info.chat_template

    @property
    def special_tokens(self) -> dict[str, str]:
        tokens = {"bos_token": self.info.bos_token, "eos_token": self.info.eos_token}
        return {k: v for k, v in tokens.items() if v}

    @property
    def capabilities(self) -> Capabilities:
        slots = self.spec.max_concurrent_requests or self.info.slots or DEFAULT_SLOTS
        return Capabilities(max_concurrency=slots)

    def validate_grammar(self, grammar: Grammar) -> None:
        self._constraint(grammar)

    def _constraint(self, grammar: Grammar | None) -> dict[str, Any]:
        if grammar is None:
            return {}
        found = self.constraints.get(grammar.key)
        if found is not None:
            return found
        assert self.kind is not None
        fields = self.kind.constraint(grammar, token_of=self._special_token if grammar.special else None)
        self.constraints[grammar.key] = fields
        while len(self.constraints) > 64:
            self.constraints.popitem(last=False)
        return fields

    def health(self) -> dict[str, object]:
        health: dict[str, object] = {**self._health, "busy": len(self._running)}
        if self.info.context_length is not None:
            health.update(slots=self.capabilities.max_concurrency, context_length=self.context_length)
        return health

    # -- generation -----------------------------------------------------------------------------------------

    async def stream(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        assert self.kind is not None
        constraint = self._constraint(request.grammar)
        body = self.kind.body(request, constraint)
        url = self.kind.url(self.kind.completion_path)
        stops = StopMatcher(request.stop)
        text_sent = False
        attempt = 0
        self._running[request.request_id] = None
        try:
            while True:
                try:
                    async for event in self._generate(request, url, body, stops):
                        if event.text:
                            text_sent = True
                        yield event
                    return
                except _Retry as retry:
                    attempt += 1
                    if text_sent or attempt > self.opts.retries or request.request_id in self._aborted:
                        raise retry.error from None
                    log.info("engine request %s failed before any text (%s); retry %d", request.request_id,
                             retry.error.message, attempt)
                    await asyncio.sleep(min(0.25 * 2 ** (attempt - 1), 2.0))
        finally:
            self._running.pop(request.request_id, None)
            self._aborted.discard(request.request_id)

    async def _generate(self, request: GenerationRequest, url: str, body: dict[str, Any],
                        stops: StopMatcher) -> AsyncIterator[GenerationEvent]:
        """One attempt: the request through the lean keep-alive client (a general-purpose client's per-chunk
        work, at one chunk per token, took more CPU than the rest of the relay), the answer as events."""
        if self.upstream is None:
            self.upstream = UpstreamClient(ENGINE_KEEPALIVE_S)
        parts = urlsplit(url)
        tls = parts.scheme == "https"
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        payload = json.dumps(body, separators=(",", ":")).encode()
        silence = self.opts.timeout_s
        try:
            async with asyncio.timeout(silence):  # the engine answers once the prompt is in: a prefill at most
                response = await self.upstream.request(
                    "POST", parts.hostname or "", parts.port or (443 if tls else 80), target, payload,
                    headers=self._auth, tls=tls, connect_timeout_s=self.opts.connect_timeout_s)
        except TimeoutError:
            raise GatewayTimeout(f"The engine did not answer within {silence:g} s.") from None
        except UpstreamError as error:
            if request.request_id in self._aborted:
                return
            raise _Retry(ServiceUnavailable(f"The engine cannot be reached: {error}.")) from None
        self._running[request.request_id] = response
        try:
            if response.status != 200:
                raise _engine_status(response.status, await _read_bounded(response.pieces()))
            async for event in self._events(request, response.pieces(), stops):
                yield event
        except TimeoutError:
            raise GatewayTimeout(f"The engine stayed silent beyond {silence:g} s.") from None
        except UpstreamError as error:
            if request.request_id in self._aborted:
                return
            raise BadGateway(f"The engine's answer broke off: {error}.") from None
        finally:
            response.close()  # unless read to its end: the engine sees the request abandoned

    async def _events(self, request: GenerationRequest, pieces: AsyncIterator[bytes],
                      stops: StopMatcher) -> AsyncIterator[GenerationEvent]:
        """The engine's server-sent events as generation events. The engine's finish may come before its counts
        (OpenAI streams send ``usage`` in a chunk of its own, then ``[DONE]``); the last event goes out when the
        stream ends, read to its end so that the connection serves the next request."""
        assert self.kind is not None
        held = ""
        emitted_at: float | None = None
        text = ""  # all the text the engine generated (stop strings cut here excluded), for the grammar check
        completion = 0
        ending = Piece()  # the finish and the counts, as they arrive
        finished = False
        buffer = b""
        stream = pieces.__aiter__()
        while True:
            async with asyncio.timeout(self.opts.timeout_s):
                piece_bytes = await anext(stream, None)
            if piece_bytes is None:
                break
            if finished:
                continue
            *lines, buffer = (buffer + piece_bytes).split(b"\n")
            for line in lines:
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    finished = True
                    break
                try:
                    data = json.loads(payload)
                except ValueError:
                    raise BadGateway("The engine sent a message that is not JSON.") from None
                try:
                    piece = self.kind.parse(data)
                except EngineReplyError as error:
                    raise BadGateway(f"The engine failed: {error}") from None
                if piece.completion_tokens is not None:
                    completion = piece.completion_tokens
                elif piece.text:
                    completion += 1  # engines that count nothing send a message per token
                emit, stopped = stops.feed(piece.text)
                text += emit
                held += emit
                if stopped:  # closing the request stops the engine
                    yield self._final(request, held, completion, "stop", ending, stops.matched)
                    return
                _merge(ending, piece)
                if piece.done:
                    finished = True
                    break
            if finished:
                continue
            now = time.monotonic()
            if held and not hold_text(emitted_at, request.emit_interval_s, now):
                yield GenerationEvent(held, completion)
                held, emitted_at = "", now
        if ending.finish is None:
            raise BadGateway("The engine ended the stream without finishing the generation.")
        tail = stops.flush()
        held, text = held + tail, text + tail
        self._check_output(request, text, ending)
        yield self._final(request, held, completion, ending.finish, ending, ending.stop_word)

    def _final(self, request: GenerationRequest, text: str, completion: int, finish: Literal["stop", "length"],
               piece: Piece, stop_sequence: str | None) -> GenerationEvent:
        return GenerationEvent(text, completion, finish, prompt_tokens=piece.prompt_tokens or len(
            request.prompt_tokens), cached_tokens=piece.cached_tokens or 0, stop_sequence=stop_sequence)

    @staticmethod
    def _check_output(request: GenerationRequest, text: str, piece: Piece) -> None:
        """A generation that ended by itself (not at a stop string, not at the token limit) must be a whole
        sentence of its grammar: the engine enforced it, and gallama does not take that on trust."""
        grammar = request.grammar
        if grammar is None or piece.finish != "stop" or piece.stop_word:
            return
        if not grammar.matches(text):
            raise BadGateway(f"The engine's output does not match the {grammar.description} it was sent "
                             "(the engine did not enforce it).", code="engine_constraint_violated")

    def abort(self, request_id: str) -> None:
        if request_id not in self._running:
            return
        self._aborted.add(request_id)
        response = self._running.get(request_id)
        if response is not None:
            response.close()  # the stream reading it breaks off; the engine sees the request abandoned

    def close(self) -> None:
        self._closing.set()
        if self.client is not None:
            self.client.close()
            self.client = None
        if self.upstream is not None:
            self.upstream.close()
            self.upstream = None


def _on_this_machine(url: str) -> bool:
    host = (urlsplit(url).hostname or "").lower()
    return host in ("localhost", "::1") or host.startswith("127.")


def _merge(ending: Piece, piece: Piece) -> None:
    """What ``piece`` says about the generation's end, kept in ``ending``."""
    if piece.finish is not None:
        ending.finish, ending.stop_word = piece.finish, piece.stop_word
    for name in ("prompt_tokens", "cached_tokens"):
        if getattr(piece, name) is not None:
            setattr(ending, name, getattr(piece, name))


class _Retry(Exception):
    """A failure before any text went out, which another attempt may not meet."""

    def __init__(self, error: ServiceUnavailable | BadGateway | GatewayTimeout) -> None:
        super().__init__(error.message)
        self.error = error


def _engine_status(status: int, content: bytes) -> Exception:
    message = _message(content)
    if status == 503:
        return _Retry(ServiceUnavailable(f"The engine is not ready (503): {message}"))
    if status in (502, 504):
        return _Retry(BadGateway(f"The engine answered {status}: {message}"))
    return BadGateway(f"The engine answered {status}: {message}")


async def _read_bounded(pieces: AsyncIterator[bytes]) -> bytes:
    content = b""
    async for chunk in pieces:
        content += chunk
        if len(content) >= MAX_ERROR_BODY:
            break
    return content[:MAX_ERROR_BODY]


def _message(content: bytes) -> str:
    """An engine's error answer as one short line: its error message, else the start of its text."""
    try:
        data = json.loads(content)
    except ValueError:
        data = None
    if isinstance(data, dict) and (data.get("object") == "error" or "error" in data):
        text = error_message(data) or ""
    elif isinstance(data, dict) and "detail" in data:
        text = str(data["detail"])
    else:
        text = content.decode("utf-8", "replace")
    text = " ".join(text.split())
    return text[:500] + ("…" if len(text) > 500 else "")
