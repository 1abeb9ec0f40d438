"""Contract tests: the exact request bodies sent to engines that cannot run here (vLLM, SGLang), checked against
their published request models, and the replies they document read back.

What was checked, and where (the engines' own source):

* vLLM ``CompletionRequest`` (``vllm/entrypoints/openai/completion/protocol.py``, commit 002032ee):
  ``prompt`` takes ``list[int >= 0]``; unknown fields are accepted and silently dropped (``extra="allow"``), so a
  misspelled or removed field (``guided_grammar``, gone in v0.12) would mean unconstrained output — every field
  sent must be one the model declares. ``stream_options`` needs ``stream=true``; ``top_k`` -1 or 0 disables it;
  temperature in [0, 2]; ``repetition_penalty`` > 0. ``StructuredOutputsParams`` (``vllm/sampling_params.py``,
  00388f65) needs exactly one of json / regex / choice / grammar / json_object / structural_tag; ``grammar`` is
  read by the ``guidance`` backend (llguidance: Lark or GBNF) and, as Lark, by xgrammar's newest Lark path.
  Streamed chunks: ``choices[].text``, ``finish_reason``, ``stop_reason``; usage per chunk with
  ``continuous_usage_stats``; a last ``choices: []`` chunk with ``usage`` then ``[DONE]``.
* SGLang ``CompletionRequest`` (``python/sglang/srt/entrypoints/openai/protocol.py``, 004c82e0): unknown fields
  dropped (pydantic ``extra="ignore"``); ``prompt`` takes ``List[int]``; ``top_k`` must be -1 or >= 1 (0 is
  refused by ``SamplingParams.verify``); ``repetition_penalty`` in (0, 2]; at most one of ``regex`` /
  ``json_schema`` / ``ebnf`` (strings); ``ebnf`` is GBNF for the default xgrammar backend, Lark or GBNF for
  llguidance. Errors are flat: ``{"object": "error", "message", "type", "param", "code"}``, in a stream wrapped
  in ``{"error": {...}}`` after HTTP 200.
"""

from __future__ import annotations

import json

import pytest

from gallama_backend_remote.engines import KINDS, EngineReplyError
from gallama_kernel.grammar.json_schema import json_schema_grammar
from gallama_kernel.grammar.regex import regex_grammar
from gallama_kernel.plugin import GenerationRequest, GrammarError, SamplingParams

VLLM_FIELDS = {
    "model": (str, type(None)), "prompt": list, "max_tokens": int, "stream": bool, "stream_options": dict,
    "temperature": float, "top_p": float, "top_k": int, "min_p": float, "repetition_penalty": float,
    "presence_penalty": float, "frequency_penalty": float, "seed": int, "stop": list,
    "skip_special_tokens": bool, "include_stop_str_in_output": bool, "structured_outputs": dict,
}
VLLM_STRUCTURED = {"json", "regex", "choice", "grammar", "json_object", "structural_tag"}
SGLANG_FIELDS = {
    "model": str, "prompt": list, "max_tokens": int, "stream": bool, "stream_options": dict,
    "temperature": float, "top_p": float, "top_k": int, "min_p": float, "repetition_penalty": float,
    "presence_penalty": float, "frequency_penalty": float, "seed": int, "stop": list,
    "skip_special_tokens": bool, "regex": str, "json_schema": str, "ebnf": str,
}
STREAM_OPTIONS = {"include_usage", "continuous_usage_stats"}


def request(**sampling) -> GenerationRequest:
    return GenerationRequest("req-1", [1, 9690, 198, 2], 64, SamplingParams(**sampling), stop=["\n\n"])


def check_fields(body: dict, fields: dict) -> None:
    unknown = set(body) - set(fields)
    assert not unknown, f"fields the engine does not declare (silently dropped there): {unknown}"
    for name, value in body.items():
        assert isinstance(value, fields[name]), (name, value)
    assert all(isinstance(t, int) and t >= 0 for t in body["prompt"])
    assert set(body["stream_options"]) <= STREAM_OPTIONS and body["stream"] is True


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.0, "top_k": 0, "seed": 7},
                                      {"temperature": 0.7, "top_k": 40, "top_p": 0.9, "min_p": 0.05,
                                       "repeat_penalty": 1.1, "presence_penalty": 0.5, "frequency_penalty": 0.2}])
