"""Every third-party package the code imports is declared in pyproject.toml."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("edgeqra", "exporters", "tui")
OWN = {"edgeqra", "exporters", "tui"}
# Imported inside a try that falls back when absent, so not a requirement.
OPTIONAL = {"pynvml"}  # measure: NVML's per-process figure, else torch's device-wide one


def _imported_modules() -> dict[str, set[str]]:
    """Top-level module name -> files that import it (absolute imports only)."""
    found: dict[str, set[str]] = {}
    for folder in SOURCES:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(ROOT)))
    return found


def _normalise(name: str) -> str:
    """PEP 503 name: ``LogBar`` / ``tomli_w`` -> ``logbar`` / ``tomli-w``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> set[str]:
    """Distribution names in ``dependencies`` and every optional extra."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        specs.extend(extra)
    return {_normalise(re.match(r"[A-Za-z0-9_.-]+", spec).group()) for spec in specs}


def test_every_directly_imported_package_is_declared():
    distributions = importlib.metadata.packages_distributions()
    declared = _declared()
    missing = {}
    for module, files in sorted(_imported_modules().items()):
        if module in sys.stdlib_module_names or module in OWN | OPTIONAL or module == "__future__":
            continue
        dists = {_normalise(d) for d in distributions.get(module, [module])}
        if not dists & declared:
            missing[module] = (sorted(dists), sorted(files)[:3])
    assert missing == {}, f"imported but not in pyproject.toml: {missing}"


def test_constraints_pins_satisfy_the_declared_ranges():
    from packaging.requirements import Requirement

    pins = {}
    for line in (ROOT / "constraints-cpu.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            pins[_normalise(name)] = version.strip()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    bad = []
    for spec in project["dependencies"]:
        req = Requirement(spec)
        pin = pins.get(_normalise(req.name))
        if pin is not None and not req.specifier.contains(pin, prereleases=True):
            bad.append(f"{spec} vs pinned {pin}")
    assert bad == []
