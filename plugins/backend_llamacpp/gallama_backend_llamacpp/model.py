"""A loaded GGUF model: vocabulary, tokenizer, chat template. Thread-safe reads only."""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable

import llama_cpp as ll

from gallama_kernel.backend import BackendError

log = logging.getLogger("gallama.llama_cpp")

_backend_ready = False
_log_sink = None


def _quiet_native_logs() -> None:
    """llama.cpp logs to stderr by default; keep it for ``-v`` only."""
    global _log_sink, _backend_ready
    if _backend_ready:
        return
    if not logging.getLogger("gallama").isEnabledFor(logging.DEBUG):
        _log_sink = ll.llama_log_callback(lambda level, text, data: None)
        ll.llama_log_set(_log_sink, ctypes.c_void_p(0))
    ll.llama_backend_init()
    _backend_ready = True


class LlamaModel:
    """Weights and vocabulary of one GGUF file."""

    def __init__(self, path: str, progress: Callable[[float], None] | None = None, n_gpu_layers: int = 0) -> None:
        _quiet_native_logs()
        params = ll.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers
        if progress is not None:
            def report(fraction: float, _data: ctypes.c_void_p) -> bool:
                progress(fraction)
                return True
            self._progress = ll.llama_progress_callback(report)  # kept alive while loading
            params.progress_callback = self._progress
        self.ptr = ll.llama_model_load_from_file(path.encode(), params)
        if not self.ptr:
            raise BackendError(f"llama.cpp could not load {path}")
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
            cached = self._pieces[token] = self._render(token, special=False)
        return cached

    def token_text(self, token: int) -> bytes:
        """The vocabulary's own text of ``token`` (special tokens included), for comparing vocabularies."""
        raw = ll.llama_vocab_get_text(self.vocab, token)
        return raw or b""

    def is_eog(self, token: int) -> bool:
        return self._eog[token]

    def tokenize(self, text: str, add_special: bool) -> list[int]:
        data = text.encode("utf-8")
        if add_special and self.add_bos and self.bos_text and text.startswith(self.bos_text):
            add_special = False  # the chat template already wrote BOS
        capacity = len(data) + 8
        tokens = (ll.llama_token * capacity)()
        n = ll.llama_tokenize(self.vocab, data, len(data), tokens, capacity, add_special, True)
        if n < 0:
            capacity = -n
            tokens = (ll.llama_token * capacity)()
            n = ll.llama_tokenize(self.vocab, data, len(data), tokens, capacity, add_special, True)
        return list(tokens[:n])

    def detokenize(self, tokens: list[int]) -> str:
        return b"".join(self.piece(t) for t in tokens if 0 <= t < self.n_vocab).decode("utf-8", errors="replace")

    def close(self) -> None:
        if self.ptr:
            ll.llama_model_free(self.ptr)
            self.ptr = None
