"""Side by side: the PEP against a bare proxy of the same stack and a well-known peer, in one run.

    python -m bench.proxy_bench                 # make bench: 5 rounds of 5 s, 1 vs 2 workers
    python -m bench.proxy_bench --quick         # make bench-quick: under 2 minutes
    python -m bench.proxy_bench --no-pin --concurrency 32 --scenarios passthrough,pep-l1

Everything starts on loopback (bench/lab.py): the example upstream, OPA with the repo's
policies, redis-server, the proxies, the peer.  Load comes from vegeta over mTLS.  Scenarios
(each sends ``GET /v1/tenants/acme/secrets/db-password`` with a bearer token):

    direct          client → upstream, plain HTTP, no proxy
    passthrough     bench/passthrough.py: bare aiohttp reverse proxy, same mTLS, keep-alive,
                    streaming, nothing else — the limit of this stack
    caddy           Caddy v2.11.9 doing the same (client certificates required and verified,
                    HTTP/1.1, keep-alive upstream, no access log) — the anchor of another stack
    pep-l1          the PEP, every stage on, decision from its in-process cache
    pep-l2          the same with L1 off (cache.l1_max_entries: 0): decisions from Redis
    pep-l1-cluster  pep-l1 on a three-master Redis Cluster (skipped, saying why, if the
    pep-l2-cluster  cluster cannot start here); pep-l2 likewise
    pep-opa         the same with the route's cache off: OPA asked on every request
    pep-cold-token  cache on, a token never seen before on every request (signature checked
                    each time; the token's jti is part of the default decision-cache key, so
                    OPA is asked too)
    peer            oauth2-proxy validating the same JWTs and forwarding (TLS without
                    client-certificate verification: it does less)

Phases, each interleaved round by round (the starting scenario rotates) so drift hits all
alike: warm-up; throughput at saturation (closed loop, ``--concurrency`` connections);
latency at a fixed rate of half the passthrough's saturation (open loop); and, in the full
run, pep-l1 with ``--workers 1`` against ``--workers 2``.  Every measured visit is preceded
by ``--settle`` seconds of the same load, not measured: a scenario comes to its round after
sitting idle while the others ran, and on a virtual machine whose host takes back idle guest
memory the first fraction of a second after idle measures the machine waking, not the proxy
(see docs/performance.md).  Any non-2xx answer in a measured visit fails the scenario: its answers
are printed and no figures are shown for it; those in a settling visit are counted and shown
in the notes ("coming out of idle").
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import report
from bench.common import tool
from bench.lab import Endpoint, Lab
from bench.procfs import cpu_seconds, peak_rss_per_process, tree_cpu_seconds
from bench.report import Column, Target
from bench.stack import Side, start_harness
from bench.vegeta import Load, Report, Vegeta, write_targets

SCENARIOS: dict[str, str] = {
    "direct": "client → upstream, plain HTTP, no proxy",
    "passthrough": "bare aiohttp reverse proxy, same mTLS, keep-alive and streaming, nothing else",
    "caddy": "Caddy v2 (Go) as a bare mTLS reverse proxy: the best-known proxy of another stack",
    "pep-l1": "the PEP, every stage on, decision from the in-process cache",
    "pep-l2": "the PEP with L1 off: decisions from Redis",
    "pep-l1-cluster": "pep-l1 with Redis a three-master Cluster",
    "pep-l2-cluster": "pep-l2 with Redis a three-master Cluster: decisions from the Cluster",
    "pep-opa": "the PEP with the route's cache off: OPA on every request",
    "pep-cold-token": "cache on, a new token on every request (signature + OPA each time)",
    "peer": "oauth2-proxy v7 validating the same JWTs (no client-certificate verification)",
}
PEER_NOTE = (
    "peer: oauth2-proxy terminates TLS but cannot verify client certificates, so its handshakes "
    "and requests carry less work than the passthrough's and the PEP's; it verifies the token's "
    "signature on every request (no verified-token cache) and does no policy decision, no risk, "
    "no Redis, no audit record (its request log goes to a file)."
)
COLD_NOTE = (
    "pep-cold-token: every request carries a token never seen before; the PEP checks its "
    "signature and, since the token's jti and exp are part of the default whole-input "
    "decision-cache key, asks OPA and stores a new cache entry as well."
)
COLUMNS = (
    Column("scenario", "scenario", "", 14),
    Column("req/s", "throughput_rps", ".0f", 7),
    Column("× pass", "ratio", ".2f", 6),
    Column("p50 ms", "p50_ms", ".2f", 7),
    Column("p90 ms", "p90_ms", ".2f", 7),
    Column("p99 ms", "p99_ms", ".2f", 7),
    Column("+p50 ms", "added_p50_ms", "+.2f", 7),
    Column("+p99 ms", "added_p99_ms", "+.2f", 7),
    Column("proxy CPU s/1k", "proxy_cpu_s_per_1k", ".3f", 14),
    Column("OPA CPU s/1k", "opa_cpu_s_per_1k", ".3f", 12),
    Column("peak RSS MB", "peak_rss_mb", ".1f", 11),
)
WORKER_COLUMNS = (
    Column("PEP", "scenario", "", 14),
    Column("req/s", "throughput_rps", ".0f", 7),
    Column("× 1 worker", "ratio", ".2f", 10),
    Column("proxy CPU s/1k", "proxy_cpu_s_per_1k", ".3f", 14),
    Column("peak RSS MB/worker", "peak_rss_mb", ".1f", 18),
)
RSS_LIMIT_MB = 90.0  # per worker
WORKERS_SCALE = 1.5
STALL_MS = 1000.0  # an answer this slow is a stall worth showing as it happens


@dataclass(frozen=True)
class Sample:
    report: Report
    proxy_cpu_s: float | None
    opa_cpu_s: float
    redis_cpu_s: float

    def per_1k(self, seconds: float | None) -> float | None:
        if seconds is None or self.report.requests == 0:
            return None
        return seconds / self.report.requests * 1000


@dataclass
class Bench:
    """Runs attacks against the lab's endpoints and keeps what each one measured."""

    lab: Lab
    vegeta: Vegeta
    failures: dict[str, list[str]] = field(default_factory=dict)
    settle_s: float = 1.0
    # Non-2xx answers in the unmeasured seconds before a visit, per scenario: "coming out of idle".
    cold: dict[str, dict[str, int]] = field(default_factory=dict)
    best_rate: dict[str, float] = field(default_factory=dict)
    _fixed: dict[str, Path] = field(default_factory=dict)
    _serial: itertools.count[int] = field(default_factory=itertools.count)

    def settle(self, ep: Endpoint, load: Load, side: Side = "driver") -> None:
        """The same load for ``settle_s``, unmeasured: the scenario out of idle before its visit."""
        if self.settle_s > 0:
            self.measure(ep, Load(load.rate, load.concurrency, self.settle_s), side, settling=True)

    def measure(self, ep: Endpoint, load: Load, side: Side = "driver", *, settling: bool = False) -> Sample:
        n = next(self._serial)
        out = self.lab.work / f"{ep.name}-{n}.bin"
        supply = self._supply(ep, load)
        for _attempt in range(3):
            targets = self._targets(ep, n, supply)
            before = self._cpu(ep)
            result = self.vegeta.attack(targets, load, out, lazy=ep.cold_tokens, side=side)
            after = self._cpu(ep)
            if ep.cold_tokens:
                targets.unlink()
            if not result.ran_out_of_targets:
                break
            supply *= 3  # too few fresh tokens for this rate: never reuse one, attack again
        else:
            raise RuntimeError(f"{ep.name}: could not pre-sign enough tokens ({supply})")
        self.best_rate[ep.name] = max(self.best_rate.get(ep.name, 0.0), result.throughput)
        if settling:
            self._cold(ep, result)
        elif not result.all_2xx:
            self._fail(ep, result)
        return Sample(
            result,
            None if before[0] is None or after[0] is None else after[0] - before[0],
            after[1] - before[1],
            after[2] - before[2],
        )

    def _supply(self, ep: Endpoint, load: Load) -> int:
        if not ep.cold_tokens:
            return 1
        if load.rate:
            return int(load.rate * load.seconds * 1.1) + 100
        return int(self.best_rate.get(ep.name, 3000.0) * load.seconds * 2) + 500

    def _targets(self, ep: Endpoint, n: int, supply: int) -> Path:
        if ep.cold_tokens:
            path = self.lab.work / f"targets-{ep.name}-{n}.txt"
            return write_targets(path, ep.url, self.lab.issuer.fresh_tokens(supply))
        if ep.name not in self._fixed:
            path = self.lab.work / f"targets-{ep.name}.txt"
            self._fixed[ep.name] = write_targets(path, ep.url, [self.lab.token])
        return self._fixed[ep.name]

    def _cpu(self, ep: Endpoint) -> tuple[float | None, float, float]:
        procs = self.lab.stack.procs
        proxy = tree_cpu_seconds(procs[ep.proc].pid) if ep.proc else None
        return proxy, cpu_seconds(procs["opa"].pid), cpu_seconds(procs["redis"].pid)

    def _cold(self, ep: Endpoint, result: Report) -> None:
        bad = {code: n for code, n in result.status_codes.items() if not code.startswith("2")}
        if not bad:
            return
        seen = self.cold.setdefault(ep.name, {})
        for code, n in bad.items():
            seen[code] = seen.get(code, 0) + n
        print(f"  ({ep.name} coming out of idle, not measured: {bad})", file=sys.stderr, flush=True)
        for line in (self.lab.stack.log_tail(ep.proc, 2) if ep.proc else "").splitlines():
            print(f"  ({ep.proc} log: {line})", file=sys.stderr)

    def _fail(self, ep: Endpoint, result: Report) -> None:
        details = self.vegeta.failures(list(result.files))
        self.failures.setdefault(ep.name, []).extend(details)
        print(f"\n!!! {ep.name}: non-2xx answers {result.status_codes} — the scenario FAILS", file=sys.stderr)
        for line in details:
            print(f"!!!   {line}", file=sys.stderr)
        for error in result.errors[:5]:
            print(f"!!!   vegeta: {error}", file=sys.stderr)
        # What the PEP said about it (its warnings: where a decision past its deadline waited).
        for line in (self.lab.stack.log_tail(ep.proc, 5) if ep.proc else "").splitlines():
            print(f"!!!   {ep.proc} log: {line}", file=sys.stderr)


