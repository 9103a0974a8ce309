"""OPA's CPU per decision under Go's collector settings, side by side.

    python -m bench.opa_gc [--decisions 2000] [--rounds 5] [--concurrency 4]

Starts one OPA server per setting (the repo's policies, loopback TCP), sends each the same
decisions (``POST /v1/data/vvault/authz/decision?provenance=true`` with the example inputs in
``examples/policy-input/``, keep-alive, as the PEP asks), in interleaved rounds so that the
machine's drift hits every setting alike, and prints each one's CPU per decision (utime +
stime of the OPA process from ``/proc``, per round and the median), the ratio of its median
to Go's default, and its peak RSS.  The settings: Go's default (GOGC=100), GOGC=200, and
GOGC=400 with and without GOMEMLIMIT=200MiB (what deploy/ ships).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import orjson

from bench.common import ROOT, free_port, opa_argv, wait_http

INPUTS = ROOT / "examples" / "policy-input"
DECISION_PATH = "vvault/authz/decision"  # what the PEP asks for a vvault route
SETTINGS: dict[str, dict[str, str]] = {
    "Go's default (GOGC=100)": {},
    "GOGC=200": {"GOGC": "200"},
    "GOGC=400": {"GOGC": "400"},
    "GOGC=400 GOMEMLIMIT=200MiB (deploy/)": {"GOGC": "400", "GOMEMLIMIT": "200MiB"},
}


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def decide(url: str, bodies: list[bytes], n: int, concurrency: int) -> None:
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, skip_auto_headers=("Accept-Encoding",)) as http:

        async def worker(k: int) -> None:
            for i in range(k, n, concurrency):
                body = bodies[i % len(bodies)]
                async with http.post(url, data=body, headers={"Content-Type": "application/json"}) as resp:
                    if resp.status != 200:
                        raise SystemExit(f"OPA answered {resp.status}: {await resp.text()}")
                    await resp.read()

        await asyncio.gather(*(worker(k) for k in range(concurrency)))


@dataclass(frozen=True)
class Setup:
    """One OPA of a side-by-side run: its environment beside the machine's (no GO* of the
    machine's own) and its policy directory."""

    env: dict[str, str]
    policies: Path = ROOT / "policies"


@dataclass(frozen=True)
class Measured:
    per_round_ms: list[float]  # OPA CPU per decision in each round
    peak_rss_mb: float

    @property
    def median_ms(self) -> float:
        return statistics.median(self.per_round_ms)


def example_bodies(inputs: Path = INPUTS) -> list[bytes]:
    """The decision request bodies for the inputs in ``inputs`` (``{"input": …}`` or a bare input)."""
    bodies = []
    for path in sorted(inputs.glob("*.json")):
        doc = orjson.loads(path.read_bytes())
        bodies.append(orjson.dumps({"input": doc.get("input", doc)}))
    if not bodies:
        raise SystemExit(f"no *.json inputs in {inputs}")
    return bodies


async def side_by_side(
    setups: dict[str, Setup],
    bodies: list[bytes],
    *,
    decisions: int,
    rounds: int,
    concurrency: int,
    path: str = DECISION_PATH,
) -> dict[str, Measured]:
    """One OPA server per setup, the same decisions to each in interleaved rounds (the order
    reversed every other round), each one's CPU per decision from /proc."""
    procs: dict[str, tuple[subprocess.Popen[bytes], str]] = {}
    try:
        for name, setup in setups.items():
            port = free_port()
            proc = subprocess.Popen(
                opa_argv(port, policies=setup.policies),
                env={**{k: v for k, v in os.environ.items() if not k.startswith("GO")}, **setup.env},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            procs[name] = (proc, f"http://127.0.0.1:{port}")
        for _, url in procs.values():
            await wait_http(url + "/health")
        urls = {name: f"{url}/v1/data/{path}?provenance=true" for name, (_, url) in procs.items()}
        for url in urls.values():  # warm up: the first evaluations compile and grow the heap
            await decide(url, bodies, 300, concurrency)
        per: dict[str, list[float]] = {name: [] for name in setups}
        for r in range(rounds):
            order = list(setups) if r % 2 == 0 else list(reversed(setups))
            for name in order:
                pid = procs[name][0].pid
                before = cpu_s(pid)
                await decide(urls[name], bodies, decisions, concurrency)
                per[name].append((cpu_s(pid) - before) / decisions * 1000)
        return {name: Measured(per[name], peak_rss_mb(procs[name][0].pid)) for name in setups}
    finally:
        for proc, _ in procs.values():
            proc.terminate()
            proc.wait(timeout=10)


async def measure(args: argparse.Namespace) -> int:
    setups = {name: Setup(env) for name, env in SETTINGS.items()}
    results = await side_by_side(
        setups, example_bodies(), decisions=args.decisions, rounds=args.rounds, concurrency=args.concurrency
    )
    base = results[next(iter(SETTINGS))].median_ms
    print(f"OPA CPU per decision, {args.rounds} interleaved rounds of {args.decisions} decisions")
    print(f"{'setting':<40} {'ms per decision, each round':<36} {'median':>7} {'ratio':>6} {'peak RSS':>9}")
    for name, m in results.items():
        rounds = " ".join(f"{v:.3f}" for v in m.per_round_ms)
        print(f"{name:<40} {rounds:<36} {m.median_ms:7.3f} {m.median_ms / base:6.2f} {m.peak_rss_mb:6.1f} MB")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--decisions", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=4)
    return asyncio.run(measure(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
