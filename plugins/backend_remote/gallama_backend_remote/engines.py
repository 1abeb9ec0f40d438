"""What each kind of remote engine is sent and answers: the request body of a generation, its constraint fields,
the streamed pieces read back, and where the engine tokenizes and reports its model.

Every kind receives the prompt as token ids that gallama rendered and tokenized (so the engine's prefix cache
sees the same tokens turn after turn, and nothing a client wrote is read as a control token there), the sampling
settings spelled out (an engine's own defaults, such as llama-server's ``min_p`` 0.05, never apply unseen), and
the constraint in the form that engine enforces:

=============  ====================================================================================
llama_server   ``grammar``: the kernel's grammar rendered as GBNF (``gallama_kernel.plugin.to_gbnf``)
vllm           ``structured_outputs.grammar``: the grammar in llguidance's Lark dialect, which vLLM's
               ``guidance`` structured-output backend reads (start vLLM with that backend)
sglang         ``ebnf``: the grammar as GBNF, which SGLang's default ``xgrammar`` backend reads
openai         none: a constrained request is refused
=============  ====================================================================================
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from gallama_kernel.plugin import GenerationRequest, Grammar, GrammarError, to_gbnf

FinishReason = Literal["stop", "length"]
TokenOf = Callable[[str], "int | None"]
"""The id of the engine's special token with a text, or None."""
PENALTY_WINDOW = 64  # tokens the repetition penalties look back on (as the llama.cpp backend)


class EngineReplyError(Exception):
    """The engine answered something that is not a generation: ``status`` (an HTTP status or None) and its
    message."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Piece:
    """One streamed message of the engine, read."""

    text: str = ""
    completion_tokens: int | None = None  # the running count, when the engine reports it
    finish: FinishReason | None = None
    stop_word: str | None = None  # the stop string that ended it, when the engine says so
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    done: bool = False  # nothing more follows


@dataclass
class EngineInfo:
    """What the engine says about the model it serves (``None``: it does not say)."""

    context_length: int | None = None
    slots: int | None = None
    vocab_size: int | None = None
    chat_template: str | None = None
    bos_token: str | None = None
    eos_token: str | None = None
    model: str | None = None


class EngineKind(abc.ABC):
    """One kind of engine. ``base`` is the URL of its OpenAI-compatible API (``http://host:port/v1``), ``root``
    that URL without the ``/v1``, where engines keep their own endpoints."""

    name: ClassVar[str]
    completion_path: ClassVar[str]  # relative to base (``/completions``) or, starting with ``:``, to root
    health_path: ClassVar[str] = ":/health"

    def __init__(self, base: str, model: str) -> None:
        self.base = base.rstrip("/")
        self.root = self.base.removesuffix("/v1")
        self.model = model

    def url(self, path: str) -> str:
        return self.root + path[1:] if path.startswith(":") else self.base + path

    def constraint(self, grammar: Grammar, param: str | None = None, token_of: TokenOf | None = None) -> dict[str, Any]:
        """The body fields that make the engine enforce ``grammar``; :class:`GrammarError` when it cannot.
        ``token_of``: the id of the engine's special token with a text (None: there is none), for the grammar's
        markers that the model writes as one token (``grammar.special``)."""
        raise GrammarError(f"The remote engine kind '{self.name}' cannot enforce output constraints "
                           f"({grammar.description}): configure engine=llama_server, vllm or sglang to use them.",
                           param=param, code="constraint_not_supported")

    @abc.abstractmethod
    def body(self, request: GenerationRequest, constraint: dict[str, Any]) -> dict[str, Any]:
        """The streamed generation request for ``request``."""

    @abc.abstractmethod
    def parse(self, data: dict[str, Any]) -> Piece:
        """One streamed JSON message; :class:`EngineReplyError` for an error message."""

    def info(self, get: Any) -> EngineInfo:
        """What the engine says about its model; ``get(url)`` returns a decoded JSON body."""
        return EngineInfo()

    # -- tokenization on the engine (kinds that offer it) ------------------------------------------------
    tokenizes: ClassVar[bool] = False

    def tokenize_request(self, text: str, add_special: bool, parse_special: bool) -> tuple[str, dict[str, Any]]:
        raise NotImplementedError

    def tokenize_reply(self, data: dict[str, Any]) -> list[int]:
        raise NotImplementedError

    def detokenize_request(self, tokens: list[int]) -> tuple[str, dict[str, Any]]:
        raise NotImplementedError

    def detokenize_reply(self, data: dict[str, Any]) -> str:
        raise NotImplementedError


def error_message(data: Any) -> str | None:
    """The message of an error body, if ``data`` is one: OpenAI's shape (llama-server's and vLLM's too,
    ``{"error": {...}}``) or SGLang's flat one (``{"object": "error", "message": ...}``)."""
    if isinstance(data, dict) and data.get("object") == "error":
        return str(data.get("message") or data)
    if not isinstance(data, dict) or "error" not in data:
        return None
    error = data["error"]
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return str(error)


