"""The compiled hot path: which modules a process really runs, and the fall back to the pure ones.

``make pytest`` runs everything with ``VVAULT_PEP_PURE=1`` (coverage and the mutation drivers
read the ``.py`` files); ``make unit-compiled`` runs the unit tests and a few end-to-end files
with ``VVAULT_PEP_PURE=0``.  The first test says which of the two is in effect, so that neither
run can quietly be the other.  The others run a copy of the package in a child interpreter:
not built, a build that does not load, a source edited after its build, the switch.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import os
import shutil
import subprocess
import sys
from importlib.machinery import EXTENSION_SUFFIXES, ExtensionFileLoader, SourceFileLoader
from pathlib import Path

import pytest

from vvault_pep import compiled
from vvault_pep.compiled import COMPILED, RUNTIME, Mode

ROOT = Path(__file__).resolve().parent.parent
PROXY = ROOT / "proxy"

# In the child: import every compiled module, use one, print what was loaded.
PROBE = """
import importlib, json, sys
from vvault_pep import compiled
from vvault_pep.config.models import Sanitize
mods = [importlib.import_module(m) for m in compiled.COMPILED]
from vvault_pep.core.sanitize import canonical_target
t = canonical_target("/v1/a/../b?x=1", Sanitize())
print(json.dumps({"state": compiled.state(), "path": t.path, "files": [m.__file__ for m in mods]}))
"""


@pytest.mark.unit
def test_the_mode_in_effect_is_the_one_asked_for() -> None:
    setting = os.environ.get(compiled.ENV)
    modules = [importlib.import_module(name) for name in COMPILED]
    if setting == "1":
        assert all(isinstance(m.__loader__, SourceFileLoader) for m in modules), [m.__file__ for m in modules]
        assert all(m.__file__ and m.__file__.endswith(".py") for m in modules)
        assert inspect.isfunction(modules[COMPILED.index("vvault_pep.core.sanitize")].canonical_target)
        assert compiled.state()["reason"] == "VVAULT_PEP_PURE=1"
    elif setting == "0":
        assert all(isinstance(m.__loader__, ExtensionFileLoader) for m in modules), [m.__file__ for m in modules]
        assert all(m.__file__ and m.__file__.endswith(tuple(EXTENSION_SUFFIXES)) for m in modules)
        sanitize = modules[COMPILED.index("vvault_pep.core.sanitize")]
        assert inspect.isbuiltin(sanitize.canonical_target)  # a mypyc function is a C built-in
        assert compiled.state()["reason"] == ""
    else:
        kinds = {compiled.MODE.module_kind(m) for m in modules}
        assert len(kinds) == 1, "compiled and pure modules mixed in one process"
        assert (kinds == {"pure"}) == bool(compiled.state()["reason"])


def _copy(into: Path, *, built: bool) -> Path:
    """The package (and, if ``built``, this checkout's compiled build) under ``into``."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so", "compiled.json")
    shutil.copytree(PROXY / "vvault_pep", into / "vvault_pep", ignore=ignore)
    if built:
        record = PROXY / "vvault_pep" / compiled.BUILD_RECORD
        assert record.exists(), "no compiled build in this checkout: make compiled"
        shutil.copy2(record, into / "vvault_pep" / compiled.BUILD_RECORD)
        for path in [*PROXY.glob(f"{RUNTIME}.*"), *(PROXY / "vvault_pep" / "core").glob("*.so")]:
            shutil.copy2(path, into / path.relative_to(PROXY))
    return into


def _probe(code: Path, setting: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COVERAGE_PROCESS")}
    env.pop(compiled.ENV, None)
    if setting is not None:
        env[compiled.ENV] = setting
    env["PYTHONPATH"] = str(code)
    return subprocess.run(
        [sys.executable, "-c", PROBE], cwd=code, env=env, capture_output=True, text=True, timeout=30, check=False
    )


def _state(res: subprocess.CompletedProcess[str], code: Path) -> dict[str, str]:
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["path"] == "/v1/b"
    assert all(f.startswith(str(code)) for f in out["files"]), out["files"]  # the copy, not the checkout
    state: dict[str, str] = out["state"]
    return state


def test_a_built_copy_runs_compiled_and_the_switch_makes_it_pure(tmp_path: Path) -> None:
    code = _copy(tmp_path, built=True)
    state = _state(_probe(code, None), code)
    assert state == {**dict.fromkeys(COMPILED, "compiled"), "reason": ""}
    forced = _probe(code, "1")
    assert _state(forced, code) == {**dict.fromkeys(COMPILED, "pure"), "reason": "VVAULT_PEP_PURE=1"}
    assert forced.stderr == ""  # asked for: no warning


def test_an_unbuilt_copy_runs_pure_without_a_warning(tmp_path: Path) -> None:
    """Nothing built (a pure wheel, the container image) is a choice: pure, the reason kept, no word."""
    code = _copy(tmp_path, built=False)
    res = _probe(code, None)
    state = _state(res, code)
    assert state == {**dict.fromkeys(COMPILED, "pure"), "reason": f"{COMPILED[0]} is not built for this interpreter"}
    assert res.stderr == ""


def test_a_partial_build_runs_pure_and_says_why(tmp_path: Path) -> None:
    code = _copy(tmp_path, built=True)
    missing = next((code / "vvault_pep" / "core").glob("sanitize.*.so"))
    missing.unlink()
    res = _probe(code, None)
    state = _state(res, code)
    assert state == {
        **dict.fromkeys(COMPILED, "pure"),
        "reason": "vvault_pep.core.sanitize is not built for this interpreter",
    }
    assert res.stderr.count("vvault-pep runs its pure-Python modules: vvault_pep.core.sanitize is not built") == 1
    assert "Traceback" not in res.stderr


def test_compiled_required_but_not_built_is_an_import_error(tmp_path: Path) -> None:
    res = _probe(_copy(tmp_path, built=False), "0")
    assert res.returncode == 1
    assert f"ImportError: VVAULT_PEP_PURE=0 asks for the compiled modules: {COMPILED[0]} is not built" in res.stderr


def test_a_source_edited_after_the_build_runs_pure(tmp_path: Path) -> None:
    """A stale extension never runs old code: the whole group falls back, none is mixed in."""
    code = _copy(tmp_path, built=True)
    edited = code / "vvault_pep" / "core" / "routing.py"
    edited.write_text(edited.read_text() + "\n# edited after the build\n")
    res = _probe(code, None)
    state = _state(res, code)
    assert state == {
        **dict.fromkeys(COMPILED, "pure"),
        "reason": "vvault_pep/core/routing.py changed since it was compiled",
    }
    assert res.stderr.count("vvault-pep runs its pure-Python modules: vvault_pep/core/routing.py changed") == 1


def test_a_build_whose_runtime_does_not_load_runs_pure(tmp_path: Path) -> None:
    """Extensions present and current, but the shared runtime is not a loadable library."""
    code = _copy(tmp_path, built=True)
    runtime = next(code.glob(f"{RUNTIME}.*"))
    runtime.write_bytes(b"not an ELF file")
    state = _state(_probe(code, None), code)
    assert set(state.values()) - {state["reason"]} == {"pure"}
    assert state["reason"].startswith(f"the compiled runtime {RUNTIME} does not load: ")
    res = _probe(code, "0")
    assert res.returncode == 1 and "ImportError: VVAULT_PEP_PURE=0 asks for the compiled modules" in res.stderr


def test_an_unknown_switch_value_is_refused(tmp_path: Path) -> None:
    res = _probe(_copy(tmp_path, built=False), "yes")
    assert res.returncode == 1
    assert "VVAULT_PEP_PURE='yes': use 1 (pure modules) or 0 (compiled modules, or fail)" in res.stderr


def _patched_compiled_modules(tree: ast.AST) -> list[str]:
    """``setattr``/``monkeypatch.setattr`` calls whose target is a compiled module (or a dotted path into one)."""
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                aliases[alias.asname or alias.name] = alias.name
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and node.args):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        if name != "setattr":
            continue
        first = node.args[0]
        target = aliases.get(first.id, "") if isinstance(first, ast.Name) else ""
        if isinstance(first, ast.Constant) and isinstance(first.value, str):
            target = first.value
        if any(target == m or target.startswith(m + ".") for m in COMPILED):
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


@pytest.mark.unit
def test_no_test_patches_a_compiled_module() -> None:
    """Patching a compiled module's function or global is invisible to compiled callers (they call
    it directly, in C), so such a test would pass pure and lie compiled; mutate a registry instead
    (``monkeypatch.setitem(obligations.TYPES, …)``), or patch the caller's module."""
    found = {
        path.name: hits
        for path in sorted((ROOT / "tests").glob("*.py"))
        if (hits := _patched_compiled_modules(ast.parse(path.read_text())))
    }
    assert found == {}


@pytest.mark.unit
def test_the_patch_finder_sees_a_patch() -> None:
    code = "from vvault_pep.core import sanitize\nimport vvault_pep.core.routing as r\n"
    code += "def t(monkeypatch):\n    monkeypatch.setattr(sanitize, 'HOP_BY_HOP', ())\n"
    code += "    monkeypatch.setattr('vvault_pep.core.principal.subject_of', None)\n    setattr(r, 'x', 1)\n"
    assert [hit.split(":")[0] for hit in _patched_compiled_modules(ast.parse(code))] == ["line 4", "line 5", "line 6"]
    assert _patched_compiled_modules(ast.parse("from vvault_pep.identity import authn\nsetattr(authn, 'S', 1)")) == []


# The same decision in this process, over a copy (coverage sees these lines; the children above
# show the imports themselves).  The runtime is given a name that cannot load, so nothing native
# is loaded into a process that runs the pure modules.
NO_RUNTIME = "vvault_pep_no_such_runtime__mypyc"


def _decided(package: Path, monkeypatch: pytest.MonkeyPatch, setting: str | None) -> Mode:
    if setting is None:
        monkeypatch.delenv(compiled.ENV, raising=False)
    else:
        monkeypatch.setenv(compiled.ENV, setting)
    mode = Mode(package, runtime=NO_RUNTIME)
    mode.decide()
    mode.decide()  # once: the second call changes nothing
    return mode


def test_the_decision_in_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    bare = _copy(tmp_path / "bare", built=False) / "vvault_pep"
    mode = _decided(bare, monkeypatch, None)
    assert (mode.compiled, mode.reason) == (False, f"{COMPILED[0]} is not built for this interpreter")
    assert caplog.records == []
    assert _decided(bare, monkeypatch, "1").reason == "VVAULT_PEP_PURE=1"

    built = _copy(tmp_path / "built", built=True) / "vvault_pep"
    mode = _decided(built, monkeypatch, None)
    assert mode.reason == f"the compiled runtime {NO_RUNTIME} does not load: No module named {NO_RUNTIME!r}"
    assert [r.getMessage() for r in caplog.records] == [
        f"vvault-pep runs its pure-Python modules: {mode.reason} (make compiled rebuilds them)"
    ]
    with pytest.raises(ImportError, match=r"^VVAULT_PEP_PURE=0 asks for the compiled modules: the compiled runtime"):
        _decided(built, monkeypatch, "0")
    with pytest.raises(ImportError, match=r"^VVAULT_PEP_PURE='true': use 1"):
        _decided(built, monkeypatch, "true")

    record = built / compiled.BUILD_RECORD
    record.write_text(json.dumps({"sources": {**json.loads(record.read_text())["sources"], COMPILED[-1]: "0" * 64}}))
    assert _decided(built, monkeypatch, None).reason == "vvault_pep/core/spiffe.py changed since it was compiled"
    record.write_text("{")
    assert _decided(built, monkeypatch, None).reason == "no readable build record compiled.json (JSONDecodeError)"
    record.unlink()
    assert _decided(built, monkeypatch, None).reason == "no readable build record compiled.json (FileNotFoundError)"
