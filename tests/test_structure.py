"""The package's shape, checked: no import cycles (function-level imports count), modules and
functions of a readable size, no private name imported across modules, and protobuf behind
onnxprune.ir (the same rule ``make lint`` runs through ruff's banned-api)."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parent.parent
#: package -> folder ([tool.setuptools.package-dir] maps onnxprune.passes onto passes/)
PACKAGES = {"onnxprune": ROOT / "onnxprune", "onnxprune.passes": ROOT / "passes"}
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80
BANNED = ("onnx", "onnxruntime", "onnx_graphsurgeon.exporters", "onnx_graphsurgeon.importers")
#: Modules allowed to import protobuf, and why (mirrors pyproject's per-file-ignores).
BOUNDARY = {
    "onnxprune.ir": "the protobuf boundary itself",
    "onnxprune.gradient": "a ModelProto -> ModelProto transform: protobuf is its subject",
}


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join([package, *parts])
            if package == "onnxprune" and name.startswith("onnxprune.passes"):
                continue
            found[name] = path
    return found


MODULES = _modules()
TREES = {name: ast.parse(path.read_text()) for name, path in MODULES.items()}


def _imports(name: str):
    """(imported module, imported name or None, node) for every import in the module, at any depth."""
    is_package = MODULES[name].name == "__init__.py"
    for node in ast.walk(TREES[name]):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None, node
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".")
                parts = parts[: len(parts) - node.level + (1 if is_package else 0)]
                base = ".".join(parts + ([node.module] if node.module else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                yield (full, None, node) if full in MODULES else (base, alias.name, node)


def _owner(module: str) -> str | None:
    """The package module that defines ``module`` (itself, or the nearest enclosing one)."""
    while module and module not in MODULES:
        module = module.rpartition(".")[0]
    return module or None


def test_there_is_no_import_cycle():
    graph = nx.DiGraph()
    graph.add_nodes_from(MODULES)
    for name in MODULES:
        for module, _, _ in _imports(name):
            target = _owner(module)
            if target and target != name and not name.startswith(target + "."):
                graph.add_edge(name, target)
    cycles = [sorted(c) for c in nx.strongly_connected_components(graph) if len(c) > 1]
    assert not cycles


def test_modules_and_functions_stay_small():
    long_modules = [(len(MODULES[n].read_text().splitlines()), n) for n in MODULES]
    assert [m for m in long_modules if m[0] > MAX_MODULE_LINES] == []
    long_functions = [(f.end_lineno - f.lineno + 1, f"{n}.{f.name}") for n, tree in TREES.items()
                      for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))]
    assert [f for f in long_functions if f[0] > MAX_FUNCTION_LINES] == []


def test_no_private_name_is_imported_across_modules():
    private = [f"{name} <- {module}.{imported}" for name in MODULES for module, imported, _ in _imports(name)
               if imported and imported.startswith("_") and not imported.startswith("__") and _owner(module)
               and _owner(module) != name]
    assert private == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_protobuf_stays_behind_the_ir_boundary(name):
    if any(name == b or name.startswith(b + ".") for b in BOUNDARY):
        return
    offending = [f"line {node.lineno}: {module}" for module, _, node in _imports(name)
                 if any(module == b or module.startswith(b + ".") for b in BANNED)]
    assert offending == [], f"{name} imports protobuf outside onnxprune.ir"


def test_the_checks_see_the_whole_package():
    assert {"onnxprune.ir", "onnxprune.pipeline", "onnxprune.passes.progressive", "onnxprune.evidence.probes"} \
        <= MODULES.keys()
