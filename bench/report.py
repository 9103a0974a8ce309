"""What a run prints and writes: the machine, the table, the targets, JSON and Markdown files.

Everything here is formatting over plain dicts; the measuring is in ``proxy_bench`` and
``soak``.  A run writes ``bench/results/<UTC time>-<host>.{json,md}`` and copies them to
``<prefix>latest.{json,md}`` (``latest`` for ``make bench``, ``soak-latest`` for
``make soak``).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import re
import shutil
import socket
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from bench.common import ROOT
from bench.procfs import cpu_model
from vvault_pep import __version__ as pep_version

RESULTS = ROOT / "bench" / "results"


def _run(argv: Sequence[str]) -> str:
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (done.stdout or done.stderr).strip()


def go_module_version(binary: str | None, module: str) -> str:
    """The module version a Go binary was built from (``go version -m``), else what it says."""
    if binary is None:
        return "not installed"
    if shutil.which("go"):
        m = re.search(rf"^\s*mod\s+{re.escape(module)}\s+(\S+)", _run(["go", "version", "-m", binary]), re.M)
        if m:
            return m.group(1)
    said = _run([binary, "--version"])
    return said.splitlines()[0] if said else "unknown"


def machine(tools: dict[str, str | None]) -> dict[str, Any]:
    try:
        import uvloop

        uvloop_version = uvloop.__version__
    except ImportError:  # optional, as in the PEP
        uvloop_version = "not installed"
    opa = _run([tools["opa"], "version"]).splitlines()[0] if tools.get("opa") else "not installed"
    redis = _run(["redis-server", "--version"])
    redis_version = m.group(1) if (m := re.search(r"v=(\S+)", redis)) else redis
    return {
        "host": socket.gethostname(),
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "uvloop": uvloop_version,
        "vvault_pep": pep_version,
        "git": _run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"]),
        "opa": opa.removeprefix("Version: "),
        "redis_server": redis_version,
        "vegeta": go_module_version(tools.get("vegeta"), "github.com/tsenart/vegeta/v12"),
        "oauth2_proxy": go_module_version(tools.get("oauth2-proxy"), "github.com/oauth2-proxy/oauth2-proxy/v7"),
        "caddy": go_module_version(tools.get("caddy"), "github.com/caddyserver/caddy/v2"),
    }


def machine_line(m: dict[str, Any]) -> str:
    return (
        f"{m['cpu_model']}, {m['cores']} cores, Linux {m['kernel']}; Python {m['python']}, aiohttp {m['aiohttp']}, "
        f"uvloop {m['uvloop']}; OPA {m['opa']}, redis {m['redis_server']}, vegeta {m['vegeta']}, "
        f"oauth2-proxy {m['oauth2_proxy']}, caddy {m.get('caddy')}; vvault-pep {m['vvault_pep']} ({m['git']})"
    )


@dataclass(frozen=True)
class Column:
    title: str
    key: str
    fmt: str
    width: int


def _cell(row: dict[str, Any], col: Column) -> str:
    value = row.get(col.key)
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return format(value, col.fmt)


def text_table(rows: Sequence[dict[str, Any]], columns: Sequence[Column]) -> list[str]:
    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            f"{cell:>{c.width}}" if i else f"{cell:<{c.width}}"
            for i, (cell, c) in enumerate(zip(cells, columns, strict=True))
        )

    return [line([c.title for c in columns]), *(line([_cell(row, c) for c in columns]) for row in rows)]


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[Column]) -> list[str]:
    lines = ["| " + " | ".join(c.title for c in columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row, c) for c in columns) + " |")
    return lines


@dataclass(frozen=True)
class Target:
    name: str
    measured: float | None
    limit: float
    unit: str
    at_most: bool  # True: measured ≤ limit; False: measured ≥ limit

    @property
    def met(self) -> bool | None:
        if self.measured is None:
            return None
        return self.measured <= self.limit if self.at_most else self.measured >= self.limit

    def as_dict(self) -> dict[str, Any]:
        return {
            "target": self.name,
            "measured": self.measured,
            "limit": self.limit,
            "unit": self.unit,
            "at_most": self.at_most,
            "met": self.met,
        }


def target_lines(targets: Sequence[Target]) -> list[str]:
    lines = [f"{'target':<44} {'measured':>12} {'wanted':>12}  met"]
    for t in targets:
        measured = "-" if t.measured is None else f"{t.measured:.2f}{t.unit}"
        wanted = f"{'≤' if t.at_most else '≥'} {t.limit:g}{t.unit}"
        met = {True: "yes", False: "NO", None: "not measured"}[t.met]
        lines.append(f"{t.name:<44} {measured:>12} {wanted:>12}  {met}")
    return lines


def write_results(prefix: str, doc: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    """``<UTC time>-<host>`` files plus the ``latest`` copies; returns the latest pair."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    host = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname())
    stem = f"{prefix}{stamp}-{host}"
    text = json.dumps(doc, indent=2, sort_keys=False) + "\n"
    (RESULTS / f"{stem}.json").write_text(text)
    (RESULTS / f"{stem}.md").write_text(markdown)
    latest_json, latest_md = RESULTS / f"{prefix}latest.json", RESULTS / f"{prefix}latest.md"
    latest_json.write_text(text)
    latest_md.write_text(markdown)
    return latest_json, latest_md


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
