"""The in-tree plugins and the example import the kernel only through its plugin surface (``gallama_kernel.plugin``
and ``gallama_kernel.hookimpl``): what they need, an outside author can import too."""

from __future__ import annotations

import ast
from pathlib import Path

import gallama_kernel.plugin as surface

ROOT = Path(__file__).resolve().parents[2]
ALLOWED = {"gallama_kernel", "gallama_kernel.plugin"}


def plugin_sources() -> list[Path]:
    """The packages' own code (not their tests): plugins/*/gallama_*/ and examples/*/gallama_*/."""
    return sorted(path for base in ("plugins", "examples") for package in (ROOT / base).glob("*/gallama_*")
                  if package.is_dir() for path in package.rglob("*.py"))


def test_plugins_import_only_the_surface() -> None:
    sources = plugin_sources()
    assert len(sources) > 20
    outside = []
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            modules = ([node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0
                       else [alias.name for alias in node.names] if isinstance(node, ast.Import) else [])
            for module in modules:
                if module.split(".")[0] == "gallama_kernel" and module not in ALLOWED:
                    outside.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {module}")
                if isinstance(node, ast.ImportFrom) and module == "gallama_kernel":
                    outside += [f"{path.relative_to(ROOT)}:{node.lineno} imports gallama_kernel.{a.name}"
                                for a in node.names if a.name not in ("hookimpl", "plugin")]
    assert not outside, "\n".join(outside)


def test_the_surface_exports_what_it_lists() -> None:
    assert len(surface.__all__) == len(set(surface.__all__))
    missing = [name for name in surface.__all__ if not hasattr(surface, name)]
    assert not missing
    for name in ("Backend", "RequestPlan", "Constraint", "GrammarBuilder", "ModelSpec", "InvalidRequest", "hookimpl",
                 "add_system_text", "ChatCompletionRequest", "GenerationPass", "Delta"):
        assert name in surface.__all__


def test_add_system_text_appends_once_in_every_message_shape() -> None:
    from gallama_kernel.plugin import add_system_text

    user = {"role": "user", "content": "hi"}
    assert add_system_text([user], "Rules.") == [{"role": "system", "content": "Rules."}, user]
    assert add_system_text([{"role": "system", "content": "Be brief."}, user], "Rules.")[0]["content"] == \
        "Be brief.\n\nRules."
    for empty in ("", None):  # no leading blank line before the only text
        assert add_system_text([{"role": "system", "content": empty}], "Rules.")[0]["content"] == "Rules."
    developer = add_system_text([{"role": "developer", "content": "Dev."}], "Rules.")
    assert developer == [{"role": "developer", "content": "Dev.\n\nRules."}]
    parts = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]}]
    added = add_system_text(parts, "Rules.")
    assert added[0]["content"] == [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "\n\nRules."}]
    assert parts[0]["content"] == [{"type": "text", "text": "Be brief."}]  # the caller's messages are unchanged
