"""Risk: how the subject has been behaving, from counters every replica shares.

Per subject (the verified user, else the workload, else the client certificate or
address — :class:`~vvault_pep.core.principal.Subject`, never the input), in Redis, with
one atomic script per request:

* ``rate_spike`` — requests in the current window above ``spike_factor`` ×
  the learned baseline (an exponentially weighted average of past windows)
  and at least ``spike_min_requests``;
* ``new_network`` — a source /24 (IPv4) or /64 (IPv6) never seen for this
  subject before (the very first network is not "new");
* ``recent_denials`` — denies in the last ``denial_window_s``;
* ``device_change`` — another device id than last time;
* ``off_hours`` — outside the tenant's business hours in its time zone.

``score`` = 30·rate_spike + 20·new_network + 6·min(denials, 5) +
15·device_change + 10·off_hours, capped at 100; ``band`` is ``low`` (< 30),
``medium`` (< 60) or ``high``.  When Redis cannot answer within
``risk.timeout_ms`` the block says ``available: false`` (score ``null``,
band ``unknown``) and the request is still judged — the policy decides what
an unknown risk allows.
"""

from __future__ import annotations

import datetime as dt
import functools
import ipaddress
import time
import zoneinfo
from collections.abc import Awaitable, Coroutine
from typing import Any

from ..config.models import Risk as RiskConfig
from ..core.principal import Subject, client_key
from .state import SharedState

# KEYS: current window, previous window, baseline, networks, denials, last device
# ARGV: window_s, network ("" if none), device id ("" if none)
_SCRIPT = """
local cur = redis.call('INCR', KEYS[1])
if cur == 1 then
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[1]) * 3)
  local prev = tonumber(redis.call('GET', KEYS[2]) or '0')
  local base = tonumber(redis.call('GET', KEYS[3]) or '-1')
  if base < 0 then base = prev else base = 0.7 * base + 0.3 * prev end
  redis.call('SET', KEYS[3], tostring(base), 'EX', 604800)
end
local base = redis.call('GET', KEYS[3]) or '-1'
local known = redis.call('SCARD', KEYS[4])
local added = 0
if ARGV[2] ~= '' then
  added = redis.call('SADD', KEYS[4], ARGV[2])
  redis.call('EXPIRE', KEYS[4], 2592000)
end
local denials = tonumber(redis.call('GET', KEYS[5]) or '0')
local previous = ''
if ARGV[3] ~= '' then
  previous = redis.call('GET', KEYS[6]) or ''
  redis.call('SET', KEYS[6], ARGV[3], 'EX', 2592000)
end
return {cur, base, known, added, denials, previous}
"""


def unavailable() -> dict[str, Any]:
    return {"available": False, "score": None, "band": "unknown", "signals": {}}


async def _ready(value: dict[str, Any]) -> dict[str, Any]:
    return value


@functools.lru_cache(maxsize=8192)
def network_of(ip: str | None) -> str:
    """The caller's /24 (IPv4) or /64 (IPv6), as text; "" when there is none."""
    if not ip:
        return ""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ""
    prefix = 24 if addr.version == 4 else 64
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


def risk_subject(subject: Subject, source_ip: str | None) -> str:
    principal = subject.principal
    return f"sub:{principal}" if principal is not None else client_key(subject, source_ip)


def risk_key(shared: SharedState, subject: str, *parts: str) -> str:
    return shared.key_for("risk", subject, *parts)  # one tag: the script's keys share a slot


def score(signals: dict[str, Any]) -> tuple[int, str]:
    total = (
        30 * bool(signals.get("rate_spike"))
        + 20 * bool(signals.get("new_network"))
        + 6 * min(int(signals.get("recent_denials", 0)), 5)
        + 15 * bool(signals.get("device_change"))
        + 10 * bool(signals.get("off_hours"))
    )
    total = min(total, 100)
    return total, "low" if total < 30 else "medium" if total < 60 else "high"


def off_hours(cfg: RiskConfig, tenant: str | None, now: dt.datetime) -> bool:
    zone = cfg.tenant_timezones.get(tenant or "")
    if zone is None:
        return False
    try:
        local = now.astimezone(zoneinfo.ZoneInfo(zone))
    except zoneinfo.ZoneInfoNotFoundError:
        return False
    start, end = cfg.business_hours
    return local.weekday() >= 5 or not start <= local.hour < end


class RiskSignals:
    def __init__(self, cfg: RiskConfig, shared: SharedState | None) -> None:
        self.cfg = cfg
        self.shared = shared

    def assess(self, who: Subject, source_ip: str | None, now: dt.datetime) -> Coroutine[Any, Any, dict[str, Any]]:
        """The subject's risk block; the Redis script is queued now, await the block."""
        if not self.cfg.enabled or self.shared is None:
            return _ready(unavailable())
        subject = risk_subject(who, source_ip)
        shared, window = self.shared, self.cfg.window_s
        bucket = int(time.time()) // window
        keys = [
            risk_key(shared, subject, "w", str(bucket)),
            risk_key(shared, subject, "w", str(bucket - 1)),
            risk_key(shared, subject, "baseline"),
            risk_key(shared, subject, "nets"),
            risk_key(shared, subject, "denials"),
            risk_key(shared, subject, "device"),
        ]
        network = network_of(source_ip)
        device_id = who.device or ""
        reply = shared.one(
            lambda p: p.eval(_SCRIPT, len(keys), *keys, window, network, device_id),
            deadline_s=self.cfg.timeout_ms / 1000,
        )
        return self._block(who.tenant, device_id, now, reply)

    async def _block(
        self, tenant: str | None, device_id: str, now: dt.datetime, reply: Awaitable[Any]
    ) -> dict[str, Any]:
        res = await reply
        if res is None:
            return unavailable()
        current, baseline, known, added, denials, previous = res
        baseline_f = float(baseline)
        signals: dict[str, Any] = {
            "requests_in_window": int(current),
            "baseline": round(baseline_f, 2) if baseline_f >= 0 else None,
            "rate_spike": baseline_f >= 0
            and int(current) >= self.cfg.spike_min_requests
            and int(current) > self.cfg.spike_factor * max(baseline_f, 1.0),
            "new_network": int(known) > 0 and int(added) == 1,
            "recent_denials": int(denials),
            "device_change": bool(previous) and bool(device_id) and previous.decode() != device_id,
            "off_hours": off_hours(self.cfg, tenant, now),
        }
        total, band = score(signals)
        return {"available": True, "score": total, "band": band, "signals": signals}

    async def record_denial(self, who: Subject, source_ip: str | None) -> None:
        if not self.cfg.enabled or self.shared is None:
            return
        shared, ttl = self.shared, self.cfg.denial_window_s
        key = risk_key(shared, risk_subject(who, source_ip), "denials")

        async def op(c: Any) -> Any:
            pipe = c.pipeline(transaction=True)
            pipe.incr(key)
            pipe.expire(key, ttl)
            return await pipe.execute()

        await shared.call(op, deadline_s=self.cfg.timeout_ms / 1000)
