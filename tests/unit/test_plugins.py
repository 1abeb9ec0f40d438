"""Plugin host: allowlist / blocklist, failures recorded against their plugin, entry-point loading."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gallama_kernel import hookimpl
from gallama_kernel.plugins import PluginHost, create_host

GALLAMA = str(Path(sys.executable).with_name("gallama"))
BROKEN_MESSAGE = "broken_mod cannot be imported on purpose"


class BackendPlugin:
    def __init__(self, backend_name: str) -> None:
        self.backend_name = backend_name
        self.calls = 0

    @hookimpl
    def register_backends(self, register):
        from gallama_kernel.backend import Backend

        self.calls += 1
        register(self.backend_name, type(f"B_{self.backend_name}", (Backend,), {}))


# -- allowlist / blocklist ---------------------------------------------------------------------------

def test_allowlist_disables_everything_else() -> None:
    a, b = BackendPlugin("a"), BackendPlugin("b")
    host = PluginHost(allow="a")
    host.register(a, "a")
    host.register(b, "b")
    assert set(host.backends) == {"a"}
    assert (a.calls, b.calls) == (1, 0)
    assert host.records["a"].status == "loaded"
    assert host.records["b"].status == "disabled"
    assert host.records["b"].hooks == []
    assert host.pm.get_plugin("b") is None


def test_blocklist_disables_named_plugins() -> None:
    host = PluginHost(deny=" b , c ")
    for name in ("a", "b", "c"):
        host.register(BackendPlugin(name), name)
    assert set(host.backends) == {"a"}
    assert [(r.name, r.status) for r in host.summaries()] == [("a", "loaded"), ("b", "disabled"),
                                                               ("c", "disabled")]


def test_blocklist_wins_over_allowlist_and_iterables_work() -> None:
    host = PluginHost(allow=["a", "b"], deny=["b"])
    assert host.is_enabled("a")
    assert not host.is_enabled("b")
    assert not host.is_enabled("c")


def test_empty_lists_mean_no_restriction_on_deny() -> None:
    host = PluginHost(allow=None, deny="")
    assert host.is_enabled("anything")


def test_create_host_allowlist_disables_entry_point_plugin() -> None:
    host = create_host(allow="nothing-by-this-name")
    assert host.records["llama_cpp"].status == "disabled"
    assert "llama_cpp" not in host.backends


def test_create_host_loads_the_real_backend_plugin_and_extras() -> None:
    host = create_host(extra=[("extra", BackendPlugin("extra_backend"))])
    assert host.records["llama_cpp"].status == "loaded"
    assert host.records["llama_cpp"].hooks == ["register_backends"]
    assert host.records["llama_cpp"].version
    assert {"llama_cpp", "extra_backend"} <= set(host.backends)


# -- failures ------------------------------------------------------------------------------------------

def test_hook_that_raises_is_recorded_as_failed() -> None:
    class Raising:
        @hookimpl
        def register_backends(self, register):
            raise RuntimeError("kaboom in backends")

    good = BackendPlugin("good")
    host = PluginHost()
    host.register(Raising(), "raising", "0.3")
    host.register(good, "good")
    assert set(host.backends) == {"good"}  # the others still register
    record = host.records["raising"]
    assert record.status == "failed"
    assert record.version == "0.3"
    assert record.error is not None
    assert record.error.startswith("register_backends: RuntimeError: kaboom in backends")
    assert "test_plugins.py" in record.error  # where it happened
    assert record.as_dict()["status"] == "failed"
    assert host.records["good"].status == "loaded"


def test_failing_request_fields_hook_is_recorded() -> None:
    class Raising:
        @hookimpl
        def register_request_fields(self, register):
            register("kept", int, "registered before the failure")
            raise ValueError("fields boom")

    host = PluginHost()
    host.register(Raising(), "raising")
    assert "kept" in host.request_fields
    assert host.records["raising"].status == "failed"
    assert "register_request_fields: ValueError: fields boom" in (host.records["raising"].error or "")


def test_in_process_broken_entry_point(fake_site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(fake_site))
    try:
        host = create_host()
    finally:
        sys.modules.pop("good_mod", None)
    broken = host.records["broken"]
    assert broken.status == "failed"
    assert broken.version == "0.1"
    assert f"ImportError: {BROKEN_MESSAGE}" in (broken.error or "")
    assert host.records["llama_cpp"].status == "loaded"
    assert "llama_cpp" in host.backends
    assert host.records["good"].status == "loaded"


# -- entry points through the real command ---------------------------------------------------------------

def _dist(site: Path, dist: str, version: str, entry_points: str) -> None:
    info = site / f"{dist}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(entry_points)


@pytest.fixture(scope="module")
def fake_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with two fake distributions: ``broken`` (fails at import) and ``good`` (adds a command)."""
    site = tmp_path_factory.mktemp("fake_site")
    _dist(site, "fakeplug", "0.1", "[gallama]\nbroken = broken_mod\n")
    (site / "broken_mod.py").write_text(f"raise ImportError({BROKEN_MESSAGE!r})\n")
    _dist(site, "goodplug", "0.2", "[gallama]\ngood = good_mod\n")
    (site / "good_mod.py").write_text(textwrap.dedent("""
        import click
        from gallama_kernel import hookimpl

        @click.command("fake-hello")
        def hello():
            click.echo("hello from an entry-point plugin")

        @hookimpl
        def register_commands(cli):
            cli.add_command(hello)
    """))
    return site


