"""Imports only go down (the layering in ispc/pipeline.py's docstring and docs/design.md), read
from the source with ``ast``: no import cycle among ispc's modules (module-level and
function-level imports alike), no module importing another's ``_private`` name, and no
function-level import of an ispc module."""
from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

REPO = Path(__file__).resolve().parents[1]
#: source folder -> the package it installs as (pyproject.toml's package-dir)
ROOTS = {"ispc": "ispc", "passes": "ispc.passes", "examples": "ispc.examples"}
#: the layers, bottom first; a module may import its own layer and those below (a package's
#: layer covers its submodules unless they are named)
LAYERS = [
    ["ispc.errors", "ispc._runtime_sessions"],
    ["ispc.config", "ispc.data", "ispc.records", "ispc.timing", "ispc.report", "ispc.observers",
     "ispc.distributed", "ispc.datasets", "ispc.plots"],
    ["ispc.ops"],
    ["ispc.modules"],
    ["ispc.compiled", "ispc.export", "ispc.native_plan", "ispc.dense_route"],
    ["ispc.passes"],
    ["ispc.pipeline"],
    ["ispc.backends", "ispc.feature_decay"],
    ["ispc.api", "ispc.benchmark", "ispc.baselines", "ispc.serialization", "ispc.gate_masks",
     "ispc.runtimes", "ispc.tune"],
    ["ispc.cli", "ispc", "ispc.examples", "ispc._runtime_worker"],
]
#: files exempt from the function-level-import rule, and why
OWNED_ELSEWHERE: dict[str, str] = {
    "ispc/_runtime_worker.py": "a timing worker process imports only its own runtime: the ONNX "
                               "Runtime and OpenVINO workers never import torch or ispc",
}
#: ispc modules that need an optional third-party package to import: only these may be imported
#: inside a function
OPTIONAL = {"ispc.ops._triton_kernels"}


def _modules() -> dict[str, Path]:
    out = {}
    for folder, package in ROOTS.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            rel = path.relative_to(REPO / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([package, *parts])] = path
    return out


MODULES = _modules()


def _package(name: str) -> str:
    path = MODULES[name]
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def _resolve(module: str, imp: ast.ImportFrom | ast.Import) -> list[tuple[str, str | None]]:
    """(ispc module imported, name taken from it or None) for each name ``imp`` imports."""
    def canon(dotted: str) -> str | None:
        for folder, package in ROOTS.items():
            if dotted == folder or dotted.startswith(folder + "."):
                if folder == "ispc":
                    return dotted
                if folder == "examples":  # scripts import the checkout's folder by that name
                    return package + dotted[len(folder):]
        return None

    if isinstance(imp, ast.Import):
        return [(m, None) for a in imp.names if (m := canon(a.name)) in MODULES]
    if imp.level:
        base = _package(module).split(".")
        base = base[:len(base) - imp.level + 1]
        source = ".".join(base + ([imp.module] if imp.module else []))
    else:
        source = canon(imp.module or "")
    if source not in MODULES:
        return []
    out = []
    for alias in imp.names:
        sub = f"{source}.{alias.name}"
        out.append((sub, None) if sub in MODULES else (source, alias.name))
    return out


def _imports() -> list[tuple[str, str, str | None, bool, int]]:
    """(importer, imported, name, inside a function, line) for every ispc import."""
    rows = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        nested = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                  for n in ast.walk(f)}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target, name in _resolve(module, node):
                    rows.append((module, target, name, id(node) in nested, node.lineno))
    return rows


IMPORTS = _imports()


def _rel(module: str) -> str:
    return MODULES[module].relative_to(REPO).as_posix()


def _layer(module: str) -> int | None:
    best = None
    for i, names in enumerate(LAYERS):
        for name in names:
            if module == name or (module.startswith(name + ".") and name != "ispc"):
                if best is None or len(name) > best[1]:
                    best = (i, len(name))
    return None if best is None else best[0]


def test_every_module_is_read():
    assert {"ispc.pipeline", "ispc.passes.base", "ispc.ops.gated_conv",
            "ispc.examples.models.resnet"} <= set(MODULES)
    assert any(name is None for _, _, name, _, _ in IMPORTS)  # module imports are seen


def test_no_import_cycle():
    g = nx.DiGraph()
    for src, dst, _, _, _ in IMPORTS:
        if src != dst and not src.startswith(dst + "."):  # a package's own __init__ is no cycle
            g.add_edge(src, dst)
    cycles = list(nx.simple_cycles(g))
    assert not cycles, f"import cycles: {cycles[:5]}"


def test_imports_only_go_down():
    unplaced = sorted({m for m in MODULES if _layer(m) is None})
    assert not unplaced, (f"place {unplaced} in a layer: tests/test_layering.py LAYERS, and "
                          "ispc/pipeline.py's docstring")
    up = [f"{_rel(src)}:{line} imports {dst} (layer {_layer(dst)} above {_layer(src)})"
          for src, dst, _, _, line in IMPORTS
          if _layer(dst) > _layer(src) and not src.startswith(dst + ".")]
    assert not up, "\n".join(up)


def test_no_cross_module_private_import():
    bad = [f"{_rel(src)}:{line} imports {name} from {dst}"
           for src, dst, name, _, line in IMPORTS
           if name and name.startswith("_") and not name.startswith("__") and src != dst
           and _rel(src) not in OWNED_ELSEWHERE]
    bad += [f"{_rel(src)}:{line} imports the private module {dst}"
            for src, dst, name, _, line in IMPORTS
            if name is None and any(p.startswith("_") and not p.startswith("__")
                                    for p in dst.split("."))
            and _package(src) != dst.rpartition(".")[0] and _rel(src) not in OWNED_ELSEWHERE]
    assert not bad, "\n".join(bad)


def test_function_level_imports_only_for_optional_packages():
    bad = [f"{_rel(src)}:{line} imports {dst} inside a function"
           for src, dst, _, inside, line in IMPORTS
           if inside and dst not in OPTIONAL and _rel(src) not in OWNED_ELSEWHERE]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("source", ["from . import records", "from .passes import base",
                                    "from ispc.pipeline import run", "import ispc.api"])
def test_resolve_reads_every_import_form(source):
    imp = ast.parse(source).body[0]
    (target, _), = _resolve("ispc.api", imp) if source != "from .passes import base" else \
        _resolve("ispc.pipeline", imp)
    assert target in MODULES
