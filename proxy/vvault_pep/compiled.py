"""The compiled hot path: which pure modules mypyc builds, and whether an import gets them.

The modules in :data:`COMPILED` are built into C extensions (one shared runtime library,
:data:`RUNTIME`, plus one small extension per module) by ``setup.py`` — ``make setup`` builds
them in place, the wheel carries them beside the ``.py`` sources.  The choice between the
compiled and the pure modules is made once per process, for the whole group at once, when the
first of them is imported:

* ``VVAULT_PEP_PURE=1``: the pure modules, whatever is built (coverage and mutation runs, and
  anyone who wants the plain Python back);
* ``VVAULT_PEP_PURE=0``: the compiled modules or an ``ImportError`` (the compiled test run, and
  an image that must not run slower without saying so);
* unset: the compiled modules when every one of them is built from exactly the source beside
  it (``compiled.json`` holds the SHA-256 of each source at build time) and the runtime library
  loads; otherwise the pure modules, with one warning that says why when something was built
  (an install with nothing built, such as the container image, is pure without a word).

All or none, never a mix: a compiled function checks its arguments' classes, so a compiled
``policy_input`` would refuse the ``Headers`` of a pure ``sanitize``.  A stale build (a source
edited since ``make setup``) falls back rather than run old code.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import logging
import os
import sys
from collections.abc import Sequence
from importlib.machinery import EXTENSION_SUFFIXES, ExtensionFileLoader, ModuleSpec
from pathlib import Path
from types import ModuleType
from typing import Final

log = logging.getLogger(__name__)

# Pure and on a cached request's path (docs/performance.md, "The compiled hot path", says how
# they were chosen).  setup.py reads this tuple; keep it a literal.
COMPILED: Final = (
    "vvault_pep.core.decision",
    "vvault_pep.core.obligations",
    "vvault_pep.core.policy_input",
    "vvault_pep.core.principal",
    "vvault_pep.core.request",
    "vvault_pep.core.responses",
    "vvault_pep.core.routing",
    "vvault_pep.core.sanitize",
    "vvault_pep.core.spiffe",
)
# mypyc's shared library for the group (setup.py passes it as group_name), a top-level module.
RUNTIME: Final = "vvault_pep_native__mypyc"
BUILD_RECORD: Final = "compiled.json"
ENV: Final = "VVAULT_PEP_PURE"
PACKAGE: Final = Path(__file__).resolve().parent


def source_of(module: str, package: Path = PACKAGE) -> Path:
    """The ``.py`` file of one of :data:`COMPILED` under the package directory."""
    return package.joinpath(*module.split(".")[1:]).with_suffix(".py")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def extension_of(module: str, package: Path = PACKAGE) -> Path | None:
    """The built extension beside the source, for this interpreter's ABI, if there is one."""
    source = source_of(module, package)
    for suffix in EXTENSION_SUFFIXES:
        candidate = source.with_name(source.stem + suffix)
        if candidate.is_file():
            return candidate
    return None


class Mode:
    """Which modules this process runs, decided once; ``reason`` says why when they are pure."""

    def __init__(self, package: Path = PACKAGE, runtime: str = RUNTIME) -> None:
        self.package = package
        self.runtime = runtime
        self.decided = False
        self.compiled = False
        self.reason = ""
        self.extensions: dict[str, Path] = {}

    def decide(self) -> None:
        if self.decided:
            return
        self.decided = True
        setting = os.environ.get(ENV, "")
        if setting not in ("", "0", "1"):
            raise ImportError(f"{ENV}={setting!r}: use 1 (pure modules) or 0 (compiled modules, or fail)")
        if setting == "1":
            self.reason = f"{ENV}=1"
            return
        problem = self._problem()
        if problem is None:
            self.compiled = True
            return
        self.reason = problem
        if setting == "0":
            raise ImportError(f"{ENV}=0 asks for the compiled modules: {problem}")
        if (self.package / BUILD_RECORD).exists() or any(extension_of(m, self.package) for m in COMPILED):
            # built, yet unusable: say so; an install with nothing built is pure by choice
            log.warning("vvault-pep runs its pure-Python modules: %s (make compiled rebuilds them)", problem)

    def _problem(self) -> str | None:
        """Why the compiled modules cannot be used, or None when they can."""
        for module in COMPILED:
            found = extension_of(module, self.package)
            if found is None:
                return f"{module} is not built for this interpreter"
            self.extensions[module] = found
        record = self.package / BUILD_RECORD
        try:
            built = json.loads(record.read_text())["sources"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return f"no readable build record {record.name} ({type(exc).__name__})"
        for module in COMPILED:
            source = source_of(module, self.package)
            if not isinstance(built, dict) or built.get(module) != digest(source):
                return f"{source.relative_to(self.package.parent)} changed since it was compiled"
        try:
            importlib.import_module(self.runtime)
        except ImportError as exc:
            return f"the compiled runtime {self.runtime} does not load: {exc}"
        return None

    def module_kind(self, module: ModuleType) -> str:
        """``compiled`` or ``pure``, from what was really loaded."""
        return "compiled" if isinstance(module.__loader__, ExtensionFileLoader) else "pure"


MODE = Mode()


class CompiledFinder(importlib.abc.MetaPathFinder):
    """Finds :data:`COMPILED` inside this package: the extension or the source, as decided."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname not in COMPILED:
            return None
        source = source_of(fullname)
        if path is None or str(source.parent) not in {str(Path(p).resolve()) for p in path}:
            return None  # not this copy of the package: left to the default finders
        MODE.decide()
        if MODE.compiled:
            extension = MODE.extensions[fullname]
            loader: importlib.abc.Loader = ExtensionFileLoader(fullname, str(extension))
            return importlib.util.spec_from_file_location(fullname, extension, loader=loader)
        loader = importlib.machinery.SourceFileLoader(fullname, str(source))
        return importlib.util.spec_from_file_location(fullname, source, loader=loader)


def install() -> None:
    """Put the finder in front of the default ones (once); the package's ``__init__`` calls it."""
    if not any(isinstance(f, CompiledFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, CompiledFinder())


def state() -> dict[str, str]:
    """Module name → ``compiled`` or ``pure`` for those imported so far, plus ``reason``."""
    out: dict[str, str] = {name: MODE.module_kind(sys.modules[name]) for name in COMPILED if name in sys.modules}
    out["reason"] = MODE.reason
    return out