def rounds_of(endpoints: Sequence[Endpoint], rounds: int) -> list[list[Endpoint]]:
    """Each round visits every endpoint once; the first one rotates so none is always first."""
    k = len(endpoints)
    return [[endpoints[(r + i) % k] for i in range(k)] for r in range(rounds)]


def run_phase(
    bench: Bench,
    endpoints: Sequence[Endpoint],
    label: str,
    rounds: int,
    load: Load,
    side: Side = "driver",
) -> dict[str, list[Sample]]:
    samples: dict[str, list[Sample]] = {ep.name: [] for ep in endpoints}
    for r, order in enumerate(rounds_of(endpoints, rounds), 1):
        parts = []
        for ep in order:
            bench.settle(ep, load, side)
            sample = bench.measure(ep, load, side)
            samples[ep.name].append(sample)
            stall = f" (slowest {sample.report.max_ms:.0f} ms)" if sample.report.max_ms > STALL_MS else ""
            parts.append(f"{ep.name} {sample.report.throughput:.0f}/s{stall}")
        print(f"  {label} {r}/{rounds}: " + ", ".join(parts), flush=True)
    return samples


def median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def peak_rss(lab: Lab, ep: Endpoint) -> tuple[float | None, dict[str, float]]:
    """The largest peak RSS among the proxy's processes (a worker's, with --workers), and each one's."""
    if ep.proc is None or ep.proc not in lab.stack.procs:
        return None, {}
    per = peak_rss_per_process(lab.stack.procs[ep.proc].pid)
    return (max(per.values()) if per else None), {str(pid): round(mb, 1) for pid, mb in per.items()}


