"""The package's layers: every import of ``pipeline`` (at any depth, a function-level one too) points down or
sideways, and no import cycle exists.

Layers, bottom first (README, "Architecture"): shared services; the math of ``method/`` beside them; data;
models; the stages; the workflows that combine stages; the CLI on top.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "pipeline"

# (module prefix, layer): the longest matching prefix decides; the stages are ordered among themselves too
LAYERS = [
    ("pipeline", 0),  # the package's face: __version__
    ("pipeline.errors", 0),
    ("pipeline.progress", 0),
    ("pipeline.method", 1),  # pure math: imports nothing of the package but errors
    ("pipeline.storage", 2),
    ("pipeline.pages", 2),
    ("pipeline.figures", 2),
    ("pipeline.config", 3),
    ("pipeline.checkpoint", 4),
    ("pipeline.lease", 4),
    ("pipeline.tracking", 4),
    ("pipeline.raysession", 4),
    ("pipeline.stack", 4),
    ("pipeline.data", 5),
    ("pipeline.models", 6),
    ("pipeline.train", 7),
    ("pipeline.tune", 8),
    ("pipeline.registry", 9),
    ("pipeline.evaluate", 10),
    ("pipeline.attribute", 11),
    ("pipeline.serve", 12),
    ("pipeline.workflows", 13),
    ("pipeline.cli", 14),
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _target(name: str) -> str | None:
    """The module of the package that ``name`` (a module or a name inside one) is."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str, path: Path) -> set[str]:
    """Every module of the package that ``module`` imports, wherever the import statement stands."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for name in names:
            if name.split(".")[0] == "pipeline" and (target := _target(name)) and target != module:
                found.add(target)
    return found


GRAPH = {module: _imports(module, path) for module, path in MODULES.items()}


def layer(module: str) -> int:
    best = max((p for p, _ in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return dict(LAYERS)[best]


def test_every_module_has_a_layer():
    assert all(isinstance(layer(m), int) for m in MODULES)
    assert len(MODULES) > 40  # the walk found the package


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down_or_sideways(module):
    upward = sorted(t for t in GRAPH[module] if layer(t) > layer(module))
    assert not upward, f"{module} (layer {layer(module)}) imports upward: " + ", ".join(
        f"{t} (layer {layer(t)})" for t in upward
    )


def test_the_math_imports_only_math():
    for module, targets in GRAPH.items():
        if module.startswith("pipeline.method"):
            assert targets <= {t for t in MODULES if t.startswith("pipeline.method")} | {"pipeline.errors"}, module


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle():
    assert _cycles(GRAPH) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    # and an import hidden in a function counts
    tree = "def f():\n    from pipeline.cli import main\n"
    node = ast.parse(tree).body[0].body[0]
    assert isinstance(node, ast.ImportFrom) and _target(node.module) == "pipeline.cli"


def test_the_code_a_registered_model_carries_imports_without_the_services_libraries():
    """A registered version's loader imports ``pipeline.registry.pyfunc`` (and so ``pipeline.registry``) where only
    torch, PIL, numpy, pandas and MLflow are installed (tests/integration/test_consumers.py loads one there)."""
    import subprocess
    import sys

    blocked = ("ray", "boto3", "botocore", "webdataset", "pycocotools", "typer", "matplotlib", "psutil", "tqdm")
    code = (
        "import importlib.abc, sys\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        f"        if name.split('.')[0] in {blocked!r}:\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import pipeline.registry.pyfunc\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
