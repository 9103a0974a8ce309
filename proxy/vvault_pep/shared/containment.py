"""Containment: quarantines and token revocations, shared by every replica.

A quarantine names a scope — ``subject``, ``workload``, ``certificate``,
``token`` (a ``jti``), ``device`` or ``tenant`` — a value, a reason and a
lifetime.  It is written to Redis (``q:{c}:<scope>:<value>``, expiring by itself)
and published on a channel; every replica checks **every** scope of the
request's verified :class:`~vvault_pep.core.principal.Subject` before the decision cache and
OPA, so a cached allow cannot outlive it.  A token revocation is a ``token``
quarantine that lives until the token's ``exp``.

Quarantines arrive three ways: a decision's obligation
(``{"type": "quarantine", "scope": "subject", "ttl_s": 900, "reason": "…"}``),
the admin API, or another replica (through Redis).

The shared set never shrinks by absence.  Each replica keeps every entry it
knows (made here, heard on the channel, read from Redis) until the entry's
own expiry or an explicit lift, and :meth:`Containment.reconcile` — on every
(re)subscription of the channel, every (re)connection, when Redis shows it lost its data, and every
:data:`~vvault_pep.shared.state.FULL_S` (:meth:`~vvault_pep.shared.state.SharedState.watch`) —
runs both ways: entries Redis lacks (made during an outage, lost by a
restart, a flush or a failover) are written back with their remaining
lifetime and published; entries Redis holds that this replica lacks are
added.  A lift deletes the entry and leaves a lift record
(``ql:{c}:<scope>:<value>``, the lift's time) for as long as the lifted entry
could have lived, so a replica that was cut off when the lift happened drops
its copy when it reconnects instead of writing it back; a quarantine made
*after* the lift (later ``since``) stands.

With a :class:`~vvault_pep.shared.push.Push` channel the events travel on it, and
while it is known healthy :meth:`Containment.check` answers from this replica's
entries alone, with no Redis command; otherwise it reads the request's keys as
well (the fall back, the only mode without push).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Coroutine
from dataclasses import dataclass, replace
from typing import Any

import orjson

from ..core.decision import MAX_TTL_S
from ..core.principal import SCOPES, Subject
from ..errors import PepError
from .push import Push
from .state import CONTAINMENT_TAG, Generation, SharedState, stop_task

log = logging.getLogger("vvault_pep.containment")

CHANNEL = "quarantine"
_LIFT_MIN_S = 60.0  # a lift record outlives the entry it lifted by at least this much
_FIRST_SUBSCRIPTION_S = 2.0  # how long start() waits for the channel before reading Redis alone


@dataclass(frozen=True, slots=True)
class Quarantine:
    scope: str
    value: str
    reason: str
    until: float  # unix time
    by: str  # "policy:<decision_id>" or "admin"
    since: float = 0.0  # unix time it was made; a lift made later ends it

    def doc(self) -> dict[str, Any]:
        return {
            "scope": self.scope,
            "value": self.value,
            "reason": self.reason,
            "until": self.until,
            "by": self.by,
            "since": self.since,
        }


# Every Redis key of containment is built here.  All of them carry one hash tag
# (CONTAINMENT_TAG, shared with the cache epochs): on a Cluster they are in one slot,
# so a request's quarantine check is one MGET on one node and reconciliation scans
# that one node.  They are few and small (see docs/deploy.md, sizing).
def quarantine_key(shared: SharedState, scope: str, value: str) -> str:
    return shared.key_for("q", CONTAINMENT_TAG, scope, value)


def quarantine_prefix(shared: SharedState) -> str:
    return shared.key_for("q", CONTAINMENT_TAG) + ":"


def lift_key(shared: SharedState, scope: str, value: str) -> str:
    return shared.key_for("ql", CONTAINMENT_TAG, scope, value)


def lift_prefix(shared: SharedState) -> str:
    return shared.key_for("ql", CONTAINMENT_TAG) + ":"


def scan_pattern(shared: SharedState) -> str:
    """A SCAN pattern matching both kinds above (and, harmlessly, other ``q*`` keys)."""
    return shared.key("q") + "*"


def channel_key(shared: SharedState) -> str:
    return shared.key(CHANNEL)


@dataclass(frozen=True, slots=True)
class Contained:
    hit: Quarantine | None  # the first quarantine that holds, if any
    answered: bool  # whether Redis answered the check

    def raise_if_held(self) -> None:
        q = self.hit
        if q is not None:
            raise PepError(
                "containment.quarantined",
                f"{q.scope} is quarantined" + (f": {q.reason}" if q.reason else ""),
            )


class Containment:
    def __init__(
        self, shared: SharedState | None, push: Push | None = None, generation: Generation | None = None
    ) -> None:
        self.shared = shared
        self.push = push
        self.gen = generation if generation is not None else Generation()
        self.channel = push.channel if push is not None else channel_key(shared) if shared is not None else ""
        self._local: dict[tuple[str, str], Quarantine] = {}
        # Lifts: pair → (time of the lift, how long to keep the record).
        self._lifted: dict[tuple[str, str], tuple[float, float]] = {}
        self._unshared: set[tuple[str, str]] = set()  # not yet known written to Redis
        self._listener: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()  # set after the first (re)subscription's reconciliation
        self.reconciles = 0
        self.written_back = 0  # entries this replica wrote back to a Redis that lacked them
        self.last_reconciled: float | None = None  # unix time

    @property
    def generation(self) -> int:
        """Moves whenever a quarantine is added, lifted or expires, or the push mode changes."""
        return self.gen.value

    async def start(self) -> None:
        if self.push is not None:
            # The push channel subscribes and reconciles (its owner starts it).
            self.push.handle("add", self._heard)
            self.push.handle("lift", self._heard)
            self.push.reconciler(self.reconcile)
            return
        if self.shared is not None:
            # Subscribe first, then reconcile (on every (re)subscription): what is published
            # between the two is heard, what was published before is read back, and nothing
            # is dropped by absence, so running beside add() or lift() loses nothing.  The
            # first reconciliation is awaited here, so a replica starts knowing what Redis holds.
            self._subscribed = asyncio.Event()
            self._listener = self.shared.follow(
                self.channel, self._on_event, self._resubscribed, name="quarantine-listener"
            )
            try:
                async with asyncio.timeout(_FIRST_SUBSCRIPTION_S):
                    await self._subscribed.wait()
            except TimeoutError:  # Redis slow or away: read what it holds now; the watcher carries on
                await self.reconcile()

    async def reconcile(self, lost: bool = True) -> bool:
        """Both ways with Redis; True when Redis answered.

        What Redis holds and this replica lacks is added; what this replica holds and
        Redis lacks is written back (remaining lifetime) and published; lift records
        end the copies made before them, here and in Redis.  Nothing is dropped because
        Redis does not hold it.
        """
        if self.shared is None:
            return False
        shared = self.shared
        q_prefix, l_prefix = quarantine_prefix(shared), lift_prefix(shared)
        # Keys without the hash tag, as an earlier version wrote them: read, and written
        # back under the tagged names, so an upgrade loses no quarantine and no lift.
        old_q, old_l = shared.key("q", ""), shared.key("ql", "")

        async def read(c: Any) -> list[tuple[bytes, Any]]:
            # One SCAN for quarantines and lift records, then their values.  On a Cluster
            # they share one slot: the SCAN goes to the master that owns it.
            where = {"target_nodes": await _owner(c, q_prefix)} if shared.cluster else {}
            keys = [
                k
                async for k in c.scan_iter(match=scan_pattern(shared), count=500, **where)
                if k.decode(errors="replace").startswith((q_prefix, l_prefix, old_q, old_l))
            ]
            # A Cluster client reads keys of different slots with mget_nonatomic.
            mget = getattr(c, "mget_nonatomic", None) or c.mget
            return list(zip(keys, await mget(keys), strict=True)) if keys else []

        rows = await shared.call(read, deadline_s=2.0)
        if rows is None:
            return False
        now = time.time()
        in_redis: dict[tuple[str, str], Quarantine] = {}
        lifts_in_redis: set[tuple[str, str]] = set()
        untagged: list[Quarantine] = []
        for key, raw in rows:
            name = key.decode(errors="replace")
            prefix = next(p for p in (q_prefix, l_prefix, old_q, old_l) if name.startswith(p))
            is_lift, tagged = prefix in (l_prefix, old_l), prefix in (q_prefix, l_prefix)
            scope, _, value = name[len(prefix) :].partition(":")
            if raw is None or scope not in SCOPES:
                continue
            if is_lift:
                if tagged:
                    lifts_in_redis.add((scope, value))
                self._note_lift((scope, value), *_lift_doc(raw, now))
            elif tagged:
                in_redis[(scope, value)] = _load(scope, value, raw, now)
            else:
                untagged.append(_load(scope, value, raw, now))
        self._expire(now)
        for q in [*in_redis.values(), *untagged]:
            # Past its own end (Redis's copy may outlive it by the moment the write took),
            # or ended by a lift: not taken.
            if q.until <= now or self._is_lifted((q.scope, q.value), q):
                continue
            self._merge(q)
        # Written back: every live entry Redis lacks (or holds for less long), every lift
        # record Redis lacks, and every Redis entry a lift it had not heard of ends.
        writes: list[Quarantine] = []
        for pair, q in self._local.items():
            theirs = in_redis.get(pair)
            if theirs is None or theirs.until < q.until - 1.0:
                writes.append(q)
        lifts = [(pair, at, keep) for pair, (at, keep) in self._lifted.items() if pair not in lifts_in_redis]
        stale = [pair for pair, q in in_redis.items() if self._is_lifted(pair, q)]
        if writes or lifts or stale:
            if not await self._write_back(writes, lifts, stale, now):
                return False
            self.written_back += len(writes)
        self._unshared.clear()
        self.reconciles += 1
        self.last_reconciled = now
        return True

    async def _write_back(
        self,
        writes: list[Quarantine],
        lifts: list[tuple[tuple[str, str], float, float]],
        stale: list[tuple[str, str]],
        now: float,
    ) -> bool:
        assert self.shared is not None
        shared = self.shared
        channel = self.channel

        async def op(c: Any) -> Any:
            pipe = c.pipeline(transaction=False)
            publish = pipe.spublish if shared.cluster else pipe.publish  # sharded on a Cluster
            for q in writes:
                pipe.set(quarantine_key(shared, q.scope, q.value), orjson.dumps(q.doc()), px=_ms(q.until - now))
                publish(channel, orjson.dumps({"op": "add", **q.doc()}))
            for (scope, value), at, keep in lifts:
                lift = {"at": at, "keep": keep}
                pipe.set(lift_key(shared, scope, value), orjson.dumps(lift), px=_ms(keep - now))
                publish(channel, orjson.dumps({"op": "lift", "scope": scope, "value": value, **lift}))
            for scope, value in stale:
                pipe.delete(quarantine_key(shared, scope, value))
            return await pipe.execute()

        done = await shared.call(op, deadline_s=2.0)
        if done is not None and writes:
            log.warning("wrote %d quarantine(s) back to Redis, which lacked them", len(writes))
        return done is not None

    def _merge(self, q: Quarantine) -> None:
        """Keep the longer-lived of two copies of one entry."""
        pair = (q.scope, q.value)
        mine = self._local.get(pair)
        if mine is None or q.until > mine.until:
            self._local[pair] = q if mine is None else replace(q, since=max(q.since, mine.since))
            self.gen.bump()

    def _note_lift(self, pair: tuple[str, str], at: float, keep: float) -> None:
        known = self._lifted.get(pair)
        if known is None or at > known[0]:
            self._lifted[pair] = (at, max(keep, known[1] if known else 0.0))
            self.gen.bump()
        mine = self._local.get(pair)
        if mine is not None and mine.since <= at:
            del self._local[pair]
            self._unshared.discard(pair)
            self.gen.bump()

    def _is_lifted(self, pair: tuple[str, str], q: Quarantine) -> bool:
        lift = self._lifted.get(pair)
        return lift is not None and q.since <= lift[0]

    def _expire(self, now: float) -> None:
        for pair in [p for p, q in self._local.items() if q.until <= now]:
            del self._local[pair]
            self.gen.bump()
        for pair in [p for p, (_, keep) in self._lifted.items() if keep <= now]:
            del self._lifted[pair]
            self.gen.bump()

    async def stop(self) -> None:
        if self._listener is not None:
            await stop_task(self._listener)

    @property
    def unshared(self) -> int:
        """Entries and lifts made here while Redis could not hear them."""
        return len(self._unshared)

    def check(self, subject: Subject) -> Coroutine[Any, Any, Contained]:
        """Whether any scope of the subject is contained, and whether Redis answered.

        The Redis read is queued now; await the answer.  Without Redis's answer, what
        this replica knows is checked all the same.  While the push channel is known
        healthy, what this replica knows is all there is: no Redis command.
        """
        pairs = subject.scopes
        reply = None
        if self.push is not None and self.push.healthy:
            return self._known(pairs)
        if self.shared is not None and pairs:
            shared = self.shared
            reply = shared.mget([quarantine_key(shared, s, v) for s, v in pairs])
        return self._check(pairs, reply)

    async def _known(self, pairs: tuple[tuple[str, str], ...]) -> Contained:
        now = time.time()
        for pair in pairs:
            local = self._local.get(pair)
            if local is not None and local.until > now:
                return Contained(local, True)
        return Contained(None, True)

    async def _check(self, pairs: tuple[tuple[str, str], ...], reply: Awaitable[list[Any] | None] | None) -> Contained:
        if not pairs:
            return Contained(None, self.shared is not None and self.shared.available)
        now = time.time()
        hits: list[Quarantine] = []
        answered = False
        if reply is not None:
            values = await reply
            answered = values is not None
            for (scope, value), raw in zip(pairs, values or [], strict=False):
                if raw is not None:
                    hits.append(_load(scope, value, raw, now))
        for pair in pairs:
            local = self._local.get(pair)
            if local is not None and local.until > now:
                hits.append(local)
        return Contained(hits[0] if hits else None, answered)

    async def add(self, scope: str, value: str, ttl_s: float, reason: str, by: str) -> tuple[Quarantine, bool]:
        """Quarantine a scope everywhere; returns it and whether Redis shared it."""
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {', '.join(SCOPES)}")
        now = time.time()
        q = Quarantine(scope, value, reason, now + ttl_s, by, since=now)
        self._local[(scope, value)] = q
        self.gen.bump()
        if self.shared is None:
            return q, False
        shared, key, blob = self.shared, quarantine_key(self.shared, scope, value), orjson.dumps(q.doc())

        event = orjson.dumps({"op": "add", **q.doc()})
        done = await shared.write_and_publish(lambda p: p.set(key, blob, px=_ms(ttl_s)), self.channel, event)
        if not done:
            self._unshared.add((scope, value))  # reconcile() writes it back
        return q, done

    async def lift(self, scope: str, value: str) -> bool:
        """End a quarantine everywhere (an explicit, audited act); whether Redis shared it."""
        pair = (scope, value)
        now = time.time()
        lifted = self._local.pop(pair, None)
        if lifted is not None:
            self.gen.bump()
        keep = max(lifted.until if lifted is not None else now + MAX_TTL_S, now) + _LIFT_MIN_S
        self._note_lift(pair, now, keep)
        if self.shared is None:
            return True
        shared = self.shared

        lift = {"at": now, "keep": keep}

        def write(pipe: Any) -> None:
            pipe.delete(quarantine_key(shared, scope, value))
            pipe.set(lift_key(shared, scope, value), orjson.dumps(lift), px=_ms(keep - now))

        event = orjson.dumps({"op": "lift", "scope": scope, "value": value, **lift})
        done = await shared.write_and_publish(write, self.channel, event)
        if not done:
            self._unshared.add(pair)  # the lift record is written back by reconcile()
        return done

    async def list(self) -> list[dict[str, Any]]:
        now = time.time()
        found = {pair: q for pair, q in self._local.items() if q.until > now}
        if self.shared is not None:
            shared = self.shared
            prefix = quarantine_prefix(shared)

            async def op(c: Any) -> list[tuple[bytes, bytes]]:
                where = {"target_nodes": await _owner(c, prefix)} if shared.cluster else {}
                keys = [k async for k in c.scan_iter(match=prefix + "*", count=500, **where)]
                mget = getattr(c, "mget_nonatomic", None) or c.mget
                return list(zip(keys, await mget(keys), strict=True)) if keys else []

            for key, raw in await shared.call(op, deadline_s=2.0) or []:
                scope, _, value = key.decode()[len(prefix) :].partition(":")
                if raw is not None and scope in SCOPES:
                    q = _load(scope, value, raw, now)
                    if not self._is_lifted((scope, value), q):
                        found.setdefault((scope, value), q)
        return [q.doc() for q in found.values()]

    def _on_event(self, data: bytes) -> None:
        """Mirror other replicas' quarantines and lifts as they happen."""
        try:
            self._heard(orjson.loads(data))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            return

    async def _resubscribed(self) -> None:
        done = await self.reconcile()
        self._subscribed.set()
        if not done:
            log.warning("reconciling after subscribing failed; the watcher retries")

    def _heard(self, event: dict[str, Any]) -> None:
        pair = (str(event["scope"]), str(event["value"]))
        if pair[0] not in SCOPES:
            return
        now = time.time()
        if event.get("op") == "lift":
            at, keep = event.get("at", now), event.get("keep", now + _LIFT_MIN_S)
            if _number(at) and _number(keep):  # a lift says exactly when, or lifts nothing
                self._note_lift(pair, float(at), float(keep))
            return
        q = Quarantine(
            pair[0],
            pair[1],
            str(event.get("reason", "")),
            float(event["until"]),
            str(event.get("by", "")),
            float(event.get("since", 0.0)),
        )
        if q.until > now and not self._is_lifted(pair, q):
            self._merge(q)


async def _owner(cluster: Any, key: str) -> Any:
    """The master owning ``key``'s slot (the client learns the slot map first if it must)."""
    await cluster.initialize()
    return cluster.get_node_from_key(key)


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def _lift_doc(raw: bytes, now: float) -> tuple[float, float]:
    """(time of the lift, keep the record until) of a lift record.

    An unreadable one lifts nothing: its time is -inf, before every quarantine, also one
    without a ``since`` (0.0: an earlier version's entry, an event without it).
    """
    try:
        doc = orjson.loads(raw)
        at, keep = doc["at"], doc.get("keep", now + _LIFT_MIN_S)
        if _number(at) and _number(keep):
            return float(at), float(keep)
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        pass
    return -math.inf, now + _LIFT_MIN_S


def _number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _load(scope: str, value: str, raw: bytes, now: float) -> Quarantine:
    try:
        doc = orjson.loads(raw)
        return Quarantine(
            scope,
            value,
            str(doc.get("reason", "")),
            float(doc.get("until", now + 60)),
            str(doc.get("by", "")),
            float(doc.get("since", 0.0)),
        )
    except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
        # An entry we cannot read still means "contained": never fail open on garbage.
        return Quarantine(scope, value, "", now + 60, "unknown")