def summarise(
    bench: Bench,
    endpoints: Sequence[Endpoint],
    saturation: dict[str, list[Sample]],
    latency: dict[str, list[Sample]],
    rate: int,
) -> list[dict[str, Any]]:
    rows = []
    for ep in endpoints:
        sat, lat = saturation[ep.name], latency.get(ep.name, [])
        pooled = bench.vegeta.report([f for s in lat for f in s.report.files]) if lat else None
        rss, rss_per = peak_rss(bench.lab, ep)
        row: dict[str, Any] = {
            "scenario": ep.name,
            "description": SCENARIOS.get(ep.name, ""),
            "status": "FAILED" if ep.name in bench.failures else "ok",
            "throughput_rps": median([s.report.throughput for s in sat]),
            "throughput_rps_rounds": [round(s.report.throughput, 1) for s in sat],
            "saturation_p50_ms": median([s.report.p50_ms for s in sat]),
            "saturation_p99_ms": median([s.report.p99_ms for s in sat]),
            "saturation_max_ms_rounds": [round(s.report.max_ms, 1) for s in sat],
            "latency_max_ms_rounds": [round(s.report.max_ms, 1) for s in lat],
            "latency_achieved_rps_rounds": [round(s.report.throughput, 1) for s in lat],
            "latency_rate_rps": rate,
            "latency_achieved_rps": median([s.report.throughput for s in lat]),
            "p50_ms": pooled.p50_ms if pooled else None,
            "p90_ms": pooled.p90_ms if pooled else None,
            "p99_ms": pooled.p99_ms if pooled else None,
            "max_ms": pooled.max_ms if pooled else None,
            "proxy_cpu_s_per_1k": median([s.per_1k(s.proxy_cpu_s) for s in sat]),
            "opa_cpu_s_per_1k": median([s.per_1k(s.opa_cpu_s) for s in sat]),
            "redis_cpu_s_per_1k": median([s.per_1k(s.redis_cpu_s) for s in sat]),
            "peak_rss_mb": rss,
            "peak_rss_mb_per_process": rss_per,
            "requests": sum(s.report.requests for s in sat) + sum(s.report.requests for s in lat),
            "failures": bench.failures.get(ep.name, []),
        }
        rows.append(row)
    by = {r["scenario"]: r for r in rows}
    base = by.get("passthrough")
    for row in rows:
        if base and base["throughput_rps"] and row["throughput_rps"] is not None:
            row["ratio"] = row["throughput_rps"] / base["throughput_rps"]
        if base and base["p50_ms"] is not None and row["p50_ms"] is not None and row["scenario"] != "direct":
            row["added_p50_ms"] = row["p50_ms"] - base["p50_ms"]
            row["added_p99_ms"] = row["p99_ms"] - base["p99_ms"]
        achieved = row["latency_achieved_rps"]
        row["sustained_half_load"] = achieved is not None and achieved >= 0.95 * rate
    for row in rows:  # a failed scenario shows no figures
        if row["status"] == "FAILED":
            for col in COLUMNS[1:]:
                row[col.key] = "FAILED" if col.key == "throughput_rps" else None
    return rows


