"""The package's layers (docs/architecture.md): every import points down, none points up, no module cycle.

Imports inside functions count; ``if TYPE_CHECKING:`` blocks (annotations only) do not.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"edgepipe": ROOT / "edgepipe", "edgepipe.passes": ROOT / "passes", "edgepipe.targets": ROOT / "targets"}

# Lowest first; a module may import its own layer and the layers below it. Folders are layers.
LAYERS: list[str] = ["core", "passes", "targets", "recipe", "sources", "pipeline", "scale", "cli"]
TOP = {"edgepipe.recipe": "recipe", "edgepipe.api": "cli", "edgepipe.__main__": "cli", "edgepipe": "cli"}


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in FOLDERS.items():
        for path in sorted(folder.rglob("*.py")):
            parts = [*package.split("."), *path.relative_to(folder).with_suffix("").parts]
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _layer(module: str) -> int:
    parts = module.split(".")
    name = TOP.get(module) or (parts[1] if len(parts) > 2 or module in ("edgepipe.passes", "edgepipe.targets") or parts[1] in LAYERS else None)
    assert name in LAYERS, f"{module} is in no layer: put it in a layer's folder (docs/architecture.md)"
    return LAYERS.index(name)


def _imports(path: Path, module: str, known: set[str]) -> set[str]:
    """edgepipe modules that ``path`` imports anywhere (functions included), resolved to known module names."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for child in node.body for n in ast.walk(child)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module if node.level == 0 else ".".join(module.split(".")[: -node.level] + [node.module])
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                out.add(name)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(p, m, set(modules)) for m, p in modules.items()}


def test_every_import_points_down():
    upward = [f"{m} ({LAYERS[_layer(m)]}) imports {d} ({LAYERS[_layer(d)]})"
              for m, deps in _graph().items() for d in sorted(deps) if _layer(d) > _layer(m)]
    assert not upward, "\n".join(upward)


def test_no_import_cycle():
    graph = _graph()
    cycles = []
    for start in graph:  # a module reachable from itself
        seen, stack = set(), list(graph[start])
        while stack:
            m = stack.pop()
            if m == start:
                cycles.append(start)
                break
            if m not in seen:
                seen.add(m)
                stack.extend(graph.get(m, ()))
    assert not cycles, f"modules in an import cycle: {sorted(cycles)}"
