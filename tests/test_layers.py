"""The house without circles: maemi_core's subpackages import each other only downwards, in the
order data < vision < teacher < model < training < evaluation < registry (the teacher reads the
vision stage's demonstration groups; the top-level modules, config, run isolation, MLflow
tracking and the model registry client, are the base every layer may use), so no import cycle
runs between subpackages. Imports inside functions count too."""

from __future__ import annotations

import ast
from pathlib import Path

CORE = Path(__file__).resolve().parents[1] / "maemi_core"
LAYER = {"data": 0, "vision": 1, "teacher": 2, "model": 3, "training": 4, "evaluation": 5, "registry": 6}


def imports(into_layers_only: bool = True) -> list[tuple[str, str]]:
    """(importing module, imported module) for every maemi_core import in maemi_core (only those
    of a layer's modules unless ``into_layers_only`` is false)."""
    out = []
    for path in CORE.rglob("*.py"):
        module = ".".join(path.relative_to(CORE.parent).with_suffix("").parts).removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                package = (CORE.parent / node.module.replace(".", "/")).is_dir()    # `from pkg import module`
                names = [f"{node.module}.{a.name}" for a in node.names] if package else [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            out += [(module, n) for n in names if n.startswith("maemi_core.") and (_package(n) or not into_layers_only)]
    return out


def _package(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in LAYER else None


def test_subpackages_import_only_downwards_so_there_is_no_cycle():
    upward = sorted({(a, b) for a, b in imports() if _package(a) and _package(b)
                     and _package(a) != _package(b) and LAYER[_package(b)] >= LAYER[_package(a)]})
    assert not upward, "imports against the layer order (move the shared code down a layer):\n" + \
        "\n".join(f"  {a} -> {b}" for a, b in upward)


def test_the_base_modules_import_no_layer():
    base = sorted({(a, b) for a, b in imports() if a.count(".") == 1 and _package(b)
                   and a not in ("maemi_core.cli", "maemi_core.code_version")})
    assert not base, "a base module imports a layer:\n" + "\n".join(f"  {a} -> {b}" for a, b in base)


def test_no_module_imports_itself_through_others():
    """No import cycle among maemi_core's modules either, inside a subpackage included (such a
    cycle works only while every import in it stays inside a function)."""
    graph: dict[str, set[str]] = {}
    for a, b in imports(into_layers_only=False):
        graph.setdefault(a, set()).add(b)
    cycles, state = [], {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for nxt in sorted(graph.get(module, ())):
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join("  " + " -> ".join(c) for c in cycles)