def test_vllm_body(sampling):
    kind = KINDS["vllm"]("http://engine:8000/v1", "qwen3-8b")
    grammar = json_schema_grammar({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]})
    body = kind.body(request(**sampling), kind.constraint(grammar))
    check_fields(body, VLLM_FIELDS)
    assert kind.url(kind.completion_path) == "http://engine:8000/v1/completions"
    assert body["model"] == "qwen3-8b"
    assert body["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    assert body["top_k"] == (sampling.get("top_k") or -1) and body["top_k"] != 0
    assert 0 <= body["temperature"] <= 2 and body["repetition_penalty"] > 0
    assert set(body["structured_outputs"]) & VLLM_STRUCTURED == {"grammar"}
    assert set(body["structured_outputs"]) == {"grammar"}  # exactly one kind of constraint
    assert body["structured_outputs"]["grammar"] == grammar.llguidance
    assert "guided_grammar" not in body and "guided_json" not in body  # removed in v0.12: silently ignored
    assert ("seed" in body) == ("seed" in sampling)
    assert body["skip_special_tokens"] is False and body["include_stop_str_in_output"] is False


def test_sglang_body():
    pytest.importorskip("gallama_kernel.grammar.gbnf")
    kind = KINDS["sglang"]("http://engine:30000/v1", "default")
    grammar = regex_grammar(r"[a-z]{2,5}")
    body = kind.body(request(temperature=0.0, top_k=0), kind.constraint(grammar))
    check_fields(body, SGLANG_FIELDS)
    assert kind.url(kind.completion_path) == "http://engine:30000/v1/completions"
    assert body["top_k"] == -1  # SGLang refuses 0
    assert sum(name in body for name in ("regex", "json_schema", "ebnf")) == 1
    assert body["ebnf"].lstrip().startswith("root") and "::=" in body["ebnf"]
    assert 0 < body["repetition_penalty"] <= 2


def test_openai_kind_refuses_every_constraint():
    kind = KINDS["openai"]("http://engine/v1", "m")
    with pytest.raises(GrammarError) as refused:
        kind.constraint(regex_grammar("a+"), param="regex_pattern")
    assert refused.value.code == "constraint_not_supported" and refused.value.param == "regex_pattern"
    body = kind.body(request(), {})
    assert set(body) <= {"model", "prompt", "max_tokens", "stream", "stream_options", "temperature", "top_p",
                         "presence_penalty", "frequency_penalty", "seed", "stop"}


def test_openai_stream_replies_are_read():
    kind = KINDS["vllm"]("http://engine/v1", "m")
    first = kind.parse({"choices": [{"index": 0, "text": "Hel", "finish_reason": None, "stop_reason": None}],
                        "usage": {"prompt_tokens": 4, "completion_tokens": 1, "total_tokens": 5}})
    assert (first.text, first.completion_tokens, first.finish) == ("Hel", 1, None)
    last = kind.parse({"choices": [{"index": 0, "text": "lo", "finish_reason": "stop", "stop_reason": "\n\n"}]})
    assert (last.finish, last.stop_word) == ("stop", "\n\n")
    usage = kind.parse({"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6,
                                                 "prompt_tokens_details": {"cached_tokens": 3}}})
    assert (usage.completion_tokens, usage.prompt_tokens, usage.cached_tokens) == (2, 4, 3)
    assert kind.parse({"choices": [{"index": 0, "text": "", "finish_reason": "length"}]}).finish == "length"
    with pytest.raises(EngineReplyError):
        kind.parse({"choices": [{"index": 0, "text": "", "finish_reason": "abort"}]})


@pytest.mark.parametrize("reply", [
    {"error": {"message": "Invalid grammar specification.", "type": "BadRequestError", "param": None, "code": 400}},
    {"object": "error", "message": "Invalid grammar request", "type": "BadRequestError", "param": None, "code": 400},
    {"error": {"object": "error", "message": "Invalid grammar request", "type": "BAD_REQUEST", "code": 400}},
])
def test_engine_errors_in_a_stream_are_read(reply):
    for name in ("vllm", "sglang", "llama_server"):
        with pytest.raises(EngineReplyError) as failed:
            KINDS[name]("http://engine/v1", "m").parse(json.loads(json.dumps(reply)))
        assert "Invalid grammar" in str(failed.value)