def targets_of(
    rows: Sequence[dict[str, Any]], workers: dict[str, Any], pep_load: dict[str, Any] | None = None
) -> list[Target]:
    by = {r["scenario"]: r for r in rows if r["status"] == "ok"}

    def get(name: str, key: str) -> float | None:
        value = by.get(name, {}).get(key)
        return value if isinstance(value, float | int) else None

    def cpu_ratio(name: str, base: str) -> float | None:
        a, b = get(name, "proxy_cpu_s_per_1k"), get(base, "proxy_cpu_s_per_1k")
        return round(a / b, 3) if a is not None and b else None

    pep_rss = [get(name, "peak_rss_mb") for name in by if name.startswith("pep-")]
    pep_rss += [w.get("peak_rss_mb") for w in workers.get("rows", [])]
    known = [v for v in pep_rss if v is not None]
    return [
        Target("pep-l1 throughput / passthrough", get("pep-l1", "ratio"), 0.80, "×", at_most=False),
        Target("pep-l1 CPU per request / passthrough's", cpu_ratio("pep-l1", "passthrough"), 1.25, "×", at_most=True),
        Target("pep-l1 CPU per request / oauth2-proxy's", cpu_ratio("pep-l1", "peer"), 1.0, "×", at_most=True),
        Target("pep-opa throughput / passthrough", get("pep-opa", "ratio"), 0.20, "×", at_most=False),
        # CPU seconds per 1,000 requests is milliseconds per request: one decision each on pep-opa
        Target("OPA CPU per decision (pep-opa)", get("pep-opa", "opa_cpu_s_per_1k"), 0.2, " ms", at_most=True),
        Target("pep-l1 added p50 at half load", get("pep-l1", "added_p50_ms"), 0.5, " ms", at_most=True),
        Target("pep-l1 added p99 at half load", get("pep-l1", "added_p99_ms"), 2.0, " ms", at_most=True),
        *_own_half_load_targets(pep_load),
        Target("peak RSS per PEP process (largest)", max(known) if known else None, RSS_LIMIT_MB, " MB", at_most=True),
        # "scales": taken as at least 1.5× with twice the workers
        Target("pep-l1 2 workers / 1 worker", workers.get("ratio"), WORKERS_SCALE, "×", at_most=False),
    ]


def _own_half_load_targets(pep_load: dict[str, Any] | None) -> list[Target]:
    row = next((r for r in (pep_load or {}).get("rows", []) if r["scenario"] == "pep-l1"), None)
    if row is None:
        return []
    return [
        Target("pep-l1 added p50 at half ITS saturation", row.get("added_p50_ms"), 0.3, " ms", at_most=True),
        Target("pep-l1 added p99 at half ITS saturation", row.get("added_p99_ms"), 2.0, " ms", at_most=True),
    ]


