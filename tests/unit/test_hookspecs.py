"""Every hookspec: an inline plugin implements it and its effect is observed where the kernel uses it."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner
from fastapi import APIRouter, FastAPI
from starlette.testclient import TestClient

from gallama_kernel import cli as gallama_cli
from gallama_kernel import hookimpl, hookspecs
from gallama_kernel.api.app import create_app
from gallama_kernel.config import ModelSpec
from gallama_kernel.pipeline.models import ModelRegistry, ServedModel
from gallama_kernel.pipeline.plan import RequestPlan
from gallama_kernel.pipeline.service import ChatService
from gallama_kernel.plugins import PluginHost
from gallama_kernel.protocol.errors import InvalidRequest
from gallama_kernel.protocol.openai import ChatCompletionRequest, validate_request
from gallama_kernel.testing import DummyBackend

HOOK_NAMES = sorted(name for name, obj in vars(hookspecs).items()
                    if inspect.isfunction(obj) and hasattr(obj, "gallama_spec"))


class OtherBackend(DummyBackend):
    name = "other"


def chat_request(**extra: Any) -> ChatCompletionRequest:
    body = {"model": "dummy", "messages": [{"role": "user", "content": "hi"}], **extra}
    return validate_request(ChatCompletionRequest, body, {})


# -- meta ------------------------------------------------------------------------------------------------

def test_hookspecs_are_found() -> None:
    assert len(HOOK_NAMES) >= 6
    assert {"register_backends", "prepare_request"} <= set(HOOK_NAMES)


@pytest.mark.parametrize("name", HOOK_NAMES)
def test_every_hookspec_has_a_test(name: str) -> None:
    assert callable(globals().get(f"test_hook_{name}")), f"hookspec {name} has no test_hook_{name} in {__file__}"


@pytest.mark.parametrize("name", HOOK_NAMES)
def test_every_hookspec_documents_its_params(name: str) -> None:
    function = getattr(hookspecs, name)
    doc = inspect.getdoc(function) or ""
    assert doc.strip(), f"hookspec {name} has no docstring"
    for param in inspect.signature(function).parameters:
        assert f":param {param}:" in doc, f"hookspec {name} does not document :param {param}:"


@pytest.mark.parametrize("name", HOOK_NAMES)
def test_every_hookspec_is_in_the_readme_with_its_signature(name: str) -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    signature = f"`{name}({', '.join(inspect.signature(getattr(hookspecs, name)).parameters)})`"
    assert signature in readme, f"README.md does not document {signature}"


@pytest.mark.parametrize("name", HOOK_NAMES)
def test_every_hookspec_is_known_to_the_host(name: str) -> None:
    assert hasattr(PluginHost().pm.hook, name)


# -- register_backends -------------------------------------------------------------------------------

def test_hook_register_backends() -> None:
    class Plugin:
        @hookimpl
        def register_backends(self, register):
            register("dummy", DummyBackend)

    host = PluginHost()
    host.register(Plugin(), "dummyplug", "1.2")
    assert host.backends == {"dummy": DummyBackend}
    record = host.records["dummyplug"]
    assert (record.status, record.version, record.hooks) == ("loaded", "1.2", ["register_backends"])


def test_hook_register_backends_same_class_twice_is_fine() -> None:
    class Plugin:
        @hookimpl
        def register_backends(self, register):
            register("dummy", DummyBackend)
            register("dummy", DummyBackend)

    host = PluginHost()
    host.register(Plugin(), "p")
    assert host.backends == {"dummy": DummyBackend}
    assert host.records["p"].status == "loaded"


def test_hook_register_backends_name_clash_is_recorded_not_raised() -> None:
    class First:
        @hookimpl
        def register_backends(self, register):
            register("dup", DummyBackend)

    class Second:
        @hookimpl
        def register_backends(self, register):
            register("dup", OtherBackend)
            register("never", OtherBackend)  # not reached: the clash above is the failure

    host = PluginHost()
    host.register(First(), "first")
    host.register(Second(), "second")
    backends = host.backends  # must not raise
    statuses = {name: host.records[name].status for name in ("first", "second")}
    assert sorted(statuses.values()) == ["failed", "loaded"]
    winner = next(n for n, s in statuses.items() if s == "loaded")
    loser = next(n for n, s in statuses.items() if s == "failed")
    assert backends["dup"] is {"first": DummyBackend, "second": OtherBackend}[winner]
    error = host.records[loser].error or ""
    assert "register_backends" in error and "dup" in error and "twice" in error
    assert host.records[winner].error is None


def test_hook_register_backends_cache_is_reset_by_register() -> None:
    class Plugin:
        @hookimpl
        def register_backends(self, register):
            register("other", OtherBackend)

    host = PluginHost()
    assert host.backends == {}
    host.register(Plugin(), "late")
    assert host.backends == {"other": OtherBackend}
    host.unregister("late")
    assert host.backends == {}
    assert "late" not in host.records


# -- register_request_fields -------------------------------------------------------------------------

class FieldsPlugin:
    @hookimpl
    def register_request_fields(self, register):
        register("artifact", bool, "Return artifacts.")
        register("thinking_template", str | None, "A thinking template.")


def test_hook_register_request_fields() -> None:
    host = PluginHost()
    host.register(FieldsPlugin(), "fields")
    fields = host.request_fields
    assert set(fields) == {"artifact", "thinking_template"}
    assert fields["artifact"].annotation is bool
    assert fields["artifact"].description == "Return artifacts."
    assert fields["artifact"].plugin == "fields"

    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "artifact": True}
    request = validate_request(ChatCompletionRequest, body, fields)
    assert request.extensions == {"artifact": True}

    with pytest.raises(InvalidRequest) as caught:
        validate_request(ChatCompletionRequest, {**body, "bogus_field": 1}, fields)
    assert caught.value.param == "bogus_field"
    assert "bogus_field" in caught.value.message
    assert caught.value.status == 400

    with pytest.raises(InvalidRequest) as caught:
        validate_request(ChatCompletionRequest, {**body, "artifact": "not-a-bool"}, fields)
    assert caught.value.param == "artifact"


def test_hook_register_request_fields_undeclared_without_plugin() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "artifact": True}
    with pytest.raises(InvalidRequest) as caught:
        validate_request(ChatCompletionRequest, body, PluginHost().request_fields)
    assert caught.value.param == "artifact"
    assert caught.value.code == "plugin_required"
    assert "gallama-feature-artifact" in caught.value.message
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "sparkle": True}
    with pytest.raises(InvalidRequest) as caught:
        validate_request(ChatCompletionRequest, body, PluginHost().request_fields)
    assert caught.value.code == "unknown_field"


def test_hook_register_request_fields_declared_twice_is_recorded() -> None:
    class Again:
        @hookimpl
        def register_request_fields(self, register):
            register("artifact", int, "clash")

    host = PluginHost()
    host.register(FieldsPlugin(), "fields")
    host.register(Again(), "again")
    fields = host.request_fields
    assert "artifact" in fields
    failed = [r for r in host.summaries() if r.status == "failed"]
    assert len(failed) == 1
    assert "artifact" in (failed[0].error or "") and "register_request_fields" in (failed[0].error or "")


# -- prepare_request ---------------------------------------------------------------------------------

class PreparePlugin:
    seen: list[ChatCompletionRequest]

    def __init__(self) -> None:
        self.seen = []

    @hookimpl
    def register_request_fields(self, register):
        register("persona", str, "A system prompt to add.")

    @hookimpl
    def prepare_request(self, request, plan):
        self.seen.append(request)
        persona = request.extensions.get("persona")
        if persona == "forbidden":
            raise InvalidRequest("persona 'forbidden' is refused", param="persona")
        if persona:
            plan.messages.insert(0, {"role": "system", "content": persona})
        plan.leading_prompt = "<think>"
        plan.stop.append("</answer>")
        plan.template_vars["marker"] = "X"


def test_hook_prepare_request() -> None:
    plugin = PreparePlugin()
    host = PluginHost()
    host.register(plugin, "prep")
    request = validate_request(
        ChatCompletionRequest,
        {"model": "dummy", "messages": [{"role": "user", "content": "hi"}], "persona": "Be brief.", "stop": "END"},
        host.request_fields)
    plan = RequestPlan(messages=[{"role": "user", "content": "hi"}], stop=request.stop_list)
    host.pm.hook.prepare_request(request=request, plan=plan)
    assert plugin.seen == [request]
    assert plan.messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert plan.leading_prompt == "<think>"
    assert plan.stop == ["END", "</answer>"]
    assert plan.template_vars == {"marker": "X"}

    refused = validate_request(
        ChatCompletionRequest,
        {"model": "dummy", "messages": [{"role": "user", "content": "hi"}], "persona": "forbidden"},
        host.request_fields)
    with pytest.raises(InvalidRequest) as caught:
        host.pm.hook.prepare_request(request=refused, plan=RequestPlan(messages=[]))
    assert caught.value.param == "persona"


def test_hook_prepare_request_reaches_the_prompt() -> None:
    """Through ChatService: the edited plan is what gets rendered and sent to the backend."""
    host = PluginHost()
    host.register(PreparePlugin(), "prep")
    registry = ModelRegistry()
    registry.add(ServedModel("dummy", DummyBackend(ModelSpec(model_id="dummy"))))
    request = validate_request(
        ChatCompletionRequest,
        {"model": "dummy", "messages": [{"role": "user", "content": "hi"}], "persona": "Be brief."},
        host.request_fields)
    prepared = ChatService(registry, host).prepare_chat(request)
    prompt = "".join(chr(t) for t in prepared.generation.prompt_tokens)
    assert prompt == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
                      "<|im_start|>assistant\n<think>")
    assert prepared.generation.stop == ["</answer>"]


# -- response_transformers ---------------------------------------------------------------------------

class Upper:
    def __init__(self) -> None:
        self.finished = False

    def feed(self, delta):
        return [{**delta, "content": delta["content"].upper()}] if "content" in delta else [delta]

    def finish(self):
        self.finished = True
        return [{"content": "!"}]


def test_hook_response_transformers() -> None:
    made: list[Upper] = []

    class Plugin:
        @hookimpl
        def response_transformers(self, request):
            if request.user == "shout":
                made.append(Upper())
                return made[-1:]
            return None

    class Silent:
        @hookimpl
        def response_transformers(self, request):
            return None

    class FromState:  # reads what its own prepare_request left in plan.state
        @hookimpl
        def prepare_request(self, request, plan):
            plan.state["from_state"] = request.user == "stateful"

        @hookimpl
        def response_transformers(self, request, plan):
            return [Upper()] if plan.state.get("from_state") else None

    host = PluginHost()
    host.register(Plugin(), "upper")
    host.register(Silent(), "silent")
    host.register(FromState(), "from_state")
    plan = RequestPlan(messages=[])
    assert host.pm.hook.response_transformers(request=chat_request(), plan=plan) == []
    groups = host.pm.hook.response_transformers(request=chat_request(user="shout"), plan=plan)
    assert groups == [made]
    assert isinstance(groups[0][0], Upper)
    stateful = RequestPlan(messages=[], state={"from_state": True})
    assert [type(t) for g in host.pm.hook.response_transformers(request=chat_request(), plan=stateful)
            for t in g] == [Upper]

    # and the service applies them to the delta stream
    registry = ModelRegistry()
    registry.add(ServedModel("dummy", DummyBackend(ModelSpec(model_id="dummy"))))
    prepared = ChatService(registry, host).prepare_chat(chat_request(user="shout"))
    assert len(prepared.transformers) == 1
    assert prepared.transform({"content": "abc"}) == [{"content": "ABC"}]
    assert prepared.transform({}, final=True) == [{"content": "!"}]
    assert prepared.transformers[0].finished


# -- register_routes ---------------------------------------------------------------------------------

def test_hook_register_routes() -> None:
    calls: list[FastAPI] = []

    class Plugin:
        @hookimpl
        def register_routes(self, app):
            calls.append(app)
            router = APIRouter()

            @router.get("/v1/plugin/ping")
            async def ping() -> dict[str, str]:
                return {"pong": "yes"}

            app.include_router(router)

    host = PluginHost()
    host.register(Plugin(), "routes")
    app = create_app(ModelRegistry(), host)
    assert calls == [app]
    with TestClient(app) as client:
        response = client.get("/v1/plugin/ping")
        assert response.status_code == 200
        assert response.json() == {"pong": "yes"}
        assert client.get("/v1/plugin/missing").status_code == 404
        assert client.get("/v1/models").json() == {"object": "list", "data": []}


def test_hook_register_error_formats() -> None:
    """A route that asks for a format gets every error in it; other routes keep OpenAI's shape; a renderer that
    raises falls back to OpenAI's shape; a name registered twice is the second plugin's error."""
    from gallama_kernel.plugin import error_format

    class Plugin:
        @hookimpl
        def register_error_formats(self, register):
            register("plain", lambda status, body: {"status": status, "said": body["error"]["message"]})
            register("broken", lambda status, body: 1 / 0)

        @hookimpl
        def register_routes(self, app):
            @app.post("/v1/plain", openapi_extra=error_format("plain"))
            async def plain() -> None:
                raise InvalidRequest("no good", param="x")

            @app.post("/v1/broken", openapi_extra=error_format("broken"))
            async def broken() -> None:
                raise InvalidRequest("still no good")

    class Twice:
        @hookimpl
        def register_error_formats(self, register):
            register("plain", lambda status, body: body)

    host = PluginHost()
    host.register(Twice(), "twice")
    host.register(Plugin(), "formats")  # registered last: called first (pluggy's order)
    app = create_app(ModelRegistry(), host)
    assert set(host.error_formats) == {"plain", "broken"}
    assert "error format 'plain' is registered twice" in (host.records["twice"].error or "")
    with TestClient(app) as client:
        assert client.post("/v1/plain").json() == {"status": 400, "said": "no good"}
        assert client.post("/v1/broken").json()["error"]["message"] == "still no good"
        assert client.post("/v1/chat/completions", json={}).json()["error"]["type"] == "invalid_request_error"


def test_hook_register_routes_failure_does_not_break_the_app() -> None:
    class Broken:
        @hookimpl
        def register_routes(self, app):
            raise RuntimeError("route boom")

    host = PluginHost()
    host.register(Broken(), "broken_routes")
    app = create_app(ModelRegistry(), host)
    assert host.records["broken_routes"].status == "failed"
    assert "route boom" in (host.records["broken_routes"].error or "")
    with TestClient(app) as client:
        assert client.get("/health").json()["status"] == "ok"


# -- register_commands -------------------------------------------------------------------------------

@pytest.fixture
def clean_cli():
    """Whatever a test adds to the global ``gallama`` group is removed afterwards."""
    before = dict(gallama_cli.cli.commands)
    yield gallama_cli.cli
    for name in set(gallama_cli.cli.commands) - set(before):
        gallama_cli.cli.commands.pop(name)
    assert gallama_cli.cli.commands == before


def test_hook_register_commands(clean_cli: click.Group) -> None:
    @click.command("hello-unit-test")
    @click.argument("who")
    def hello(who: str) -> None:
        """Say hello."""
        click.echo(f"hello {who}")

    class Plugin:
        @hookimpl
        def register_commands(self, cli):
            cli.add_command(hello)

    host = PluginHost()
    host.register(Plugin(), "cmds")
    assert "hello-unit-test" not in clean_cli.commands
    host.call_each("register_commands", cli=clean_cli)
    assert host.records["cmds"].status == "loaded"
    assert clean_cli.commands["hello-unit-test"] is hello

    runner = CliRunner()
    result = runner.invoke(clean_cli, ["hello-unit-test", "world"])
    assert result.exit_code == 0, result.output
    assert result.output == "hello world\n"
    listing = runner.invoke(clean_cli, ["--help"])
    assert "hello-unit-test" in listing.output


# -- register_models ---------------------------------------------------------------------------------

def test_hook_register_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gallama_kernel.catalog import load_catalog

    entry = {"kind": "chat", "description": "My model", "default_quant": "4.0",
             "backends": {"llama_cpp": {"repo": "me/my-model-GGUF", "quants": {"4.0": {"file": "my-Q4_K_M.gguf"}}}}}

    class Plugin:
        @hookimpl
        def register_models(self, register):
            register("my-model", entry)

    host = PluginHost()
    host.register(Plugin(), "models")
    assert host.records["models"].hooks == ["register_models"]
    catalog = load_catalog(host)
    assert "qwen-2.5-7B" in catalog.models  # the built-in catalog is still there
    item = catalog.resolve("my-model", "4.0", "llama_cpp")
    assert (item.repo, item.revision, item.file) == ("me/my-model-GGUF", "main", "my-Q4_K_M.gguf")
    assert catalog.models["my-model"].plugin == "models"
    assert host.records["models"].status == "loaded"

    # and `gallama list available` shows it
    monkeypatch.setenv("GALLAMA_HOME_PATH", str(tmp_path))
    monkeypatch.setattr(gallama_cli, "_host", lambda *args: host)
    result = CliRunner().invoke(gallama_cli.cli, ["list", "available", "--json"])
    assert result.exit_code == 0, result.output
    assert "my-model" in [model["model"] for model in json.loads(result.stdout)]


def test_hook_register_models_bad_entry_is_recorded() -> None:
    from gallama_kernel.catalog import load_catalog

    class Broken:
        @hookimpl
        def register_models(self, register):
            register("../outside", {"default_quant": "4.0", "backends": {}})

    host = PluginHost()
    host.register(Broken(), "broken_models")
    catalog = load_catalog(host)  # must not raise
    assert "../outside" not in catalog.models
    assert host.records["broken_models"].status == "failed"
    assert "register_models" in (host.records["broken_models"].error or "")
