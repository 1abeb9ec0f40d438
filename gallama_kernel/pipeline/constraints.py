"""Output constraints of a request, compiled into one grammar (with a cache: a repeated tool set or schema
compiles once).

Request fields become a :class:`Constraint`; ``prepare_request`` hooks may replace it or set
``plan.constraint_after`` (free text up to a marker such as ``</think>``, then the constraint) before it is
compiled. Whatever cannot be enforced is a 400, never dropped.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..grammar.core import Grammar, GrammarBuilder, GrammarError, user_grammar
from ..grammar.json_schema import JsonSchemaCompiler
from ..grammar.regex import add_regex, prefix_grammar, regex_grammar
from ..grammar.tool_formats import FORMATS
from ..grammar.tools import ToolSpec
from ..protocol.openai import ChatCompletionRequest, NamedToolChoice

log = logging.getLogger("gallama.constraints")

CACHE_SIZE = 128


@dataclass(frozen=True)
class Constraint:
    """One output constraint before compilation.

    :param kind: ``json_object``, ``json_schema``, ``regex``, ``regex_prefix``, ``lark``, ``tools``, or
        ``custom`` (a plugin's own rules: see :meth:`custom`)
    :param param: the request field it comes from (named in errors)
    :param spec: what defines it (schema, pattern, grammar text; for ``custom`` the cache key); JSON-serialisable
    :param tools: for ``tools``: the functions; ``choice``: ``auto``, ``required`` or a function name
    :param answer: for ``tools`` with ``auto``: the constraint on a plain answer (``response_format``), if any
    :param format: for ``tools``: the call syntax, a name in :data:`~gallama_kernel.grammar.tool_formats.FORMATS`
        (the model's own, see :class:`~gallama_kernel.pipeline.models.ServedModel`)
    """

    kind: str
    param: str
    spec: Any = None
    tools: tuple[ToolSpec, ...] = ()
    choice: str = ""
    parallel: bool = True
    answer: Constraint | None = None
    format: str = "hermes"
    description: str = field(default="", compare=False)
    build: Callable[[GrammarBuilder], str] | None = field(default=None, compare=False)

    @classmethod
    def custom(cls, key: str, build: Callable[[GrammarBuilder], str], description: str,
               param: str = "messages") -> Constraint:
        """A plugin's grammar: ``build(builder)`` adds its rules and returns the start expansion. ``key``
        identifies the grammar in the compile cache (equal keys must build equal grammars)."""
        return cls("custom", param, key, build=build, description=description)

    def key(self) -> str:
        return json.dumps([self.kind, self.spec, [(t.name, t.parameters) for t in self.tools], self.choice,
                           self.parallel, self.answer.key() if self.answer else None, self.format], sort_keys=True)

    def add_to(self, builder: GrammarBuilder) -> str:
        """Add this constraint's rules to ``builder``; return the expansion for its output."""
        if self.kind == "json_object":
            return JsonSchemaCompiler(builder, param=self.param).compile({"type": "object"})
        if self.kind == "json_schema":
            return JsonSchemaCompiler(builder, param=self.param).compile(self.spec)
        if self.kind in ("regex", "regex_prefix"):
            return add_regex(builder, self.spec, self.param, prefix=self.kind == "regex_prefix")
        if self.kind == "custom" and self.build is not None:
            return self.build(builder)
        if self.kind == "tools":
            answer = self.answer.add_to(builder) if self.answer else None
            _, start = FORMATS[self.format].grammar(list(self.tools), self.choice, parallel=self.parallel,
                                                    alternative=answer, builder=builder)
            return start
        raise GrammarError(f"A {self.kind} constraint cannot be combined here.", param=self.param)


def from_request(request: ChatCompletionRequest, tool_format: str = "hermes") -> Constraint | None:
    """The constraint a chat request asks for, or ``None``; tool calls in ``tool_format``."""
    answer: Constraint | None = None
    fmt = request.response_format
    if fmt is not None and fmt.type == "json_object":
        answer = Constraint("json_object", "response_format", description="JSON object")
    elif fmt is not None and fmt.type == "json_schema" and fmt.json_schema is not None:
        schema = fmt.json_schema.schema_
        answer = (Constraint("json_schema", "response_format.json_schema.schema", schema,
                             description=f"JSON schema '{fmt.json_schema.name}'") if schema not in (None, True, {})
                  else Constraint("json_object", "response_format", description="JSON object"))
    elif request.regex_pattern is not None:
        answer = Constraint("regex", "regex_pattern", request.regex_pattern, description="regex_pattern")
    elif request.regex_prefix_pattern is not None:
        answer = Constraint("regex_prefix", "regex_prefix_pattern", request.regex_prefix_pattern,
                            description="regex_prefix_pattern")
    elif request.grammar is not None:
        answer = Constraint("lark", "grammar", request.grammar, description="Lark grammar")
    choice = request.effective_tool_choice
    if not request.tools or choice == "none":
        return answer
    tools = tuple(ToolSpec(t.function.name, t.function.parameters if t.function.parameters is not None else {})
                  for t in request.tools)
    name = choice.function.name if isinstance(choice, NamedToolChoice) else str(choice)
    parallel = request.parallel_tool_calls is not False
    return Constraint("tools", "tools", tools=tools, choice=name, parallel=parallel,
                      answer=answer if name == "auto" else None, format=tool_format, description="tool calls")


_CACHE: OrderedDict[str, Grammar] = OrderedDict()
_CACHE_LOCK = threading.Lock()  # requests are prepared on several threads (service.off_loop)


def compile_constraint(constraint: Constraint, after: str | None = None) -> Grammar:
    """The grammar for ``constraint``, preceded by free text up to ``after`` when given. Cached; compiled outside
    the cache's lock (two first requests for one constraint may both compile it)."""
    key = json.dumps([constraint.key(), after])
    with _CACHE_LOCK:
        grammar = _CACHE.get(key)
        if grammar is not None:
            _CACHE.move_to_end(key)
            return grammar
    grammar = _compile(constraint, after)
    with _CACHE_LOCK:
        _CACHE[key] = grammar
        if len(_CACHE) > CACHE_SIZE:
            _CACHE.popitem(last=False)
    return grammar


def _compile(constraint: Constraint, after: str | None) -> Grammar:
    if constraint.kind == "lark" or (constraint.answer is not None and constraint.answer.kind == "lark"):
        if constraint.kind != "lark" or after:
            raise GrammarError("A Lark grammar cannot be combined with tools or other constraints.",
                               param="grammar")
        return user_grammar(constraint.spec)
    if constraint.kind == "regex" and not after:  # one terminal, read back exactly (see regex_grammar)
        return regex_grammar(constraint.spec, constraint.param)
    if constraint.kind == "regex_prefix" and not after:
        return prefix_grammar(constraint.spec, constraint.param)
    builder = GrammarBuilder()
    body = constraint.add_to(builder)
    if after:
        body = f"{builder.text_until(after)} ({body})"
    return builder.build(body, constraint.description or constraint.kind, param=constraint.param)


def check_output(grammar: Grammar, text: str) -> bool:
    """Parse finished output with the grammar it was generated under; log when it does not parse."""
    if grammar.matches(text):
        return True
    log.error("output does not parse with its %s grammar: %r", grammar.description, text[:200])
    return False
