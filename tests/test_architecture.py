"""The package's import graph: no cycles, and the lower layers never import the layers above them."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "i2i_unlearning"
# layer -> the package's modules it may not import (the design's arrows point down)
FORBIDDEN = {
    "data": ("runner", "gan_runner", "cli", "runs", "training", "families", "unlearning", "metrics", "report",
             "bench"),
    "families": ("runner", "gan_runner", "cli", "runs", "training", "unlearning", "metrics", "report", "bench"),
    "unlearning": ("runner", "gan_runner", "cli", "runs", "training", "metrics", "report", "bench"),
    "metrics": ("runner", "gan_runner", "cli", "runs", "training", "unlearning", "report", "bench"),
}


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (anywhere in the file, lazy imports included)."""
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package
                for _ in range(max(node.level - 1, 0)):
                    base = base.rpartition(".")[0]
                root = f"{base}.{node.module}" if node.level and node.module else base if node.level else node.module
                for alias in node.names:  # `from . import x` names a module; `from .m import f` names m
                    targets.add(f"{root}.{alias.name}" if f"{root}.{alias.name}" in modules else root)
            elif isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def test_the_import_graph_has_no_cycle():
    graph, state, path = import_graph(), {}, []

    def visit(node):
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                pytest.fail("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_lower_layers_do_not_import_upper_ones():
    bad = []
    for module, targets in import_graph().items():
        layer = module.split(".")[1] if module.count(".") else None
        for target in targets:
            top = target.split(".")[1] if target.count(".") else None
            if top in FORBIDDEN.get(layer, ()):
                bad.append(f"{module} imports {target}")
    assert not bad, bad


def test_the_check_can_fail():
    """Control: the graph sees the runner's imports (a cycle or a wrong arrow would be found)."""
    graph = import_graph()
    assert "i2i_unlearning.runner" in graph["i2i_unlearning.gan_runner"]
    assert "i2i_unlearning.families.base" in graph["i2i_unlearning.runner"]