class LlamaServer(EngineKind):
    """llama.cpp's own ``llama-server``: its native ``/completion`` endpoint (token ids in, one streamed message
    per token, the prompt cache on), ``/tokenize`` with ``parse_special`` off for client text, ``/props``."""

    name = "llama_server"
    completion_path = ":/completion"
    tokenizes = True

    def constraint(self, grammar: Grammar, param: str | None = None, token_of: TokenOf | None = None) -> dict[str, Any]:
        """The GBNF, its markers as their tokens; and the markers as ``preserved_tokens``: llama-server leaves
        control tokens out of the text it sends unless the request names them."""
        fields: dict[str, Any] = {"grammar": to_gbnf(grammar, param=param, token_of=token_of)}
        preserved = [text for _, text in grammar.special if token_of is not None and token_of(text) is not None]
        if preserved:
            fields["preserved_tokens"] = preserved
        return fields

    def body(self, request: GenerationRequest, constraint: dict[str, Any]) -> dict[str, Any]:
        sampling = request.sampling
        return {
            "prompt": request.prompt_tokens, "n_predict": request.max_tokens, "stream": True, "cache_prompt": True,
            # the chain the llama.cpp backend builds: penalties, top-k, top-p, min-p, temperature (0: greedy)
            "samplers": ["penalties", "top_k", "top_p", "min_p", "temperature"],
            "temperature": sampling.temperature, "top_k": sampling.top_k, "top_p": sampling.top_p,
            "min_p": sampling.min_p, "repeat_penalty": sampling.repeat_penalty, "repeat_last_n": PENALTY_WINDOW,
            "presence_penalty": sampling.presence_penalty, "frequency_penalty": sampling.frequency_penalty,
            "seed": -1 if sampling.seed is None else sampling.seed & 0xFFFFFFFF,
            "stop": list(request.stop), "n_probs": 0, **constraint,
        }

    def parse(self, data: dict[str, Any]) -> Piece:
        message = error_message(data)
        if message is not None:
            raise EngineReplyError(message)
        piece = Piece(text=str(data.get("content") or ""), completion_tokens=_int(data.get("tokens_predicted")))
        if not data.get("stop"):
            return piece
        piece.done = True
        piece.prompt_tokens = _int(data.get("tokens_evaluated"))
        timings = data.get("timings")
        if isinstance(timings, dict):
            piece.cached_tokens = _int(timings.get("cache_n"))
        kind = data.get("stop_type")
        if kind == "limit":
            piece.finish = "length"
        elif kind in ("eos", "word"):
            piece.finish = "stop"
            if kind == "word" and data.get("stopping_word"):
                piece.stop_word = str(data["stopping_word"])
        else:
            raise EngineReplyError(f"the engine ended the generation without a reason (stop_type {kind!r})")
        return piece

    def info(self, get: Any) -> EngineInfo:
        props = get(self.url(":/props"))
        settings = props.get("default_generation_settings") or {}
        info = EngineInfo(context_length=_int(settings.get("n_ctx")), slots=_int(props.get("total_slots")),
                          chat_template=props.get("chat_template") or None, bos_token=props.get("bos_token"),
                          eos_token=props.get("eos_token"), model=props.get("model_alias") or props.get("model_path"))
        models = get(self.url("/models"))
        for entry in models.get("data") or []:
            meta = entry.get("meta") if isinstance(entry, dict) else None
            if isinstance(meta, dict):
                info.vocab_size = _int(meta.get("n_vocab"))
        return info

    def tokenize_request(self, text: str, add_special: bool, parse_special: bool) -> tuple[str, dict[str, Any]]:
        return self.url(":/tokenize"), {"content": text, "add_special": add_special, "parse_special": parse_special}

    def tokenize_reply(self, data: dict[str, Any]) -> list[int]:
        return [int(t) for t in data["tokens"]]

    def detokenize_request(self, tokens: list[int]) -> tuple[str, dict[str, Any]]:
        return self.url(":/detokenize"), {"tokens": tokens}

    def detokenize_reply(self, data: dict[str, Any]) -> str:
        return str(data["content"])


