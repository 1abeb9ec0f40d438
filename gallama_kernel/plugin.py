"""Everything a plugin imports from the kernel, in one place: ``from gallama_kernel.plugin import ...``.

This module is the plugin-facing surface. The in-tree plugins and ``examples/`` import the kernel only through it
(and ``gallama_kernel.hookimpl``), which ``tests/unit/test_plugin_surface.py`` checks, so what works for them
works for an outside author.

Stability: the names in ``__all__`` change only with a note in the README's plugin section; whatever else the
kernel's modules hold is internal and may change. Groups:

* hooks: :data:`hookimpl` (the hook specifications and their documentation are ``gallama_kernel.hookspecs``);
* routes: :data:`ADMIN_SCOPE` (a route for admin keys only), :func:`served_backend` (a model's backend, in a
  worker's route), :func:`read_json` (a bounded, checked JSON body), :func:`unless_disconnected`,
  :class:`EventStream` and :func:`sse_event` (server-sent events);
* protocols: :class:`ChatPipeline` / :func:`chat_pipeline` (the kernel's chat pipeline for a route that speaks
  another protocol), :func:`error_format` (a route's errors in a format from ``register_error_formats``),
  :func:`usage_header` / :func:`usage_comment` (usage reported to the gateway), :func:`caller_key` (the key that
  called, for what a plugin keeps per caller), :func:`gallama_home` (where a plugin keeps its files);
* backends: :class:`Backend` and the types of its contract (requests, events, sampling, capabilities, progress,
  prompt segments), :class:`ThreadJobs` and :func:`hold_text` for engines that run in a thread, :class:`Emit`,
  :func:`core_share` / :class:`CoreShare` (a CPU engine's share of the cores all workers use);
* features: :class:`RequestPlan`, :class:`GenerationPass`, :class:`Constraint` (and :func:`compile_constraint`),
  :class:`ResponseTransformer`, :data:`Delta`, :data:`SEGMENT`, :func:`add_system_text`, :class:`StopMatcher`;
* grammars: :class:`Grammar`, :class:`GrammarBuilder`, :func:`literal`, :func:`regex_literal`,
  :func:`escape_regex`, :class:`MatcherCache` (llguidance matchers for a backend's tokenizer),
  :func:`trim_engine_message`, :func:`to_gbnf` (a grammar as llama.cpp's GBNF, for engines that read that);
* requests, models and errors: :class:`ChatCompletionRequest`, :class:`CompletionRequest`, :class:`ModelSpec`,
  the draft-model keys, :class:`InvalidRequest` (a 400), :class:`BackendError`, :class:`ConfigError`,
  :class:`GrammarError`, and for backends in front of another engine :class:`BadGateway` (502),
  :class:`ServiceUnavailable` (503) and :class:`GatewayTimeout` (504), and :class:`UpstreamClient` (with
  :class:`UpstreamResponse`, :class:`UpstreamError`): the gateway's lean keep-alive HTTP/1.1 client, for streams
  of one small chunk per token.
"""

from . import hookimpl
from .api.http_input import read_json, unless_disconnected
from .api.streaming import EventStream, sse_event
from .backend import (
    Backend,
    BackendError,
    Capabilities,
    Emit,
    GenerationEvent,
    GenerationRequest,
    ProgressCallback,
    PromptSegment,
    SamplingParams,
    ThreadJobs,
    hold_text,
)
from .config import DRAFT_KEYS, ConfigError, ModelSpec, draft_keys_given, resolve_named_model, unused_draft_keys
from .cores import CoreShare, core_share
from .gateway.upstream import UpstreamClient, UpstreamError, UpstreamResponse
from .grammar.core import (
    Grammar,
    GrammarBuilder,
    GrammarError,
    escape_regex,
    literal,
    regex_literal,
    trim_engine_message,
)
from .grammar.gbnf import to_gbnf
from .grammar.matchers import MATCHER_CACHE_SIZE, MatcherCache
from .hookspecs import ADMIN_SCOPE, error_format
from .pipeline.chat import ChatPipeline, caller_key, chat_pipeline, gallama_home, usage_comment, usage_header
from .pipeline.constraints import Constraint, compile_constraint
from .pipeline.models import served_backend
from .pipeline.plan import SEGMENT, Delta, GenerationPass, RequestPlan, ResponseTransformer
from .pipeline.stops import StopMatcher
from .pipeline.tools import add_system_text
from .protocol.errors import BadGateway, GatewayTimeout, InvalidRequest, ServiceUnavailable
from .protocol.openai import ChatCompletionRequest, CompletionRequest

__all__ = [
    "ADMIN_SCOPE",
    "DRAFT_KEYS",
    "MATCHER_CACHE_SIZE",
    "SEGMENT",
    "Backend",
    "BackendError",
    "BadGateway",
    "Capabilities",
    "ChatCompletionRequest",
    "ChatPipeline",
    "CompletionRequest",
    "ConfigError",
    "Constraint",
    "CoreShare",
    "Delta",
    "Emit",
    "EventStream",
    "GatewayTimeout",
    "GenerationEvent",
    "GenerationPass",
    "GenerationRequest",
    "Grammar",
    "GrammarBuilder",
    "GrammarError",
    "InvalidRequest",
    "MatcherCache",
    "ModelSpec",
    "ProgressCallback",
    "PromptSegment",
    "RequestPlan",
    "ResponseTransformer",
    "SamplingParams",
    "ServiceUnavailable",
    "StopMatcher",
    "ThreadJobs",
    "UpstreamClient",
    "UpstreamError",
    "UpstreamResponse",
    "add_system_text",
    "caller_key",
    "chat_pipeline",
    "compile_constraint",
    "core_share",
    "draft_keys_given",
    "error_format",
    "escape_regex",
    "gallama_home",
    "hold_text",
    "hookimpl",
    "literal",
    "read_json",
    "regex_literal",
    "resolve_named_model",
    "served_backend",
    "sse_event",
    "to_gbnf",
    "trim_engine_message",
    "unless_disconnected",
    "unused_draft_keys",
    "usage_comment",
    "usage_header",
]
