"""Containment, rule by rule, on a real Redis: scopes, keys, lifetimes, merges, lifts.

Two :class:`~vvault_pep.shared.containment.Containment` objects on one redis-server stand for
two replicas; each test has its own key prefix.  What is checked is what an operator or
another replica sees: which scopes a quarantine holds, what lands in Redis under which key and
for how long, which copy wins when two meet, what a lift ends (and what it leaves standing),
what an unreadable entry means, and what is refused.  How a replica learns of another's
quarantine (a read of Redis, a channel message) is left open: the tests wait for the outcome.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import orjson
import pytest
import redis.asyncio as aioredis
from tests.conftest import RedisServer
from tests.heard import until

from vvault_pep.config.models import Redis as RedisConfig
from vvault_pep.core.principal import SCOPES, Subject
from vvault_pep.errors import PepError
from vvault_pep.shared import containment as cm
from vvault_pep.shared.containment import Contained, Containment, Quarantine
from vvault_pep.shared.state import SharedState


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}:"


@pytest.fixture
async def raw(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_server.url)
    yield client
    await client.aclose()


async def _shared(redis_server: RedisServer, prefix: str) -> SharedState:
    return SharedState(RedisConfig(url=redis_server.url, key_prefix=prefix, timeout_ms=2000))


@pytest.fixture
async def replicas(redis_server: RedisServer, prefix: str) -> AsyncIterator[tuple[Containment, Containment]]:
    made: list[tuple[SharedState, Containment]] = []
    for _ in range(2):
        shared = await _shared(redis_server, prefix)
        made.append((shared, Containment(shared)))
    yield made[0][1], made[1][1]
    for shared, c in made:
        await c.stop()
        await shared.close()


def subject(*pairs: tuple[str, str]) -> Subject:
    return Subject(scopes=tuple(pairs))


async def held(c: Containment, *pairs: tuple[str, str]) -> Quarantine | None:
    return (await c.check(subject(*pairs))).hit


# --- keys ----------------------------------------------------------------------


def test_every_key_carries_the_containment_tag(prefix: str) -> None:
    shared = SharedState(RedisConfig(url="redis://127.0.0.1:1/0", key_prefix=prefix))
    assert cm.quarantine_key(shared, "subject", "alice") == f"{prefix}q:{{c}}:subject:alice"
    assert cm.quarantine_prefix(shared) == f"{prefix}q:{{c}}:"
    assert cm.lift_key(shared, "token", "j1") == f"{prefix}ql:{{c}}:token:j1"
    assert cm.lift_prefix(shared) == f"{prefix}ql:{{c}}:"
    assert cm.scan_pattern(shared) == f"{prefix}q*"
    assert cm.channel_key(shared) == f"{prefix}quarantine"


# --- add -------------------------------------------------------------------------


async def test_a_quarantine_lands_in_redis_under_its_key_for_its_lifetime(
    replicas: tuple[Containment, Containment], raw: aioredis.Redis, prefix: str
) -> None:
    a, _ = replicas
    before = time.time()
    q, shared = await a.add("device", "d-1", 30, "lost laptop", "admin")
    after = time.time()
    assert shared is True
    assert (q.scope, q.value, q.reason, q.by) == ("device", "d-1", "lost laptop", "admin")
    assert before <= q.since <= after and q.until == pytest.approx(q.since + 30)
    key = f"{prefix}q:{{c}}:device:d-1"
    assert orjson.loads(await raw.get(key)) == q.doc()
    assert q.doc() == {
        "scope": "device",
        "value": "d-1",
        "reason": "lost laptop",
        "until": q.until,
        "by": "admin",
        "since": q.since,
    }
    assert 28_000 < await raw.pttl(key) <= 30_000
    assert a.unshared == 0


async def test_a_short_quarantine_still_gets_a_positive_redis_lifetime(
    replicas: tuple[Containment, Containment], raw: aioredis.Redis, prefix: str
) -> None:
    a, _ = replicas
    await a.add("token", "j-short", 0.0004, "", "admin")  # 0.4 ms: rounded to 0 it would never expire
    assert await raw.pttl(f"{prefix}q:{{c}}:token:j-short") in (-2, 0, 1)


@pytest.mark.parametrize("scope", ["user", "Subject", "", "ip"])
async def test_an_unknown_scope_is_refused(replicas: tuple[Containment, Containment], scope: str) -> None:
    a, _ = replicas
    with pytest.raises(
        ValueError, match=r"^scope must be one of subject, workload, certificate, token, device, tenant$"
    ):
        await a.add(scope, "x", 30, "", "admin")
    assert await a.list() == []


@pytest.mark.parametrize("scope", SCOPES)
async def test_each_scope_holds_only_its_own_value(replicas: tuple[Containment, Containment], scope: str) -> None:
    a, _ = replicas
    await a.add(scope, "v1", 30, "why", "admin")
    assert (await held(a, (scope, "v1"))) is not None
    assert await held(a, (scope, "v2")) is None
    other = next(s for s in SCOPES if s != scope)
    assert await held(a, (other, "v1")) is None
    # every scope of the subject is checked, not only the first
    hit = await held(a, (other, "v1"), (scope, "v1"))
    assert hit is not None and (hit.scope, hit.value) == (scope, "v1")


async def test_the_refusal_names_the_scope_and_the_reason(replicas: tuple[Containment, Containment]) -> None:
    a, _ = replicas
    await a.add("tenant", "acme", 30, "incident 42", "policy:d1")
    await a.add("workload", "w", 30, "", "admin")
    with pytest.raises(PepError) as err:
        (await a.check(subject(("tenant", "acme")))).raise_if_held()
    assert (err.value.code, err.value.detail) == ("containment.quarantined", "tenant is quarantined: incident 42")
    with pytest.raises(PepError) as err:
        (await a.check(subject(("workload", "w")))).raise_if_held()
    assert (err.value.code, err.value.detail) == ("containment.quarantined", "workload is quarantined")
    (await a.check(subject(("workload", "other")))).raise_if_held()  # nothing held: no error


async def test_a_subject_without_scopes_is_never_held(replicas: tuple[Containment, Containment]) -> None:
    a, _ = replicas
    await a.add("subject", "alice", 30, "", "admin")
    assert await a.check(subject()) == Contained(None, True)


async def test_another_replica_holds_the_quarantine(replicas: tuple[Containment, Containment]) -> None:
    a, b = replicas
    await b.start()
    q, _ = await a.add("subject", "alice", 30, "r", "admin")
    await until(lambda: held(b, ("subject", "alice")))
    hit = await held(b, ("subject", "alice"))
    assert hit is not None and (hit.reason, hit.by, hit.until) == ("r", "admin", pytest.approx(q.until))


async def test_an_expired_quarantine_holds_nothing(replicas: tuple[Containment, Containment]) -> None:
    a, _ = replicas
    await a.add("subject", "brief", 0.2, "", "admin")
    assert await held(a, ("subject", "brief")) is not None
    await until(lambda: _not_held(a, ("subject", "brief")))
    assert await a.list() == []


async def _not_held(c: Containment, pair: tuple[str, str]) -> bool:
    return await held(c, pair) is None


# --- without Redis ------------------------------------------------------------------


async def test_without_redis_a_quarantine_holds_here_and_says_it_was_not_shared() -> None:
    c = Containment(None)
    q, shared = await c.add("subject", "alice", 30, "", "admin")
    assert shared is False
    assert await c.check(subject(("subject", "alice"))) == Contained(q, False)
    assert await c.check(subject()) == Contained(None, False)
    assert await c.reconcile() is False
    assert await c.lift("subject", "alice") is True
    assert await c.check(subject(("subject", "alice"))) == Contained(None, False)
    await c.start()  # nothing to follow
    await c.stop()


async def test_with_redis_down_a_quarantine_holds_here_and_is_written_back_later(
    redis_server: RedisServer, raw: aioredis.Redis, prefix: str
) -> None:
    shared = SharedState(RedisConfig(url="redis://127.0.0.1:1/0", key_prefix=prefix, timeout_ms=200))
    c = Containment(shared)
    try:
        q, done = await c.add("token", "j1", 30, "", "admin")
        assert done is False and c.unshared == 1
        assert (await c.check(subject(("token", "j1")))).hit == q
        assert await c.lift("token", "j2") is False
        assert await c.lift("token", "j3") is False
        assert c.unshared == 3  # each entry and each lift Redis did not hear, counted once
    finally:
        await shared.close()
    # the same replica, Redis reachable again: reconcile writes both back
    up = await _shared(redis_server, prefix)
    c.shared = up
    try:
        assert await c.reconcile() is True
        assert c.unshared == 0 and c.written_back == 1 and c.reconciles == 1
        assert orjson.loads(await raw.get(f"{prefix}q:{{c}}:token:j1")) == q.doc()
        for jti in ("j2", "j3"):
            lift = orjson.loads(await raw.get(f"{prefix}ql:{{c}}:token:{jti}"))
            assert set(lift) == {"at", "keep"}
    finally:
        await up.close()


# --- lift ----------------------------------------------------------------------------


async def test_a_lift_ends_the_quarantine_everywhere_and_leaves_a_record(
    replicas: tuple[Containment, Containment], raw: aioredis.Redis, prefix: str
) -> None:
    a, b = replicas
    await b.start()
    q, _ = await a.add("subject", "alice", 30, "", "admin")
    await until(lambda: held(b, ("subject", "alice")))
    before = time.time()
    assert await a.lift("subject", "alice") is True
    after = time.time()
    assert await held(a, ("subject", "alice")) is None
    assert await raw.get(f"{prefix}q:{{c}}:subject:alice") is None
    lift = orjson.loads(await raw.get(f"{prefix}ql:{{c}}:subject:alice"))
    assert before <= lift["at"] <= after
    # kept for as long as the lifted entry could have lived, plus a minute
    assert lift["keep"] == pytest.approx(q.until + 60, abs=0.01)
    ttl = await raw.pttl(f"{prefix}ql:{{c}}:subject:alice")
    assert 88_000 < ttl <= 90_000
    await until(lambda: _not_held(b, ("subject", "alice")))


async def test_a_lift_of_an_unknown_entry_is_kept_for_the_longest_lifetime(
    replicas: tuple[Containment, Containment], raw: aioredis.Redis, prefix: str
) -> None:
    from vvault_pep.core.decision import MAX_TTL_S

    a, _ = replicas
    now = time.time()
    assert await a.lift("device", "never-seen") is True
    lift = orjson.loads(await raw.get(f"{prefix}ql:{{c}}:device:never-seen"))
    assert lift["keep"] == pytest.approx(now + MAX_TTL_S + 60, abs=2)


async def test_a_quarantine_made_after_a_lift_stands(replicas: tuple[Containment, Containment]) -> None:
    a, b = replicas
    await a.add("subject", "bob", 30, "", "admin")
    await a.lift("subject", "bob")
    await asyncio.sleep(0.01)  # a later `since` than the lift's time
    again, _ = await a.add("subject", "bob", 30, "again", "admin")
    assert await held(a, ("subject", "bob")) == again
    assert await a.reconcile() is True  # the lift record in Redis ends only what came before it
    assert await held(a, ("subject", "bob")) == again
    assert await b.reconcile() is True
    assert await held(b, ("subject", "bob")) is not None


# --- reconcile: both ways -------------------------------------------------------------


async def test_reconcile_adds_what_redis_holds_and_writes_back_what_it_lacks(
    replicas: tuple[Containment, Containment], raw: aioredis.Redis, prefix: str
) -> None:
    a, b = replicas
    qa, _ = await a.add("subject", "alice", 30, "a", "admin")
    await raw.delete(f"{prefix}q:{{c}}:subject:alice")  # Redis lost it (a restart, a flush)
    assert await b.reconcile() is True
    assert await held(b, ("subject", "alice")) is None  # nobody told b
    assert await a.reconcile() is True
    assert a.written_back == 1
    assert orjson.loads(await raw.get(f"{prefix}q:{{c}}:subject:alice")) == qa.doc()
    assert 27_000 < await raw.pttl(f"{prefix}q:{{c}}:subject:alice") <= 30_000  # what is left of its life
    assert await b.reconcile() is True
    assert await held(b, ("subject", "alice")) == qa
    assert b.written_back == 0 and b.last_reconciled is not None and b.reconciles == 2


async def test_reconcile_writes_back_a_longer_life_than_redis_holds(
    replicas: tuple[Containment, Containment], raw: aioredis.Redis, prefix: str
) -> None:
    a, _ = replicas
    q, _ = await a.add("token", "j", 60, "", "admin")
    key = f"{prefix}q:{{c}}:token:j"
    shorter = {**q.doc(), "until": q.until - 30}
    await raw.set(key, orjson.dumps(shorter), px=30_000)
    assert await a.reconcile() is True
    assert orjson.loads(await raw.get(key))["until"] == q.until
    # within a second of each other they are the same entry: nothing written
    await raw.set(key, orjson.dumps({**q.doc(), "until": q.until - 0.5}), px=30_000)
    written = a.written_back
    assert await a.reconcile() is True
    assert a.written_back == written
    assert orjson.loads(await raw.get(key))["until"] == q.until - 0.5


async def test_the_longer_lived_copy_wins_and_keeps_the_later_since(
    replicas: tuple[Containment, Containment], raw: aioredis.Redis, prefix: str
) -> None:
    a, _ = replicas
    mine, _ = await a.add("device", "d", 30, "mine", "admin")
    key = f"{prefix}q:{{c}}:device:d"
    theirs = {**mine.doc(), "reason": "theirs", "until": mine.until + 100, "since": mine.since - 50}
    await raw.set(key, orjson.dumps(theirs), px=200_000)
    assert await a.reconcile() is True
    await raw.delete(key)  # what this replica holds now, not what Redis says
    hit = await held(a, ("device", "d"))
    assert hit is not None
    assert (hit.reason, hit.until, hit.since) == ("theirs", mine.until + 100, mine.since)
    # a shorter copy does not replace the longer one
    await raw.set(key, orjson.dumps({**theirs, "reason": "short", "until": mine.until - 10}), px=200_000)
    assert await a.reconcile() is True
    await raw.delete(key)
    hit = await held(a, ("device", "d"))
    assert hit is not None and hit.reason == "theirs"


async def test_reconcile_drops_copies_a_lift_ended_and_deletes_them_in_redis(
    replicas: tuple[Containment, Containment], raw: aioredis.Redis, prefix: str
) -> None:
    a, b = replicas
    qa, _ = await a.add("subject", "carol", 30, "", "admin")
    assert await b.reconcile() is True
    assert await held(b, ("subject", "carol")) is not None
    # a lift b never heard of: only its record is in Redis (the entry itself came back somehow)
    at = time.time()
    await raw.set(f"{prefix}ql:{{c}}:subject:carol", orjson.dumps({"at": at, "keep": at + 120}), px=120_000)
    assert await b.reconcile() is True
    assert await held(b, ("subject", "carol")) is None
    assert await raw.get(f"{prefix}q:{{c}}:subject:carol") is None  # stale entry deleted
    assert await a.reconcile() is True
    assert await held(a, ("subject", "carol")) is None
    assert (await a.list()) == []
    assert qa.since <= at


async def test_reconcile_writes_back_a_lift_redis_lacks(
    replicas: tuple[Containment, Containment], raw: aioredis.Redis, prefix: str
) -> None:
    a, _ = replicas
    await a.add("subject", "dave", 30, "", "admin")
    await a.lift("subject", "dave")
    key = f"{prefix}ql:{{c}}:subject:dave"
    record = orjson.loads(await raw.get(key))
    await raw.delete(key)
    assert await a.reconcile() is True
    assert orjson.loads(await raw.get(key)) == record
    assert 85_000 < await raw.pttl(key) <= 90_000


async def test_an_unreadable_entry_in_redis_still_contains(
    replicas: tuple[Containment, Containment], raw: aioredis.Redis, prefix: str
) -> None:
    a, _ = replicas
    for value, blob in (("garbage", b"not json"), ("list", b"[1, 2]"), ("bad-until", b'{"until": "soon"}')):
        await raw.set(f"{prefix}q:{{c}}:subject:{value}", blob, px=60_000)
    before = time.time()
    assert await a.reconcile() is True
    for value in ("garbage", "list", "bad-until"):
        hit = await held(a, ("subject", value))
        after = time.time()
        assert hit is not None, value
        assert (hit.by, hit.reason) == ("unknown", "")
        assert before + 60 <= hit.until <= after + 60  # a minute, then read again


async def test_missing_fields_of_an_entry_take_their_defaults(
    replicas: tuple[Containment, Containment], raw: aioredis.Redis, prefix: str
) -> None:
    a, _ = replicas
    await raw.set(f"{prefix}q:{{c}}:tenant:t1", b"{}", px=60_000)
    before = time.time()
    assert await a.reconcile() is True
    hit = await held(a, ("tenant", "t1"))
    after = time.time()
    assert hit is not None
    assert (hit.scope, hit.value, hit.reason, hit.by, hit.since) == ("tenant", "t1", "", "", 0.0)
    assert before + 60 <= hit.until <= after + 60


async def test_an_unreadable_lift_record_lifts_nothing(
    replicas: tuple[Containment, Containment], raw: aioredis.Redis, prefix: str
) -> None:
    a, _ = replicas
    q, _ = await a.add("subject", "erin", 30, "", "admin")
    for blob in (b"garbage", b"{}", b'{"at": "x"}'):
        await raw.set(f"{prefix}ql:{{c}}:subject:erin", blob, px=60_000)
        assert await a.reconcile() is True
        assert await held(a, ("subject", "erin")) == q, blob


async def test_keys_of_unknown_scopes_and_other_kinds_are_ignored(
    replicas: tuple[Containment, Containment], raw: aioredis.Redis, prefix: str
) -> None:
    a, _ = replicas
    await raw.set(f"{prefix}q:{{c}}:user:mallory", b"{}", px=60_000)
    await raw.set(f"{prefix}qx:something", b"{}", px=60_000)  # matches the SCAN pattern, not a quarantine
    assert await a.reconcile() is True
    assert await held(a, ("subject", "mallory")) is None
    assert await a.list() == []


async def test_untagged_keys_of_an_earlier_version_are_read_and_written_back_tagged(
    replicas: tuple[Containment, Containment], raw: aioredis.Redis, prefix: str
) -> None:
    a, _ = replicas
    until_ = time.time() + 30
    doc = {"scope": "subject", "value": "old", "reason": "v0", "until": until_, "by": "admin", "since": 1.0}
    await raw.set(f"{prefix}q:subject:old", orjson.dumps(doc), px=30_000)
    lifted_at = time.time()
    await raw.set(f"{prefix}q:subject:gone", orjson.dumps({**doc, "value": "gone", "since": lifted_at - 5}), px=30_000)
    await raw.set(f"{prefix}ql:subject:gone", orjson.dumps({"at": lifted_at, "keep": lifted_at + 60}), px=60_000)
    assert await a.reconcile() is True
    hit = await held(a, ("subject", "old"))
    assert hit is not None and (hit.reason, hit.until) == ("v0", until_)
    assert orjson.loads(await raw.get(f"{prefix}q:{{c}}:subject:old")) == doc
    assert await held(a, ("subject", "gone")) is None  # the old lift record still ends it
    # the old lift record is written back under the tagged name too
    assert orjson.loads(await raw.get(f"{prefix}ql:{{c}}:subject:gone"))["at"] == lifted_at


async def test_an_expired_lift_record_is_forgotten(
    replicas: tuple[Containment, Containment], raw: aioredis.Redis, prefix: str
) -> None:
    a, _ = replicas
    at = time.time() - 10
    await raw.set(f"{prefix}ql:{{c}}:subject:fred", orjson.dumps({"at": at, "keep": time.time() + 0.3}), px=60_000)
    assert await a.reconcile() is True
    await raw.delete(f"{prefix}ql:{{c}}:subject:fred")
    await asyncio.sleep(0.4)
    assert await a.reconcile() is True
    assert await raw.get(f"{prefix}ql:{{c}}:subject:fred") is None  # not written back once past its keep


# --- what another replica says on the channel ------------------------------------


async def test_events_on_the_channel_add_and_lift(
    replicas: tuple[Containment, Containment], raw: aioredis.Redis, prefix: str
) -> None:
    _, b = replicas
    await b.start()
    channel = f"{prefix}quarantine"
    until_ = time.time() + 30
    event = {"op": "add", "scope": "device", "value": "d9", "reason": "r", "until": until_, "by": "x", "since": 5.0}
    await raw.publish(channel, orjson.dumps(event))
    await until(lambda: held(b, ("device", "d9")))
    hit = await held(b, ("device", "d9"))
    assert hit == Quarantine("device", "d9", "r", until_, "x", 5.0)
    await raw.publish(channel, orjson.dumps({"op": "lift", "scope": "device", "value": "d9", "at": 6.0}))
    await until(lambda: _not_held(b, ("device", "d9")))


async def test_odd_events_change_nothing(
    replicas: tuple[Containment, Containment], raw: aioredis.Redis, prefix: str
) -> None:
    _, b = replicas
    await b.start()
    channel = f"{prefix}quarantine"
    now = time.time()
    for event in (
        b"not json",
        orjson.dumps({"op": "add", "scope": "user", "value": "u", "until": now + 30}),  # not a scope
        orjson.dumps({"op": "add", "scope": "subject", "value": "late", "until": now - 1}),  # expired
        orjson.dumps({"op": "add", "value": "noscope", "until": now + 30}),
        orjson.dumps({"op": "add", "scope": "subject", "value": "nountil"}),
        orjson.dumps([1, 2]),
    ):
        await raw.publish(channel, event)
    # a last, valid event: once it is heard, every event before it was too
    await raw.publish(channel, orjson.dumps({"op": "add", "scope": "subject", "value": "ok", "until": now + 30}))
    await until(lambda: held(b, ("subject", "ok")))
    hit = await held(b, ("subject", "ok"))
    assert hit is not None and (hit.reason, hit.by, hit.since) == ("", "", 0.0)
    for value in ("u", "late", "noscope", "nountil"):
        assert await held(b, ("subject", value)) is None
    assert await held(b, ("user", "u")) is None


async def test_a_lift_event_ends_only_copies_made_before_it(
    replicas: tuple[Containment, Containment], raw: aioredis.Redis, prefix: str
) -> None:
    a, b = replicas
    await a.start()
    q, _ = await a.add("token", "j5", 30, "", "admin")
    channel = f"{prefix}quarantine"
    await raw.publish(channel, orjson.dumps({"op": "lift", "scope": "token", "value": "j5", "at": q.since - 1}))
    await raw.publish(channel, orjson.dumps({"op": "add", "scope": "subject", "value": "mark", "until": q.until}))
    await until(lambda: held(a, ("subject", "mark")))
    assert await held(a, ("token", "j5")) == q  # the lift is older than the quarantine
    # and an add event older than a known lift is not taken
    await a.lift("token", "j6")
    await raw.publish(
        channel, orjson.dumps({"op": "add", "scope": "token", "value": "j6", "until": q.until, "since": 1.0})
    )
    await raw.publish(channel, orjson.dumps({"op": "add", "scope": "subject", "value": "mark2", "until": q.until}))
    await until(lambda: held(a, ("subject", "mark2")))
    assert await held(a, ("token", "j6")) is None
    assert b is not None


# --- list -----------------------------------------------------------------------------


async def test_list_shows_what_holds_here_and_in_redis_but_no_lifted_entry(
    replicas: tuple[Containment, Containment], raw: aioredis.Redis, prefix: str
) -> None:
    a, b = replicas
    qa, _ = await a.add("subject", "alice", 30, "a", "admin")
    qb, _ = await b.add("tenant", "acme", 30, "b", "admin")
    listed = sorted(await a.list(), key=lambda d: d["scope"])
    assert listed == [qa.doc(), qb.doc()]
    # an entry whose lift this replica knows of is not listed even if Redis still has it
    await a.lift("tenant", "acme")
    await raw.set(f"{prefix}q:{{c}}:tenant:acme", orjson.dumps(qb.doc()), px=30_000)
    assert await a.list() == [qa.doc()]
    # garbage and unknown scopes in Redis
    await raw.set(f"{prefix}q:{{c}}:user:x", b"{}", px=30_000)
    assert await a.list() == [qa.doc()]
    await raw.set(f"{prefix}q:{{c}}:device:junk", b"junk", px=30_000)
    assert [d["value"] for d in await a.list()] == ["alice", "junk"]
    # a value with colons (a SPIFFE ID) held only in Redis is listed whole
    qw, _ = await b.add("workload", "spiffe://demo.vvault/ns/a:b", 30, "", "admin")
    assert qw.doc() in await a.list()


async def test_what_a_replica_writes_back_reaches_the_others_on_the_channel(
    replicas: tuple[Containment, Containment], raw: aioredis.Redis, prefix: str
) -> None:
    a, b = replicas
    q, _ = await a.add("device", "wb", 30, "back", "admin")
    key = f"{prefix}q:{{c}}:device:wb"
    await raw.delete(key)  # Redis lost it before b ever read it
    await b.start()
    assert await a.reconcile() is True and a.written_back == 1
    # a marker published after: once b holds it, b has heard everything before it
    marker = {"op": "add", "scope": "subject", "value": "marker", "until": q.until}
    await raw.publish(f"{prefix}quarantine", orjson.dumps(marker))
    await until(lambda: held(b, ("subject", "marker")))
    await raw.delete(key)  # gone from Redis again: what b holds is what it heard
    assert await held(b, ("device", "wb")) == q


async def test_start_reads_what_redis_holds_before_the_first_request(redis_server: RedisServer, prefix: str) -> None:
    first = await _shared(redis_server, prefix)
    a = Containment(first)
    q, _ = await a.add("workload", "spiffe://d/x", 30, "", "admin")
    second = await _shared(redis_server, prefix)
    b = Containment(second)
    try:
        await b.start()
        assert b.reconciles >= 1
        assert (await b.check(subject(("workload", "spiffe://d/x")))).hit == q
    finally:
        await b.stop()
        await first.close()
        await second.close()
