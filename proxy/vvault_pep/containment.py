"""Containment: quarantines and token revocations, shared by every replica.

A quarantine names a scope — ``subject``, ``tenant``, ``token`` (a ``jti``) or
``device`` — a value, a reason and a lifetime.  It is written to Redis
(``q:<scope>:<value>``, expiring by itself) and published on a channel; every
replica checks the request's scopes **before** the decision cache and OPA,
so a cached allow cannot outlive it.  A token revocation is a ``token``
quarantine that lives until the token's ``exp``.

Quarantines arrive three ways: a decision's obligation
(``{"type": "quarantine", "scope": "subject", "ttl_s": 900, "reason": "…"}``),
the admin API, or another replica (through Redis).  Each replica also keeps
what it learnt locally, so a quarantine still holds on the replica that made
it when Redis is down — nothing is lifted by an outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Coroutine
from dataclasses import dataclass
from typing import Any

import orjson

from .errors import PepError
from .scopes import scope_values
from .shared_state import SharedState

log = logging.getLogger("vvault_pep.containment")

SCOPES = ("subject", "tenant", "token", "device")
CHANNEL = "quarantine"
SYNC_S = 5.0  # how often a replica re-reads every quarantine from Redis
MAX_TTL_S = 30 * 86_400


@dataclass(frozen=True, slots=True)
class Quarantine:
    scope: str
    value: str
    reason: str
    until: float  # unix time
    by: str  # "policy:<decision_id>" or "admin"

    def doc(self) -> dict[str, Any]:
        return {"scope": self.scope, "value": self.value, "reason": self.reason, "until": self.until, "by": self.by}


def parse_obligation(raw: Any) -> tuple[str, float, str] | None:
    """``(scope, ttl_s, reason)`` of a well-formed quarantine obligation, else None."""
    if not isinstance(raw, dict) or raw.get("type") != "quarantine":
        return None
    scope, ttl, reason = raw.get("scope"), raw.get("ttl_s", 900), raw.get("reason", "")
    if scope not in SCOPES or not isinstance(reason, str):
        return None
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not 0 < ttl <= MAX_TTL_S:
        return None
    return scope, float(ttl), reason[:256]


class Containment:
    def __init__(self, shared: SharedState | None) -> None:
        self.shared = shared
        self._local: dict[tuple[str, str], Quarantine] = {}
        self._unshared: set[tuple[str, str]] = set()  # made here while Redis could not hear it
        self._listener: asyncio.Task[None] | None = None
        self._syncer: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self.shared is not None:
            await self.sync()
            # Not sync() on every (re)subscription yet: it replaces the local mirror, and run
            # beside add() it could drop a quarantine just made here.  The 5-s sync covers it.
            self._listener = self.shared.follow(
                self.shared.key(CHANNEL), self._on_event, None, name="quarantine-listener"
            )
            self._syncer = asyncio.create_task(self._sync_loop(), name="quarantine-sync")

    async def sync(self) -> bool:
        """Mirror every quarantine Redis holds, so an outage later lifts none of them.

        A replica that starts (or reconnects) after a quarantine was made learns it here,
        not only from the channel.  Entries this replica made while Redis was down are kept.
        """
        if self.shared is None:
            return False
        shared = self.shared
        prefix = shared.key("q", "")

        async def op(c: Any) -> list[tuple[bytes, Any]]:
            keys = [k async for k in c.scan_iter(match=prefix + "*", count=500)]
            # A Cluster client reads keys of different slots with mget_nonatomic.
            mget = getattr(c, "mget_nonatomic", None) or c.mget
            return list(zip(keys, await mget(keys), strict=True)) if keys else []

        rows = await shared.call(op, deadline_s=2.0)
        if rows is None:
            return False
        now = time.time()
        mirror = {pair: q for pair, q in self._local.items() if pair in self._unshared and q.until > now}
        for key, raw in rows:
            scope, _, value = key.decode()[len(prefix) :].partition(":")
            if raw is not None and scope in SCOPES:
                mirror[(scope, value)] = _load(scope, value, raw, now)
        self._local = mirror
        return True

    async def _sync_loop(self) -> None:
        while True:
            await asyncio.sleep(SYNC_S)
            await self.sync()

    async def stop(self) -> None:
        for task in (self._listener, self._syncer):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    def _key(self, scope: str, value: str) -> str:
        assert self.shared is not None
        return self.shared.key("q", scope, value)

    def check(self, doc: dict[str, Any]) -> Coroutine[Any, Any, None]:
        """Raise PepError(containment.quarantined) if any scope of the request is contained.

        The Redis read is queued now; awaiting the result raises.
        """
        pairs = scope_values(doc)
        reply = self.shared.mget([self._key(s, v) for s, v in pairs]) if self.shared is not None and pairs else None
        return self._check(pairs, reply)

    async def _check(self, pairs: list[tuple[str, str]], reply: Awaitable[list[Any] | None] | None) -> None:
        if not pairs:
            return
        now = time.time()
        hits: list[Quarantine] = []
        if reply is not None:
            values = await reply
            for (scope, value), raw in zip(pairs, values or [], strict=False):
                if raw is not None:
                    hits.append(_load(scope, value, raw, now))
        for pair in pairs:
            local = self._local.get(pair)
            if local is not None and local.until > now:
                hits.append(local)
        if hits:
            q = hits[0]
            raise PepError(
                "containment.quarantined",
                f"{q.scope} is quarantined" + (f": {q.reason}" if q.reason else ""),
            )

    async def add(self, scope: str, value: str, ttl_s: float, reason: str, by: str) -> tuple[Quarantine, bool]:
        """Quarantine a scope everywhere; returns it and whether Redis shared it."""
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {', '.join(SCOPES)}")
        q = Quarantine(scope, value, reason, time.time() + ttl_s, by)
        self._local[(scope, value)] = q
        if self.shared is None:
            return q, False
        shared, key, blob = self.shared, self._key(scope, value), orjson.dumps(q.doc())

        ms, event = max(1, int(ttl_s * 1000)), orjson.dumps({"op": "add", **q.doc()})
        done = await shared.write_and_publish(lambda p: p.set(key, blob, px=ms), shared.key(CHANNEL), event)
        if not done:
            self._unshared.add((scope, value))
        else:
            self._unshared.discard((scope, value))
        return q, done

    async def lift(self, scope: str, value: str) -> bool:
        self._local.pop((scope, value), None)
        self._unshared.discard((scope, value))
        if self.shared is None:
            return True
        shared, key = self.shared, self._key(scope, value)

        event = orjson.dumps({"op": "lift", "scope": scope, "value": value})
        return await shared.write_and_publish(lambda p: p.delete(key), shared.key(CHANNEL), event)

    async def list(self) -> list[dict[str, Any]]:
        now = time.time()
        found = {pair: q for pair, q in self._local.items() if q.until > now}
        if self.shared is not None:
            shared = self.shared
            prefix = shared.key("q", "")

            async def op(c: Any) -> list[tuple[bytes, bytes]]:
                keys = [k async for k in c.scan_iter(match=prefix + "*", count=500)]
                mget = getattr(c, "mget_nonatomic", None) or c.mget
                return list(zip(keys, await mget(keys), strict=True)) if keys else []

            for key, raw in await shared.call(op, deadline_s=2.0) or []:
                scope, _, value = key.decode()[len(prefix) :].partition(":")
                if raw is not None:
                    found[(scope, value)] = _load(scope, value, raw, now)
        return [q.doc() for q in found.values()]

    def _on_event(self, data: bytes) -> None:
        """Mirror another replica's quarantine locally (for when Redis later fails)."""
        try:
            event = orjson.loads(data)
            pair = (str(event["scope"]), str(event["value"]))
            if event.get("op") == "lift":
                self._local.pop(pair, None)
            else:
                self._local[pair] = Quarantine(
                    pair[0], pair[1], str(event.get("reason", "")), float(event["until"]), str(event.get("by", ""))
                )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return


def _load(scope: str, value: str, raw: bytes, now: float) -> Quarantine:
    try:
        doc = orjson.loads(raw)
        return Quarantine(
            scope, value, str(doc.get("reason", "")), float(doc.get("until", now + 60)), str(doc.get("by", ""))
        )
    except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
        # An entry we cannot read still means "contained": never fail open on garbage.
        return Quarantine(scope, value, "", now + 60, "unknown")
