"""Every code sample of docs/plugins.md runs: Python blocks in order in one namespace, TOML blocks parse into an
entry point of the group ``gallama``, shell blocks are ``gallama`` commands that succeed."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import tomllib
import types
from pathlib import Path
from typing import Any

import pytest

from gallama_kernel.catalog import load_catalog
from gallama_kernel.plugins import PluginHost
from gallama_kernel.testing import GALLAMA

GUIDE = Path(__file__).parents[2] / "docs" / "plugins.md"
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```$", re.S | re.M)


def blocks(language: str) -> list[str]:
    return [code for lang, code in BLOCK.findall(GUIDE.read_text()) if lang == language]


def test_the_guide_is_linked_from_the_readme() -> None:
    assert "docs/plugins.md" in (GUIDE.parents[1] / "README.md").read_text()


def test_every_block_has_a_language_this_test_runs() -> None:
    languages = {lang for lang, _ in BLOCK.findall(GUIDE.read_text())}
    assert languages <= {"python", "toml", "shell"}
    assert GUIDE.read_text().count("```") == 2 * len(BLOCK.findall(GUIDE.read_text()))


@pytest.fixture(scope="module")
def namespace() -> dict[str, Any]:
    """The Python samples, run in order in one namespace (as the guide says)."""
    names: dict[str, Any] = {"__name__": "plugin_guide"}
    for index, code in enumerate(blocks("python")):
        exec(compile(code, f"{GUIDE}:python-{index}", "exec"), names)  # the guide's own samples
    return names


def test_the_python_samples_run(namespace: dict[str, Any]) -> None:
    assert len(blocks("python")) >= 8
    assert {"Persona", "Counter", "Routes", "register_commands", "register_models"} <= set(namespace)


def test_the_guide_hooks_register_through_a_plugin_host(namespace: dict[str, Any]) -> None:
    module = types.SimpleNamespace(**{name: namespace[name] for name in ("register_backends", "register_models")})
    host = PluginHost()
    host.register(module, "guide")
    assert host.backends["counter"] is namespace["Counter"]
    assert "my-model" in load_catalog(host).models
    assert host.records["guide"].errors == []
    assert host.records["guide"].backends["counter"]["options"]["word"]["default"] == "tick"


def test_the_toml_samples_declare_an_entry_point() -> None:
    for code in blocks("toml"):
        project = tomllib.loads(code)["project"]
        assert project["entry-points"]["gallama"] and "gallama" in project["dependencies"]


def test_the_shell_samples_run() -> None:
    for code in blocks("shell"):
        for line in filter(None, (line.split("#")[0].strip() for line in code.splitlines())):
            argv = shlex.split(line)
            assert argv[0] == "gallama"
            result = subprocess.run([str(GALLAMA), *argv[1:]], capture_output=True, text=True, timeout=120)
            assert result.returncode == 0, result.stderr
            if "--json" in argv:
                json.loads(result.stdout)
