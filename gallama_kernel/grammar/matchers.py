"""Compiled llguidance matchers for one model's tokenizer, shared by every backend that enforces grammars.

A :class:`MatcherCache` hands out a fresh :class:`llguidance.LLMatcher` per request: a ``deep_copy`` of a
pristine matcher cached by ``Grammar.key``, so a repeated tool set or schema compiles once. Each backend builds
the :class:`llguidance.LLTokenizer` of its own vocabulary (llama.cpp's vocab, a ``tokenizer.json``) and
advances the matcher token by token inside its engine loop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

import llguidance

from .core import Grammar, GrammarError, trim_engine_message
from .limits import grammar_budget_error

log = logging.getLogger("gallama.grammar")

MATCHER_CACHE_SIZE = 64


def matcher_limits() -> llguidance.LLParserLimits:
    """llguidance's default limits, with short error messages: a matcher error must not dump parser state."""
    return llguidance.LLParserLimits(verbose_errors=False)


class MatcherCache:
    """An LRU cache of compiled matchers for one tokenizer. Thread-safe.

    :param tokenizer: llguidance's view of the model's vocabulary; its EOS tokens are the grammar's end, so once
        a grammar is complete the model may end its turn with any of them
    :param cache_size: pristine compiled matchers kept, keyed by ``Grammar.key``
    :param special_token: the id of the vocabulary's special token with a given text, or ``None``: a grammar's
        :attr:`~.core.Grammar.special` texts are then enforced as those tokens
    """

    def __init__(self, tokenizer: llguidance.LLTokenizer, cache_size: int = MATCHER_CACHE_SIZE,
                 special_token: Callable[[str], int | None] | None = None) -> None:
        self.tokenizer = tokenizer
        self.special_token = special_token  # the vocabulary's special token with a text (Grammar.special)
        self.cache_size = cache_size
        self._compiled: OrderedDict[str, llguidance.LLMatcher | str] = OrderedDict()  # key -> matcher or error
        self._lock = threading.Lock()
        self.compilations = 0  # grammars compiled so far (cache misses)
        self.hits = 0  # grammars found compiled
        self.compile_seconds = 0.0  # time spent compiling, all grammars together

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
                self.hits += 1
        if cached is None:
            problem = grammar_budget_error(grammar.llguidance, user=False)  # native code must never see these
            if problem is not None:
                raise GrammarError(f"The {grammar.description} cannot be enforced: {problem}", param="grammar",
                                   code="grammar_too_large")
            started = time.perf_counter()
            try:
                text = grammar.for_vocabulary(self.special_token) if self.special_token else grammar.llguidance
                matcher = llguidance.LLMatcher(self.tokenizer, text, log_level=0,
                                               limits=matcher_limits())
            except Exception as error:  # what llguidance refuses is the client's grammar: never a 500
                message = trim_engine_message(str(error))
                raise GrammarError(f"The {grammar.description} cannot be enforced: {message}", param="grammar",
                                   code="invalid_grammar") from None
            cached = trim_engine_message(matcher.get_error()) if matcher.is_error() else matcher
            if isinstance(cached, llguidance.LLMatcher):
                for warning in matcher.get_grammar_warnings():
                    log.debug("grammar warning (%s): %s", grammar.description, warning)
            with self._lock:
                self.compilations += 1
                self.compile_seconds += time.perf_counter() - started
                self._compiled[key] = cached
                while len(self._compiled) > self.cache_size:
                    self._compiled.popitem(last=False)
        if isinstance(cached, str):
            raise GrammarError(f"The {grammar.description} cannot be enforced: {cached}",
                               param="grammar", code="invalid_grammar")
        return cached

    def stats(self) -> dict[str, float]:
        """Counters for health and metrics: compilations, cache hits, seconds spent compiling."""
        return {"grammar_compilations": self.compilations, "grammar_cache_hits": self.hits,
                "grammar_compile_seconds": round(self.compile_seconds, 6)}

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
