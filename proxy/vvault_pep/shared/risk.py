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

Counted locally, flushed in batches (``risk.flush_ms``, 100 ms by default; 0 runs the
script on every request).  A replica that synced a subject with Redis less than
``local_max_age_ms`` ago (1 s; at least ``2 × flush_ms``), in the current window, answers
that subject's requests from what it knows plus what it counted since, with no Redis
command, *unless* the request
carries a network or a device this replica does not know Redis already holds for the
subject: those (``new_network``, ``device_change``) are decided on the request, by the
script, as before.  Every ``flush_ms`` the counts (and denials) of the period go to
Redis in one round trip for all subjects, and the reply brings back what the other
replicas counted.  So a local answer misses at most the other replicas' requests and
denials of the last ``local_max_age_ms + flush_ms``, and this replica's own reach Redis
within one ``flush_ms`` and a round trip (docs/continuous-verification.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import ipaddress
import logging
import time
import zoneinfo
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from ..config.models import Risk as RiskConfig
from ..core.principal import Subject, client_key
from .state import SharedState

log = logging.getLogger("vvault_pep.risk")

# KEYS: current window, previous window, baseline, networks, denials, last device
# ARGV: window_s, network ("" if none), device id ("" if none), requests to count
_SCRIPT = """
local cur = redis.call('INCRBY', KEYS[1], ARGV[4])
if cur == tonumber(ARGV[4]) then
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

# A subject's counts of one flush period.  KEYS: its window, the previous window,
# baseline, denials, last device; ARGV: window_s, requests, denials, denial_window_s,
# 1 if the window is the current one (its first requests set the baseline).
_FLUSH = """
local n = tonumber(ARGV[2])
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
if n > 0 then
  cur = redis.call('INCRBY', KEYS[1], n)
  if cur == n then
    redis.call('EXPIRE', KEYS[1], tonumber(ARGV[1]) * 3)
    if ARGV[5] == '1' then
      local prev = tonumber(redis.call('GET', KEYS[2]) or '0')
      local base = tonumber(redis.call('GET', KEYS[3]) or '-1')
      if base < 0 then base = prev else base = 0.7 * base + 0.3 * prev end
      redis.call('SET', KEYS[3], tostring(base), 'EX', 604800)
    end
  end
end
local denials = tonumber(redis.call('GET', KEYS[4]) or '0')
if tonumber(ARGV[3]) > 0 then
  denials = redis.call('INCRBY', KEYS[4], ARGV[3])
  redis.call('EXPIRE', KEYS[4], ARGV[4])
end
return {cur, redis.call('GET', KEYS[3]) or '-1', denials, redis.call('GET', KEYS[5]) or ''}
"""
_MAX_NETS = 64  # networks remembered per subject (others are asked of Redis on the request)
_MAX_SUBJECTS = 100_000  # subjects remembered; past it, the new ones run the script


@dataclass(slots=True)
class _Known:
    """What this replica knows of one subject's counters, and what it counted since."""

    bucket: int  # the window this is about
    count: int  # the window's count in Redis at the last sync (ours included)
    baseline: float
    denials: int  # in Redis at the last sync
    device: str  # the last device Redis holds ("" for none)
    synced: float  # monotonic time of the last sync
    nets: set[str] = field(default_factory=set)  # networks Redis holds for the subject
    pending: int = 0  # requests counted here since, not yet in Redis
    pending_denials: int = 0
    # sent to Redis, reply not yet here: still counted, or a request answered meanwhile
    # would miss them
    flushing: int = 0
    flushing_denials: int = 0

    @property
    def requests(self) -> int:
        return self.count + self.flushing + self.pending

    @property
    def unflushed_denials(self) -> int:
        return self.flushing_denials + self.pending_denials


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
        self.flush_s = cfg.flush_ms / 1000
        # a subject synced longer ago is read on its request
        self.stale_s = max(2 * self.flush_s, cfg.local_max_age_ms / 1000) if self.flush_s else 0.0
        self._known: dict[str, _Known] = {}
        self._flusher: asyncio.Task[None] | None = None
        self.local = 0  # requests answered from local counts
        self.flushes = 0  # flush round trips that completed

    def assess(self, who: Subject, source_ip: str | None, now: dt.datetime) -> Coroutine[Any, Any, dict[str, Any]]:
        """The subject's risk block; the Redis script (if any) is queued now, await the block."""
        if not self.cfg.enabled or self.shared is None:
            return _ready(unavailable())
        subject = risk_subject(who, source_ip)
        shared, window = self.shared, self.cfg.window_s
        bucket = int(time.time()) // window
        network = network_of(source_ip)
        device_id = who.device or ""
        known = self._known.get(subject) if self.flush_s else None
        if (
            known is not None
            and known.bucket == bucket
            and time.monotonic() - known.synced <= self.stale_s
            and (not network or network in known.nets)
            and (not device_id or device_id == known.device)
        ):
            # Nothing on this request that only Redis can judge: counted here, flushed later.
            known.pending += 1
            self.local += 1
            self._flushing()
            res = [known.requests, known.baseline, len(known.nets) or 1, 0, known.denials + known.unflushed_denials]
            return _ready(self._signals(who.tenant, device_id, now, res))
        keys = [
            risk_key(shared, subject, "w", str(bucket)),
            risk_key(shared, subject, "w", str(bucket - 1)),
            risk_key(shared, subject, "baseline"),
            risk_key(shared, subject, "nets"),
            risk_key(shared, subject, "denials"),
            risk_key(shared, subject, "device"),
        ]
        # What was counted here for this window rides along with this request's count.
        carried = known.pending if known is not None and known.bucket == bucket else 0
        if carried:
            assert known is not None
            known.pending, known.flushing = 0, known.flushing + carried
        reply = shared.one(
            lambda p: p.eval(_SCRIPT, len(keys), *keys, window, network, device_id, 1 + carried),
            deadline_s=self.cfg.timeout_ms / 1000,
        )
        carrier = known if carried else None
        return self._block(who.tenant, device_id, now, reply, subject, bucket, network, carrier, carried)

    async def _block(
        self,
        tenant: str | None,
        device_id: str,
        now: dt.datetime,
        reply: Awaitable[Any],
        subject: str,
        bucket: int,
        network: str,
        carrier: _Known | None,
        carried: int,
    ) -> dict[str, Any]:
        res = await reply
        if carrier is not None:  # the state the carried counts were taken from
            carrier.flushing -= carried
            if res is None:
                carrier.pending += carried  # flushed later, not lost
        if res is None:
            return unavailable()
        if self.flush_s:
            self._learn(subject, bucket, network, device_id, res)
            known = self._known.get(subject)
            if known is not None and known.unflushed_denials:
                res = [*res[:4], int(res[4]) + known.unflushed_denials, res[5]]  # ours, not yet in Redis
        return self._signals(tenant, device_id, now, res)

    def _learn(self, subject: str, bucket: int, network: str, device_id: str, res: list[Any]) -> None:
        current, baseline, _, _, denials, previous = res
        known = self._known.get(subject)
        if known is not None and known.bucket != bucket and known.pending:
            return  # the last window's counts are flushed first; learnt at the next request
        if known is None or known.bucket != bucket:
            if known is None and len(self._known) >= _MAX_SUBJECTS:
                return
            pending = known.pending_denials if known is not None else 0
            known = _Known(bucket, 0, -1.0, 0, "", 0.0, set(known.nets) if known else set(), 0, pending)
            self._known[subject] = known
        known.count = max(known.count, int(current))
        known.baseline, known.denials = float(baseline), int(denials)
        known.device = device_id or (previous.decode() if isinstance(previous, bytes) else str(previous))
        if network and len(known.nets) < _MAX_NETS:
            known.nets.add(network)
        known.synced = time.monotonic()
        self._flushing()  # which also forgets subjects gone quiet

    def _signals(self, tenant: str | None, device_id: str, now: dt.datetime, res: list[Any]) -> dict[str, Any]:
        current, baseline, known, added, denials = res[:5]
        previous = res[5] if len(res) > 5 else b""
        baseline_f = float(baseline)
        signals: dict[str, Any] = {
            "requests_in_window": int(current),
            "baseline": round(baseline_f, 2) if baseline_f >= 0 else None,
            "rate_spike": baseline_f >= 0
            and int(current) >= self.cfg.spike_min_requests
            and int(current) > self.cfg.spike_factor * max(baseline_f, 1.0),
            "new_network": int(known) > 0 and int(added) == 1,
            "recent_denials": int(denials),
            "device_change": bool(previous) and bool(device_id) and _text(previous) != device_id,
            "off_hours": off_hours(self.cfg, tenant, now),
        }
        total, band = score(signals)
        return {"available": True, "score": total, "band": band, "signals": signals}

    async def record_denial(self, who: Subject, source_ip: str | None) -> None:
        if not self.cfg.enabled or self.shared is None:
            return
        subject = risk_subject(who, source_ip)
        known = self._known.get(subject) if self.flush_s else None
        if known is not None:
            known.pending_denials += 1  # seen here at once, in Redis at the next flush
            self._flushing()
            return
        shared, ttl = self.shared, self.cfg.denial_window_s
        key = risk_key(shared, subject, "denials")

        async def op(c: Any) -> Any:
            pipe = c.pipeline(transaction=True)
            pipe.incr(key)
            pipe.expire(key, ttl)
            return await pipe.execute()

        await shared.call(op, deadline_s=self.cfg.timeout_ms / 1000)

    # ------------------------------------------------------------ the batched flush

    def _flushing(self) -> None:
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush_loop(), name="risk-flush")

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self.flush_s)
            try:
                await self.flush()
            except Exception:  # a bug here must not end the loop: counts wait for the next
                log.exception("flushing risk counters failed")

    async def flush(self) -> bool:
        """This period's counts of every subject to Redis in one round trip; False if it failed."""
        if self.shared is None:
            return False
        shared, window, now = self.shared, self.cfg.window_s, time.monotonic()
        current = int(time.time()) // window
        for subject in [s for s, k in self._known.items() if not k.pending and not k.pending_denials]:
            if now - self._known[subject].synced > max(self.stale_s, 1.0):
                del self._known[subject]  # its next request runs the script anyway
        batch = [(s, k, k.pending, k.pending_denials) for s, k in self._known.items() if k.pending or k.pending_denials]
        if not batch:
            return True
        replies = []
        for subject, known, n, d in batch:
            known.pending, known.flushing = known.pending - n, known.flushing + n
            known.pending_denials, known.flushing_denials = known.pending_denials - d, known.flushing_denials + d
            keys = [
                risk_key(shared, subject, "w", str(known.bucket)),
                risk_key(shared, subject, "w", str(known.bucket - 1)),
                risk_key(shared, subject, "baseline"),
                risk_key(shared, subject, "denials"),
                risk_key(shared, subject, "device"),
            ]
            args = (window, n, d, self.cfg.denial_window_s, int(known.bucket == current))
            replies.append(shared.one(_flush_op(keys, args)))
        ok = True
        for (_, known, n, d), res in zip(batch, await asyncio.gather(*replies), strict=True):
            known.flushing, known.flushing_denials = known.flushing - n, known.flushing_denials - d
            if res is None:
                known.pending += n  # counted again next time
                known.pending_denials += d
                ok = False
                continue
            count, baseline, denials, device = res
            known.count = max(known.count, int(count))
            known.baseline, known.denials = float(baseline), int(denials)
            known.device = _text(device)
            known.synced = time.monotonic()
        if ok:
            self.flushes += 1
        return ok

    async def stop(self) -> None:
        """Flush what was counted, then stop flushing."""
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                async with asyncio.timeout(2.0):
                    await self._flusher
            self._flusher = None
        with contextlib.suppress(Exception):  # a timeout included: stopping never waits on Redis long
            async with asyncio.timeout(2.0):
                await self.flush()


def _flush_op(keys: list[str], args: tuple[int, ...]) -> Callable[[Any], object]:
    return lambda pipe: pipe.eval(_FLUSH, len(keys), *keys, *args)


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
