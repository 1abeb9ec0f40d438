"""Grammar enforcement with llguidance: one tokenizer per model, compiled matchers cached, masks applied in place.

A :class:`GrammarEngine` belongs to one loaded model. It hands out a fresh :class:`llguidance.LLMatcher` per
request (a ``deep_copy`` of a pristine matcher cached by ``Grammar.key``, so a repeated tool set or schema
compiles once). The engine thread advances that matcher token by token; :class:`TokenMask` turns the
matcher's next-token bitmask into ``-inf`` logits in llama.cpp's own logits row before the sampler chain runs.

Chosen by measurement over llama.cpp's GBNF sampler (0.65x free decoding): llguidance's mask costs ~2%.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING

import llguidance
import numpy as np
from llguidance.llamacpp import lltokenizer_from_vocab

from gallama_kernel.grammar import Grammar, GrammarError

if TYPE_CHECKING:
    from .model import LlamaModel

log = logging.getLogger("gallama.llama_cpp")

MATCHER_CACHE_SIZE = 64


def _limits() -> llguidance.LLParserLimits:
    """llguidance's default limits, with short error messages: a matcher error must not dump parser state."""
    return llguidance.LLParserLimits(verbose_errors=False)


class GrammarEngine:
    """llguidance for one model: its tokenizer and an LRU cache of compiled matchers. Thread-safe.

    :param model: the loaded model; its end-of-generation tokens are the grammar's EOS, so once a grammar is
        complete the model may end its turn with any token the engine stops on.
    :param cache_size: pristine compiled matchers kept, keyed by ``Grammar.key``
    """

    def __init__(self, model: LlamaModel, cache_size: int = MATCHER_CACHE_SIZE) -> None:
        self.n_vocab = model.n_vocab
        self.tokenizer: llguidance.LLTokenizer = lltokenizer_from_vocab(
            model.vocab, n_vocab=model.n_vocab, eos_token=model.eog_tokens or None)
        self.cache_size = cache_size
        self._compiled: OrderedDict[str, llguidance.LLMatcher | str] = OrderedDict()  # key -> matcher or error
        self._lock = threading.Lock()
        self.compilations = 0  # grammars compiled so far (cache misses)

    def _pristine(self, grammar: Grammar) -> llguidance.LLMatcher:
        """The cached compiled matcher of ``grammar`` (never advanced); compiles on a miss.

        Compiling drops the GIL (llguidance) and runs outside the lock: two first requests for the same
        grammar may both compile it, and later ones hit the cache.
        """
        key = grammar.key
        with self._lock:
            cached = self._compiled.get(key)
            if cached is not None:
                self._compiled.move_to_end(key)
        if cached is None:
            matcher = llguidance.LLMatcher(self.tokenizer, grammar.llguidance, log_level=0, limits=_limits())
            cached = matcher.get_error() if matcher.is_error() else matcher
            if isinstance(cached, llguidance.LLMatcher):
                for warning in matcher.get_grammar_warnings():
                    log.debug("grammar warning (%s): %s", grammar.description, warning)
            with self._lock:
                self.compilations += 1
                self._compiled[key] = cached
                while len(self._compiled) > self.cache_size:
                    self._compiled.popitem(last=False)
        if isinstance(cached, str):
            raise GrammarError(f"The {grammar.description} cannot be enforced: {cached.strip()}",
                               param="grammar", code="invalid_grammar")
        return cached

    def validate(self, grammar: Grammar) -> None:
        """Raise :class:`GrammarError` (a 400 with llguidance's message) unless ``grammar`` compiles.

        Validation compiles into the cache: the request that follows gets its matcher without compiling again.
        """
        self._pristine(grammar)

    def matcher(self, grammar: Grammar) -> llguidance.LLMatcher:
        """A fresh matcher for one request, at the start of ``grammar``; raises :class:`GrammarError`.

        May compile (~1 ms for a JSON grammar, more for large tool sets): call it off the event loop and off
        the engine thread.
        """
        pristine = self._pristine(grammar)
        with self._lock:  # deep_copy reads the pristine matcher; PyO3 refuses overlapping borrows
            return pristine.deep_copy()


class TokenMask:
    """Applies a matcher's next-token mask to a logits row in place. One per engine thread (not thread-safe).

    The mask is computed into a preallocated bitmask (llguidance drops the GIL), expanded with numpy and
    written as ``-inf`` into the disallowed entries of the row llama.cpp's sampler reads next.
    """

    def __init__(self, n_vocab: int) -> None:
        self.n_vocab = n_vocab
        self.bits = np.zeros((n_vocab + 31) // 32, dtype=np.int32)
        self._bytes = self.bits.view(np.uint8)
        self._row_type = ctypes.c_float * n_vocab

    def apply(self, matcher: llguidance.LLMatcher, logits: ctypes._Pointer[ctypes.c_float]) -> str | None:
        """Mask ``logits`` (``n_vocab`` floats from ``llama_get_logits_ith``) for ``matcher``'s next token.

        Returns the matcher's error message when it is in an error state (then nothing is masked), else None.
        """
        matcher.unsafe_compute_mask_ptr(self.bits.ctypes.data, self.bits.nbytes)
        if matcher.is_error():
            return matcher.get_error() or "the grammar matcher failed"
        row = np.frombuffer(self._row_type.from_address(ctypes.addressof(logits.contents)), dtype=np.float32)
        # bit i of word w allows token 32*w + i: little-endian words read as bytes, least significant bit first
        allowed = np.unpackbits(self._bytes, count=self.n_vocab, bitorder="little")
        np.copyto(row, -np.inf, where=allowed == 0)
        return None
