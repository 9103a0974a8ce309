"""Side by side: the PEP against a bare proxy of the same stack, in one run.

    python -m bench.proxy_bench [--seconds 3] [--rounds 5] [--concurrency 16]

Scenarios, interleaved round by round so machine drift hits them alike:

    direct        client → example upstream (plain HTTP, no proxy)
    passthrough   bare aiohttp reverse proxy with the same mTLS, pooling and streaming
    pep-l1        vvault-pep, every stage on, decision from its in-process cache
    pep-opa       vvault-pep with `cache: off`: OPA asked on every request

Closed loop at fixed concurrency.  Prints, per scenario, the median throughput over the
rounds, p50/p99 latency, the ratio to passthrough, and the CPU seconds the proxy process
spent per 1,000 requests.  The load generator is Python on the same machine (a first
harness; the full one with an external generator and more scenarios is issue 8): read the
ratios, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from examples.pki import make_pki

from bench.cache_bench import free_port, start_opa, wait_http

ROOT = Path(__file__).resolve().parent.parent
PATH = "/v1/tenants/acme/secrets/db-password"
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def pep_config(pki: Path, opa_port: int, up_port: int, cache: bool) -> dict[str, Any]:
    return {
        "listener": {"host": "127.0.0.1", "port": free_port(), "tls": {
            "cert_file": str(pki / "server.pem"), "key_file": str(pki / "server-key.pem"),
            "client_ca_file": str(pki / "ca.pem")}},
        "admin": {"host": "127.0.0.1", "port": free_port()},
        "opa": {"url": f"http://127.0.0.1:{opa_port}", "timeout_ms": 1000},
        "audit": {"sinks": [{"type": "file", "path": os.devnull}]},
        "cache": {"default_ttl_s": 300, "max_ttl_s": 300},
        "upstreams": {"vvault": {"url": f"http://127.0.0.1:{up_port}"}},
        "routes": [{"name": "secrets", "path": "/v1/tenants/{tenant}/secrets/{path*}", "methods": ["GET"],
                    "upstream": "vvault", "policy": "vvault/authz/decision",
                    "cache": {"ttl_s": 300} if cache else "off"}],
    }  # fmt: skip


async def load(url: str, ctx: ssl.SSLContext | None, seconds: float, concurrency: int) -> tuple[int, list[float]]:
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    connector = aiohttp.TCPConnector(ssl=ctx if ctx is not None else False, limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def worker() -> None:
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                async with http.get(url) as resp:
                    await resp.read()
                    if resp.status != 200:
                        raise RuntimeError(f"{url}: HTTP {resp.status}")
                latencies.append((time.perf_counter() - started) * 1000)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return len(latencies), latencies


async def main(seconds: float, rounds: int, concurrency: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="vvault-proxy-bench-"))
    pki = make_pki(work / "pki")
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        opa_port, up_port, pt_port = free_port(), free_port(), free_port()
        procs["opa"] = start_opa(opa_port)
        procs["upstream"] = subprocess.Popen(
            [sys.executable, "-m", "examples.vvault_api.app", "--port", str(up_port)],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        procs["passthrough"] = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.passthrough",
                "--port",
                str(pt_port),
                "--upstream",
                f"http://127.0.0.1:{up_port}",
                "--pki",
                str(pki),
            ],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
        )
        ports = {"passthrough": pt_port}
        for name, cache in (("pep-l1", True), ("pep-opa", False)):
            cfg = pep_config(pki, opa_port, up_port, cache)
            path = work / f"{name}.yaml"
            path.write_text(yaml.safe_dump(cfg))
            procs[name] = subprocess.Popen(
                [sys.executable, "-m", "vvault_pep.cli", "serve", "--config", str(path), "--log-level", "ERROR"],
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
            )
            ports[name] = cfg["listener"]["port"]
            await wait_http(f"http://127.0.0.1:{cfg['admin']['port']}/readyz")
        await wait_http(f"http://127.0.0.1:{up_port}/v1/tenants/acme/collections")
        ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        ctx.load_cert_chain(str(pki / "client-reader.pem"), str(pki / "client-reader-key.pem"))
        scenarios: dict[str, tuple[str, ssl.SSLContext | None, str | None]] = {
            "direct": (f"http://127.0.0.1:{up_port}{PATH}", None, None),
            "passthrough": (f"https://localhost:{ports['passthrough']}{PATH}", ctx, "passthrough"),
            "pep-l1": (f"https://localhost:{ports['pep-l1']}{PATH}", ctx, "pep-l1"),
            "pep-opa": (f"https://localhost:{ports['pep-opa']}{PATH}", ctx, "pep-opa"),
        }
        for url, c, _ in scenarios.values():  # warm-up
            await load(url, c, 0.5, concurrency)
        rates: dict[str, list[float]] = {n: [] for n in scenarios}
        lats: dict[str, list[float]] = {n: [] for n in scenarios}
        cpu: dict[str, list[float]] = {n: [] for n in scenarios}
        for _ in range(rounds):
            for name, (url, c, proc) in scenarios.items():
                before = cpu_seconds(procs[proc].pid) if proc else 0.0
                count, latencies = await load(url, c, seconds, concurrency)
                if proc:
                    cpu[name].append((cpu_seconds(procs[proc].pid) - before) / count * 1000)
                rates[name].append(count / seconds)
                lats[name].extend(latencies)
        base = statistics.median(rates["passthrough"])
        print(
            f"\n{rounds} interleaved rounds of {seconds:g} s per scenario, concurrency {concurrency}, "
            f"{os.cpu_count()} cores (load generator on the same machine)"
        )
        print(f"{'scenario':<12} {'req/s':>8} {'× pass':>7} {'p50 ms':>8} {'p99 ms':>8} {'proxy CPU s/1k':>15}")
        for name in scenarios:
            ordered = sorted(lats[name])
            p50, p99 = ordered[len(ordered) // 2], ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
            c = f"{statistics.median(cpu[name]):.3f}" if cpu[name] else "-"
            print(
                f"{name:<12} {statistics.median(rates[name]):8.0f} {statistics.median(rates[name]) / base:7.2f} "
                f"{p50:8.2f} {p99:8.2f} {c:>15}"
            )
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    asyncio.run(main(args.seconds, args.rounds, args.concurrency))
