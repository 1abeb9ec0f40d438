"""A loaded GGUF model: vocabulary, tokenizer, chat template. Thread-safe."""

from __future__ import annotations

import ctypes
import logging
import re
import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import llama_cpp as ll

from gallama_kernel.plugin import BackendError

log = logging.getLogger("gallama.llama_cpp")

RECENT_PROMPTS = 8  # tokenized prompts kept for reuse (see LlamaModel.tokenize)
MIN_REUSE_BYTES = 1024  # a shorter shared opening is tokenized again: cheaper than finding the cut
CHUNK_BYTES = 32 * 1024  # longer prompts are tokenized in pieces cut at control tokens (see LlamaModel._chunked)
_SPLITTING = ll.LLAMA_TOKEN_ATTR_CONTROL | ll.LLAMA_TOKEN_ATTR_USER_DEFINED  # llama.cpp cuts the text at these
_STRIPPING = ll.LLAMA_TOKEN_ATTR_LSTRIP | ll.LLAMA_TOKEN_ATTR_RSTRIP

_backend_ready = False
_LOG_SINK = ll.llama_log_callback(lambda level, text, data: None)  # module level: llama.cpp keeps the pointer


def _quiet_native_logs() -> None:
    """llama.cpp logs to stderr by default; keep it for ``-v`` only.

    Set again before every load: llama.cpp keeps one process-wide log callback, and whoever set another may
    have freed it since (a freed ctypes callback's memory is reused by the next one made, such as a load's
    progress callback, which llama.cpp then calls for every log line; or it crashes the load)."""
    global _backend_ready
    if logging.getLogger("gallama").isEnabledFor(logging.DEBUG):
        ll.llama_log_set(None, ctypes.c_void_p(0))  # llama.cpp's own logging to stderr
    else:
        ll.llama_log_set(_LOG_SINK, ctypes.c_void_p(0))
    if not _backend_ready:
        ll.llama_backend_init()
        _backend_ready = True


