"""The package's import graph has no cycle, and the search's pure parts load without torch.

Which imports count: every ``import`` statement in a module's source, wherever it stands:
at module level, inside a function (a lazy import still ties the two modules: neither can be
read or changed alone, and the cycle only waits for a call order to bite), and under
``if TYPE_CHECKING:``. The graph is read from the source with :mod:`ast`, so it is the same
whatever was imported first. Modules are the installed names (``exporters/`` is
``edgeqra.exporters``, ``tui/`` is ``edgeqra.tui``, from ``pyproject.toml``). An edge goes to
the module named (``from edgeqra.search.executors.base import Task`` -> that module, not its
package ``__init__``): a package re-exporting its submodules is not a cycle.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def package_dirs(root: Path = ROOT) -> dict[str, Path]:
    """Installed top-level package name -> source folder, as ``pyproject.toml`` maps them."""
    setup = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapped = setup.get("package-dir", {})
    return {name: root / mapped.get(name, name.replace(".", "/")) for name in mapped} | {
        "edgeqra": root / "edgeqra"
    }


def modules(dirs: dict[str, Path]) -> dict[str, Path]:
    """Every module's dotted name -> its file (a package is its ``__init__.py``)."""
    found: dict[str, Path] = {}
    for package, folder in dirs.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            name = ".".join([package, *parts])
            found.setdefault(name, path)
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[tuple[str, int]]:
    """(module imported, line) for every import statement in ``path`` that names a module of
    ``known`` (other than itself)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[tuple[str, int]] = set()

    def add(target: str, line: int) -> None:
        while target and target not in known:  # `import a.b.c` of a non-module attribute
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add((target, line))

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            for alias in node.names:
                # `from pkg import sub` imports the submodule `pkg.sub` when there is one
                full = f"{source}.{alias.name}"
                add(full if full in known else source, node.lineno)
    return found


def import_graph(dirs: dict[str, Path]) -> dict[str, set[tuple[str, int]]]:
    """Module -> the package modules it imports, with the line of each import."""
    known = modules(dirs)
    return {name: imports(name, path, known) for name, path in known.items()}


def cycles(graph: dict[str, set[tuple[str, int]]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), sorted."""
    edges = {v: sorted({w for w, _ in graph[v]}) for v in graph}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

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
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(out)


def describe(graph: dict[str, set[tuple[str, int]]], component: list[str]) -> str:
    """The imports that close a cycle, one per line (``module:line -> module``)."""
    members = set(component)
    return "\n".join(
        f"  {v}:{line} -> {w}"
        for v in component
        for w, line in sorted(graph[v], key=lambda e: e[1])
        if w in members
    )


def test_the_checker_finds_a_cycle_through_a_function_level_import(tmp_path):
    """The check is not vacuous: a lazy import and a TYPE_CHECKING import close cycles."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.b import thing\n")
    (pkg / "b.py").write_text("def thing():\n    from pkg import a\n")
    (pkg / "sub" / "__init__.py").write_text("from .c import x\n")
    (pkg / "sub" / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.sub.d import y\nx = 1\n"
    )
    (pkg / "sub" / "d.py").write_text("from pkg.sub import c\ny = 2\n")
    (pkg / "e.py").write_text("from pkg.sub.c import x\n")  # a package re-export: no cycle
    graph = import_graph({"pkg": pkg})
    assert cycles(graph) == [["pkg.a", "pkg.b"], ["pkg.sub.c", "pkg.sub.d"]]
    assert describe(graph, ["pkg.a", "pkg.b"]) == "  pkg.a:1 -> pkg.b\n  pkg.b:2 -> pkg.a"


def test_no_import_cycle():
    graph = import_graph(package_dirs())
    assert {"edgeqra.pipeline", "edgeqra.exporters.package", "edgeqra.tui.app"} <= set(graph)
    found = cycles(graph)
    assert not found, "import cycles (module:line -> module):\n" + "\n".join(
        describe(graph, c) for c in found
    )


PURE = (
    "edgeqra.result",
    "edgeqra.search.bayes",
    "edgeqra.search.driver",
    "edgeqra.search.evolution",
    "edgeqra.search.executors",
    "edgeqra.search.fidelity",
    "edgeqra.search.journal",
    "edgeqra.search.pareto",
    "edgeqra.search.surrogate",
)


def test_the_search_loads_without_torch():
    """In a fresh interpreter, importing the search's pure parts loads no torch or peft (each
    module in turn, so a failure names the first one that pulls them in)."""
    code = (
        "import importlib, sys\n"
        f"for name in {PURE!r}:\n"
        "    importlib.import_module(name)\n"
        "    heavy = [m for m in ('torch', 'peft', 'transformers', 'gptqmodel') if m in sys.modules]\n"
        "    if heavy:\n"
        "        sys.exit(f'importing {name} loaded {heavy}')\n"
    )
    out = subprocess.run(  # noqa: S603 - a fixed script on this interpreter
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr.strip()