def run_gallama(site: Path, *args: str, **env_vars: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GALLAMA_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    env["COLUMNS"] = "200"
    env.update(env_vars)
    return subprocess.run([GALLAMA, *args], env=env, capture_output=True, text=True, timeout=60, check=False)


def plugins_json(site: Path, **env_vars: str) -> dict[str, dict]:
    result = run_gallama(site, "plugins", "--json", **env_vars)
    assert result.returncode == 0, result.stderr
    return {item["name"]: item for item in json.loads(result.stdout)}


def test_broken_entry_point_is_listed_as_failed(fake_site: Path) -> None:
    records = plugins_json(fake_site)
    broken = records["broken"]
    assert broken["status"] == "failed"
    assert broken["version"] == "0.1"
    assert broken["hooks"] == []
    assert "ImportError" in broken["error"] and BROKEN_MESSAGE in broken["error"]
    assert records["llama_cpp"]["status"] == "loaded"
    assert records["llama_cpp"]["hooks"] == ["register_backends"]
    assert records["llama_cpp"]["error"] is None
    assert records["good"]["status"] == "loaded"
    assert records["good"]["hooks"] == ["register_commands"]


def test_plugins_table_shows_the_broken_plugin(fake_site: Path) -> None:
    result = run_gallama(fake_site, "plugins")
    assert result.returncode == 0, result.stderr
    assert "broken" in result.stdout
    assert "failed" in result.stdout
    assert "llama_cpp" in result.stdout
    assert "Traceback" not in result.stderr


def test_entry_point_command_is_added_despite_broken_plugin(fake_site: Path) -> None:
    result = run_gallama(fake_site, "fake-hello")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "hello from an entry-point plugin"


def test_env_allowlist(fake_site: Path) -> None:
    records = plugins_json(fake_site, GALLAMA_PLUGINS="broken,good")
    assert records["llama_cpp"]["status"] == "disabled"
    assert records["llama_cpp"]["hooks"] == []
    assert records["broken"]["status"] == "failed"  # allowed, so it is tried, and fails
    assert records["good"]["status"] == "loaded"


def test_env_blocklist(fake_site: Path) -> None:
    records = plugins_json(fake_site, GALLAMA_DISABLE_PLUGINS="llama_cpp, broken")
    assert records["llama_cpp"]["status"] == "disabled"
    assert records["broken"]["status"] == "disabled"
    assert records["broken"]["error"] is None
    assert records["good"]["status"] == "loaded"


def test_env_blocklist_removes_plugin_commands(fake_site: Path) -> None:
    result = run_gallama(fake_site, "fake-hello", GALLAMA_DISABLE_PLUGINS="good")
    assert result.returncode != 0
    assert "fake-hello" in result.stderr  # click: No such command 'fake-hello'


# -- one set of hook rules ---------------------------------------------------------------------------

class Ordered:
    """Records the order in which its registration hook runs."""

    def __init__(self, name: str, seen: list[str]) -> None:
        self.name, self.seen = name, seen

    @hookimpl
    def register_request_fields(self, register):
        self.seen.append(self.name)
        register(f"field_{self.name}", bool, "")


class OrderedFirst(Ordered):
    @hookimpl(tryfirst=True)
    def register_request_fields(self, register):
        self.seen.append(self.name)
        register(f"field_{self.name}", bool, "")


def test_registration_hooks_run_in_pluggys_order_with_tryfirst() -> None:
    seen: list[str] = []
    host = PluginHost()
    host.register(Ordered("a", seen), "a")
    host.register(Ordered("b", seen), "b")
    host.register(OrderedFirst("early", seen), "early")
    fields = host.request_fields
    called = list(seen)
    seen.clear()
    host.pm.hook.register_request_fields(register=lambda *args: None)  # pluggy's own call, for comparison
    assert called == seen == ["early", "b", "a"]
    assert {name: field.plugin for name, field in fields.items()} == {"field_a": "a", "field_b": "b",
                                                                     "field_early": "early"}


class WrapsRegistration:
    @hookimpl(wrapper=True)
    def register_backends(self, register):
        return (yield)

    @hookimpl
    def register_request_fields(self, register):
        register("never", bool, "")


def test_a_wrapper_on_a_registration_hook_is_refused_at_registration() -> None:
    host = PluginHost()
    host.register(WrapsRegistration(), "wrapping")
    record = host.records["wrapping"]
    assert record.status == "failed" and "register_backends: hook wrappers are not supported" in record.error
    assert "never" not in host.request_fields and host.pm.get_plugin("wrapping") is None


class FailsTwice:
    @hookimpl
    def register_backends(self, register):
        raise RuntimeError("no backend today")

    @hookimpl
    def register_request_fields(self, register):
        raise RuntimeError("no fields either")


def test_every_registration_error_is_kept_and_others_still_register() -> None:
    host = PluginHost()
    host.register(FailsTwice(), "twice")
    host.register(BackendPlugin("fine"), "fine")
    host.run_registrations()
    record = host.records["twice"]
    assert record.status == "failed" and len(record.errors) == 2
    assert record.errors[0].startswith("register_backends: RuntimeError: no backend today")
    assert record.errors[1].startswith("register_request_fields: RuntimeError: no fields either")
    assert record.failed_in("register_backends") and not record.failed_in("register_models")
    assert "fine" in host.backends and host.records["fine"].status == "loaded"
    assert record.as_dict()["errors"] == record.errors


def test_per_request_hooks_are_not_called_one_by_one() -> None:
    with pytest.raises(ValueError, match="through pluggy"):
        PluginHost().call_each("prepare_request", request=None, plan=None)
