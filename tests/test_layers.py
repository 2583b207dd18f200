"""The package's imports point down only (docs/architecture.md, "Layers").

Read from the source with ``ast`` (nothing is imported), so this runs in milliseconds and fails
with the offending module and line.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "gaisnet_ray"

# top to bottom; a module may import from its own layer or any layer below it
LAYERS: list[set[str]] = [
    {"cli", "__main__"},
    {"run_command", "precheck", "study"},  # `gaisnet run`, what it checks before Ray loads; `gaisnet study`
    {"driver", "inprocess", "report"},     # the two runtimes of a round, the run's report
    {"actors", "serve", "cluster"},        # everything that talks to Ray
    # ---- core: no `import ray` from here down
    {"planner"},
    {"hfsl", "inference", "rounds"},
    {"privacy", "relay"},
    {"cloudengine", "runfolder"},
    {"knowledge", "schemes", "data"},
    {"models"},
    {"logs", "worker_setup"},
    {"config", "tiers", "layout"},         # the bottom: schemas, resource shapes, run-folder names
]
CORE_FROM = 4  # LAYERS[4:] never import ray (worker_setup included: serve/ and actors/ both use it)


def _unit(path: Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0].removesuffix(".py")


def _level(unit: str) -> int:
    for i, names in enumerate(LAYERS):
        if unit in names:
            return i
    raise AssertionError(f"{unit!r} is in no layer of tests/test_layers.py: add it where it belongs")


def _imports(path: Path):
    """(line, gaisnet_ray unit imported | 'ray') for every import in the module, lazy ones included."""
    tree = ast.parse(path.read_text(), str(path))
    rel_parts = path.relative_to(PKG).parts
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and getattr(block.test, "id", getattr(block.test, "attr", None)) == "TYPE_CHECKING"
                   for stmt in block.body for n in ast.walk(stmt)}
    for node in ast.walk(tree):
        if id(node) in typing_only:  # annotations only: never imported at run time
            continue
        if isinstance(node, ast.Import):
            for a in node.names:
                top = a.name.split(".")
                if top[0] == "ray":
                    yield node.lineno, "ray"
                elif top[0] == "gaisnet_ray" and len(top) > 1:
                    yield node.lineno, top[1]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level == 0:
                top = mod.split(".")
                if top[0] == "ray":
                    yield node.lineno, "ray"
                elif top[0] == "gaisnet_ray":
                    yield node.lineno, top[1] if len(top) > 1 else node.names[0].name
                continue
            base = list(rel_parts[:-1])[: len(rel_parts) - node.level] if node.level > 1 else list(rel_parts[:-1])
            target = base + [p for p in mod.split(".") if p]
            if not target:  # `from . import x` at the package root
                target = [node.names[0].name]
            yield node.lineno, target[0].removesuffix(".py")


def test_every_import_points_down_and_core_has_no_ray():
    problems = []
    for path in sorted(PKG.rglob("*.py")):
        unit = _unit(path)
        if unit == "__init__":
            continue
        level = _level(unit)
        for line, dep in _imports(path):
            where = f"{path.relative_to(PKG.parent)}:{line}"
            if dep == "ray":
                if level >= CORE_FROM:
                    problems.append(f"{where} imports ray, but {unit} is core (no Ray below actors/serve/cluster)")
                continue
            if dep != unit and _level(dep) < level:
                problems.append(f"{where}: {unit} (layer {level}) imports {dep} (layer {_level(dep)}), which is above it")
    assert not problems, "\n".join(problems)


def test_no_two_packages_import_each_other():
    """Same-layer imports are allowed, cycles between the package's parts are not."""
    graph: dict[str, set[str]] = {}
    for path in PKG.rglob("*.py"):
        unit = _unit(path)
        graph.setdefault(unit, set()).update(d for _, d in _imports(path) if d not in (unit, "ray", "__init__"))
    state: dict[str, int] = {}

    def visit(u: str, trail: list[str]) -> None:
        state[u] = 1
        for v in sorted(graph.get(u, ())):
            if state.get(v) == 1:
                raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(v):] + [v]) if v in trail
                                     else f"import cycle through {u} -> {v}")
            if v not in state:
                visit(v, trail + [v])
        state[u] = 2

    for u in sorted(graph):
        if u not in state:
            visit(u, [u])
