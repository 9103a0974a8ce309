"""Rate limits: GCRA, atomic in Redis, shared by every replica; local when Redis is not.

GCRA (the generic cell rate algorithm) keeps one number per key — the
theoretical arrival time of the next request — so a limit costs one small
Lua call and no sliding-window lists.  A route's ``rate_limit`` names the
key (``subject``, ``tenant``, ``client`` — the certificate thumbprint or
source address — or ``route``), the sustained rate and the burst.  The clock
is Redis's own (``TIME``), so replicas with skewed clocks agree.

When Redis cannot answer, the same algorithm runs in this process with the
same numbers: a per-replica limit, never no limit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from .config import RateLimit
from .errors import PepError
from .scopes import client_key, subject_key
from .shared_state import SharedState

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


def key_of(limit: RateLimit, route: str, doc: dict[str, Any]) -> str:
    """The limiter key; a request without the named value falls back to its client — never unlimited."""
    identity = doc.get("identity") or {}
    value: Any
    if limit.per == "subject":
        value = subject_key(doc)
    elif limit.per == "tenant":
        value = identity.get("tenant") or (doc.get("route") or {}).get("params", {}).get("tenant")
    elif limit.per == "route":
        value = "*"
    else:
        value = None
    if not isinstance(value, str) or not value:
        return f"{route}:client:{client_key(doc)}"
    return f"{route}:{limit.per}:{value}"


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
            res = await shared.call(
                lambda c: script(keys=[shared.key("rl", key)], args=[int(interval), int(tolerance)])
            )
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
