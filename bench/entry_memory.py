"""What a caller who shows a new token costs in memory, cache by cache.

    python -m bench.entry_memory [--tokens 10000]

Fills the two caches a new token fills, through their own code paths: the verified-token
cache (``Authenticator.verify`` on HS256 tokens of one tenant, role set and scopes, a
distinct ``jti`` each, as a client that renews its token does) and the L1 decision cache
(``DecisionCache.store`` of the same allow answer under a key per token).  It prints the
Python heap each one holds per entry (tracemalloc: what the entries themselves allocate,
not the allocator's slack) and the process's RSS before and after.  Compare revisions by
running it in each one's checkout; ``make soak`` gives the figure of a whole process.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import time
import tracemalloc
from collections.abc import Sequence

import jwt

from vvault_pep.config.models import Cache, Issuer, Route
from vvault_pep.config.models import Identity as IdentityConfig
from vvault_pep.decide.cache import CacheHints, DecisionCache
from vvault_pep.identity.authn import Authenticator

SECRET = "bench-" * 8
ISSUER = Issuer(
    name="bench",
    issuer="https://issuer.bench.example",
    audiences=("vvault",),
    algorithms=("HS256",),
    shared_secret=SECRET,
)
# An allow answer of the shipped policy's shape (obligations, cache block).
ANSWER = {
    "allow": True,
    "reason": "allowed",
    "obligations": {"headers": {"X-Vvault-Tenant": "acme", "X-Vvault-Subject": "svc-reporting"}},
    "cache": {"ttl_s": 30},
}


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return 0.0


def tokens(n: int) -> list[str]:
    now = int(time.time())
    base = {
        "iss": ISSUER.issuer,
        "aud": "vvault",
        "sub": "svc-reporting",
        "tenant": "acme",
        "roles": ["reader", "auditor"],
        "scope": "secrets:read vectors:read",
        "amr": ["mfa"],
        "client_id": "reporting",
        "iat": now,
        "exp": now + 3600,
    }
    return [
        jwt.encode({**base, "jti": f"jti-{i:08d}"}, SECRET, algorithm="HS256", headers={"typ": "at+jwt", "kid": "k1"})
        for i in range(n)
    ]


def traced(fill: object) -> tuple[int, float, float]:
    """Bytes the call leaves allocated, and RSS before and after (MB)."""
    gc.collect()
    before_rss = rss_mb()
    tracemalloc.start()
    start, _ = tracemalloc.get_traced_memory()
    fill()  # type: ignore[operator]
    gc.collect()
    end, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return end - start, before_rss, rss_mb()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=10_000)
    args = parser.parse_args(argv)
    n = args.tokens
    signed = tokens(n)
    authn = Authenticator(IdentityConfig(issuers=(ISSUER,), verified_cache_entries=n))
    cache = DecisionCache(Cache(l1_max_entries=n), None)
    route = Route(name="bench", path="/v1/bench", upstream="app", policy="vvault/authz")
    loop = asyncio.new_event_loop()

    def verify_all() -> None:
        for t in signed:
            loop.run_until_complete(authn.verify(t))

    def store_all() -> None:
        for i in range(n):
            doc = {"subject": {"token": {"id": f"jti-{i:08d}"}}, "request": {"method": "GET", "path": "/v1/bench"}}
            cache.store(route, doc, dict(ANSWER), ttl_s=30.0, hints=CacheHints(), revision="r1", epochs=[0, 0])

    rows = [("verified-token cache", *traced(verify_all)), ("L1 decision cache", *traced(store_all))]
    loop.close()
    print(f"{n} new tokens of one caller")
    print(f"{'cache':<22} {'bytes per entry':>16} {'MB for all':>11} {'RSS before':>11} {'RSS after':>10}")
    for name, used, before, after in rows:
        print(f"{name:<22} {used / n:16.0f} {used / 2**20:11.2f} {before:11.1f} {after:10.1f}")
    total = sum(r[1] for r in rows)
    print(f"{'both':<22} {total / n:16.0f} {total / 2**20:11.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
