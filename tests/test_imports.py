"""The package's modules import one another without a cycle.

The graph is read from the source with ``ast``: the imports a module runs when it is imported (its
body, ``if``/``try``/``with`` blocks and class bodies; not functions, not ``if TYPE_CHECKING``).
Importing ``a.b.c`` also imports the packages ``a.b`` and ``a``; those edges count too, except to
the importing module's own packages (which are being imported already).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "rebel_diffusion"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE


def package_modules(root: Path = ROOT, package: str = PACKAGE) -> dict[str, Path]:
    """{dotted module name: file} for every module of the package (a package by its ``__init__``)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_time_nodes(body: list[ast.stmt]):
    """The import statements among ``body`` that run when the module is imported."""
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                yield from _import_time_nodes(node.body)
            yield from _import_time_nodes(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                yield from _import_time_nodes(block)
        elif isinstance(node, ast.With | ast.ClassDef):
            yield from _import_time_nodes(node.body)


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """{module: the package modules importing it imports} from the modules' import-time imports."""
    graph = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        targets = set()
        for node in _import_time_nodes(ast.parse(path.read_text(encoding="utf-8")).body):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
                continue
            if node.level:
                base = name.split(".")
                base = base[: len(base) - (node.level - 1) - (0 if is_package else 1)]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module
            targets.add(base)
            targets.update(f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in modules)
        own = {*_ancestors(name), name}
        with_packages = targets | {a for t in targets for a in _ancestors(t)}
        graph[name] = {t for t in with_packages if t in modules and t not in own}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``graph`` as [a, b, ..., a], or None (depth-first, in name order)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_package_has_no_import_cycle():
    cycle = find_cycle(import_graph(package_modules()))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_graph_sees_the_imports_that_matter():
    """The reader is not vacuous: it finds relative, absolute and package imports, and skips
    functions and ``if TYPE_CHECKING`` blocks."""
    modules = package_modules()
    graph = import_graph(modules)
    run_folder = f"{PACKAGE}.outputs.run_folder"
    assert {f"{PACKAGE}.config", f"{PACKAGE}.models", f"{PACKAGE}.errors"} <= graph[run_folder]
    assert run_folder in graph[f"{PACKAGE}.outputs.generation"]
    assert f"{PACKAGE}.config" not in graph[f"{PACKAGE}.sampling.sampler"]  # an annotation only (TYPE_CHECKING)
    assert f"{PACKAGE}.training.recipe" not in graph[f"{PACKAGE}.training.plans"]  # TYPE_CHECKING too
    assert f"{PACKAGE}.cli.sample" not in graph[f"{PACKAGE}.cli"]  # chosen inside a function
    assert f"{PACKAGE}.rewards" not in graph[f"{PACKAGE}.rewards.aesthetic"]  # its own package
    assert {f"{PACKAGE}.toy.data", f"{PACKAGE}.toy"} <= graph[f"{PACKAGE}.rewards.toy_alignment"]  # and another


def test_find_cycle_names_the_cycle(tmp_path):
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    # From source: a module-level import closes the cycle; one inside a function does not.
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("def f():\n    from .a import x\n")
    modules = package_modules(pkg, "pkg")
    assert find_cycle(import_graph(modules)) is None
    (pkg / "b.py").write_text("import pkg.a\n")
    assert find_cycle(import_graph(package_modules(pkg, "pkg"))) == ["pkg.a", "pkg.b", "pkg.a"]
