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
from pathlib import Path

import aiohttp
import orjson

from bench.common import ROOT, free_port, opa_argv, wait_http

INPUTS = ROOT / "examples" / "policy-input"
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


async def measure(args: argparse.Namespace) -> int:
    bodies = []
    for path in sorted(INPUTS.glob("*.json")):
        doc = orjson.loads(path.read_bytes())
        bodies.append(orjson.dumps({"input": doc.get("input", doc)}))
    procs: dict[str, tuple[subprocess.Popen[bytes], str]] = {}
    try:
        for name, env in SETTINGS.items():
            port = free_port()
            proc = subprocess.Popen(
                opa_argv(port),
                env={**{k: v for k, v in os.environ.items() if not k.startswith("GO")}, **env},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            procs[name] = (proc, f"http://127.0.0.1:{port}")
        for _, url in procs.values():
            await wait_http(url + "/health")
        urls = {name: url + "/v1/data/vvault/authz/decision?provenance=true" for name, (_, url) in procs.items()}
        for url in urls.values():  # warm up: the first evaluations compile and grow the heap
            await decide(url, bodies, 300, args.concurrency)
        per: dict[str, list[float]] = {name: [] for name in SETTINGS}
        for r in range(args.rounds):
            order = list(SETTINGS) if r % 2 == 0 else list(reversed(SETTINGS))
            for name in order:
                pid = procs[name][0].pid
                before = cpu_s(pid)
                await decide(urls[name], bodies, args.decisions, args.concurrency)
                per[name].append((cpu_s(pid) - before) / args.decisions * 1000)
        base = statistics.median(per[next(iter(SETTINGS))])
        print(f"OPA CPU per decision, {args.rounds} interleaved rounds of {args.decisions} decisions")
        print(f"{'setting':<40} {'ms per decision, each round':<36} {'median':>7} {'ratio':>6} {'peak RSS':>9}")
        for name, values in per.items():
            med = statistics.median(values)
            rounds = " ".join(f"{v:.3f}" for v in values)
            rss = peak_rss_mb(procs[name][0].pid)
            print(f"{name:<40} {rounds:<36} {med:7.3f} {med / base:6.2f} {rss:6.1f} MB")
        return 0
    finally:
        for proc, _ in procs.values():
            proc.terminate()
            proc.wait(timeout=10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--decisions", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=4)
    return asyncio.run(measure(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
