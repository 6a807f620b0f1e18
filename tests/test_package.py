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
}
#: What only exporting (and the torch backend) needs: the ``export`` extra, not the runtime install.
EXPORT_EXTRA = {"torch", "transformers", "safetensors", "gguf", "accelerate", "huggingface-hub"}


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
    runtime = {_name(r) for r in project["dependencies"]}
    export = {_name(r) for r in project["optional-dependencies"]["export"]}
    assert export == EXPORT_EXTRA and not runtime & EXPORT_EXTRA, (runtime, export)
    declared = runtime | export
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


def module_imports() -> dict[str, set[str]]:
    """Package module -> the package modules it imports, function-level imports included."""
    graph = {}
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        package = name if rel.name == "__init__" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    mod = f"{base}.{node.module}" if node.module else base
                else:
                    mod = node.module or ""
                if mod.startswith("qwen_ondevice"):
                    found.add(mod)
                    found.update(f"{mod}.{a.name}" for a in node.names)  # `from . import x` imports a module
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("qwen_ondevice"))
        graph[name] = found
    return {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}


def test_no_import_cycles():
    graph = module_imports()
    assert len(graph) > 30  # the walk really found the package
    cycles, state = [], {}

    def visit(m, stack):
        state[m] = "open"
        for d in sorted(graph[m]):
            if d == "qwen_ondevice" or d.endswith("__init__"):
                continue
            if state.get(d) == "open":
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d, stack + [d])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_module_imports_a_private_name_of_another():
    offenders = []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("qwen_ondevice")):
                offenders += [f"{path.name}: {a.name}" for a in node.names if a.name.startswith("_") and a.name != "__version__"]
    assert not offenders, offenders


#: The export's own subpackages: running a bundle must not need any of them.
EXPORT_PACKAGES = ("qwen_ondevice.export", "qwen_ondevice.quantize")


def reached_from(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for d in graph[todo.pop()]:
            if d not in seen:
                seen.add(d)
                todo.append(d)
    return seen


def test_the_runtime_does_not_import_the_export():
    graph = module_imports()
    assert any(m.startswith(EXPORT_PACKAGES) for m in graph)  # the names below are the tree's own
    for start in ("qwen_ondevice.runtime.open_model", "qwen_ondevice.runtime.generate", "qwen_ondevice.serve.app",
                  "qwen_ondevice.cli.generate", "qwen_ondevice.cli.chat", "qwen_ondevice.cli.serve"):
        reached = {m for m in reached_from(graph, start) if m.startswith(EXPORT_PACKAGES)}
        assert not reached, f"{start} imports export modules: {sorted(reached)}"


def test_core_imports_no_other_stage():
    graph = module_imports()
    core = [m for m in graph if m.startswith("qwen_ondevice.core.")]
    assert len(core) > 5
    for m in core:
        outside = {d for d in graph[m] if d != "qwen_ondevice" and not d.startswith("qwen_ondevice.core")}
        assert not outside, f"{m} imports {sorted(outside)}"


#: The stage folders from the bottom floor up: a folder imports only folders below it (the order
#: docs/architecture.md draws). quantize sits above runtime because calibration runs the graphs
#: with the runtime's call inputs; eval above qnn and runtime because it checks bundles with both.
FLOORS = ("core", "qnn", "runtime", "quantize", "eval", "export", "serve", "cli")


def test_no_folder_imports_a_folder_above_it():
    graph = module_imports()
    folders = {m.split(".")[1] for m in graph if m.count(".") >= 2}
    assert folders == set(FLOORS), f"stage folders {sorted(folders)} differ from FLOORS {FLOORS}"
    upward = sorted(f"{m} -> {d}" for m, deps in graph.items() for d in deps
                    if m.count(".") >= 2 and d.count(".") >= 2
                    and FLOORS.index(d.split(".")[1]) > FLOORS.index(m.split(".")[1]))
    assert not upward, f"imports of a folder above: {upward}"


def test_library_modules_register_no_cli_arguments():
    offenders = []
    for path in SRC.rglob("*.py"):
        if path.parent.name == "cli":
            continue
        text = path.read_text()
        if "add_argument(" in text or "add_parser(" in text or "argparse" in text:
            offenders.append(str(path.relative_to(SRC)))
    assert not offenders, f"CLI arguments outside qwen_ondevice.cli: {offenders}"


def test_the_architecture_module_table_matches_the_tree():
    doc = (ROOT / "docs" / "architecture.md").read_text()
    table = doc[doc.index("| module | job |"):]
    table = table[:table.index("\n\n")]
    named = set()
    for cell in re.findall(r"^\| ([^|]+) \|", table, re.M)[2:]:
        named.update(re.findall(r"`([\w/<>.]+)`", cell))
    modules = {str(p.relative_to(SRC)) for p in SRC.rglob("*.py") if p.name != "__init__.py"}
    folders = {n for n in named if n.endswith("/")}
    covered = {m for m in modules if m in named or any(m.startswith(f) for f in folders)
               or (m.startswith("cli/") and "cli/<command>.py" in named)}
    assert modules - covered == set(), \
        f"modules missing from the table of docs/architecture.md: {sorted(modules - covered)}"
    stale = {n for n in named if "<" not in n and not (SRC / n).exists()}
    assert not stale, f"docs/architecture.md names modules that do not exist: {sorted(stale)}"
