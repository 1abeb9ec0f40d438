"""The order in which several plugins' per-request hooks see and change one plan (documented in hookspecs.py)."""

from __future__ import annotations

from typing import Any

import pluggy

from gallama_kernel import PROJECT_NAME
from gallama_kernel.plugin import RequestPlan, hookimpl
from gallama_kernel.plugins import PluginHost
from gallama_kernel.protocol.openai import ChatCompletionRequest, validate_request


def appender(label: str, **marks: bool) -> object:
    class Appender:
        @hookimpl(**marks)
        def prepare_request(self, request: Any, plan: RequestPlan) -> None:
            plan.state.setdefault("seen", []).append((label, list(plan.stop)))
            plan.stop.append(label)

        @hookimpl(**marks)
        def response_transformers(self, request: Any) -> list[str]:
            return [label]

    return Appender()


def request() -> ChatCompletionRequest:
    return validate_request(ChatCompletionRequest, {"model": "m", "messages": [{"role": "user", "content": "x"}]}, {})


def test_registered_last_runs_first_and_tryfirst_trylast_move_an_implementation() -> None:
    host = PluginHost()
    host.register(appender("late", trylast=True), "late")
    host.register(appender("first-registered"), "first-registered")
    host.register(appender("early", tryfirst=True), "early")
    host.register(appender("last-registered"), "last-registered")
    plan = RequestPlan(messages=[])
    host.prepare_request(request(), plan)
    order = ["early", "last-registered", "first-registered", "late"]
    assert plan.stop == order
    # each implementation sees the plan as the ones before it left it
    assert plan.state["seen"] == [(label, order[:index]) for index, label in enumerate(order)]
    # transformers come back in the same order: the first one returned is fed first
    assert host.response_transformers(request(), plan) == order


def test_a_wrapper_on_prepare_request_sees_the_plan_before_and_after_the_others() -> None:
    class Wrapper:
        @pluggy.HookimplMarker(PROJECT_NAME)(wrapper=True)
        def prepare_request(self, request: Any, plan: RequestPlan) -> Any:
            before = list(plan.stop)
            yield
            plan.state["around"] = (before, list(plan.stop))

    host = PluginHost()
    host.register(appender("a"), "a")
    host.register(Wrapper(), "wrapper")
    host.register(appender("b"), "b")
    plan = RequestPlan(messages=[])
    host.prepare_request(request(), plan)
    assert plan.state["around"] == ([], ["b", "a"])
    assert host.records["wrapper"].status == "loaded"
