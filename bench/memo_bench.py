"""A client that repeats itself byte for byte: what the per-connection memo saves.

    python -m bench.memo_bench [--rounds 5] [--requests 1500] [--connections 8] [--cache l1|l2|off]
    make bench-memo

vegeta numbers every request (an ``X-Vegeta-Seq`` header it always sends), so no two of its
requests carry the same header block and the memo never recalls one: ``make bench`` and
``make bench-revisions`` measure what the memo costs a client that never repeats itself, not
what it saves.  This benchmark drives the lab's PEP (the working tree, every stage on, the same
config as ``make bench``) with curl instead — one process per connection, each sending the
same request over one keep-alive connection, as a service calling an API does — once with
``listener.memo: true`` and once with ``false``, in interleaved rounds, and reports the PEP's
CPU milliseconds per request for both.  curl's own work runs on the driver's CPUs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import yaml

from bench import procfs
from bench.common import ROOT, tool, wait_http_sync
from bench.lab import CacheMode, Lab
from bench.stack import start_harness


def start_pep(lab: Lab, name: str, cache: CacheMode, *, memo: bool) -> tuple[subprocess.Popen[bytes], str]:
    """The lab's PEP from the working tree with ``listener.memo`` as given; (process, URL)."""
    config = lab.pep_config(name, cache)
    config["listener"]["memo"] = memo
    path = lab.work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    argv = [sys.executable, "-m", "vvault_pep.cli", "serve", "--config", str(path), "--log-level", "ERROR"]
    proc = lab.stack.start(name, argv, "sut", cwd=ROOT)
    wait_http_sync(f"http://127.0.0.1:{config['admin']['port']}/readyz", alive=proc)
    return proc, f"https://127.0.0.1:{config['listener']['port']}/v1/tenants/acme/secrets/db-password"


def curl_config(lab: Lab, url: str, requests: int) -> Path:
    """A curl config sending ``url`` ``requests`` times over one connection, answers discarded."""
    path = lab.work / f"curl-{abs(hash(url))}-{requests}.cfg"
    tls = lab.tls
    head = [
        "silent",
        f'cacert = "{tls.root}"',
        f'cert = "{tls.cert}"',
        f'key = "{tls.key}"',
        f'header = "Authorization: Bearer {lab.token}"',
        'write-out = "%{http_code}\\n"',
    ]
    body = [f'url = "{url}"\noutput = "/dev/null"' for _ in range(requests)]
    path.write_text("\n".join([*head, *body]) + "\n")
    return path


def attack(lab: Lab, cfg: Path, connections: int) -> tuple[int, int, float]:
    """(requests answered 200, other answers, seconds): ``connections`` curls at once."""
    started = time.perf_counter()
    # The harness runs on the driver's CPUs (start_harness): the curls it starts inherit them.
    procs = [
        subprocess.Popen(["curl", "--config", str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        for _ in range(connections)
    ]
    outs = [p.communicate()[0].decode().split() for p in procs]
    seconds = time.perf_counter() - started
    codes = [c for out in outs for c in out]
    ok = sum(1 for c in codes if c == "200")
    return ok, len(codes) - ok, seconds


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=1500, help="per connection and round")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--cache", choices=["l1", "l2", "off"], default="l1", help="the route's decision cache")
    parser.add_argument("--no-pin", dest="pin", action="store_false")
    args = parser.parse_args(argv)
    harness = start_harness(args.pin, tool)
    if harness is None:
        return 2
    _, pinning = harness
    lab = Lab(pinning, prefix="vvault-memo-")
    try:
        lab.start_services()
        peps = {
            flag: start_pep(lab, f"memo-{'on' if flag else 'off'}", args.cache, memo=flag) for flag in (True, False)
        }
        configs = {flag: curl_config(lab, url, args.requests) for flag, (_, url) in peps.items()}
        for flag in peps:  # warm-up: keys, caches, connections to OPA, Redis and the upstream
            attack(lab, curl_config(lab, peps[flag][1], 50), args.connections)
        print(
            f"{lab.stack.pinning.describe()}; {args.rounds} interleaved rounds, {args.connections} keep-alive "
            f"connections x {args.requests} identical requests, route cache {args.cache}",
            flush=True,
        )
        cpu: dict[bool, list[float]] = {True: [], False: []}
        rate: dict[bool, list[float]] = {True: [], False: []}
        for r in range(args.rounds):
            for flag in (True, False) if r % 2 == 0 else (False, True):
                proc = peps[flag][0]
                before = procfs.tree_cpu_seconds(proc.pid)
                ok, bad, seconds = attack(lab, configs[flag], args.connections)
                used = procfs.tree_cpu_seconds(proc.pid) - before
                if bad:
                    print(f"memo {'on' if flag else 'off'}: {bad} answers were not 200", file=sys.stderr)
                    return 1
                cpu[flag].append(used / ok * 1000)
                rate[flag].append(ok / seconds)
            print(f"  round {r + 1}/{args.rounds}: on {rate[True][-1]:.0f}/s, off {rate[False][-1]:.0f}/s", flush=True)
        off_cpu, off_rate = statistics.median(cpu[False]), statistics.median(rate[False])
        print(f"\n{'listener.memo':<14} {'req/s':>7} {'× off':>6} {'PEP CPU ms/req':>15} {'× off':>6}")
        for flag in (False, True):
            ms, rps = statistics.median(cpu[flag]), statistics.median(rate[flag])
            print(f"{str(flag).lower():<14} {rps:7.0f} {rps / off_rate:6.2f} {ms:15.3f} {ms / off_cpu:6.2f}")
        print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        return 0
    except KeyboardInterrupt:
        return 130
    finally:
        lab.close()


if __name__ == "__main__":
    sys.exit(main())
