"""Soak: does the PEP's memory stay flat under minutes of steady load?

    python -m bench.soak [--minutes 5] [--rate R] [--cold-share 0.1] [--no-pin]

Starts the same world as ``make bench`` (bench/lab.py) with one PEP (pep-l1: every stage on,
cache on), measures its saturation for a few seconds, then drives it open loop at half of
that (or ``--rate``) for ``--minutes``: most requests carry the same token (decisions from
the in-process cache), ``--cold-share`` of them a token never seen before (signature, OPA,
a new cache entry: what fills caches).  Every 5 s it samples the RSS of each PEP process.

It prints the RSS at the start of the load, its peak (VmHWM) and at the end, the slope of a
least-squares line through the second half of the samples (MB per minute), and whether the
memory is flat (slope < 1 MB/min) and within 90 MB.  It also says when the two bounded caches
a new token fills (L1 decisions, verified tokens) are full at that rate, and, when the run
has a minute of load after that, the slope from then on: a cache filling is not a leak.  Results go to
bench/results/soak-latest.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import Any

from bench import report
from bench.common import tool
from bench.lab import Lab
from bench.procfs import peak_rss_per_process, status_mb, tree
from bench.report import Target
from bench.stack import start_harness
from bench.vegeta import Load, Vegeta, write_targets
from vvault_pep.config import load_config

SAMPLE_S = 5.0
FLAT_MB_PER_MIN = 1.0
RSS_LIMIT_MB = 90.0  # per worker
AFTER_FULL_MIN_S = 60.0  # least loaded time after the caches are full for a slope of that part


def slope_per_minute(points: Sequence[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, MB) points, in MB per minute."""
    if len(points) < 3:
        return None
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    if var == 0:
        return None
    cov = sum((t - mean_t) * (v - mean_v) for t, v in points)
    return cov / var * 60


def caches_full_s(cache_entries: Sequence[int], cold_rate: float) -> float | None:
    """When the bounded caches a new token fills are all full (seconds into the load), at
    ``cold_rate`` new tokens a second; None when nothing fills them."""
    caps = [n for n in cache_entries if n > 0]
    return max(caps) / cold_rate if caps and cold_rate > 0 else None


