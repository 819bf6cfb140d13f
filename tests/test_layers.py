"""The import graph of mpr_server: calls go one way (docs/architecture.rst), so no module imports
from a layer above its own, and no group of modules imports itself in a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "mpr_server"

# Lowest first. A module belongs to the layer of the longest prefix that names it.
LAYERS: list[tuple[str, ...]] = [
    ("mpr_server", "mpr_server.model", "mpr_server.errors", "mpr_server._async", "mpr_server.jsonlog"),
    ("mpr_server.metrics", "mpr_server.redis", "mpr_server.push", "mpr_server.auth", "mpr_server.notify"),
    ("mpr_server.stores",),
    ("mpr_server.service",),
    ("mpr_server.wire", "mpr_server.http", "mpr_server.config"),
    ("mpr_server.app",),
    ("mpr_server.workers", "mpr_server.upgrade_cli", "mpr_server.admin"),
    ("mpr_server.tap",),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> int:
    best, level = -1, -1
    for n, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, level = len(prefix), n
    assert level >= 0, f"{module} is in no layer: add it to LAYERS (and to docs/architecture.rst)"
    return level


def imports_of(path: Path) -> set[str]:
    """The mpr_server modules a file imports (at any depth: lazy imports count too)."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("mpr_server"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if not target.startswith("mpr_server"):
                continue
            # "from pkg import mod" imports the submodule when there is one
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                found.add(candidate if _exists(candidate) else target)
    found.discard(module)
    return found


def _exists(module: str) -> bool:
    path = ROOT.parent.joinpath(*module.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


GRAPH = {module_name(p): imports_of(p) for p in sorted(ROOT.rglob("*.py"))}


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_no_import_from_a_higher_layer(module: str) -> None:
    level = layer_of(module)
    upward = sorted(i for i in GRAPH[module] if layer_of(i) > level)
    assert upward == [], f"{module} (layer {level}) imports from higher layers: {upward}"


def test_no_import_cycle() -> None:
    # Imports of a package's __init__ re-export its own modules; a cycle through one is real too.
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for target in sorted(GRAPH.get(module, ())):
            if target == module.rpartition(".")[0] and module.startswith(target + "."):
                continue  # a module importing names from its own package's __init__
            if state.get(target) == 1:
                cycles.append([*stack[stack.index(target) :], target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)
    assert cycles == []


def test_the_graph_is_read() -> None:
    """The checks above are only as good as the graph: it must see known edges."""
    assert "mpr_server.service" in GRAPH["mpr_server.wire.methods"]
    assert "mpr_server.stores.redis.store" in GRAPH["mpr_server.app"]
    assert "mpr_server.redis.base" in GRAPH["mpr_server.redis.cluster"]
    assert layer_of("mpr_server.stores.redis.fanout") == 2