def pep_half_load(
    bench: Bench,
    endpoints: Sequence[Endpoint],
    saturation: dict[str, list[Sample]],
    rounds: int,
    concurrency: int,
    seconds: float,
) -> dict[str, Any]:
    """Latency at half of pep-l1's own saturation, where the PEP is not queueing.

    The issue's half load is half the passthrough's saturation, a rate no PEP scenario
    carries on this stack, so its latencies there are mostly queueing.  Here the rate is
    one pep-l1 does carry, and every scenario that saturates well above it is measured
    at it too: what the PEP adds to a request when it has the CPU to spare.
    """
    l1 = median([s.report.throughput for s in saturation.get("pep-l1", [])])
    if not l1:
        return {"skipped": "no pep-l1 saturation figure"}
    rate = max(1, int(l1 / 2))
    chosen = [
        ep
        for ep in endpoints
        if ep.name != "direct" and (median([s.report.throughput for s in saturation[ep.name]]) or 0) >= 1.5 * rate
    ]
    print(f"latency at {rate} req/s (half pep-l1's {l1:.0f} req/s), open loop: {', '.join(e.name for e in chosen)}")
    samples = run_phase(bench, chosen, "pep half load", rounds, Load(rate, concurrency, seconds))
    rows = []
    for ep in chosen:
        pooled = bench.vegeta.report([f for s in samples[ep.name] for f in s.report.files])
        rows.append(
            {
                "scenario": ep.name,
                "achieved_rps": median([s.report.throughput for s in samples[ep.name]]),
                "p50_ms": pooled.p50_ms,
                "p90_ms": pooled.p90_ms,
                "p99_ms": pooled.p99_ms,
            }
        )
    base = next((r for r in rows if r["scenario"] == "passthrough"), None)
    for row in rows:
        if base is not None:
            row["added_p50_ms"] = row["p50_ms"] - base["p50_ms"]
            row["added_p99_ms"] = row["p99_ms"] - base["p99_ms"]
    return {"rate_rps": rate, "rows": rows}


PEP_LOAD_COLUMNS = (
    Column("scenario", "scenario", "", 14),
    Column("req/s", "achieved_rps", ".0f", 7),
    Column("p50 ms", "p50_ms", ".2f", 7),
    Column("p90 ms", "p90_ms", ".2f", 7),
    Column("p99 ms", "p99_ms", ".2f", 7),
    Column("+p50 ms", "added_p50_ms", "+.2f", 7),
    Column("+p99 ms", "added_p99_ms", "+.2f", 7),
)


def workers_supported() -> bool:
    done = subprocess.run(
        [sys.executable, "-m", "vvault_pep.cli", "serve", "--help"], capture_output=True, text=True, check=False
    )
    return "--workers" in done.stdout


def compare_workers(bench: Bench, rounds: int, load: Load) -> dict[str, Any]:
    if not workers_supported():
        reason = "`vvault-pep serve --workers` does not exist yet in this checkout: 1 vs 2 workers not measured"
        print(f"\nworkers: skipped — {reason}")
        return {"skipped": reason}
    lab = bench.lab
    # Both PEPs and the load generator float over every CPU: two workers pinned to one CPU
    # would measure nothing.  OPA and Redis stay where they are.
    w1 = lab.add_pep("pep-l1-w1", "l1", workers=1, side="any")
    w2 = lab.add_pep("pep-l1-w2", "l1", workers=2, side="any")
    print(f"\nworkers: pep-l1 with --workers 1 and 2, PEP and vegeta unpinned, {rounds} rounds")
    for ep in (w1, w2):
        bench.measure(ep, Load(0, load.concurrency, 1), side="any", settling=True)
    samples = run_phase(bench, [w1, w2], "workers", rounds, load, side="any")
    rows = []
    for ep in (w1, w2):
        sat = samples[ep.name]
        rss, rss_per = peak_rss(lab, ep)
        rows.append(
            {
                "scenario": ep.name,
                "status": "FAILED" if ep.name in bench.failures else "ok",
                "throughput_rps": median([s.report.throughput for s in sat]),
                "proxy_cpu_s_per_1k": median([s.per_1k(s.proxy_cpu_s) for s in sat]),
                "peak_rss_mb": rss,
                "peak_rss_mb_per_process": rss_per,
            }
        )
    base = rows[0]["throughput_rps"]
    for row in rows:
        row["ratio"] = row["throughput_rps"] / base if base else None
    failed = any(r["status"] == "FAILED" for r in rows)
    return {
        "pinning": "PEP workers and load generator unpinned (all CPUs); OPA and redis as in the main run",
        "rows": rows,
        "ratio": None if failed else rows[1]["ratio"],
    }


