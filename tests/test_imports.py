"""The package's modules import each other without a cycle.

A cycle hides easily inside a function (``from alignment.report import ...`` in a Hydra callback, ``from
alignment.figures import ...`` in a report): it works until someone moves the import to the top of the file or
imports the modules in another order, and it means the modules cannot be read or tested one at a time. The
graph is read from the source with ``ast``, so every import counts: at module level, inside functions, under
``if TYPE_CHECKING``, absolute (``import alignment.x``, ``from alignment import x``, ``from alignment.x import
y``) and relative (``from . import x``, ``from ..x import y``), in subpackages too (``alignment.worlds.toy``).
An import names the most specific module it reaches: ``from alignment.worlds import toy`` is an edge to
``alignment.worlds.toy``, not to the package's ``__init__``.

Print the graph (one edge a line, where it is written) and any cycle:

    python -m tests.test_imports
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "alignment"

# module -> imported module -> where ("alignment/report.py:24"), for every import of the package's own modules
Graph = dict[str, dict[str, list[str]]]


def module_names(package_dir: Path) -> dict[str, Path]:
    """Every module of the package and its subpackages by dotted name (a package by its ``__init__``)."""
    names = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = path.relative_to(package_dir.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def _target(dotted: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of ``dotted`` that is one of the modules (``alignment.config.Config`` ->
    ``alignment.config``), or None for a module outside the package."""
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in modules:
            return ".".join(parts[:n])
    return None


def import_graph(package_dir: Path = PACKAGE) -> Graph:
    modules = module_names(package_dir)
    graph: Graph = {name: {} for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        where = path.relative_to(package_dir.parent).as_posix()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                imported = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: level 1 is this module's package, 2 its parent, ...
                    base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] +
                                    ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                imported = [base if alias.name == "*" else f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            for dotted in imported:
                target = _target(dotted, modules)
                line = f"{where}:{node.lineno}"
                if target is not None and target != name and line not in graph[name].get(target, []):
                    graph[name].setdefault(target, []).append(line)
    return graph


def find_cycles(graph: Graph) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) for each group of modules that import each other (a strongly connected
    component with more than one module, found with Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
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

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph) + 100))
    for v in sorted(graph):
        if v not in index:
            connect(v)
    return [_cycle_in(component, graph) for component in sorted(components)]


def _cycle_in(component: list[str], graph: Graph) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first, inside the component)."""
    start, members = component[0], set(component)
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w not in members:
                    continue
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start} in {component}")  # a component always has one


def describe(cycle: list[str], graph: Graph) -> str:
    return "\n".join(f"  {a} -> {b}  ({', '.join(graph[a][b])})" for a, b in zip(cycle, cycle[1:]))


@pytest.mark.fast
def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert sum(map(len, graph.values())) > len(graph), "the graph should see the package's imports"
    cycles = find_cycles(graph)
    assert not cycles, "import cycles in alignment/ (each edge: where the import is written):\n" + "\n\n".join(
        describe(cycle, graph) for cycle in cycles)


@pytest.mark.fast
def test_only_the_hydra_app_imports_hydra():
    # The rest of the package receives typed dataclasses and plain dicts (alignment/hydra_app.py says why).
    importers = set()
    for name, path in module_names(PACKAGE).items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                roots = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                roots = [(node.module or "").split(".")[0]]
            else:
                continue
            if "hydra" in roots:
                importers.add(name)
    assert importers == {"alignment.hydra_app"}


@pytest.mark.fast
def test_the_graph_sees_every_kind_of_import(tmp_path):
    # A fake package with each way of writing an import, the cycle closed by an import inside a function.
    pkg = tmp_path / "pkg"
    (pkg / "sub" / "deep").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "a.py": "from pkg.b import thing\n",
        "b.py": "import pkg.sub.c as c\nthing = 1\n",
        "sub/__init__.py": "from . import d\n",
        "sub/c.py": "from .deep import e\n",
        "sub/d.py": "",
        "sub/deep/__init__.py": "",
        "sub/deep/e.py": "from ..d import x\nfrom pkg import f\n",
        "f.py": "def later():\n    from pkg.sub import deep\n    from . import a\n",
    }
    for rel, text in files.items():
        (pkg / rel).write_text(text)
    graph = import_graph(pkg)
    assert {m: sorted(t) for m, t in graph.items() if t} == {
        "pkg.a": ["pkg.b"], "pkg.b": ["pkg.sub.c"], "pkg.sub": ["pkg.sub.d"], "pkg.sub.c": ["pkg.sub.deep.e"],
        "pkg.sub.deep.e": ["pkg.f", "pkg.sub.d"], "pkg.f": ["pkg.a", "pkg.sub.deep"]}
    assert graph["pkg.f"]["pkg.a"] == ["pkg/f.py:3"]
    assert find_cycles(graph) == [["pkg.a", "pkg.b", "pkg.sub.c", "pkg.sub.deep.e", "pkg.f", "pkg.a"]]
    (pkg / "f.py").write_text("")
    assert find_cycles(import_graph(pkg)) == []


if __name__ == "__main__":
    graph = import_graph()
    for module in sorted(graph):
        for target in sorted(graph[module]):
            print(f"{module} -> {target}  ({', '.join(graph[module][target])})")
    cycles = find_cycles(graph)
    for cycle in cycles:
        print(f"\ncycle:\n{describe(cycle, graph)}")
    print(f"\n{sum(map(len, graph.values()))} imports between {len(graph)} modules, {len(cycles)} cycles")
    raise SystemExit(1 if cycles else 0)
