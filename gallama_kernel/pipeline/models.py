"""The models this process serves, by name and alias."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from ..backend import Backend
from ..grammar.tool_formats import FORMATS, HERMES, ToolFormat, detect_format
from ..protocol.errors import ModelNotFound
from .prompt import PromptRenderer
from .reasoning import ReasoningSyntax, detect
from .tools import template_knows_tools


@dataclass
class ServedModel:
    name: str
    backend: Backend
    aliases: list[str] = field(default_factory=list)
    created: int = field(default_factory=lambda: int(time.time()))
    renderer: PromptRenderer = field(init=False)
    reasoning: ReasoningSyntax | None = field(init=False)
    """How the model marks its reasoning (``None``: it does not reason); see :mod:`.reasoning`."""
    tool_format: ToolFormat = field(init=False)
    """How the model writes tool calls: its ``tool_format`` key, else the format its chat template shows when
    the template renders tools, else the generic ``hermes``."""

    def __post_init__(self) -> None:
        self.renderer = PromptRenderer(self.backend.chat_template, self.backend.special_tokens,
                                       self.backend.control_texts)
        spec = getattr(self.backend, "spec", None)
        self.reasoning = detect(self.backend.chat_template, getattr(spec, "reasoning", None),
                                self.backend.control_texts)
        chosen = getattr(spec, "tool_format", None)
        template = self.renderer.source if self.renderer.uses_model_template else None
        if chosen not in (None, "auto"):
            self.tool_format = FORMATS[chosen]
        else:
            self.tool_format = (detect_format(template) if template_knows_tools(template) else None) or HERMES


class ModelRegistry:
    def __init__(self) -> None:
        self._models: dict[str, ServedModel] = {}
        self._lookup: dict[str, str] = {}

    def add(self, model: ServedModel) -> None:
        for key in (model.name, *model.aliases):
            if key in self._lookup:
                raise ValueError(f"model name '{key}' is already served")
        self._models[model.name] = model
        for key in (model.name, *model.aliases):
            self._lookup[key] = model.name

    def get(self, name: str) -> ServedModel:
        key = self._lookup.get(name)
        if key is None:
            raise ModelNotFound(name, sorted(self._lookup))
        return self._models[key]

    def all(self) -> list[ServedModel]:
        return list(self._models.values())

    def close(self) -> None:
        for model in self._models.values():
            model.backend.close()
        self._models.clear()
        self._lookup.clear()


def served_backend(app: Any, name: str) -> Backend:
    """The backend serving the model ``name`` (or an alias) in the worker app ``app`` (a plugin route's
    ``request.app``); a 404 ``model_not_found`` when this process does not serve it."""
    registry = getattr(app.state, "registry", None)
    if not isinstance(registry, ModelRegistry):
        raise ModelNotFound(name, [])
    return registry.get(name).backend
