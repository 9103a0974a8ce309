"""The pure middle of one cached request, timed in process: compiled against pure modules.

    python -m bench.core_walk [--number 5000] [--repeat 7]

Runs the ``core`` calls a cached request makes on the demo config (sanitize's canonical target
and header checks, the route match, the subject, the policy input, the response-header policy)
in two child interpreters, one with ``VVAULT_PEP_PURE=1`` and one with ``VVAULT_PEP_PURE=0``
(the compiled modules, or an import error: ``make compiled`` first), and prints microseconds
per request for each: what the compiled hot path saves before aiohttp, TLS and Redis dilute it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import timeit

from bench.common import ROOT

DEMO = ROOT / "examples" / "config" / "demo.yaml"


def measure(number: int, repeat: int) -> dict[str, object]:
    """In this process: the best of ``repeat`` runs of ``number`` walks, in µs per walk."""
    from vvault_pep import compiled
    from vvault_pep.config.loader import parse_config
    from vvault_pep.core import responses, sanitize
    from vvault_pep.core.policy_input import Facts, build_input
    from vvault_pep.core.principal import ANONYMOUS, subject_of
    from vvault_pep.core.routing import RouteTable

    config = parse_config(DEMO.read_text(), filename=str(DEMO), base_dir=DEMO.parent, offline=True)
    routes = RouteTable(config.routes)
    raw = [
        (b"Host", b"127.0.0.1:8443"),
        (b"User-Agent", b"vegeta"),
        (b"Authorization", b"Bearer " + b"x" * 600),
        (b"Accept", b"*/*"),
        (b"Traceparent", b"00-" + b"a" * 32 + b"-" + b"b" * 16 + b"-01"),
    ]
    answer = [("Content-Type", "application/json"), ("Content-Length", "120"), ("ETag", '"abc"')]
    policy = responses.policy_for(config.responses, config.routes[0].responses)
    now = dt.datetime.now(dt.UTC)

    def walk() -> None:
        target = sanitize.canonical_target(
            "/v1/tenants/acme/secrets/db-password?version=2", config.sanitize, config.limits.max_query_params
        )
        headers = sanitize.check_headers(raw, config.sanitize, config.limits)
        match = routes.match(headers.host, "GET", target.segments, target.trailing_slash)
        subject_of(ANONYMOUS, None, None, {})
        facts = Facts("id", "GET", "1.1", target, headers, "127.0.0.1", 5555, None, match, now)
        build_input(facts, pep_version="bench")
        responses.pass_headers(answer, policy)
        responses.partial_reason(200, answer)

    walk()
    best = min(timeit.repeat(walk, number=number, repeat=repeat)) / number
    return {"mode": compiled.state()["vvault_pep.core.sanitize"], "us": round(best * 1e6, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--number", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.number, args.repeat)))
        return 0
    results = {}
    for setting in ("1", "0"):
        res = subprocess.run(
            [
                sys.executable,
                "-m",
                "bench.core_walk",
                "--child",
                "--number",
                str(args.number),
                "--repeat",
                str(args.repeat),
            ],
            cwd=ROOT,
            env={**os.environ, "VVAULT_PEP_PURE": setting},
            capture_output=True,
            text=True,
            check=False,
        )
        if res.returncode != 0:
            print(res.stderr.strip().splitlines()[-1] if res.stderr.strip() else "the child failed", file=sys.stderr)
            return 1
        out = json.loads(res.stdout)
        results[out["mode"]] = out["us"]
        print(f"{out['mode']:<9} {out['us']:6.1f} µs per request (core calls of one cached request)")
    print(
        f"saved     {results['pure'] - results['compiled']:6.1f} µs ({1 - results['compiled'] / results['pure']:.0%})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
