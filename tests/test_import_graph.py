"""The import graph of sft_jax: models/ imports nothing above it, the base modules import nothing above
them, and no two modules import each other, however indirectly.

Every import a file writes counts: at the top, inside a function, or under `if TYPE_CHECKING`. A lazy
import breaks a circle at run time but not in the design. Importing `sft_jax.x.y` also runs the package
`__init__.py` files above it; those implicit edges are not counted (every module would then import
`sft_jax/__init__.py`). Modules are found on disk, so new packages are covered without listing them here.
"""

from __future__ import annotations

import ast
import pathlib

PACKAGE = "sft_jax"
ROOT = pathlib.Path(__file__).resolve().parents[1] / PACKAGE

# The bottom of the package, each with what it may import (itself and its submodules always allowed).
# A prefix covers the module and its submodules.
ALLOWED = {
    "sft_jax.sharding": (),
    "sft_jax.state": ("sft_jax.sharding",),  # state.to_host is sharding's
    "sft_jax.models": ("sft_jax.models", "sft_jax.sharding", "sft_jax.state"),
}

Edges = dict[str, dict[str, str]]  # {importer: {imported: "file:line" of the first import}}


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _modules() -> dict[str, pathlib.Path]:
    """{dotted module name: file}; a package is its `__init__.py`."""
    modules = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = (PACKAGE, *path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _resolve(name: str, modules: dict[str, pathlib.Path]) -> str | None:
    """The module a dotted name lands in: itself, or its longest known prefix (a name inside a module)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def _imports(module: str, path: pathlib.Path, modules: dict[str, pathlib.Path]) -> list[tuple[str, int]]:
    """(imported sft_jax module, line) for every import statement in the file."""
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the importer's package, one level up per extra dot
                package = module.split(".")
                package = package[: len(package) - node.level + (1 if is_package else 0)]
                base = ".".join(package + ([base] if base else []))
            # `from pkg import x` imports the module pkg.x when there is one, else a name defined in pkg.
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for name in names:
            if _under(name, PACKAGE):
                target = _resolve(name, modules)
                if target is not None and target != module:
                    found.append((target, node.lineno))
    return found


def _graph() -> Edges:
    modules = _modules()
    edges: Edges = {}
    for module, path in modules.items():
        where = edges.setdefault(module, {})
        for target, line in _imports(module, path, modules):
            where.setdefault(target, f"{path.relative_to(ROOT.parent)}:{line}")
    return edges


def _cycles(edges: Edges) -> list[list[str]]:
    """One cycle through each strongly connected component of more than one module (Tarjan)."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, {}):
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
                components.append(set(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    cycles = []
    for component in components:
        start = min(component)
        # Shortest way back to `start` inside the component (breadth first).
        previous, frontier = {start: None}, [start]
        while frontier and start not in [w for v in frontier for w in edges[v]]:
            nxt = []
            for v in frontier:
                for w in sorted(edges[v]):
                    if w in component and w not in previous:
                        previous[w] = v
                        nxt.append(w)
            frontier = nxt
        last = next(v for v in frontier if start in edges[v])
        cycle = [last]
        while previous[cycle[-1]] is not None:
            cycle.append(previous[cycle[-1]])
        cycles.append([*reversed(cycle), start])
    return cycles


def _violations(edges: Edges, prefix: str, allowed: tuple[str, ...]) -> list[str]:
    return [f"{where}: {module} imports {target}"
            for module, targets in sorted(edges.items()) if _under(module, prefix)
            for target, where in sorted(targets.items())
            if not _under(target, prefix) and not any(_under(target, a) for a in allowed)]


def test_graph_is_found():
    edges = _graph()
    assert {"sft_jax.models.lora", "sft_jax.sharding", "sft_jax.state"} <= set(edges)
    assert "sft_jax.models.dropout" in edges["sft_jax.models.lora"]


def test_models_import_nothing_above_them():
    problems = _violations(_graph(), "sft_jax.models", ALLOWED["sft_jax.models"])
    assert not problems, "models/ may import only models/, sharding and state:\n" + "\n".join(problems)


def test_base_modules_import_nothing_above_them():
    edges = _graph()
    problems = [p for base in ("sft_jax.sharding", "sft_jax.state") for p in _violations(edges, base, ALLOWED[base])]
    assert not problems, "\n".join(problems)


def test_cycle_finder_finds_cycles():
    edges = {"a": {"b": ""}, "b": {"c": ""}, "c": {"a": "", "d": ""}, "d": {}, "x": {"y": ""}, "y": {"x": ""}}
    assert sorted(_cycles(edges)) == [["a", "b", "c", "a"], ["x", "y", "x"]]


def test_no_import_cycles():
    edges = _graph()
    cycles = _cycles(edges)
    described = [" -> ".join(cycle) + "".join(f"\n    {edges[a][b]}: imports {b}" for a, b in zip(cycle, cycle[1:]))
                 for cycle in cycles]
    assert not cycles, "import cycles:\n" + "\n".join(described)
