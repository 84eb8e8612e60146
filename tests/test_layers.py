"""The package's layers, as its layout shows them, held by a test.

``core`` (the data root, chunks, annotations) knows nothing of Twisted or of the web; ``web``
(the Klein app, the site) builds on the core; ``process`` (options, service, workers) builds on
both; ``tools`` (ingest, demo) uses the core alone. These tests read every module's imports
(those inside functions too, where a cycle would hide) and import the core and the tools in a
fresh interpreter, failing on any Twisted, Klein or werkzeug module that got loaded.
"""

from __future__ import annotations

import ast
import configparser
import importlib.metadata
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import neurotrale_twisted

PACKAGE = Path(neurotrale_twisted.__file__).parent
NAME = "neurotrale_twisted"

#: The layers each layer may import, besides itself and the package's top module.
ALLOWED = {
    "core": set(),
    "web": {"core"},
    "process": {"core", "web"},
    "tools": {"core"},
}

#: Third-party packages a layer must not import at all.
FORBIDDEN = {
    "core": {"twisted", "klein", "werkzeug", "zope", "treq"},
    "tools": {"twisted", "klein", "werkzeug", "zope", "treq"},
}


def module_name(path: Path) -> str:
    """The dotted name of a module file of the package."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    """Every module of the package, by dotted name."""
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: Path) -> set[str]:
    """The modules ``path`` imports anywhere in it, as dotted names (relative ones resolved)."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            # ``from package import module`` imports that module.
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def layer_of(module: str) -> str | None:
    """The layer (``core``, ``web``, ``process``, ``tools``) a module of the package is in."""
    parts = module.split(".")
    if parts[0] != NAME or len(parts) < 2 or parts[1] not in ALLOWED:
        return None
    return parts[1]


def internal_imports(known: dict[str, Path]) -> dict[str, set[str]]:
    """For each module of the package, the modules of the package it imports."""
    return {
        name: {imported for imported in imports_of(name, path) if imported in known} - {name}
        for name, path in known.items()
    }


def test_the_package_has_the_four_layers() -> None:
    """The layout is the map README's Development section gives: four layers, none empty."""
    layers = {layer_of(name) for name in modules()}
    assert {"core", "web", "process", "tools"} <= layers


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_a_layer_imports_only_the_layers_below_it(layer: str) -> None:
    known = modules()
    wrong = [
        f"{name} imports {imported}"
        for name, imported_set in internal_imports(known).items()
        if layer_of(name) == layer
        for imported in sorted(imported_set)
        if layer_of(imported) not in {None, layer} | ALLOWED[layer]
    ]
    assert wrong == []


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_a_layer_names_no_forbidden_package(layer: str) -> None:
    wrong = [
        f"{name} imports {imported}"
        for name, path in modules().items()
        if layer_of(name) == layer
        for imported in sorted(imports_of(name, path))
        if imported.split(".")[0] in FORBIDDEN[layer]
    ]
    assert wrong == []


def test_no_module_takes_part_in_an_import_cycle() -> None:
    """Not even through an import inside a function: each module's imports, followed, never
    lead back to it."""
    graph = internal_imports(modules())
    cycles = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for successor in sorted(graph[node]):
            if state.get(successor) == 1:
                cycles.append([*stack[stack.index(successor) :], successor])
            elif successor not in state:
                visit(successor)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert cycles == []


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_importing_a_layer_loads_no_twisted_klein_or_werkzeug(layer: str) -> None:
    """Every module of the layer, imported in a fresh interpreter: none of them (nor anything
    they import) loads Twisted, Klein, werkzeug or zope."""
    names = [name for name in modules() if layer_of(name) == layer]
    assert names
    forbidden = sorted(FORBIDDEN[layer])
    script = (
        "import importlib, json, sys\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {forbidden!r})))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
        cwd=PACKAGE.parent,
    )
    assert json.loads(result.stdout) == []


def declared_requirements() -> set[str]:
    """The distributions ``setup.cfg`` says the package needs, by normalized name."""
    parser = configparser.ConfigParser()
    parser.read(PACKAGE.parent / "setup.cfg")
    names = set()
    for line in parser["options"]["install_requires"].splitlines():
        line = line.split("#")[0].strip()
        if line:
            names.add(canonical(re.split(r"[\s\[<>=!~;]", line, maxsplit=1)[0]))
    return names


def canonical(name: str) -> str:
    """A distribution name as packaging compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_package_imported_is_declared() -> None:
    """A third-party package the code imports must be named in ``setup.cfg``, not arrive by
    chance with another one (werkzeug with Klein, zope.interface with Twisted)."""
    if not (PACKAGE.parent / "setup.cfg").is_file():
        pytest.skip("not run from a source tree")
    declared = declared_requirements()
    distributions = importlib.metadata.packages_distributions()
    imported = (
        {
            module.split(".")[0]
            for name, path in modules().items()
            for module in imports_of(name, path)
            if module and not module.startswith(NAME)
        }
        - set(sys.stdlib_module_names)
        - {"__future__"}
    )
    undeclared = sorted(
        top
        for top in imported
        if not {canonical(d) for d in distributions.get(top, [])} & declared
        # A namespace package (zope) is declared through the distribution imported from it.
        and not any(name.startswith(f"{canonical(top)}-") for name in declared)
    )
    assert imported and undeclared == []


def test_every_package_is_installed() -> None:
    """``setup.cfg`` lists every package of the tree: one left out is missing from a wheel
    (and from the container image) while an editable install hides it."""
    if not (PACKAGE.parent / "setup.cfg").is_file():
        pytest.skip("not run from a source tree")
    parser = configparser.ConfigParser()
    parser.read(PACKAGE.parent / "setup.cfg")
    listed = set(parser["options"]["packages"].split())
    found = {module_name(path) for path in PACKAGE.rglob("__init__.py")}
    assert found - listed == set()
