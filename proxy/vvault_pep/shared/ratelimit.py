"""Rate limits: GCRA, atomic in Redis, shared by every replica; local when Redis is not.

GCRA (the generic cell rate algorithm) keeps one number per key — the
theoretical arrival time of the next request — so a limit costs one small
Lua call and no sliding-window lists.  A route's ``rate_limit`` names the
key (``subject``, ``tenant``, ``certificate``, ``workload``, ``client`` — the
certificate thumbprint or source address — or ``route``), the sustained rate
and the burst.  Every key is built from the verified :class:`~vvault_pep.core.principal.Subject`
(:func:`key_of`): ``tenant`` is the caller's verified tenant, and a caller
without one is limited per subject (else per client), never in a bucket some
tenant's callers share — a path parameter names no bucket.  The clock
is Redis's own (``TIME``), so replicas with skewed clocks agree.

When Redis cannot answer, the same algorithm runs in this process with the
same numbers: a per-replica limit, never no limit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from ..config.models import RateLimit
from ..core.principal import Subject, client_key
from ..errors import PepError
from .state import SharedState

# KEYS[1] = limiter key; ARGV = emission interval (µs), burst tolerance (µs)
_GCRA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
if tat - now > tolerance then
  return {0, tat - now - tolerance}
end
local new_tat = tat + interval
redis.call('SET', KEYS[1], new_tat, 'PX', math.ceil((new_tat - now) / 1000) + 1)
return {1, 0}
"""


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    retry_after_s: float
    shared: bool


def key_of(limit: RateLimit, route: str, subject: Subject, source_ip: str | None) -> str:
    """The limiter key, from verified names only; a caller without the named one is never unlimited.

    Without its named value a caller falls back to its subject, then its client: a
    tenant-less caller never lands in a tenant's bucket (the kinds differ in the key).
    """
    value: str | None
    per = limit.per
    if per == "route":
        return f"{route}:route:*"
    if per == "client":
        return f"{route}:client:{client_key(subject, source_ip)}"
    value = {
        "subject": subject.principal,
        "tenant": subject.tenant,
        "certificate": subject.certificate,
        "workload": subject.workload,
    }.get(per)
    if value is None and per in ("tenant", "workload") and subject.principal is not None:
        per, value = "subject", subject.principal
    if value is None:
        return f"{route}:client:{client_key(subject, source_ip)}"
    return f"{route}:{per}:{value}"


def rl_key(shared: SharedState, key: str) -> str:
    return shared.key("rl", key)


class RateLimiter:
    def __init__(self, shared: SharedState | None) -> None:
        self.shared = shared
        self._script: Any = shared.client.register_script(_GCRA) if shared is not None else None
        self._local: dict[str, float] = {}  # key → TAT (µs, monotonic)

    async def check(self, limit: RateLimit, key: str) -> Verdict:
        interval = 1_000_000 / limit.rate_per_s
        tolerance = interval * (limit.burst - 1)
        if self.shared is not None:
            shared, script = self.shared, self._script
            res = await shared.call(lambda c: script(keys=[rl_key(shared, key)], args=[int(interval), int(tolerance)]))
            if res is not None:
                return Verdict(bool(int(res[0])), int(res[1]) / 1_000_000, True)
        now = time.monotonic() * 1_000_000
        tat = max(self._local.get(key, now), now)
        if tat - now > tolerance:
            return Verdict(False, (tat - now - tolerance) / 1_000_000, False)
        self._local[key] = tat + interval
        if len(self._local) > 100_000:  # bounded: drop keys whose debt is paid
            self._local = {k: v for k, v in self._local.items() if v > now}
        return Verdict(True, 0.0, False)


def refuse(verdict: Verdict) -> PepError:
    retry = max(1, int(verdict.retry_after_s + 0.999))
    return PepError("ratelimit.exceeded", "too many requests", headers=(("Retry-After", str(retry)),))
