"""Decision-cache benchmark: what a hit saves against asking OPA.

    python -m bench.cache_bench [--requests 3000] [--rounds 10]

Starts everything on loopback — the example upstream, OPA with the repo's
policies, redis-server, two `vvault-pep serve` processes (one with L1 + L2,
one with L1 switched off so every hit comes from Redis) — then sends the same
allowed request over mTLS, one at a time, through three scenarios:

    l1   cache on, answer from this process's memory
    l2   cache on, answer from Redis
    opa  `cache: off`, OPA asked every time

Scenarios are interleaved in rounds so machine drift hits them alike.  It
prints median / p90 / p99 latency, the ratio of each median to the opa
scenario's, and how many OPA calls the cache saved (from /admin/cache).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
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

from bench.common import ADMIN_TOKEN, PATH, ROOT, free_port, start_opa, wait_http


def pep_config(pki: Path, opa_port: int, up_port: int, redis_port: int, l1: bool) -> dict[str, Any]:
    route = {
        "path": "/v1/tenants/{tenant}/secrets/{path*}",
        "methods": ["GET"],
        "upstream": "vvault",
        "policy": "vvault/authz/decision",
    }
    return {
        "listener": {
            "host": "127.0.0.1",
            "port": free_port(),
            "tls": {
                "cert_file": str(pki / "server.pem"),
                "key_file": str(pki / "server-key.pem"),
                "client_ca_file": str(pki / "ca.pem"),
            },
        },
        "admin": {"host": "127.0.0.1", "port": free_port(), "token": ADMIN_TOKEN},
        "opa": {"url": f"http://127.0.0.1:{opa_port}", "timeout_ms": 1000},
        "redis": {"url": f"redis://127.0.0.1:{redis_port}/0", "timeout_ms": 200},
        "cache": {"l1_max_entries": 10000 if l1 else 0, "default_ttl_s": 300, "max_ttl_s": 300},
        "identity": {"workload": {"trust_domains": ["demo.vvault"]}},
        "upstreams": {"vvault": {"url": f"http://127.0.0.1:{up_port}"}},
        "routes": [
            {**route, "name": "hit", "host": "hit.bench", "cache": {"ttl_s": 300}},
            {**route, "name": "miss", "host": "miss.bench", "cache": "off"},
        ],
    }


async def measure(port: int, host: str, ctx: ssl.SSLContext, n: int, out: list[float]) -> None:
    connector = aiohttp.TCPConnector(ssl=ctx, limit=1)
    async with aiohttp.ClientSession(connector=connector) as http:
        url = f"https://localhost:{port}{PATH}"
        for _ in range(n):
            started = time.perf_counter()
            async with http.get(url, headers={"Host": host}) as resp:
                await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"{host}: HTTP {resp.status}")
            out.append((time.perf_counter() - started) * 1000)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def main(requests: int, rounds: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="vvault-bench-"))
    pki = make_pki(work / "pki")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        opa_port, up_port, redis_port = free_port(), free_port(), free_port()
        procs.append(start_opa(opa_port))
        procs.append(
            subprocess.Popen(
                ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                stdout=subprocess.DEVNULL,
            )
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "examples.vvault_api.app", "--port", str(up_port)],
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        configs = []
        for l1 in (True, False):
            cfg = pep_config(pki, opa_port, up_port, redis_port, l1)
            path = work / f"pep-{'l1' if l1 else 'l2'}.yaml"
            path.write_text(yaml.safe_dump(cfg))
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "vvault_pep.cli", "serve", "--config", str(path), "--log-level", "ERROR"],
                    cwd=ROOT,
                    stdout=subprocess.DEVNULL,
                )
            )
            configs.append(cfg)
        await wait_http(f"http://127.0.0.1:{opa_port}/health")
        for cfg in configs:
            await wait_http(f"http://127.0.0.1:{cfg['admin']['port']}/readyz")
        ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        ctx.load_cert_chain(str(pki / "client-reader.pem"), str(pki / "client-reader-key.pem"))
        scenarios = {
            "l1": (configs[0]["listener"]["port"], "hit.bench"),
            "l2": (configs[1]["listener"]["port"], "hit.bench"),
            "opa": (configs[0]["listener"]["port"], "miss.bench"),
        }
        samples: dict[str, list[float]] = {name: [] for name in scenarios}
        for port, host in scenarios.values():  # warm-up: connections, JIT-free but caches filled
            await measure(port, host, ctx, 50, [])
        per_round = max(1, requests // rounds)
        for _ in range(rounds):
            for name, (port, host) in scenarios.items():
                await measure(port, host, ctx, per_round, samples[name])
        stats = {}
        async with aiohttp.ClientSession() as http:
            for label, cfg in (("l1+l2 instance", configs[0]), ("l2-only instance", configs[1])):
                async with http.get(
                    f"http://127.0.0.1:{cfg['admin']['port']}/admin/cache",
                    headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                ) as resp:
                    stats[label] = (await resp.json())["cache"]
        base = statistics.median(samples["opa"])
        print(
            f"\ndecision cache, {per_round * rounds} sequential mTLS requests per scenario, {rounds} interleaved rounds"
        )
        print(f"{'scenario':<8} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'p50 / opa':>10}")
        for name, values in samples.items():
            median = statistics.median(values)
            print(f"{name:<8} {median:8.3f} {pct(values, 0.9):8.3f} {pct(values, 0.99):8.3f} {median / base:10.2f}")
        for label, counters in stats.items():
            asked = counters["miss"] + counters["bypass"]
            served = counters["l1"] + counters["l2"]
            print(
                f"{label}: OPA asked {asked} times, cache answered {served} "
                f"(l1 {counters['l1']}, l2 {counters['l2']}, bypass {counters['bypass']})"
            )
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    asyncio.run(main(args.requests, args.rounds))
