"""The import graph of ray_mtup/ points one way.

The graph is built with ``ast`` from every import of a ray_mtup module, at module level, inside a
function or under ``if TYPE_CHECKING:`` alike: an import moved into a function still makes the
modules depend on each other, it only hides the cycle from Python. The test fails on any cycle,
and on a function-level import of a ray_mtup module, unless that module loads a heavy library
(Ray Tune, torch...) when imported: such imports stay lazy for start-up time only (``run_tune.py
--help`` and a config error answer in a second), never to dodge a cycle, since their edges are
in the graph the cycle test walks.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ray_mtup"
#: Libraries that take seconds to import; the package imports them inside the functions using them.
HEAVY = {"ray", "torch", "transformers", "deepspeed", "peft", "matplotlib", "optuna", "mlflow", "wandb",
         "llguidance", "bm25s", "liger_kernel", "safetensors", "tensorboardX"}


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE).with_suffix("").parts)


def _imported(node: ast.Import | ast.ImportFrom, modules: set[str]) -> set[str]:
    """The ray_mtup modules one import statement names (``from . import a, b`` names a and b)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
        return {n.split(".", 1)[1] for n in names if n.startswith("ray_mtup.")} & modules
    if node.level == 0:
        if node.module == "ray_mtup":
            base = ""
        elif node.module and node.module.startswith("ray_mtup."):
            base = node.module.split(".", 1)[1]
        else:
            return set()
    else:
        base = node.module or ""
    found = {base} if base in modules else set()
    found |= {f"{base}.{a.name}".lstrip(".") for a in node.names} & modules
    return found


def _function_level(tree: ast.Module) -> set[int]:
    """ids of the import nodes that sit inside a function body."""
    inner: set[int] = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            inner |= {id(n) for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))}
    return inner


def _heavy_roots(node: ast.Import | ast.ImportFrom) -> set[str]:
    names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
    if isinstance(node, ast.ImportFrom) and node.level:
        return set()
    return {n.split(".")[0] for n in names} & HEAVY


def _scan() -> tuple[nx.DiGraph, list[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(files)
    graph, eager = nx.DiGraph(), nx.DiGraph()  # all imports; module-level ones only
    graph.add_nodes_from(modules)
    eager.add_nodes_from(modules)
    heavy: set[str] = set()  # modules importing a heavy library at module level
    inner_imports = []
    for name, path in sorted(files.items()):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        inner = _function_level(tree)
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            if id(node) not in inner and _heavy_roots(node):
                heavy.add(name)
            for dep in _imported(node, modules) - {name}:
                graph.add_edge(name, dep)
                if id(node) in inner:
                    inner_imports.append((f"ray_mtup/{path.relative_to(PACKAGE)}:{node.lineno}", dep))
                else:
                    eager.add_edge(name, dep)
    slow = {m for m in modules if heavy & ({m} | nx.descendants(eager, m))}
    lazy = [f"{where} imports {dep}" for where, dep in inner_imports if dep not in slow]
    return graph, lazy


def test_scanner_sees_every_form_of_import():
    """The scanner is not blind to the forms the package uses (guards the test below)."""
    tree = ast.parse(
        "from . import amr, corpus\nfrom .config import X\nimport ray_mtup.errors\n"
        "from ray_mtup import scoring\ndef f():\n    from .prompts import Y\n"
    )
    modules = {"amr", "corpus", "config", "errors", "scoring", "prompts"}
    seen = set().union(*(_imported(n, modules) for n in ast.walk(tree)
                         if isinstance(n, (ast.Import, ast.ImportFrom))))
    assert seen == modules
    assert len(_function_level(tree)) == 1
    assert _heavy_roots(ast.parse("import torch.distributed as dist").body[0]) == {"torch"}
    assert _heavy_roots(ast.parse("from ray.tune import Callback").body[0]) == {"ray"}
    assert not _heavy_roots(ast.parse("from .ray import x").body[0])


def test_no_import_cycle():
    graph, _ = _scan()
    assert graph.number_of_edges() > 50  # the scan found the package's imports
    cycles = [" -> ".join([*c, c[0]]) for c in nx.simple_cycles(graph)]
    assert not cycles, "import cycles in ray_mtup/:\n" + "\n".join(sorted(cycles))


def test_no_function_level_import_of_the_package():
    _, lazy = _scan()
    assert not lazy, "hoist these imports to module level:\n" + "\n".join(lazy)


if __name__ == "__main__":  # pragma: no cover - a quick listing while refactoring
    g, lazy_imports = _scan()
    print("\n".join(" -> ".join([*c, c[0]]) for c in nx.simple_cycles(g)))
    print("\n".join(lazy_imports))
    pytest.main([__file__])
