"""The package's shape: what it imports is what pyproject.toml declares, and the reverse."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "qwen_ondevice"

#: Declared but never imported by the package, each for a stated reason (kept in pyproject.toml too).
NOT_IMPORTED = {
    "accelerate": "transformers refuses to load a GGUF file without it",
    "jinja2": "transformers renders chat templates with it",
}


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].strip().lower().replace("_", "-")


def imported_top_modules() -> set[str]:
    """Top-level modules imported anywhere in the package (function-level imports included)."""
    found = set()
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return {m for m in found if m not in sys.stdlib_module_names and m != "qwen_ondevice"}


def test_declared_dependencies_match_the_imports():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {_name(r) for r in project["dependencies"]}
    dists = importlib.metadata.packages_distributions()  # module -> distributions providing it
    imported = {}
    for module in imported_top_modules():
        names = {d.lower().replace("_", "-") for d in dists.get(module, [])}
        assert names, f"{module} is imported but no installed distribution provides it"
        imported[module] = names
    undeclared = {m: n for m, n in imported.items() if not n & declared}
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"
    used = set().union(*imported.values())
    unused = declared - used - set(NOT_IMPORTED)
    assert not unused, f"declared in pyproject.toml but never imported: {sorted(unused)}"
    for name in NOT_IMPORTED:
        assert name in declared, f"{name} is listed as needed but not declared"