class LlamaModel:
    """Weights and vocabulary of one GGUF file."""

    def __init__(self, path: str, progress: Callable[[float], None] | None = None, n_gpu_layers: int = 0) -> None:
        self._users = 0  # calls into the model under way (see in_use)
        self._users_done = threading.Condition()
        self._closed = False
        self._holding = threading.local()  # this thread's nesting depth in in_use
        _quiet_native_logs()
        params = ll.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers
        if progress is not None:
            def report(fraction: float, _data: ctypes.c_void_p) -> bool:
                progress(fraction)
                return True
            self._progress = ll.llama_progress_callback(report)  # kept alive as long as the model
            params.progress_callback = self._progress
        self.ptr = ll.llama_model_load_from_file(path.encode(), params)
        if not self.ptr:
            raise BackendError(f"llama.cpp could not load {path}")
        if progress is not None:
            progress(1.0)
        self.vocab = ll.llama_model_get_vocab(self.ptr)
        self.n_vocab = ll.llama_vocab_n_tokens(self.vocab)
        self.n_ctx_train = ll.llama_model_n_ctx_train(self.ptr)
        self.add_bos = bool(ll.llama_vocab_get_add_bos(self.vocab))
        self._pieces: list[bytes | None] = [None] * self.n_vocab
        self._eog = [bool(ll.llama_vocab_is_eog(self.vocab, t)) for t in range(self.n_vocab)]
        self.eog_tokens = [t for t, eog in enumerate(self._eog) if eog]  # every token that ends a turn
        self.bos_text = self._special_text(ll.llama_vocab_bos(self.vocab))
        self.eos_text = self._special_text(ll.llama_vocab_eos(self.vocab))
        raw = ll.llama_model_chat_template(self.ptr, None)
        self.chat_template = raw.decode("utf-8", errors="replace") if raw else None
        self._cuts = self._cut_tokens()
        self._cut_at = re.compile(b"|".join(re.escape(text) for text, _ in self._cuts)) if self._cuts else None
        self._markers = self._marker_texts()
        self._marker_at = re.compile(b"|".join(re.escape(t) for t in sorted(self._markers, key=len, reverse=True))) \
            if self._markers else None
        self.control_texts = self._control_texts() | {t.decode("utf-8", errors="replace") for t in self._markers}
        self._recent: deque[tuple[bytes, list[int]]] = deque(maxlen=RECENT_PROMPTS)
        self._recent_lock = threading.Lock()

    @contextmanager
    def in_use(self) -> Iterator[None]:
        """Hold the model loaded while native code reads it: :meth:`close` waits for every holder. Requests are
        prepared in threads that may outlive their request (a preparation past its budget is abandoned, not
        stopped), so a model closed under them would be read after being freed. Raises
        :class:`BackendError` once the model is closed, except to a thread that already holds it."""
        if getattr(self._holding, "depth", 0):
            self._holding.depth += 1
            try:
                yield
            finally:
                self._holding.depth -= 1
            return
        with self._users_done:
            if self._closed:
                raise BackendError("the model has been unloaded")
            self._users += 1
        self._holding.depth = 1
        try:
            yield
        finally:
            self._holding.depth = 0
            with self._users_done:
                self._users -= 1
                self._users_done.notify_all()

    def _cut_tokens(self) -> list[tuple[bytes, int]]:
        """Control tokens whose text splits a prompt into pieces llama.cpp tokenizes independently (with
        ``parse_special``, the text between special tokens is tokenized on its own): (text, id). Empty, and
        prompts are always tokenized whole, for vocabularies where that does not hold or cannot be relied on:
        other than BPE and SentencePiece, adding EOS, or with a special token whose text contains another's."""
        kind = ll.llama_vocab_type(self.vocab)
        if kind not in (ll.LLAMA_VOCAB_TYPE_BPE, ll.LLAMA_VOCAB_TYPE_SPM) or ll.llama_vocab_get_add_eos(self.vocab):
            return []
        specials: list[tuple[bytes, int, int]] = []
        for token in range(self.n_vocab):
            attr = ll.llama_vocab_get_attr(self.vocab, token)
            if attr & _SPLITTING:
                text = self._render(token, special=True)
                if text:
                    specials.append((text, token, attr))
        texts = [text for text, _, _ in specials]
        if any(a != b and a in b for a in texts for b in texts):
            return []
        return [(text, token) for text, token, attr in specials
                if attr & ll.LLAMA_TOKEN_ATTR_CONTROL and not attr & _STRIPPING]

    def _control_texts(self) -> frozenset[str]:
        """Texts llama.cpp reads as control tokens with ``parse_special`` and as plain text without it (tokens
        marked user-defined are read as tokens either way)."""
        found = set()
        for token in range(self.n_vocab):
            if ll.llama_vocab_get_attr(self.vocab, token) & (ll.LLAMA_TOKEN_ATTR_CONTROL | ll.LLAMA_TOKEN_ATTR_UNKNOWN):
                text = self._render(token, special=True).decode("utf-8", errors="replace")
                if text:
                    found.add(text)
        return frozenset(found)

    def _marker_texts(self) -> frozenset[bytes]:
        """Texts of user-defined tokens shaped like markup (``<think>``, ``<tool_call>``, gpt-oss's ``<|start|>``):
        llama.cpp reads them as their tokens even in plain text, so client text holding them would write a role
        or a call. They count as control texts, and plain text has them broken up (see :meth:`_plain`)."""
        found = set()
        for token in range(self.n_vocab):
            attr = ll.llama_vocab_get_attr(self.vocab, token)
            if attr & ll.LLAMA_TOKEN_ATTR_USER_DEFINED and not attr & ll.LLAMA_TOKEN_ATTR_CONTROL:
                text = self._render(token, special=True)
                if len(text) > 2 and text[:1] in (b"<", b"[") and text[-1:] in (b">", b"]"):
                    found.add(text)
        return frozenset(found)

    def _plain(self, data: bytes, add_special: bool) -> list[int]:
        """Tokens of ``data`` as plain text: control-token text is its characters (``parse_special`` off), and
        so is a marker's (its first byte tokenized apart from the rest, which llama.cpp would otherwise read as
        the marker's token)."""
        if self._marker_at is None or self._marker_at.search(data) is None:
            return self._tokenize(data, add_special, parse_special=False)
        tokens: list[int] = []
        at = 0
        for found in self._marker_at.finditer(data):
            tokens += self._tokenize(data[at:found.start()], add_special and not tokens, parse_special=False)
            tokens += self._tokenize(found.group()[:1], False, parse_special=False)
            tokens += self._plain(found.group()[1:], False)
            at = found.end()
        return tokens + self._tokenize(data[at:], False, parse_special=False)

    def _special_text(self, token: int) -> str:
        if token < 0:
            return ""
        return self._render(token, special=True).decode("utf-8", errors="replace")

    def _render(self, token: int, special: bool) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = ll.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = ll.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    def piece(self, token: int) -> bytes:
        """Bytes of a generated token; control tokens render as nothing."""
        cached = self._pieces[token]
        if cached is None:
            with self.in_use():
                cached = self._pieces[token] = self._render(token, special=False)
        return cached

    def special_token(self, text: str) -> int | None:
        """The control or user-defined token whose text is ``text`` (Mistral's ``[TOOL_CALLS]``, gpt-oss's
        ``<|channel|>``), or ``None``. llguidance reads such tokens apart from text, so a grammar names them."""
        with self.in_use():
            tokens = self._tokenize(text.encode("utf-8"), False, parse_special=True)
            if len(tokens) == 1 and ll.llama_vocab_get_attr(self.vocab, tokens[0]) & _SPLITTING:
                return tokens[0]
        return None

    def special_piece(self, token: int) -> bytes:
        """Bytes of ``token`` with control tokens rendered as their text (a grammar's special token)."""
        with self.in_use():
            return self._render(token, special=True)

    def token_text(self, token: int) -> bytes:
        """The vocabulary's own text of ``token`` (special tokens included), for comparing vocabularies."""
        with self.in_use():
            raw = ll.llama_vocab_get_text(self.vocab, token)
        return raw or b""

    def is_eog(self, token: int) -> bool:
        return self._eog[token]

    def tokenize(self, text: str, add_special: bool) -> list[int]:
        """llama.cpp's tokens of ``text`` (special-token text read as special tokens; BOS first when
        ``add_special`` and the model wants it, unless the text already starts with it).

        An agent sends its growing conversation again and again, and tokenizing costs ~1 µs per token here, on
        the event loop. So the last few prompts are kept, and a new one that shares a long opening with one of
        them reuses its tokens up to the last control token (``<|im_start|>``, …) inside the shared part, and
        tokenizes only the rest: exactly llama.cpp's result, since it tokenizes the text between special
        tokens independently (checked on every reuse; anything unexpected tokenizes the whole text).
        """
        data = text.encode("utf-8")
        if add_special and self.add_bos and self.bos_text and text.startswith(self.bos_text):
            add_special = False  # the chat template already wrote BOS
        with self.in_use():
            if not self._cuts:
                return self._tokenize(data, add_special)
            body = self._reuse(data)
            if body is None:
                body = self._chunked(data)
            bos = ll.llama_vocab_bos(self.vocab)
        with self._recent_lock:
            self._recent.append((data, body))
        return [bos, *body] if add_special and self.add_bos and bos >= 0 else list(body)

    def _reuse(self, data: bytes) -> list[int] | None:
        with self._recent_lock:
            recent = list(self._recent)
        shared, old, old_tokens = max(((common_prefix(data, o), o, t) for o, t in recent), default=(0, b"", []),
                                      key=lambda item: item[0])
        if shared < MIN_REUSE_BYTES:
            return None
        cut, text, token = max(((data.rfind(text, 0, shared), text, token) for text, token in self._cuts),
                               key=lambda item: item[0])
        if cut <= 0 or old.count(text) != old_tokens.count(token):  # every occurrence must be that token
            return None
        index = -1
        for _ in range(old.count(text, 0, cut) + 1):
            index = old_tokens.index(token, index + 1)
        tail = self._tokenize(data[cut:], False)
        if not tail or tail[0] != token:
            return None
        return old_tokens[:index] + tail

    def _chunked(self, data: bytes) -> list[int]:
        """llama.cpp's tokens of ``data`` (special tokens parsed, no BOS), in pieces of about
        :data:`CHUNK_BYTES` cut before a control token: llama.cpp splits the text at every special token with a
        list that grows per split (quadratic: 16,000 short messages took 3.3 s whole), while the text between
        control tokens is tokenized independently (as for :meth:`_reuse`), so the pieces' tokens joined are
        the same."""
        assert self._cut_at is not None
        tokens: list[int] = []
        start = 0
        while len(data) - start > CHUNK_BYTES:
            found = self._cut_at.search(data, start + CHUNK_BYTES)
            if found is None:
                break
            tokens += self._tokenize(data[start:found.start()], False)
            start = found.start()
        return tokens + self._tokenize(data[start:], False)

    def tokenize_pieces(self, pieces: list[tuple[str, bool]], add_special: bool) -> list[int]:
        """Tokens of a prompt cut by :class:`~gallama_kernel.backend.SegmentSplitter`: ``(text, True)`` a control
        token's text, ``(text, False)`` plain text. Not kept for reuse: a prompt with client control text is
        rare, and its many small pieces would push the real prompts out."""
        tokens: list[int] = []
        with self.in_use():
            for text, control in pieces:
                data = text.encode("utf-8")
                tokens += self._tokenize(data, False, parse_special=True) if control else self._plain(data, False)
            bos = ll.llama_vocab_bos(self.vocab)
        starts_with_bos = bool(pieces) and pieces[0] == (self.bos_text, True)
        return [bos, *tokens] if add_special and self.add_bos and bos >= 0 and not starts_with_bos else tokens

    def tokenize_plain(self, text: str, add_special: bool) -> list[int]:
        """Tokens of ``text`` read as plain text: control-token and marker text (``<|im_start|>``, ``<think>``)
        is its characters."""
        with self.in_use():
            return self._plain(text.encode("utf-8"), add_special)

    def _tokenize(self, data: bytes, add_special: bool, parse_special: bool = True) -> list[int]:
        capacity = len(data) + 8
        tokens = (ll.llama_token * capacity)()
        n = ll.llama_tokenize(self.vocab, data, len(data), tokens, capacity, add_special, parse_special)
        if n < 0:
            capacity = -n
            tokens = (ll.llama_token * capacity)()
            n = ll.llama_tokenize(self.vocab, data, len(data), tokens, capacity, add_special, parse_special)
        return list(tokens[:n])

    def detokenize(self, tokens: list[int]) -> str:
        return b"".join(self.piece(t) for t in tokens if 0 <= t < self.n_vocab).decode("utf-8", errors="replace")

    def close(self) -> None:
        """Free the model once no thread reads it any more (see :meth:`in_use`)."""
        with self._users_done:
            self._closed = True
            self._users_done.wait_for(lambda: self._users == 0)
        if self.ptr:
            ll.llama_model_free(self.ptr)
            self.ptr = None


def common_prefix(a: list[int] | bytes, b: list[int] | bytes) -> int:
    """Length of the common prefix of two token lists (or byte strings): a bisection over slice ranges, which
    compare in C (about 2n elements), where a Python loop over a long shared history (8 slots x thousands of
    tokens, on the engine thread while every stream waits) took milliseconds."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    low, high = 0, n  # a[:low] == b[:low]; the first difference lies in [low, high)
    while high - low > 1:
        middle = (low + high) // 2
        if a[low:middle] == b[low:middle]:
            low = middle
        else:
            high = middle
    return low
