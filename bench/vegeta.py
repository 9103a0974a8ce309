"""The load generator: vegeta, driven through its command line, read through its JSON report.

Two shapes of load:

* **closed loop** (``rate=0``): ``concurrency`` workers, each sending its next request as
  soon as the last answered, over that many keep-alive connections — throughput at
  saturation;
* **open loop** (``rate>0``): requests leave on a fixed schedule whether or not earlier ones
  answered, over at most ``concurrency`` connections — latency at a given load.  Far below
  saturation that leaves most connections idle and no request waits for a free one; a target
  that cannot keep the rate shows up as a lower achieved rate (reported).

Every proxied scenario gets the same request, the same TLS (client certificate, HTTP/1.1:
vegeta would speak HTTP/2 to a server that offers it, and only the Go peer does) and the same
keep-alive.  Targets come from a file in vegeta's HTTP format, one target per token.
"""

from __future__ import annotations

import base64
import json
import subprocess
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.stack import Side, Stack

OUT_OF_TARGETS = "no targets to attack"


@dataclass(frozen=True)
class ClientTls:
    root: Path
    cert: Path
    key: Path


@dataclass(frozen=True)
class Load:
    rate: int  # requests per second; 0 = closed loop
    concurrency: int
    seconds: float


@dataclass(frozen=True)
class Report:
    requests: int
    duration_s: float
    rate: float  # sent per second
    throughput: float  # successful answers per second
    success: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    status_codes: dict[str, int]
    errors: tuple[str, ...]
    files: tuple[Path, ...] = field(default=(), compare=False)

    @classmethod
    def parse(cls, doc: dict[str, Any], files: Sequence[Path]) -> Report:
        lat = doc["latencies"]
        return cls(
            requests=int(doc["requests"]),
            duration_s=(doc["duration"] + doc["wait"]) / 1e9,
            rate=float(doc["rate"]),
            throughput=float(doc["throughput"]),
            success=float(doc["success"]),
            p50_ms=lat["50th"] / 1e6,
            p90_ms=lat["90th"] / 1e6,
            p99_ms=lat["99th"] / 1e6,
            max_ms=lat["max"] / 1e6,
            status_codes={str(k): int(v) for k, v in (doc.get("status_codes") or {}).items()},
            errors=tuple(doc.get("errors") or ()),
            files=tuple(files),
        )

    @property
    def ran_out_of_targets(self) -> bool:
        return any(OUT_OF_TARGETS in e for e in self.errors)

    @property
    def all_2xx(self) -> bool:
        return self.requests > 0 and all(code.startswith("2") for code in self.status_codes)


def write_targets(path: Path, url: str, tokens: Iterable[str]) -> Path:
    with path.open("w") as f:
        for token in tokens:
            f.write(f"GET {url}\nAuthorization: Bearer {token}\n\n")
    return path


class Vegeta:
    def __init__(self, binary: str, stack: Stack, tls: ClientTls) -> None:
        self.binary = binary
        self.stack = stack
        self.tls = tls

    def attack(self, targets: Path, load: Load, out: Path, *, lazy: bool = False, side: Side = "driver") -> Report:
        self.stack.run(self.attack_argv(targets, load, out, lazy=lazy), side)
        return self.report([out])

    def attack_argv(self, targets: Path, load: Load, out: Path, *, lazy: bool = False) -> list[str]:
        argv = [
            self.binary,
            "attack",
            f"-targets={targets}",
            f"-output={out}",
            f"-duration={load.seconds}s",
            f"-rate={load.rate}/1s" if load.rate else "-rate=0",
            f"-workers={load.concurrency}",
            # Open loop too keeps to ``concurrency`` connections: more workers would open new
            # connections whenever answers slow down, and a TLS handshake with a client
            # certificate costs the proxy more than many requests — a spiral that measures
            # handshakes.  A target that cannot keep the rate shows as a missed rate.
            f"-max-workers={load.concurrency}",
            "-http2=false",
            "-keepalive=true",
            "-timeout=10s",
            "-max-body=2048",
            f"-root-certs={self.tls.root}",
            f"-cert={self.tls.cert}",
            f"-key={self.tls.key}",
        ]
        if lazy:
            argv.append("-lazy")  # read as needed: a run that outlasts the tokens stops, never reuses one
        return argv

    def report(self, files: Sequence[Path]) -> Report:
        done = self.stack.run([self.binary, "report", "-type=json", *map(str, files)], "driver", stdout=subprocess.PIPE)
        return Report.parse(json.loads(done.stdout), files)

    def failures(self, files: Sequence[Path], limit: int = 5) -> list[str]:
        """The distinct non-2xx answers (status, error, body) with their counts, most common first."""
        seen: Counter[tuple[int, str, str]] = Counter()
        for path in files:
            done = self.stack.run([self.binary, "encode", "-to=json", str(path)], "driver", stdout=subprocess.PIPE)
            for line in done.stdout.splitlines():
                hit = json.loads(line)
                if 200 <= hit["code"] < 300:
                    continue
                body = base64.b64decode(hit.get("body") or b"").decode("utf-8", "replace")
                seen[(hit["code"], hit.get("error", ""), body[:400])] += 1
        return [
            f"{count} × HTTP {code}" + (f" error={error!r}" if error else "") + (f" body={body!r}" if body else "")
            for (code, error, body), count in seen.most_common(limit)
        ]