def counters(lab: Lab, endpoints: Sequence[Endpoint]) -> dict[str, Any]:
    """Where each PEP's decisions came from (/admin/cache), summed over its workers."""
    out: dict[str, Any] = {}
    for ep in endpoints:
        if not ep.admin_ports:
            continue
        total: dict[str, Any] = {}
        try:
            for doc in lab.admin_get(ep, "/admin/cache"):
                for k, v in doc.get("cache", {}).items():
                    if isinstance(v, int):
                        total[k] = total.get(k, 0) + v
        except OSError as exc:
            total = {"error": str(exc)}
        out[ep.name] = total
    return out


def odd_metrics(lab: Lab, endpoints: Sequence[Endpoint]) -> dict[str, list[str]]:
    """Non-zero error, failure and drop counters from each PEP's /metrics: what went wrong quietly."""
    out: dict[str, list[str]] = {}
    for ep in endpoints:
        lines = []
        for port in ep.admin_ports:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
                    text = resp.read().decode()
            except OSError:
                continue
            for line in text.splitlines():
                if line.startswith("#") or not any(w in line for w in ("error", "fail", "drop", "timeout")):
                    continue
                name, _, value = line.rpartition(" ")
                if name.endswith("_created"):
                    continue
                try:
                    if float(value) > 0:
                        lines.append(re.sub(r'otel_scope_\w+="[^"]*",?', "", line).replace("{}", ""))
                except ValueError:
                    continue
        if lines:
            out[ep.name] = lines
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 rounds of 2 s, no workers comparison (< 2 min)")
    parser.add_argument("--seconds", type=float, help="length of each attack (default 5, quick 2)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds per phase (default 5, quick 2)")
    parser.add_argument("--concurrency", type=int, default=16, help="closed-loop connections (default 16)")
    parser.add_argument(
        "--settle",
        type=float,
        help="unmeasured seconds of the same load before every measured visit (default 1, quick 0.5; 0: none)",
    )
    parser.add_argument("--no-pin", dest="pin", action="store_false", help="do not pin processes to CPUs")
    parser.add_argument(
        "--workers-compare",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="measure pep-l1 with --workers 1 and 2 (default: on, off with --quick)",
    )
    parser.add_argument("--no-peer", dest="peer", action="store_false", help="leave oauth2-proxy out")
    parser.add_argument("--scenarios", help="comma-separated subset (passthrough is always measured)")
    parser.add_argument("--no-write", dest="write", action="store_false", help="do not write bench/results/")
    args = parser.parse_args(argv)
    seconds = args.seconds or (2.0 if args.quick else 5.0)
    rounds = args.rounds or (2 if args.quick else 5)
    compare = args.workers_compare if args.workers_compare is not None else not args.quick
    wanted = list(SCENARIOS) if not args.scenarios else ["passthrough", *args.scenarios.split(",")]
    unknown = set(wanted) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")

    harness = start_harness(args.pin, tool)
    if harness is None:
        return 2
    tools, pinning = harness
    started = report.utc_now()
    busy = os.getloadavg()[0]
    if busy > 0.5:
        print(f"warning: the machine is not idle (load average {busy:.2f}): other work skews the figures")
    lab = Lab(pinning)
    try:
        return run(lab, tools, args, seconds, rounds, compare, wanted, started, busy)
    except KeyboardInterrupt as exc:
        print(f"\ninterrupted ({exc}): stopping every process", file=sys.stderr)
        return 130
    finally:
        lab.close()


