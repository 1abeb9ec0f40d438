"""Entry point of artifact mode: the ``artifact`` request field and its hooks.

``artifact`` is ``"No"`` (default: plain chat), ``"Fast"`` or ``"Slow"``:

* ``Fast``: one generation. A system prompt describes the answer format, an example exchange shows it (see
  :mod:`gallama_feature_artifact.prompt`), and the answer is generated under the artifact grammar
  (:mod:`gallama_feature_artifact.grammar`), so its structure is guaranteed.
* ``Slow``: first a hidden planning pass (after ``<plan>``, the model writes one to eight bullet lines on
  which text and which artifacts it will produce, then ``</plan>``, under a grammar; at most
  :data:`PLAN_MAX_TOKENS` tokens, counted as reasoning tokens, never sent), then the same enforced answer,
  generated after the plan in the same assistant turn (the plan is appended to ``plan.leading_prompt``).
  Slower; meant for capable models, which organise long answers better after planning.

Both add :class:`~gallama_feature_artifact.transformer.ArtifactTransformer`, which turns the tagged output
into content deltas with ``artifact_meta`` (one choice per segment when not streamed). Artifact mode
constrains the whole output, so a request that already has an output constraint (``tools``,
``response_format``, ``regex_pattern``, ``grammar`` …) is refused with a 400.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, get_args

from gallama_kernel import hookimpl
from gallama_kernel.plugin import (
    ChatCompletionRequest,
    GenerationPass,
    InvalidRequest,
    RequestPlan,
    ResponseTransformer,
)

from .grammar import PLAN_CLOSE, PLAN_OPEN, answer_constraint, plan_constraint
from .prompt import with_prompts
from .transformer import ArtifactTransformer

ArtifactMode = Literal["No", "Fast", "Slow"]
MODES: tuple[str, ...] = get_args(ArtifactMode)
FIELD = "artifact"
FIELD_DESCRIPTION = ("Artifact mode: 'No' (default) plain chat; 'Fast' answers as <text> and <artifact> segments "
                     "(one choice each, with artifact_meta), structure enforced; 'Slow' plans in a hidden pass "
                     "first.")

PLAN_MAX_TOKENS = 256
"""Most tokens of the hidden plan of ``Slow`` mode (fewer when the request's ``max_tokens`` is lower)."""


def artifact_mode(request: ChatCompletionRequest) -> ArtifactMode:
    """The request's artifact mode (``"No"`` when the field is absent)."""
    return request.extensions.get(FIELD, "No")


@hookimpl
def register_request_fields(register: Callable[[str, Any, str], None]) -> None:
    register(FIELD, ArtifactMode, FIELD_DESCRIPTION)


@hookimpl
def prepare_request(request: ChatCompletionRequest, plan: RequestPlan) -> None:
    mode = artifact_mode(request)
    if mode == "No":
        return
    if plan.constraint is not None:
        what = plan.constraint.description or "an output constraint"
        raise InvalidRequest(f"artifact mode ('{mode}') cannot be combined with '{plan.constraint.param}' ({what}): "
                             "both decide the format of the whole output. Send only one of them.", param=FIELD)
    plan.messages = with_prompts(plan.messages, mode)
    plan.constraint = answer_constraint()
    if mode == "Slow":
        plan.passes.append(planning_pass(request.token_limit))


def planning_pass(requested: int | None) -> GenerationPass:
    """The hidden planning pass of ``Slow`` mode, at most ``requested`` tokens (the request's ``max_tokens``)."""
    limit = PLAN_MAX_TOKENS if requested is None else min(PLAN_MAX_TOKENS, requested)
    return GenerationPass(opening=PLAN_OPEN, constraint=plan_constraint(), max_tokens=limit, show_as="hidden",
                          done=_keep_plan)


def _keep_plan(plan: RequestPlan, text: str) -> None:
    """Put the finished (or truncated) plan before the answer, closed, so the answer follows it."""
    if not text.endswith(PLAN_CLOSE):
        text = f"{text.rstrip()}\n{PLAN_CLOSE}"
    plan.leading_prompt += f"{PLAN_OPEN}{text}\n"


@hookimpl
def response_transformers(request: ChatCompletionRequest) -> list[ResponseTransformer] | None:
    if artifact_mode(request) == "No":
        return None
    return [ArtifactTransformer()]
