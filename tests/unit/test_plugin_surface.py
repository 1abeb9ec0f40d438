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