def run(
    lab: Lab,
    tools: dict[str, str | None],
    args: argparse.Namespace,
    seconds: float,
    rounds: int,
    compare: bool,
    wanted: list[str],
    started: str,
    busy: float,
) -> int:
    t0 = time.monotonic()
    assert tools["vegeta"] is not None
    settle = args.settle if args.settle is not None else (0.5 if args.quick else 1.0)
    bench = Bench(lab, Vegeta(tools["vegeta"], lab.stack, lab.tls), settle_s=max(0.0, settle))
    lab.start_services()
    makers = {
        "direct": lab.add_direct,
        "passthrough": lab.add_passthrough,
        "pep-l1": lambda: lab.add_pep("pep-l1", "l1"),
        "pep-l2": lambda: lab.add_pep("pep-l2", "l2"),
        "pep-opa": lambda: lab.add_pep("pep-opa", "off"),
        "pep-cold-token": lambda: lab.add_pep("pep-cold-token", "l1", cold_tokens=True),
    }
    if {"pep-l1-cluster", "pep-l2-cluster"} & set(wanted):
        why = lab.start_cluster()
        if why is None:
            makers["pep-l1-cluster"] = lambda: lab.add_pep("pep-l1-cluster", "l1", cluster=True)
            makers["pep-l2-cluster"] = lambda: lab.add_pep("pep-l2-cluster", "l2", cluster=True)
        else:
            print(f"pep-l1-cluster, pep-l2-cluster: SKIPPED — {why}")
    caddy = tools.get("caddy")
    if caddy is not None:
        makers["caddy"] = lambda: lab.add_caddy(caddy)
    elif "caddy" in wanted:
        print("caddy: SKIPPED — caddy not found: run `make bench-tools`")
    endpoints = [makers[name]() for name in SCENARIOS if name in wanted and name in makers]
    peer: dict[str, Any] = {"note": PEER_NOTE}
    if "peer" in wanted:
        if not args.peer:
            peer["skipped"] = "left out (--no-peer)"
        elif tools["oauth2-proxy"] is None:
            peer["skipped"] = "oauth2-proxy not found: run `make bench-tools`"
        else:
            try:
                endpoints.append(lab.add_peer(tools["oauth2-proxy"]))
            except RuntimeError as exc:
                peer["skipped"] = f"oauth2-proxy did not work: {exc}"
        if "skipped" in peer:
            print(f"peer: SKIPPED — {peer['skipped']}")
    placement = lab.stack.placement()
    print(f"pinning: {lab.stack.pinning.describe()}")
    print("  " + ", ".join(f"{name} → {where}" for name, where in placement.items()))

    warmup = Load(0, args.concurrency, 1.0)
    print(f"warm-up: 1 s per scenario, concurrency {args.concurrency}", flush=True)
    for ep in endpoints:
        bench.measure(ep, warmup, settling=True)
    saturation = run_phase(bench, endpoints, "saturation", rounds, Load(0, args.concurrency, seconds))
    pt = median([s.report.throughput for s in saturation["passthrough"]]) or 2.0
    rate = max(1, int(pt / 2))
    print(f"latency at {rate} req/s (half the passthrough's {pt:.0f} req/s), open loop", flush=True)
    latency = run_phase(bench, endpoints, "half load", rounds, Load(rate, args.concurrency, seconds))
    pep_load = pep_half_load(bench, endpoints, saturation, rounds, args.concurrency, seconds)
    workers: dict[str, Any] = {"skipped": "not requested (--quick or --no-workers-compare)"}
    if compare:
        workers = compare_workers(bench, rounds, Load(0, args.concurrency, seconds))

    rows = summarise(bench, endpoints, saturation, latency, rate)
    targets = targets_of(rows, workers, pep_load)
    cache = counters(lab, [ep for ep in lab.endpoints.values() if ep.admin_ports])
    odd = odd_metrics(lab, [ep for ep in lab.endpoints.values() if ep.admin_ports])
    m = report.machine(tools)
    params = {
        "seconds": seconds,
        "rounds": rounds,
        "settle_s": bench.settle_s,
        "concurrency": args.concurrency,
        "half_load_rate_rps": rate,
        "quick": args.quick,
        "pinning": lab.stack.pinning.describe(),
        "placement": placement,
        "load_average_at_start": round(busy, 2),
        "opa_url": lab.opa_url.replace(str(lab.work), "<lab>"),
        "wall_s": round(time.monotonic() - t0, 1),
    }
    doc = {
        "kind": "vvault-pep proxy benchmark",
        "started": started,
        "finished": report.utc_now(),
        "machine": m,
        "parameters": params,
        "scenarios": rows,
        "targets": [t.as_dict() for t in targets],
        "workers": workers,
        "pep_half_load": pep_load,
        "peer": peer,
        "cache_counters": cache,
        "pep_error_metrics": odd,
        "coming_out_of_idle": bench.cold,
        "notes": [note for name, note in (("peer", PEER_NOTE), ("pep-cold-token", COLD_NOTE)) if name in wanted],
    }
    text = render_text(doc, rows, targets, workers)
    print("\n" + "\n".join(text))
    if args.write:
        # a quick run never replaces the full run's latest.*
        prefix = "quick-" if args.quick else ""
        latest_json, latest_md = report.write_results(prefix, doc, render_markdown(doc, rows, targets, workers))
        print(f"\nwritten: {latest_json.relative_to(report.ROOT)}, {latest_md.relative_to(report.ROOT)}")
    if bench.failures:
        print(f"\nFAILED scenarios: {', '.join(bench.failures)} (non-2xx answers, printed above)", file=sys.stderr)
        return 1
    return 0


