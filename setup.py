"""Build hook: mypyc compiles the hot path's pure modules; the metadata stays in pyproject.toml.

The modules are those of ``COMPILED`` in ``proxy/vvault_pep/compiled.py``; they are built into
one group (a shared runtime library plus one small extension per module), in place for
``pip install -e .`` (``make setup``) and into the wheel beside the ``.py`` sources.  Next to
them goes ``vvault_pep/compiled.json``, the SHA-256 of every compiled source: the package loads
the compiled modules only while the sources beside them are the ones they were built from.

``VVAULT_PEP_PURE=1`` at build time builds nothing (a pure-Python wheel or install).  A failed
compilation fails the build: a wheel is never silently pure.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from setuptools import setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
PACKAGE = ROOT / "proxy" / "vvault_pep"


def _constant(name: str) -> Any:
    """A literal from compiled.py, read without importing the package."""
    tree = ast.parse((PACKAGE / "compiled.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == name:
            assert node.value is not None
            return ast.literal_eval(node.value)
    raise LookupError(f"{name} not in compiled.py")


COMPILED = [str(m) for m in _constant("COMPILED")]
RUNTIME = str(_constant("RUNTIME"))
GROUP = RUNTIME.removesuffix("__mypyc")


def _source(module: str) -> Path:
    return PACKAGE.joinpath(*module.split(".")[1:]).with_suffix(".py")


class BuildWithRecord(build_ext):
    """build_ext, then ``compiled.json`` where the extensions went (in place or the wheel's tree)."""

    def run(self) -> None:
        super().run()
        target = Path(self.get_ext_fullpath(COMPILED[0])).parent.parent
        record = {
            "sources": {m: hashlib.sha256(_source(m).read_bytes()).hexdigest() for m in COMPILED},
        }
        target.mkdir(parents=True, exist_ok=True)
        (target / str(_constant("BUILD_RECORD"))).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def _extensions() -> list[Any]:
    if os.environ.get("VVAULT_PEP_PURE") == "1":
        return []
    from mypyc.build import mypycify

    old = Path.cwd()
    os.chdir(ROOT)  # mypy reads [tool.mypy] from pyproject.toml here, and the paths are relative to it
    try:
        return list(
            mypycify(
                [str(_source(m).relative_to(ROOT)) for m in COMPILED],
                opt_level="3",
                group_name=GROUP,
            )
        )
    finally:
        os.chdir(old)


extensions = _extensions()
setup(
    ext_modules=extensions,
    cmdclass={"build_ext": BuildWithRecord} if extensions else {},
)
