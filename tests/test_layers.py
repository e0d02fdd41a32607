"""The package's import graph: no cycles, and every import points down the layers.

Every import statement counts, at module level or inside a function, under TYPE_CHECKING
or not: a lazy import still makes the two modules depend on each other.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "fcsnap"

# Bottom to top; a module belongs to the layer of the longest prefix naming it. A module may
# import its own layer and those below. What no prefix names is the top layer (the API,
# the command line, the daemon, the test machinery).
LAYERS: list[tuple[str, ...]] = [
    (
        "fcsnap.version", "fcsnap.errors", "fcsnap.units", "fcsnap.files", "fcsnap.options",
        "fcsnap.threads", "fcsnap.outputs", "fcsnap.scratch", "fcsnap.workingset",
        "fcsnap.unix_http",
        "fcsnap.header", "fcsnap.uffd.abi",
    ),
    ("fcsnap.store.format",),
    ("fcsnap.store.backends",),
    ("fcsnap.store.operations",),
    ("fcsnap.uffd",),
]


def module_names() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name)."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def imported(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules `name` imports (a name imported from a package that is not a
    module of it counts as the package)."""

    def known(dotted: str) -> str | None:
        while dotted and dotted not in modules:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str | None] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(known(alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in modules else known(base))
    return {m for m in found if m is not None and m != name and m.startswith("fcsnap")}


def import_graph() -> dict[str, set[str]]:
    modules = module_names()
    return {name: imported(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for dep in sorted(graph[node]):
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def layer(name: str) -> int:
    best, rank = -1, len(LAYERS)
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), i
    return rank


def test_the_graph_sees_lazy_and_type_checking_imports():
    graph = import_graph()
    assert "fcsnap.store.operations.tagging" in graph["fcsnap.cli.names"]  # inside tag
    assert "fcsnap.uffd.reactor" in graph["fcsnap.uffd.session"]  # under TYPE_CHECKING
    assert "fcsnap.api" in graph["fcsnap"]


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_lower_layers_never_import_higher_ones():
    graph = import_graph()
    upward = sorted(
        f"{name} -> {dep}"
        for name, deps in graph.items()
        for dep in deps
        if layer(dep) > layer(name)
    )
    assert upward == []


def test_every_store_module_is_in_a_layer():
    loose = [
        name for name in import_graph()
        if name.startswith("fcsnap.store.") and layer(name) == len(LAYERS)
    ]
    assert loose == []


def test_every_import_of_the_package_names_a_module_that_exists():
    """An import inside a function runs only when that command does: a path left behind by a
    move fails here rather than in front of a user."""
    modules = module_names()
    missing = []
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and not node.level and node.module and \
                    node.module.startswith("fcsnap"):
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.startswith("fcsnap")]
            else:
                continue
            missing += [f"{name}: {m}" for m in names
                        if m not in modules and importlib.util.find_spec(m) is None]
    assert missing == []