def _headline(doc: dict[str, Any]) -> list[str]:
    p = doc["parameters"]
    return [
        f"{p['rounds']} interleaved rounds of {p['seconds']:g} s per scenario; saturation: closed loop, "
        f"{p['concurrency']} connections; latency: open loop at {p['half_load_rate_rps']} req/s "
        f"(half the passthrough's saturation)",
        f"machine: {report.machine_line(doc['machine'])}",
        f"pinning: {p['pinning']}; load average at start {p['load_average_at_start']}",
        f"the PEPs ask OPA at {p.get('opa_url', 'loopback TCP')}",
    ]


def _notes(doc: dict[str, Any], rows: Sequence[dict[str, Any]]) -> list[str]:
    lines = []
    rate = doc["parameters"]["half_load_rate_rps"]
    for row in rows:
        if row["status"] == "ok" and not row["sustained_half_load"] and row["latency_achieved_rps"] is not None:
            lines.append(
                f"{row['scenario']}: could not sustain {rate} req/s (achieved {row['latency_achieved_rps']:.0f}): "
                "its half-load latencies include queueing"
            )
    if "skipped" in doc["peer"]:
        lines.append(f"peer skipped: {doc['peer']['skipped']}")
    lines += doc["notes"]
    for name, codes in doc.get("coming_out_of_idle", {}).items():
        lines.append(
            f"{name}: coming out of idle (the unmeasured {doc['parameters']['settle_s']:g} s before a visit): "
            + ", ".join(f"{n} × {code}" for code, n in sorted(codes.items()))
        )
    for name, counts in doc["cache_counters"].items():
        lines.append(f"{name} decisions: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    for name, metrics in doc["pep_error_metrics"].items():
        lines.append(f"{name} error counters: " + "; ".join(metrics[:6]))
    return lines


def render_text(
    doc: dict[str, Any], rows: Sequence[dict[str, Any]], targets: Sequence[Target], workers: dict[str, Any]
) -> list[str]:
    out = _headline(doc)
    out += ["", *report.text_table(rows, COLUMNS)]
    out += [
        "(req/s and CPU: saturation, median of rounds; p50/p90/p99: at half load, all rounds pooled; "
        "+p50/+p99: over passthrough; RSS: VmHWM, largest process)"
    ]
    pep_load = doc.get("pep_half_load") or {}
    if "rows" in pep_load:
        out += [
            "",
            f"latency at half pep-l1's saturation ({pep_load['rate_rps']} req/s, open loop, all rounds pooled):",
        ]
        out += report.text_table(pep_load["rows"], PEP_LOAD_COLUMNS)
    if "rows" in workers:
        out += ["", f"workers ({workers['pinning']}):", *report.text_table(workers["rows"], WORKER_COLUMNS)]
    else:
        out += ["", f"workers: skipped — {workers['skipped']}"]
    out += ["", *report.target_lines(targets), ""]
    out += [f"- {line}" for line in _notes(doc, rows)]
    return out


def render_markdown(
    doc: dict[str, Any], rows: Sequence[dict[str, Any]], targets: Sequence[Target], workers: dict[str, Any]
) -> str:
    out = [f"# vvault-pep proxy benchmark — {doc['finished']}", ""]
    out += [f"- {line}" for line in _headline(doc)]
    out += ["- placement: " + ", ".join(f"{k} → {v}" for k, v in doc["parameters"]["placement"].items()), ""]
    out += ["## Scenarios", "", *report.markdown_table(rows, COLUMNS), ""]
    out += [
        "req/s and CPU seconds per 1,000 requests: throughput at saturation, median of the rounds. "
        "p50/p90/p99: latency at half the passthrough's saturation rate, open loop, all rounds pooled; "
        "+p50/+p99: added over the passthrough at that rate. Peak RSS: VmHWM of the largest process.",
        "",
    ]
    out += ["| scenario | what it is |", "|---|---|"]
    out += [f"| {r['scenario']} | {r['description']} |" for r in rows]
    pep_load = doc.get("pep_half_load") or {}
    if "rows" in pep_load:
        out += ["## Latency at half pep-l1's saturation", ""]
        out += [f"Open loop at {pep_load['rate_rps']} req/s, a rate pep-l1 carries; all rounds pooled.", ""]
        out += [*report.markdown_table(pep_load["rows"], PEP_LOAD_COLUMNS), ""]
    out += ["", "## Workers", ""]
    if "rows" in workers:
        out += [workers["pinning"], "", *report.markdown_table(workers["rows"], WORKER_COLUMNS)]
    else:
        out += [f"Skipped: {workers['skipped']}"]
    out += ["", "## Targets", "", "```text", *report.target_lines(targets), "```", ""]
    out += ["## Notes", "", *[f"- {line}" for line in _notes(doc, rows)], ""]
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
