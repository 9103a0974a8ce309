"""The package layout is the architecture: its rules, checked over the source's imports.

Every import counts, wherever it stands (inside a function, under ``TYPE_CHECKING``): a lazy
import is still a dependency.  The rules:

* no import cycles, between modules or between packages;
* ``core/`` is pure: no sockets, TLS, Redis, aiohttp, subprocesses or asyncio I/O, and
  nothing of the PEP but ``errors`` and ``config``;
* ``identity/``, ``decide/`` and ``shared/`` never import ``edge/`` or ``app/``;
* the packages stand in layers: a package imports only the ones below it.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "proxy" / "vvault_pep"

# Lower first; a package may import itself and anything before it in this list.
LAYERS = ("errors", "config", "core", "net", "identity", "shared", "decide", "observe", "edge", "app")
# The top-level modules that are no package: the version, the command line's old path, and
# the loader that picks the compiled or the pure hot path.
TOP = {"vvault_pep", "vvault_pep.errors", "vvault_pep.cli", "vvault_pep.compiled"}
IO_MODULES = {"aiohttp", "redis", "socket", "ssl", "asyncio", "subprocess", "http", "httptools", "urllib.request"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        parts = path.relative_to(PKG).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(("vvault_pep", *parts))] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> Iterator[tuple[str, int]]:
    """(imported module, line) for every import in the file, relative ones resolved."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                yield (sub if sub in MODULES else target), node.lineno


def _graph() -> dict[str, set[str]]:
    return {
        name: {dep for dep, _ in _imports(name, path) if dep in MODULES and dep != name}
        for name, path in MODULES.items()
    }


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "vvault_pep"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_every_module_sits_in_a_package_of_the_layout() -> None:
    stray = [m for m in MODULES if m not in TOP and _package(m) not in LAYERS]
    assert not stray, f"modules outside the role packages: {stray}"


def test_no_import_cycle_between_modules() -> None:
    assert _cycles(_graph()) == []


def test_no_import_cycle_between_packages() -> None:
    packages: dict[str, set[str]] = {}
    for module, deps in _graph().items():
        if module in TOP:
            continue
        packages.setdefault(_package(module), set()).update(
            _package(d) for d in deps if d not in TOP and _package(d) != _package(module)
        )
    assert _cycles(packages) == []


def test_packages_import_only_the_layers_below() -> None:
    upward = []
    for module, deps in _graph().items():
        if module in TOP:
            continue
        rank = LAYERS.index(_package(module))
        for dep in deps:
            if dep in TOP and dep != "vvault_pep.cli":
                continue
            if dep == "vvault_pep.cli" or LAYERS.index(_package(dep)) > rank:
                upward.append(f"{module} -> {dep}")
    assert upward == []


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _package(m) == "core"))
def test_core_does_no_io(module: str) -> None:
    found = []
    for dep, line in _imports(module, MODULES[module]):
        top = dep.split(".")[0]
        io = dep in IO_MODULES or top in IO_MODULES or dep.startswith("urllib.request")
        above = top == "vvault_pep" and dep not in TOP and _package(dep) not in ("errors", "config", "core")
        if io or above:
            found.append(f"line {line}: {dep}")
    assert found == [], f"{module} imports I/O or a layer above it"


@pytest.mark.parametrize("package", ["identity", "decide", "shared"])
def test_services_never_import_the_edge_or_the_app(package: str) -> None:
    found = [
        f"{module} -> {dep}"
        for module, deps in _graph().items()
        if _package(module) == package
        for dep in deps
        if _package(dep) in ("edge", "app") or dep == "vvault_pep.cli"
    ]
    assert found == []


def test_the_checks_can_fail() -> None:
    """The cycle finder and the resolver see what they must (a guard against a blind test)."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert "vvault_pep.core.sanitize" in _graph()["vvault_pep.app.stages"]
    assert "vvault_pep.errors" in _graph()["vvault_pep.core.routing"]
