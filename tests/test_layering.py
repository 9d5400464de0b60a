"""The layering ``esm ← selection ← finetune ← stepstone`` holds at module level.

Every library module is parsed with :mod:`ast` (nothing is imported) and every
``import`` in it counts, at the top or inside a function: a lower layer never imports
a higher one (nor the benchmarks or tests), and no modules import each other, directly
or round a longer loop.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# folder -> (installed package, layer); a module may import its own layer and below
LAYERS = {"esm": ("stepstone.esm", 0), "selection": ("stepstone.selection", 1),
          "finetune": ("stepstone.finetune", 2), "stepstone": ("stepstone", 3)}
OUTSIDE = ("benchmarks", "tests")  # scripts and tests: the library never imports them
# Import edges that close a cycle and are on their way out, each with what removes it.
# An entry that is no longer needed fails test_transitional_edges_are_still_needed.
TRANSITIONAL: dict[tuple[str, str], str] = {}


def _modules() -> dict[str, Path]:
    found = {}
    for folder, (package, _) in LAYERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


MODULES = _modules()


def _layer(module: str) -> int | None:
    best = None
    for package, layer in LAYERS.values():
        if module == package or module.startswith(package + "."):
            if best is None or len(package) > len(best[0]):
                best = (package, layer)
    return None if best is None else best[1]


def _imports(module: str, path: Path) -> dict[str, int]:
    """Modules ``module`` imports (top level or nested), each with its first line."""
    is_package = path.name == "__init__.py"
    out: dict[str, int] = {}

    def add(target: str, line: int) -> None:
        out.setdefault(target, line)

    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = module.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                add(sub if sub in MODULES else base, node.lineno)
    return out


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def _where(module: str, target: str) -> str:
    path = MODULES[module].relative_to(ROOT)
    return f"{path}:{GRAPH[module][target]} ({module} imports {target})"


def test_no_upward_imports():
    bad = []
    for module, targets in GRAPH.items():
        own = _layer(module)
        for target in targets:
            if target.split(".")[0] in OUTSIDE:
                bad.append(_where(module, target) + ": the library never imports " + target)
                continue
            layer = _layer(target)
            if layer is not None and layer > own:
                bad.append(_where(module, target) + ": a lower layer imports a higher one")
    assert not bad, "Upward imports:\n" + "\n".join(bad)


def _cycles() -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    edges = {m: sorted(t for t in ts if t in MODULES and t != m and (m, t) not in TRANSITIONAL)
             for m, ts in GRAPH.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return components


def test_no_import_cycles():
    described = []
    for component in _cycles():
        members = set(component)
        links = [_where(m, t) for m in component for t in GRAPH[m] if t in members and t != m]
        described.append(" <-> ".join(component) + "\n    " + "\n    ".join(links))
    assert not described, "Import cycles between modules:\n" + "\n".join(described)


def test_transitional_edges_are_still_needed():
    stale = [f"{a} -> {b}" for a, b in TRANSITIONAL if b not in GRAPH.get(a, {})]
    assert not stale, f"Remove from TRANSITIONAL (the import is gone): {stale}"


def test_the_checker_sees_nested_and_relative_imports(tmp_path):
    # the parser, not the tree, is under test: a function-level import and a relative one
    path = tmp_path / "__init__.py"
    path.write_text("def f():\n    from stepstone.finetune import train\n"
                    "from .catalog import load_builtin\nimport stepstone.esm.data as d\n")
    found = _imports("stepstone.esm", path)
    assert {"stepstone.finetune.train", "stepstone.esm.catalog", "stepstone.esm.data"} <= set(found)
    assert found["stepstone.finetune.train"] == 2
