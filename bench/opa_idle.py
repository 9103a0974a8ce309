"""What a quiet spell costs the OPA sidecar: decisions right after idling, alone and in a burst.

    python -m bench.opa_idle                     # idles of 10, 30 and 65 s, then a burst after 60 s
    python -m bench.opa_idle --idle 130 --burst-after 0

One OPA as the bench and deploy/ run it (the repo's policies, GOGC=400, GOMEMLIMIT=200MiB),
pinned to CPU 0; the input is ``examples/policy-input/read-secret.json``.  It is warmed with
200 decisions, then left alone for each ``--idle`` in turn and asked once (and once more right
after), with OPA's own timers (``?metrics=true``).  Then, after ``--burst-after`` seconds of
quiet, ``--burst`` clients ask at once on new connections: the slowest first answers.  A
last line touches 64 MB of new memory in this process, at once and after 20 s of quiet: on a
virtual machine whose host takes back idle guest memory the second is several times slower,
and most of the difference is not counted to the process as CPU time.
"""

from __future__ import annotations

import argparse
import asyncio
import mmap
import os
import resource
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import orjson

from .common import ROOT, free_port, opa_argv, opa_binary, opa_environ, wait_http_sync

PATH = "/v1/data/vvault/authz/decision"


def _body() -> bytes:
    doc = orjson.loads((ROOT / "examples/policy-input/read-secret.json").read_bytes())
    return orjson.dumps({"input": doc.get("input", doc)})


def ask(port: int, body: bytes) -> tuple[float, dict[str, float]]:
    """One decision: wall milliseconds and OPA's timers above 0.2 ms."""
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{PATH}?metrics=true", data=body, headers={"Content-Type": "application/json"}
    )
    started = time.perf_counter()
    with urllib.request.urlopen(req, timeout=10) as resp:
        doc = orjson.loads(resp.read())
    wall = (time.perf_counter() - started) * 1000
    timers = {k.removeprefix("timer_").removesuffix("_ns"): v / 1e6 for k, v in doc.get("metrics", {}).items()}
    return wall, {k: round(v, 2) for k, v in timers.items() if v > 0.2}


async def burst(port: int, body: bytes, clients: int) -> list[float]:
    """``clients`` new connections at once, one decision each: their answers' times in ms."""
    head = f"POST {PATH} HTTP/1.1\r\nHost: opa\r\nContent-Type: application/json\r\n".encode()
    request = head + b"Content-Length: %d\r\n\r\n" % len(body) + body

    async def one() -> float:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        started = time.perf_counter()
        writer.write(request)
        lines = (await reader.readuntil(b"\r\n\r\n")).split(b"\r\n")
        length = next(int(v.split(b":")[1]) for v in lines if v.lower().startswith(b"content-length"))
        await reader.readexactly(length)
        writer.close()
        return (time.perf_counter() - started) * 1000

    return sorted(await asyncio.gather(*(one() for _ in range(clients))))


def touch(mb: int = 64) -> tuple[float, float]:
    """Wall and system-CPU milliseconds to touch ``mb`` MB of new memory, one byte a page."""
    area = mmap.mmap(-1, mb << 20)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_stime
    started = time.perf_counter()
    for offset in range(0, mb << 20, mmap.PAGESIZE):
        area[offset] = 1
    wall = (time.perf_counter() - started) * 1000
    system = (resource.getrusage(resource.RUSAGE_SELF).ru_stime - before) * 1000
    area.close()
    return wall, system


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--idle", type=float, nargs="*", default=[10, 30, 65], help="quiet spells, seconds")
    parser.add_argument("--burst-after", type=float, default=60, help="quiet before the burst (0: no burst)")
    parser.add_argument("--burst", type=int, default=16, help="clients in the burst")
    args = parser.parse_args(argv)
    if not Path(opa_binary()).exists():
        print("OPA not found: run `make tools`", file=sys.stderr)
        return 2
    port = free_port()
    opa = subprocess.Popen(
        opa_argv(port),
        env=opa_environ(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=lambda: os.sched_setaffinity(0, {0}),
    )
    try:
        wait_http_sync(f"http://127.0.0.1:{port}/health", alive=opa)
        body = _body()
        for _ in range(200):
            ask(port, body)
        wall, timers = ask(port, body)
        print(f"warm: {wall:.1f} ms {timers}")
        for idle in args.idle:
            time.sleep(idle)
            wall, timers = ask(port, body)
            print(f"after {idle:g} s idle: {wall:.1f} ms {timers}; the next one {ask(port, body)[0]:.1f} ms")
        if args.burst_after > 0:
            time.sleep(args.burst_after)
            times = asyncio.run(burst(port, body, args.burst))
            print(
                f"{args.burst} at once after {args.burst_after:g} s idle: fastest {times[0]:.1f} ms, "
                f"median {times[len(times) // 2]:.1f} ms, slowest {times[-1]:.1f} ms"
            )
    finally:
        opa.terminate()
        opa.wait()
    hot = touch()
    time.sleep(20)
    cold = touch()
    print(
        f"64 MB of new memory: {hot[0]:.0f} ms (system CPU {hot[1]:.0f} ms) right after start, "
        f"{cold[0]:.0f} ms (system CPU {cold[1]:.0f} ms) after 20 s of quiet"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
