"""The module import graph of the taylorcal_jax package has no cycles.

Every module is parsed (ast, not imported), and every import statement in it counts, also those
inside functions: `import a.b` is an edge to a.b; `from a import b` is an edge to a.b when that is
a module of the package, else to a; relative imports are resolved against the importing module.
Only edges between modules of the package are kept. A cycle is listed as the modules around it.
"""

import ast
import os

import pytest

PACKAGE = "taylorcal_jax"
ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), PACKAGE)


def package_modules(root: str, package: str) -> dict[str, str]:
    """{dotted module name: file path} of every .py file under root (a package's __init__.py is
    the package itself)."""
    modules = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__pycache__")))
        rel = os.path.relpath(dirpath, os.path.dirname(root))
        prefix = rel.replace(os.sep, ".")
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            dotted = prefix if name == "__init__.py" else f"{prefix}.{name[:-3]}"
            modules[dotted] = os.path.join(dirpath, name)
    assert package in modules, f"{root} is not the package {package}"
    return modules


def _base(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module named by a `from ... import` statement's source."""
    if not node.level:
        return node.module or ""
    parts = module.split(".") if is_package else module.split(".")[:-1]
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def import_edges(modules: dict[str, str]) -> dict[str, set[str]]:
    """{module: the package's modules it imports}."""
    edges = {}
    for module, path in modules.items():
        with open(path) as f:
            tree = ast.parse(f.read(), filename=path)
        is_package = path.endswith("__init__.py")
        targets = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = _base(module, is_package, node)
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.add(sub if sub in modules else base)
        edges[module] = {t for t in targets if t in modules and t != module}
    return edges


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a closed list of modules) per strongly connected component with more than
    one module (Tarjan's algorithm, iteratively), in a stable order."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []
    counter = [0]

    def visit(root):
        work = [(root, iter(sorted(edges.get(root, ()))))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(set(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return [_cycle_in(component, edges) for component in components]


def _cycle_in(component: set[str], edges: dict[str, set[str]]) -> list[str]:
    """A closed path start -> ... -> start inside one strongly connected component."""
    start = min(component)
    parent, frontier = {start: None}, [start]
    while frontier:  # breadth first, so the cycle listed is a shortest one through `start`
        nxt = []
        for node in frontier:
            for child in sorted(edges[node] & component):
                if child == start:
                    path = [node]
                    while parent[path[-1]] is not None:
                        path.append(parent[path[-1]])
                    return [start] + path[::-1][1:] + [start]
                if child not in parent:
                    parent[child] = node
                    nxt.append(child)
        frontier = nxt
    raise AssertionError(f"no cycle through {start} in {sorted(component)}")


def test_the_package_has_no_import_cycles():
    edges = import_edges(package_modules(ROOT, PACKAGE))
    assert sum(map(len, edges.values())) > 0  # the parse found the package's imports
    cycles = find_cycles(edges)
    listed = "\n".join(" -> ".join(cycle) for cycle in cycles)
    assert not cycles, f"{len(cycles)} import cycle(s) in {PACKAGE}:\n{listed}"


def _write(root, files: dict[str, str]):
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_finds_cycles_through_function_level_and_relative_imports(tmp_path):
    _write(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/a.py": "from pkg import b\n",  # `from package import module`
            "pkg/b.py": "def f():\n    from .sub import c\n",  # inside a function, relative
            "pkg/sub/__init__.py": "",
            "pkg/sub/c.py": "import pkg.a\nimport os\n",
            "pkg/d.py": "from pkg.sub.c import name\nfrom . import e\n",  # d -> c, d -> e
            "pkg/e.py": "from .sub import c as _\n",
        },
    )
    edges = import_edges(package_modules(str(tmp_path / "pkg"), "pkg"))
    assert edges["pkg.a"] == {"pkg.b"} and edges["pkg.b"] == {"pkg.sub.c"}
    assert edges["pkg.sub.c"] == {"pkg.a"} and edges["pkg.d"] == {"pkg.sub.c", "pkg.e"}
    assert find_cycles(edges) == [["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]]


@pytest.mark.parametrize("acyclic", [True, False])
def test_cycles_are_one_per_component_and_none_in_a_dag(acyclic):
    edges = {"x": {"y"}, "y": {"z"}, "z": set() if acyclic else {"x"}, "p": {"q"}, "q": {"p"}}
    cycles = find_cycles(edges)
    expected = [["p", "q", "p"]] + ([] if acyclic else [["x", "y", "z", "x"]])
    assert sorted(cycles) == sorted(expected)
