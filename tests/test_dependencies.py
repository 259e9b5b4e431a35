"""Every third-party module the code imports is a declared dependency of the installed
distribution: the service's imports are core dependencies, the tests' and benchmarks'
are core or ``test`` extras. (A package that merely happens to be installed on the
developer's machine once hid a missing dependency: ``serve`` crashed on a clean install.)

Imports are found by walking the syntax tree of every file (function-local imports
included); modules map to distributions through ``packages_distributions()``, and the
declared requirements come from the installed metadata, i.e. what pip resolved from
``pyproject.toml``.
"""

from __future__ import annotations

import ast
import re
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIRST_PARTY = {"service", "tests", "bench"}
DISTRIBUTION = "mrc-ingest"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def imported_modules(folder: Path) -> dict[str, list[str]]:
    """Top-level module -> files importing it (absolute imports only)."""
    found: dict[str, list[str]] = {}
    for path in sorted(folder.rglob("*.py")):
        tree = ast.parse(path.read_text("utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], []).append(str(path.relative_to(ROOT)))
    return found


def third_party(modules: dict[str, list[str]]) -> dict[str, list[str]]:
    return {m: files for m, files in modules.items()
            if m not in sys.stdlib_module_names and m not in FIRST_PARTY}


def declared() -> tuple[set[str], set[str]]:
    """(core requirements, test-extra requirements), canonical names."""
    core, test = set(), set()
    for requirement in metadata.requires(DISTRIBUTION) or []:
        name = canonical(re.split(r"[\s;<>=!~\[(]", requirement, maxsplit=1)[0])
        (test if re.search(r"extra\s*==\s*['\"]test['\"]", requirement) else core).add(name)
    return core, test


def distributions_of(module: str) -> set[str]:
    return {canonical(d) for d in metadata.packages_distributions().get(module, [])}


def undeclared(modules: dict[str, list[str]], allowed: set[str]) -> list[str]:
    problems = []
    for module, files in sorted(third_party(modules).items()):
        dists = distributions_of(module)
        if not dists:
            problems.append(f"{module} (imported by {files[0]}) is not installed at all")
        elif not dists & allowed:
            problems.append(f"{module} (imported by {files[0]}) comes from {sorted(dists)}, "
                            f"which is not declared")
    return problems


def test_the_distribution_is_installed():
    try:
        metadata.distribution(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        pytest.fail("install the project first: python3 -m pip install '.[test]'")


def test_every_service_import_is_a_core_dependency():
    core, _ = declared()
    assert undeclared(imported_modules(ROOT / "service"), core) == []


def test_every_test_and_benchmark_import_is_declared():
    core, test = declared()
    modules = imported_modules(ROOT / "tests")
    for name, files in imported_modules(ROOT / "bench").items():
        modules.setdefault(name, []).extend(files)
    assert undeclared(modules, core | test) == []


def test_the_walk_sees_function_local_imports():
    """The check itself: ``serve`` imports uvicorn inside a function, and that counts."""
    assert "uvicorn" in third_party(imported_modules(ROOT / "service"))
    assert distributions_of("PIL") == {"pillow"}