class OpenAICompletions(EngineKind):
    """Any engine with OpenAI's ``/v1/completions`` taking token ids as the prompt; no constraints."""

    name = "openai"
    completion_path = "/completions"
    health_path = "/models"

    def info(self, get: Any) -> EngineInfo:
        """``/v1/models``: the entry for the model (else the first), its ``max_model_len`` (vLLM, SGLang)."""
        entries = [e for e in get(self.url("/models")).get("data") or [] if isinstance(e, dict)]
        entry = next((e for e in entries if e.get("id") == self.model), entries[0] if entries else {})
        return EngineInfo(context_length=_int(entry.get("max_model_len")), model=entry.get("id"))

    def sampling_fields(self, request: GenerationRequest) -> dict[str, Any]:
        sampling = request.sampling
        fields: dict[str, Any] = {"temperature": sampling.temperature, "top_p": sampling.top_p,
                                  "presence_penalty": sampling.presence_penalty,
                                  "frequency_penalty": sampling.frequency_penalty}
        if sampling.seed is not None:
            fields["seed"] = sampling.seed
        return fields

    def body(self, request: GenerationRequest, constraint: dict[str, Any]) -> dict[str, Any]:
        body = {"model": self.model, "prompt": request.prompt_tokens, "max_tokens": request.max_tokens,
                "stream": True, "stream_options": {"include_usage": True}, **self.sampling_fields(request)}
        if request.stop:
            body["stop"] = list(request.stop)
        return {**body, **constraint}

    def parse(self, data: dict[str, Any]) -> Piece:
        message = error_message(data)
        if message is not None:
            raise EngineReplyError(message)
        piece = Piece()
        choices = data.get("choices") or []
        if choices:
            choice = choices[0]
            piece.text = str(choice.get("text") or "")
            reason = choice.get("finish_reason")
            if reason == "length":
                piece.finish = "length"
            elif reason == "stop":
                piece.finish = "stop"
                stop = choice.get("stop_reason")
                piece.stop_word = stop if isinstance(stop, str) else None
            elif reason is not None:
                raise EngineReplyError(f"the engine ended the generation with finish_reason {reason!r}")
        usage = data.get("usage")
        if isinstance(usage, dict):
            piece.completion_tokens = _int(usage.get("completion_tokens"))
            piece.prompt_tokens = _int(usage.get("prompt_tokens"))
            details = usage.get("prompt_tokens_details")
            if isinstance(details, dict):
                piece.cached_tokens = _int(details.get("cached_tokens"))
        return piece


class Vllm(OpenAICompletions):
    """vLLM's OpenAI server: ``/v1/completions`` with token ids, its sampling extensions, and
    ``structured_outputs``; ``/tokenize`` and ``/detokenize`` at its root."""

    name = "vllm"
    health_path = ":/health"

    def constraint(self, grammar: Grammar, param: str | None = None, token_of: TokenOf | None = None) -> dict[str, Any]:
        """llguidance's Lark, its markers as their tokens (``<[id]>``)."""
        text = grammar.for_vocabulary(token_of) if token_of is not None else grammar.llguidance
        return {"structured_outputs": {"grammar": text}}

    def sampling_fields(self, request: GenerationRequest) -> dict[str, Any]:
        sampling = request.sampling
        return {**super().sampling_fields(request), "top_k": sampling.top_k if sampling.top_k > 0 else -1,
                "min_p": sampling.min_p, "repetition_penalty": sampling.repeat_penalty,
                "skip_special_tokens": False, "include_stop_str_in_output": False}

    def body(self, request: GenerationRequest, constraint: dict[str, Any]) -> dict[str, Any]:
        body = super().body(request, constraint)
        body["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
        return body


class Sglang(OpenAICompletions):
    """SGLang's OpenAI server: ``/v1/completions`` with token ids and its ``ebnf`` constraint field."""

    name = "sglang"
    health_path = ":/health"

    def constraint(self, grammar: Grammar, param: str | None = None, token_of: TokenOf | None = None) -> dict[str, Any]:
        """GBNF with the markers as text (xgrammar's EBNF names no tokens)."""
        return {"ebnf": to_gbnf(grammar, param=param)}

    def sampling_fields(self, request: GenerationRequest) -> dict[str, Any]:
        sampling = request.sampling
        return {**super().sampling_fields(request), "top_k": sampling.top_k if sampling.top_k > 0 else -1,
                "min_p": sampling.min_p, "repetition_penalty": sampling.repeat_penalty,
                "skip_special_tokens": False}


KINDS: dict[str, type[EngineKind]] = {kind.name: kind for kind in (LlamaServer, Vllm, Sglang, OpenAICompletions)}


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