def slope_after(points: Sequence[tuple[float, float]], start_s: float | None, end_s: float) -> float | None:
    """The slope of the samples from ``start_s`` on (one sample's margin), or None when they
    span less than ``AFTER_FULL_MIN_S``."""
    if start_s is None or end_s - (start_s + SAMPLE_S) < AFTER_FULL_MIN_S:
        return None
    return slope_per_minute([(t, v) for t, v in points if t >= start_s + SAMPLE_S])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--rate", type=int, help="requests per second (default: half of pep-l1's saturation)")
    parser.add_argument("--cold-share", type=float, default=0.1, help="share of requests with a new token")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--no-pin", dest="pin", action="store_false")
    parser.add_argument("--no-write", dest="write", action="store_false")
    args = parser.parse_args(argv)
    harness = start_harness(args.pin, tool)
    if harness is None:
        return 2
    tools, pinning = harness
    started = report.utc_now()
    lab = Lab(pinning, prefix="vvault-soak-")
    try:
        return soak(lab, tools, args, started)
    except KeyboardInterrupt as exc:
        print(f"\ninterrupted ({exc}): stopping every process", file=sys.stderr)
        return 130
    finally:
        lab.close()


def soak(lab: Lab, tools: dict[str, str | None], args: argparse.Namespace, started: str) -> int:
    assert tools["vegeta"] is not None
    vegeta = Vegeta(tools["vegeta"], lab.stack, lab.tls)
    lab.start_services()
    pep = lab.add_pep("pep-l1", "l1")
    pid = lab.stack.procs["pep-l1"].pid
    print(f"pinning: {lab.stack.pinning.describe()}")
    hot_targets = write_targets(lab.work / "hot.txt", pep.url, [lab.token])
    vegeta.attack(hot_targets, Load(0, args.concurrency, 1), lab.work / "warmup.bin")
    saturation = vegeta.attack(hot_targets, Load(0, args.concurrency, 5), lab.work / "saturation.bin")
    rate = args.rate or max(2, int(saturation.throughput / 2))
    seconds = args.minutes * 60
    cold_rate = max(1, round(rate * args.cold_share)) if args.cold_share > 0 else 0
    hot_rate = rate - cold_rate
    print(
        f"pep-l1 saturation {saturation.throughput:.0f} req/s; soak at {rate} req/s for {args.minutes:g} min "
        f"({hot_rate}/s with one token, {cold_rate}/s with a new token each)",
        flush=True,
    )
    cold_targets = write_targets(
        lab.work / "cold.txt", pep.url, lab.issuer.fresh_tokens(int(cold_rate * seconds * 1.05) + 100)
    )
    idle_mb = sum(status_mb(p, "VmRSS") for p in tree(pid))
    hot_out, cold_out = lab.work / "soak-hot.bin", lab.work / "soak-cold.bin"
    attacks = [
        lab.stack.start(
            "vegeta-hot", vegeta.attack_argv(hot_targets, Load(hot_rate, args.concurrency, seconds), hot_out), "driver"
        )
    ]
    if cold_rate:
        attacks.append(
            lab.stack.start(
                "vegeta-cold",
                vegeta.attack_argv(cold_targets, Load(cold_rate, 4, seconds), cold_out, lazy=True),
                "driver",
            )
        )
    t0 = time.monotonic()
    samples: list[dict[str, Any]] = []
    while any(a.poll() is None for a in attacks):
        now = time.monotonic() - t0
        per = {p: status_mb(p, "VmRSS") for p in tree(pid)}
        samples.append({"t_s": round(now, 1), "rss_mb": round(max(per.values()), 2), "processes": len(per)})
        if len(samples) % 6 == 1:
            print(f"  {now:5.0f} s  RSS {samples[-1]['rss_mb']:.1f} MB", flush=True)
        time.sleep(SAMPLE_S)
    hot = vegeta.report([hot_out])
    cold = vegeta.report([cold_out]) if cold_rate else None
    failed = [r for r in (hot, cold) if r is not None and not r.all_2xx]
    for r in failed:
        print(f"\n!!! soak: non-2xx answers {r.status_codes} — the soak FAILS", file=sys.stderr)
        for line in vegeta.failures(list(r.files)):
            print(f"!!!   {line}", file=sys.stderr)
    peak = max(peak_rss_per_process(pid).values())
    loaded = [s for s in samples if s["t_s"] <= seconds]
    half = [(s["t_s"], s["rss_mb"]) for s in loaded if s["t_s"] >= seconds / 2]
    slope = slope_per_minute(half)
    # Bounded caches filling are not a leak: the part after they are full says whether memory
    # then stays flat (a new token's entries replace an old one's).
    pep_config = load_config(lab.work / "pep-l1.yaml")
    full_s = caches_full_s((pep_config.cache.l1_max_entries, pep_config.identity.verified_cache_entries), cold_rate)
    after_full = slope_after([(s["t_s"], s["rss_mb"]) for s in loaded], full_s, seconds)
    targets = [
        Target("RSS slope over the second half", slope, FLAT_MB_PER_MIN, " MB/min", at_most=True),
        Target("peak RSS of the PEP process", peak, RSS_LIMIT_MB, " MB", at_most=True),
    ]
    result = {
        "rate_rps": rate,
        "hot_rate_rps": hot_rate,
        "cold_rate_rps": cold_rate,
        "minutes": args.minutes,
        "saturation_rps": saturation.throughput,
        "idle_rss_mb": round(idle_mb, 2),
        "start_rss_mb": loaded[0]["rss_mb"] if loaded else None,
        "end_rss_mb": loaded[-1]["rss_mb"] if loaded else None,
        "peak_rss_mb": round(peak, 2),
        "slope_mb_per_min_second_half": slope,
        "caches_full_s": full_s,
        "slope_mb_per_min_after_caches_full": after_full,
        "flat": slope is not None and slope < FLAT_MB_PER_MIN,
        "within_limit": peak <= RSS_LIMIT_MB,
        "hot": {"achieved_rps": hot.throughput, "p50_ms": hot.p50_ms, "p99_ms": hot.p99_ms, "codes": hot.status_codes},
        "cold": None
        if cold is None
        else {
            "achieved_rps": cold.throughput,
            "p50_ms": cold.p50_ms,
            "p99_ms": cold.p99_ms,
            "codes": cold.status_codes,
        },
        "status": "FAILED" if failed else "ok",
        "samples": samples,
    }
    doc = {
        "kind": "vvault-pep soak",
        "started": started,
        "finished": report.utc_now(),
        "machine": report.machine(tools),
        "parameters": {
            "pinning": lab.stack.pinning.describe(),
            "placement": lab.stack.placement(),
            "concurrency": args.concurrency,
            "sample_s": SAMPLE_S,
        },
        "soak": result,
        "targets": [t.as_dict() for t in targets],
    }
    lines = render(doc, targets)
    print("\n" + "\n".join(lines))
    if args.write:
        md = "\n".join([f"# vvault-pep soak — {doc['finished']}", "", "```text", *lines, "```", ""])
        latest_json, latest_md = report.write_results("soak-", doc, md)
        print(f"\nwritten: {latest_json.relative_to(report.ROOT)}, {latest_md.relative_to(report.ROOT)}")
    return 1 if failed else 0


def render(doc: dict[str, Any], targets: Sequence[Target]) -> list[str]:
    s = doc["soak"]

    def mb(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f} MB"

    slope = s["slope_mb_per_min_second_half"]
    hot, cold = s["hot"], s["cold"]
    lines = [
        f"soak: pep-l1 at {s['rate_rps']} req/s for {s['minutes']:g} min "
        f"(half its saturation of {s['saturation_rps']:.0f} req/s unless --rate), "
        f"{s['cold_rate_rps']}/s of them with a new token",
        f"machine: {report.machine_line(doc['machine'])}",
        f"pinning: {doc['parameters']['pinning']}",
        "",
        f"RSS idle {mb(s['idle_rss_mb'])}, start {mb(s['start_rss_mb'])}, peak {mb(s['peak_rss_mb'])}, "
        f"end {mb(s['end_rss_mb'])}",
        "slope over the second half: " + ("-" if slope is None else f"{slope:+.3f} MB/min"),
        _after_full_line(s),
        f"flat (< {FLAT_MB_PER_MIN:g} MB/min): {'yes' if s['flat'] else 'NO'}; "
        f"within {RSS_LIMIT_MB:g} MB: {'yes' if s['within_limit'] else 'NO'}",
        f"one-token requests: {hot['achieved_rps']:.0f} req/s, p50 {hot['p50_ms']:.2f} ms, p99 {hot['p99_ms']:.2f} ms, "
        f"codes {hot['codes']}",
    ]
    if cold:
        lines.append(
            f"new-token requests: {cold['achieved_rps']:.0f} req/s, p50 {cold['p50_ms']:.2f} ms, "
            f"p99 {cold['p99_ms']:.2f} ms, codes {cold['codes']}"
        )
    lines += ["", *report.target_lines(targets)]
    lines += ["", "RSS samples (s: MB): " + ", ".join(f"{x['t_s']:.0f}: {x['rss_mb']:.1f}" for x in s["samples"])]
    return lines


def _after_full_line(s: dict[str, Any]) -> str:
    full_s, slope = s.get("caches_full_s"), s.get("slope_mb_per_min_after_caches_full")
    if full_s is None:
        return "caches: no new tokens, nothing fills them"
    if slope is None:
        need = (full_s + SAMPLE_S + AFTER_FULL_MIN_S) / 60
        return f"caches full at ~{full_s:.0f} s: too late for a slope after it (--minutes {need:.1f} or more gives one)"
    return f"caches full at ~{full_s:.0f} s; slope after that: {slope:+.3f} MB/min"


if __name__ == "__main__":
    sys.exit(main())
