"""The package's shape (docs/design.md): every layer imports only from the layers below it, the
import graph is acyclic (imports inside functions included), and no source file grows past ~400
lines. Read from the source with ``ast``, so a lazy import that dodges a cycle is still seen."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "hyperbit"
# Lowest first: a layer may import itself and any layer before it, nothing after it.
LAYERS = ("_version", "_io", "nn", "pathways", "config", "models", "analysis", "data", "train",
          "interop", "runs", "reports", "cli", "__main__")
MAX_LINES = 400


def _component(module: str) -> str:
    """``hyperbit.train.loop`` -> ``train``; ``hyperbit`` (the package's __init__) -> ``hyperbit``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every ``hyperbit...`` module a source file imports, at any depth of the file."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "hyperbit"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "hyperbit":
                found.add(target)
                # ``from . import loop``: the names may be submodules
                found |= {f"{target}.{alias.name}" for alias in node.names}
    return found


def import_graph() -> dict[str, set[str]]:
    """Component -> the other components it imports."""
    graph: dict[str, set[str]] = {}
    for path in sorted(SRC.rglob("*.py")):
        src = _component(_module_name(path))
        deps = graph.setdefault(src, set())
        for target in _imports(path):
            dst = _component(target)
            if dst != src:
                deps.add(dst)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_every_component_is_a_known_layer():
    assert set(import_graph()) == set(LAYERS) | {"hyperbit"}


def test_import_graph_is_acyclic():
    graph = import_graph()
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
    assert not [c for c, deps in graph.items() if "hyperbit" in deps], "nothing imports the package root"


def test_each_layer_imports_only_layers_below_it():
    graph = import_graph()
    wrong = [f"{c} imports {d}" for c, deps in graph.items() if c != "hyperbit"
             for d in deps if LAYERS.index(d) > LAYERS.index(c)]
    assert not wrong, wrong


def test_nn_and_pathways_import_nothing_above_them():
    graph = import_graph()
    assert graph["nn"] <= set()
    assert graph["pathways"] <= {"nn"}


def test_the_checks_see_imports_inside_functions(tmp_path):
    """The graph includes lazy imports: planting one that closes a cycle is caught."""
    planted = tmp_path / "hyperbit"
    (planted / "nn").mkdir(parents=True)
    (planted / "nn" / "__init__.py").write_text("def f():\n    from ..train import loop\n")
    global SRC
    real, SRC = SRC, planted
    try:
        assert _imports(planted / "nn" / "__init__.py") == {"hyperbit.train", "hyperbit.train.loop"}
        graph = import_graph()
    finally:
        SRC = real
    assert find_cycle({**import_graph(), "nn": graph["nn"]}) is not None


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_no_source_file_is_over_400_lines(path):
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(SRC)} has {lines} lines"
