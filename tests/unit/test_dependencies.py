"""Every import of the kernel and of each plugin package is a dependency that package declares.

`make install` installs each package with its declared ``dependencies`` only; an import that works in the test
environment because a test extra (or another package) brought it in fails for users. So the modules of every
package are read with ``ast``, each imported top-level name is mapped to the distributions that provide it, and
one of them must be a declared runtime dependency of that package (the standard library, the package itself and,
for plugins, the kernel excepted). An import of an optional extra's distribution is allowed only where it cannot
run at import time: inside a function, or under a ``try`` that handles ``ImportError``.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from dataclasses import dataclass
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROJECTS = [ROOT, *sorted(p.parent for p in ROOT.glob("plugins/*/pyproject.toml")),
            *sorted(p.parent for p in ROOT.glob("examples/*/pyproject.toml"))]
SKIPPED_PARTS = {"tests", "bench", "examples", "plugins", "build", "dist"}
IMPORT_ERRORS = {"ImportError", "ModuleNotFoundError"}


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    return normalize(re.split(r"[\s<>=!~;\[(@]", requirement.strip(), maxsplit=1)[0])


@dataclass(frozen=True)
class Import:
    module: str
    path: Path
    line: int
    deferred: bool  # inside a function or a try that handles ImportError: not run when the module is imported


def _handles_import_error(node: ast.Try) -> bool:
    for handler in node.handlers:
        caught = handler.type
        names = caught.elts if isinstance(caught, ast.Tuple) else [caught] if caught is not None else []
        if caught is None or any(isinstance(n, ast.Name) and n.id in IMPORT_ERRORS | {"Exception"} for n in names):
            return True
    return False


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(path: Path) -> list[Import]:
    """Absolute imports of one module; those under ``if TYPE_CHECKING:`` never run and are left out."""
    found: list[Import] = []

    def visit(node: ast.AST, deferred: bool) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child, deferred)
            return
        if isinstance(node, ast.Import):
            found.extend(Import(alias.name, path, node.lineno, deferred) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.append(Import(node.module, path, node.lineno, deferred))
        inner = deferred or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) or (
            isinstance(node, ast.Try) and _handles_import_error(node))
        for child in ast.iter_child_nodes(node):
            if isinstance(node, ast.Try) and child in node.handlers:
                visit(child, deferred)  # a fallback import in the handler runs at import time
            else:
                visit(child, inner)

    visit(ast.parse(path.read_text(), filename=str(path)), False)
    return found


@dataclass
class Project:
    root: Path
    name: str
    dependencies: set[str]
    optional: set[str]
    packages: set[str]

    @classmethod
    def read(cls, root: Path) -> Project:
        meta = tomllib.loads((root / "pyproject.toml").read_text())["project"]
        optional = {requirement_name(r) for extra in meta.get("optional-dependencies", {}).values() for r in extra}
        packages = {p.name for p in root.iterdir() if (p / "__init__.py").exists()}
        return cls(root, normalize(meta["name"]), {requirement_name(r) for r in meta.get("dependencies", [])},
                   optional, packages)

    def modules(self) -> list[Path]:
        return sorted(path for package in self.packages for path in (self.root / package).rglob("*.py")
                      if not SKIPPED_PARTS & set(path.relative_to(self.root).parts[1:]))


def undeclared(project: Project, providers: dict[str, list[str]]) -> list[str]:
    """One line per import that the project's declared dependencies do not cover."""
    problems = []
    for module in project.modules():
        for item in imports_of(module):
            top = item.module.split(".")[0]
            if top in sys.stdlib_module_names or top in project.packages or top.startswith("gallama"):
                continue
            distributions = {normalize(d) for d in providers.get(top, [top])}
            if distributions & project.dependencies:
                continue
            if item.deferred and distributions & project.optional:
                continue
            where = f"{item.path.relative_to(project.root)}:{item.line}"
            problems.append(f"{project.name}: {where}: imports {top} (from {', '.join(sorted(distributions))}), "
                            "which its pyproject.toml does not declare in dependencies")
    return problems


@pytest.mark.parametrize("root", PROJECTS, ids=lambda p: p.name if p != ROOT else "gallama")
def test_every_import_is_a_declared_dependency(root: Path) -> None:
    project = Project.read(root)
    assert project.modules(), f"no modules found for {project.name}"
    assert undeclared(project, packages_distributions()) == []


def test_the_check_sees_an_undeclared_import(tmp_path: Path) -> None:
    """The audit itself: a module-level import of a test-only distribution is reported, a deferred one of an
    optional extra is not, and an import under TYPE_CHECKING never counts."""
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "demo"\ndependencies = ["pyyaml"]\n'
                                             '[project.optional-dependencies]\nextra = ["jsonschema"]\n')
    package = tmp_path / "demo"
    package.mkdir()
    (package / "__init__.py").write_text(
        "from typing import TYPE_CHECKING\nimport yaml\nimport httpx\n"
        "if TYPE_CHECKING:\n    import hypothesis\n"
        "def later():\n    import jsonschema\n"
        "try:\n    import openai\nexcept ImportError:\n    import pytest\n")
    problems = undeclared(Project.read(tmp_path), {"yaml": ["PyYAML"], "httpx": ["httpx"]})
    assert [line.split(": imports ")[1].split(" ")[0] for line in problems] == ["httpx", "openai", "pytest"]
