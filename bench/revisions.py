"""Before and after: the PEP at several git revisions, side by side in one run.

    python -m bench.revisions REV [REV ...] [--rounds 5] [--seconds 4] [--cache l1|l2|off]
    make bench-revisions REVS="3c3bc4e HEAD"

Each revision's ``proxy/`` is exported with ``git archive`` into the lab's work directory
and served by the same virtualenv with ``PYTHONPATH`` pointing at it, in the same lab as
``make bench`` (every stage on, pinned the same way).  The revisions are measured in
interleaved rounds, closed loop, and the table gives, per revision: the median throughput,
the ratio to the first revision, and the PEP's CPU milliseconds per request — the figure
that says what a change saved, whatever else the machine was doing.  ``WORKTREE`` stands
for the files as they are now, committed or not, with the compiled hot path when it is built
(``make compiled``; a stale build stops the PEP rather than measure the pure modules unsaid);
``WORKTREE-PURE`` for the same files on the pure modules.  An exported revision runs pure (no
build there).
"""

from __future__ import annotations

import argparse
import io
import statistics
import subprocess
import sys
import tarfile
from collections.abc import Sequence
from pathlib import Path

from bench import report
from bench.common import ROOT, tool
from bench.lab import CacheMode, Endpoint, Lab
from bench.proxy_bench import Bench, rounds_of
from bench.stack import start_harness
from bench.vegeta import Load, Vegeta

WORKTREE = "WORKTREE"
WORKTREE_PURE = "WORKTREE-PURE"
PURE = {"VVAULT_PEP_PURE": "1"}


def export(rev: str, into: Path) -> tuple[Path, str, dict[str, str]]:
    """``proxy/`` at ``rev`` under ``into``: the directory to put on PYTHONPATH, a title, the env."""
    if rev == WORKTREE_PURE:
        return ROOT / "proxy", "the files as they are now, pure modules", PURE
    if rev == WORKTREE:
        if (ROOT / "proxy" / "vvault_pep" / "compiled.json").exists():
            return ROOT / "proxy", "the files as they are now, compiled hot path", {"VVAULT_PEP_PURE": "0"}
        return ROOT / "proxy", "the files as they are now (not compiled)", PURE
    sha = _git("rev-parse", "--short", f"{rev}^{{commit}}")
    title = _git("log", "-1", "--format=%s", sha)
    archive = subprocess.run(["git", "archive", sha, "proxy"], cwd=ROOT, check=True, capture_output=True).stdout
    target = into / f"rev-{sha}"
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(target, filter="data")
    return target / "proxy", title, PURE


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "revisions", nargs="+", help=f"git revisions (the first is the baseline), {WORKTREE} or {WORKTREE_PURE}"
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--cache", choices=["l1", "l2", "off"], default="l1", help="the route's decision cache")
    parser.add_argument("--no-pin", dest="pin", action="store_false")
    args = parser.parse_args(argv)
    harness = start_harness(args.pin, tool)
    if harness is None:
        return 2
    tools, pinning = harness
    assert tools["vegeta"] is not None
    lab = Lab(pinning, prefix="vvault-revisions-")
    try:
        return run(lab, Vegeta(tools["vegeta"], lab.stack, lab.tls), args, tools)
    except KeyboardInterrupt:
        return 130
    finally:
        lab.close()


def run(lab: Lab, vegeta: Vegeta, args: argparse.Namespace, tools: dict[str, str | None]) -> int:
    bench = Bench(lab, vegeta)
    lab.start_services()
    cache: CacheMode = args.cache
    endpoints: list[Endpoint] = []
    titles: dict[str, str] = {}
    for i, rev in enumerate(args.revisions):
        code, title, env = export(rev, lab.work)
        name = f"{i}-{rev}"
        endpoints.append(lab.add_pep(name, cache, code=code, env=env))
        titles[name] = title
    lines = [
        f"{pinning_line(lab)}; {args.rounds} interleaved rounds of {args.seconds:g} s, closed loop, "
        f"{args.concurrency} connections, route cache {cache}"
    ]
    print(lines[0], flush=True)
    load = Load(0, args.concurrency, args.seconds)
    rates: dict[str, list[float]] = {ep.name: [] for ep in endpoints}
    cpu: dict[str, list[float]] = {ep.name: [] for ep in endpoints}
    for r, order in enumerate(rounds_of(endpoints, args.rounds), 1):
        for ep in order:
            bench.settle(ep, load)
            sample = bench.measure(ep, load)
            rates[ep.name].append(sample.report.throughput)
            per_1k = sample.per_1k(sample.proxy_cpu_s)
            if per_1k is not None:
                cpu[ep.name].append(per_1k)
        print(f"  round {r}/{args.rounds}: " + ", ".join(f"{n} {rates[n][-1]:.0f}/s" for n in rates), flush=True)
    if bench.failures:
        print("some answers were not 2xx: the figures are not comparable", file=sys.stderr)
        return 1
    base_rate = statistics.median(rates[endpoints[0].name])
    base_cpu = statistics.median(cpu[endpoints[0].name])
    lines.append(f"{'revision':<22} {'req/s':>7} {'× first':>8} {'PEP CPU ms/req':>15} {'× first':>8}  subject")
    for ep in endpoints:
        rate, ms = statistics.median(rates[ep.name]), statistics.median(cpu[ep.name])
        lines.append(
            f"{ep.name:<22} {rate:7.0f} {rate / base_rate:8.2f} {ms:15.3f} {ms / base_cpu:8.2f}  {titles[ep.name][:70]}"
        )
    print("\n" + "\n".join(lines[1:]))
    out = ROOT / "bench" / "results" / "revisions-latest.md"
    out.write_text(
        f"# vvault-pep before/after — {report.utc_now()}\n\n"
        f"`python -m bench.revisions {' '.join(args.revisions)}`\n\n"
        f"machine: {report.machine_line(report.machine(tools))}\n\n```text\n" + "\n".join(lines) + "\n```\n"
    )
    print(f"written: {out.relative_to(ROOT)}")
    return 0


def pinning_line(lab: Lab) -> str:
    return lab.stack.pinning.describe()


if __name__ == "__main__":
    sys.exit(main())
