"""What one policy-module check costs a PEP without bundles: the listing decoded whole or without its AST.

    python -m bench.module_check [--checks 30] [--policies DIR]

Starts the real OPA with the repo's policies (or ``--policies``), fetches ``GET /v1/policies``
once and then, in two child interpreters side by side, names the revision from it ``--checks``
times: one decodes the whole answer with orjson (what the PEP did before), the other reads
each module's id and source only (``decide/modules.py``).  Between two checks each child
keeps 3,000 new 300-byte objects, as a PEP whose caches fill between checks keeps its new
entries.  It prints the median time of one check (what it holds the event loop for) and what
the process's RSS grew by over all checks beyond what the kept objects need alone.  Both must
name the same revision.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import ROOT, free_port, opa_argv, opa_environ, wait_http_sync
from bench.procfs import status_mb

KEPT_PER_CHECK = 3_000
KEPT_BYTES = 300


def child(way: str, path: Path, checks: int) -> dict[str, Any]:
    """In this process: ``checks`` revisions named from the listing at ``path``, the ``way`` asked."""
    import orjson

    from vvault_pep.decide.modules import sources

    listing = path.read_bytes()

    def whole() -> list[tuple[str, str]]:
        doc = orjson.loads(listing)
        return sorted((str(m.get("id")), str(m.get("raw"))) for m in doc.get("result") or [] if isinstance(m, dict))

    def nothing() -> list[tuple[str, str]]:
        return []

    name = {"whole": whole, "sources": lambda: sources(listing), "none": nothing}[way]
    kept: list[list[bytes]] = []
    times = []
    revision = ""
    start = status_mb(os.getpid(), "VmRSS")
    for _ in range(checks):
        began = time.perf_counter()
        revision = "p:" + hashlib.sha256(orjson.dumps(name())).hexdigest()[:32]
        times.append(time.perf_counter() - began)
        kept.append([bytes(KEPT_BYTES) for _ in range(KEPT_PER_CHECK)])
    return {
        "ms": statistics.median(times) * 1000,
        "grew_mb": status_mb(os.getpid(), "VmRSS") - start,
        "revision": revision,
    }


def run(way: str, path: Path, checks: int) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "bench.module_check", "--child", way, "--listing", str(path), "--checks", str(checks)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checks", type=int, default=30)
    parser.add_argument("--policies", type=Path, default=ROOT / "policies")
    parser.add_argument("--child", choices=("whole", "sources", "none"), help=argparse.SUPPRESS)
    parser.add_argument("--listing", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.listing, args.checks)))
        return 0
    port = free_port()
    opa = subprocess.Popen(
        opa_argv(port, policies=args.policies),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=opa_environ(),
    )
    try:
        wait_http_sync(f"http://127.0.0.1:{port}/health", alive=opa)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/policies", timeout=10) as resp:
            listing = resp.read()
    finally:
        opa.terminate()
        opa.wait(10)
    with tempfile.TemporaryDirectory(prefix="vvault-module-check-") as tmp:
        path = Path(tmp) / "policies.json"
        path.write_bytes(listing)
        kept = run("none", path, args.checks)
        figures = {way: run(way, path, args.checks) for way in ("whole", "sources")}
    print(f"GET /v1/policies: {len(listing) / 1000:.0f} KB for {args.policies}; {args.checks} checks")
    print(f"{'decoded':10} {'ms per check':>13} {'RSS grown beyond the kept objects':>35}")
    for way, fig in figures.items():
        print(f"{way:10} {fig['ms']:13.2f} {fig['grew_mb'] - kept['grew_mb']:32.1f} MB")
    whole, only = figures["whole"], figures["sources"]
    print(f"time per check: {only['ms'] / whole['ms']:.2f}× the whole decode's")
    same = whole["revision"] == only["revision"]
    print(f"same revision: {'yes' if same else 'NO'} ({whole['revision']})")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
