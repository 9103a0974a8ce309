"""Containment's known state, function by function: events heard, lifts, expiry, generation.

What one replica holds decides a request while the push channel is healthy, so each
way that state changes is checked on its own: an event heard on the channel
(:meth:`Containment._on_event`, :meth:`Containment._heard`), a lift and the record it
leaves, expiry at the exact instant, a full reconciliation (nothing shrinks by absence),
:attr:`Containment.generation` (moves on every change of known state, and only then),
:attr:`Containment.unshared`, and the publish that goes out with every write — on a real
redis-server, and on a real (one-node) Redis Cluster where the code takes Cluster-only
branches (SCAN on the owner of the slot, ``mget_nonatomic``, ``SPUBLISH``).  Where the
instant matters the wall clock is fixed: ``until == now`` is an expired entry.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from tests.conftest import RedisServer
from tests.heard import Heard, until
from tests.redis_topologies import OneNodeCluster

from vvault_pep.config.models import Redis as RedisConfig
from vvault_pep.core.principal import Subject
from vvault_pep.shared import containment as cm
from vvault_pep.shared.containment import Contained, Containment, Quarantine
from vvault_pep.shared.push import Push
from vvault_pep.shared.state import Generation, SharedState

T0 = 1_700_000_000.0  # the fixed wall clock of the tests that need one


@pytest.fixture
def prefix() -> str:
    return f"s{uuid.uuid4().hex[:10]}:"


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Callable[[float], None]:
    """Fix the wall clock containment reads at ``T0`` (or where the test moves it)."""

    def set_to(t: float) -> None:
        monkeypatch.setattr(cm.time, "time", lambda: t)

    set_to(T0)
    return set_to


@pytest.fixture
async def raw(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_server.url)
    yield client
    await client.aclose()


@pytest.fixture
async def shared(redis_server: RedisServer, prefix: str) -> AsyncIterator[SharedState]:
    state = SharedState(RedisConfig(url=redis_server.url, key_prefix=prefix, timeout_ms=2000))
    yield state
    await state.close()


@pytest.fixture(scope="module")
def one_node_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OneNodeCluster]:
    node = OneNodeCluster(tmp_path_factory.mktemp("one-node-cluster"))
    node.start()
    yield node
    node.stop()


@pytest.fixture
async def on_cluster(one_node_cluster: OneNodeCluster, prefix: str) -> AsyncIterator[SharedState]:
    cfg = RedisConfig(url=one_node_cluster.url, mode="cluster", key_prefix=prefix, timeout_ms=2000)
    state = SharedState(cfg)
    yield state
    await state.close()


@pytest.fixture
async def cluster_raw(one_node_cluster: OneNodeCluster) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(one_node_cluster.url)  # every slot is on this node
    yield client
    await client.aclose()


def event(op: str, **fields: Any) -> bytes:
    return orjson.dumps({"op": op, **fields})


def known(c: Containment) -> dict[tuple[str, str], Quarantine]:
    return dict(c._local)


def moved(c: Containment, before: int) -> int:
    return c.generation - before


# --- an event heard adds or extends, and never shortens -------------------------------


def test_an_add_event_is_held_as_it_was_sent(clock: Callable[[float], None]) -> None:
    c = Containment(None)
    g = c.generation
    c._on_event(event("add", scope="device", value="d1", reason="lost", until=T0 + 30, by="admin", since=T0 - 5))
    assert known(c) == {("device", "d1"): Quarantine("device", "d1", "lost", T0 + 30, "admin", T0 - 5)}
    assert moved(c, g) == 1


def test_a_longer_copy_extends_and_a_shorter_or_equal_one_changes_nothing(clock: Callable[[float], None]) -> None:
    c = Containment(None)
    c._on_event(event("add", scope="subject", value="s", reason="first", until=T0 + 30, by="a", since=T0 - 10))
    g = c.generation
    for until_, reason in ((T0 + 30, "equal"), (T0 + 10, "shorter")):
        c._on_event(event("add", scope="subject", value="s", reason=reason, until=until_, by="b", since=T0))
        assert known(c)[("subject", "s")].reason == "first", reason
        assert c.generation == g, reason  # nothing changed: nothing moved
    c._on_event(event("add", scope="subject", value="s", reason="longer", until=T0 + 90, by="b", since=T0 - 20))
    # the longer-lived copy, with the later of the two `since`s (a lift after either still ends it)
    assert known(c)[("subject", "s")] == Quarantine("subject", "s", "longer", T0 + 90, "b", T0 - 10)
    assert moved(c, g) == 1


def test_an_add_event_expiring_now_or_before_is_not_taken(clock: Callable[[float], None]) -> None:
    c = Containment(None)
    g = c.generation
    c._on_event(event("add", scope="subject", value="now", until=T0))
    c._on_event(event("add", scope="subject", value="before", until=T0 - 1))
    assert known(c) == {} and c.generation == g
    c._on_event(event("add", scope="subject", value="after", until=T0 + 0.001))
    assert list(known(c)) == [("subject", "after")]


def test_an_add_event_missing_optional_fields_takes_their_defaults(clock: Callable[[float], None]) -> None:
    c = Containment(None)
    c._on_event(event("add", scope="tenant", value="t", until=T0 + 5))
    assert known(c) == {("tenant", "t"): Quarantine("tenant", "t", "", T0 + 5, "", 0.0)}


@pytest.mark.parametrize(
    "raw_event",
    [
        b"not json",
        b"[1, 2]",
        b'"add"',
        event("add", value="v", until=T0 + 30),  # no scope
        event("add", scope="subject", until=T0 + 30),  # no value
        event("add", scope="subject", value="v"),  # no until
        event("add", scope="subject", value="v", until="soon"),
        event("add", scope="subject", value="v", until=None),
        event("add", scope="subject", value="v", until=T0 + 30, since="x"),
        event("add", scope="user", value="v", until=T0 + 30),  # not a scope
        event("lift", scope="subject", value="v", at="x"),
        event("lift", scope="subject", value="v", at=None),
        event("lift", scope="subject", value="v", keep=None),
        event("lift", scope="ip", value="v"),
    ],
)
def test_a_malformed_event_changes_nothing(clock: Callable[[float], None], raw_event: bytes) -> None:
    c = Containment(None)
    c._on_event(event("add", scope="subject", value="v", reason="held", until=T0 + 60, since=T0 - 1))
    before, g = known(c), c.generation
    c._on_event(raw_event)
    assert known(c) == before
    assert c._lifted == {}
    assert c.generation == g


# --- a lift event ends exactly the named pair and is honoured later -------------------


def test_a_lift_event_ends_exactly_the_named_pair(clock: Callable[[float], None]) -> None:
    c = Containment(None)
    for scope, value in (("subject", "alice"), ("subject", "bob"), ("workload", "alice")):
        c._on_event(event("add", scope=scope, value=value, until=T0 + 60, since=T0 - 10))
    g = c.generation
    c._on_event(event("lift", scope="subject", value="alice", at=T0 - 1, keep=T0 + 500))
    assert sorted(known(c)) == [("subject", "bob"), ("workload", "alice")]
    assert c._lifted == {("subject", "alice"): (T0 - 1, T0 + 500)}
    assert moved(c, g) == 2  # a lift record known, an entry gone
    # honoured later: a copy made before the lift is not taken again, one made after it is
    for since in (T0 - 10, T0 - 1):
        c._on_event(event("add", scope="subject", value="alice", until=T0 + 90, since=since))
        assert ("subject", "alice") not in known(c), since
    c._on_event(event("add", scope="subject", value="alice", until=T0 + 90, since=T0 - 0.5))
    assert known(c)[("subject", "alice")].since == T0 - 0.5


def test_a_lift_event_older_than_the_entry_leaves_it(clock: Callable[[float], None]) -> None:
    c = Containment(None)
    c._on_event(event("add", scope="token", value="j", until=T0 + 60, since=T0 - 1))
    c._on_event(event("lift", scope="token", value="j", at=T0 - 2, keep=T0 + 100))
    assert ("token", "j") in known(c)
    assert c._lifted == {("token", "j"): (T0 - 2, T0 + 100)}


def test_a_lift_event_without_times_is_taken_as_now_for_a_minute(clock: Callable[[float], None]) -> None:
    c = Containment(None)
    c._on_event(event("add", scope="device", value="d", until=T0 + 60, since=T0))
    c._on_event(event("lift", scope="device", value="d"))
    assert known(c) == {}
    assert c._lifted == {("device", "d"): (T0, T0 + 60)}


def test_a_later_lift_moves_the_time_and_keeps_the_longer_record(clock: Callable[[float], None]) -> None:
    c = Containment(None)
    c._on_event(event("lift", scope="subject", value="x", at=T0 - 100, keep=T0 + 500))
    g = c.generation
    # the same lift heard twice (a write back, a reconcile): nothing new
    c._on_event(event("lift", scope="subject", value="x", at=T0 - 100, keep=T0 + 900))
    assert c._lifted == {("subject", "x"): (T0 - 100, T0 + 500)} and c.generation == g
    # an older one: nothing new either
    c._on_event(event("lift", scope="subject", value="x", at=T0 - 200, keep=T0 + 900))
    assert c._lifted == {("subject", "x"): (T0 - 100, T0 + 500)} and c.generation == g
    # a later one, before the first record's keep: its time, and the longer keep
    c._on_event(event("lift", scope="subject", value="x", at=T0 - 50, keep=T0 + 300))
    assert c._lifted == {("subject", "x"): (T0 - 50, T0 + 500)}
    assert moved(c, g) == 1
    c._on_event(event("lift", scope="subject", value="x", at=T0 - 10, keep=T0 + 700))
    assert c._lifted == {("subject", "x"): (T0 - 10, T0 + 700)}
    # a copy made between the first lift and the last one is ended by the last one
    c._on_event(event("add", scope="subject", value="x", until=T0 + 60, since=T0 - 20))
    assert ("subject", "x") not in known(c)


def test_lift_records_of_other_pairs_are_their_own(clock: Callable[[float], None]) -> None:
    c = Containment(None)
    c._on_event(event("lift", scope="subject", value="a", at=T0 - 100, keep=T0 + 500))
    c._on_event(event("lift", scope="subject", value="b", at=T0 - 300, keep=T0 + 200))
    assert c._lifted == {("subject", "a"): (T0 - 100, T0 + 500), ("subject", "b"): (T0 - 300, T0 + 200)}


# --- expiry at the exact instant -------------------------------------------------------


def test_expire_drops_what_ends_at_or_before_now_and_keeps_the_rest(clock: Callable[[float], None]) -> None:
    c = Containment(None)
    for value, until_ in (("ends-now", T0 + 10), ("ended", T0 + 5), ("later", T0 + 10.001)):
        c._on_event(event("add", scope="subject", value=value, until=until_, since=T0 - 1))
    for value, keep in (("kept-to-now", T0 + 10), ("kept-later", T0 + 10.001)):
        c._on_event(event("lift", scope="token", value=value, at=T0 - 1, keep=keep))
    g = c.generation
    c._expire(T0 + 10)
    assert list(known(c)) == [("subject", "later")]
    assert list(c._lifted) == [("token", "kept-later")]
    assert moved(c, g) == 3  # two entries and a lift record gone
    c._expire(T0 + 10)
    assert moved(c, g) == 3  # nothing more to drop: nothing moved


async def test_a_local_entry_holds_until_its_exact_expiry(clock: Callable[[float], None]) -> None:
    c = Containment(None)
    q, _ = await c.add("subject", "s", 10, "r", "admin")
    assert q == Quarantine("subject", "s", "r", T0 + 10, "admin", T0)
    clock(T0 + 9.999)
    assert await c.check(Subject(scopes=(("subject", "s"),))) == Contained(q, False)
    assert await c._known((("subject", "s"),)) == Contained(q, True)
    assert await c.list() == [q.doc()]
    clock(T0 + 10)
    assert await c.check(Subject(scopes=(("subject", "s"),))) == Contained(None, False)
    assert await c._known((("subject", "s"),)) == Contained(None, True)
    assert await c.list() == []


async def test_known_answers_from_local_state_with_the_first_held_scope(clock: Callable[[float], None]) -> None:
    c = Containment(None)
    q, _ = await c.add("device", "d", 30, "", "admin")
    assert await c._known((("subject", "s"), ("device", "d"))) == Contained(q, True)
    assert await c._known((("subject", "s"),)) == Contained(None, True)
    assert await c._known(()) == Contained(None, True)


# --- generation ------------------------------------------------------------------------


async def test_generation_is_the_one_given_and_moves_on_every_change(clock: Callable[[float], None]) -> None:
    gen = Generation()
    c = Containment(None, generation=gen)
    assert c.gen is gen and c.generation == 0
    await c.add("subject", "a", 30, "", "admin")
    assert gen.value == 1
    await c.lift("subject", "a")  # an entry gone, a lift record known
    assert gen.value == 3
    await c.lift("subject", "never-held")  # a lift record only
    assert gen.value == 4


async def test_a_lift_that_ends_an_entry_moves_generation_even_if_a_later_lift_is_known(
    clock: Callable[[float], None],
) -> None:
    c = Containment(None)
    # another replica's lift, stamped ahead of this clock: this lift's record adds nothing
    c._on_event(event("lift", scope="subject", value="a", at=T0 + 100, keep=T0 + 900))
    await c.add("subject", "a", 30, "", "admin")
    g = c.generation
    await c.lift("subject", "a")
    assert known(c) == {}
    assert c._lifted == {("subject", "a"): (T0 + 100, T0 + 900)}
    assert moved(c, g) == 1


# --- unshared --------------------------------------------------------------------------


async def test_unshared_counts_each_entry_and_lift_redis_did_not_take(prefix: str) -> None:
    down = SharedState(RedisConfig(url="redis://127.0.0.1:1/0", key_prefix=prefix, timeout_ms=200))
    down.cfg = down.cfg.model_copy(update={"retry_after_failure_s": 0.0})
    c = Containment(down)
    try:
        assert c.unshared == 0
        for value in ("a", "b"):
            _, done = await c.add("subject", value, 30, "", "admin")
            assert done is False
        assert c.unshared == 2
        await c.add("subject", "a", 30, "", "admin")  # the same pair again
        assert c.unshared == 2
        assert await c.lift("subject", "a") is False  # the entry's place is taken by its lift
        assert c.unshared == 2
        assert await c.lift("token", "j") is False
        assert c.unshared == 3
    finally:
        await down.close()


# --- a full reconcile: nothing shrinks by absence --------------------------------------


async def test_reconcile_against_an_empty_redis_keeps_and_writes_back_every_entry(
    shared: SharedState, raw: aioredis.Redis, prefix: str
) -> None:
    c = Containment(shared)
    assert c.last_reconciled is None and c.reconciles == 0
    q, _ = await c.add("subject", "kept", 30, "r", "admin")
    await raw.delete(cm.quarantine_key(shared, "subject", "kept"))
    g = c.generation
    before = time.time()
    async with Heard(raw, c.channel, sharded=False) as heard:
        assert await c.reconcile() is True
        assert await heard.mark() == [{"op": "add", **q.doc()}]
    assert known(c) == {("subject", "kept"): q}
    assert c.generation == g  # written back, not changed here
    assert c.reconciles == 1 and c.written_back == 1 and c.unshared == 0
    assert c.last_reconciled is not None and before <= c.last_reconciled <= time.time()
    assert orjson.loads(await raw.get(cm.quarantine_key(shared, "subject", "kept"))) == q.doc()


async def test_reconcile_publishes_the_lift_records_it_writes_back(
    shared: SharedState, raw: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    c = Containment(shared)
    await c.lift("token", "j1")
    at, keep = c._lifted[("token", "j1")]
    await raw.delete(cm.lift_key(shared, "token", "j1"))
    async with Heard(raw, c.channel, sharded=False) as heard:
        with caplog.at_level(logging.WARNING, logger="vvault_pep.containment"):
            assert await c.reconcile() is True
        assert await heard.mark() == [{"op": "lift", "scope": "token", "value": "j1", "at": at, "keep": keep}]
    assert orjson.loads(await raw.get(cm.lift_key(shared, "token", "j1"))) == {"at": at, "keep": keep}
    assert c.written_back == 0
    assert [r for r in caplog.records if r.name == "vvault_pep.containment"] == []  # no quarantine written


async def test_a_write_back_is_logged_once_with_its_count(
    shared: SharedState, raw: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    c = Containment(shared)
    for value in ("a", "b"):
        await c.add("device", value, 30, "", "admin")
        await raw.delete(cm.quarantine_key(shared, "device", value))
    with caplog.at_level(logging.WARNING, logger="vvault_pep.containment"):
        assert await c.reconcile() is True
        assert await c.reconcile() is True  # Redis holds them now: nothing to write, nothing said
    said = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "vvault_pep.containment"]
    assert said == [(logging.WARNING, "wrote 2 quarantine(s) back to Redis, which lacked them")]
    assert c.written_back == 2


async def test_an_entry_that_expired_here_is_neither_kept_nor_written_back(
    shared: SharedState, raw: aioredis.Redis
) -> None:
    c = Containment(shared)
    q, _ = await c.add("subject", "brief", 0.05, "", "admin")
    await until(lambda: time.time() > q.until)
    g = c.generation
    async with Heard(raw, c.channel, sharded=False) as heard:
        assert await c.reconcile() is True
        assert await heard.mark() == []
    assert known(c) == {} and c.written_back == 0
    assert moved(c, g) == 1


async def test_a_reconcile_whose_write_back_fails_is_not_counted(
    redis_server: RedisServer, raw: aioredis.Redis, prefix: str
) -> None:
    # a user that may read but not write: the read half of the reconcile answers, the write half fails
    user = f"ro-{uuid.uuid4().hex[:8]}"
    await raw.execute_command("ACL", "SETUSER", user, "on", ">pw", "~*", "&*", "+@all", "-set", "-del")
    url = f"redis://{user}:pw@127.0.0.1:{redis_server.port}/0"
    ro = SharedState(RedisConfig(url=url, key_prefix=prefix, timeout_ms=2000))
    c = Containment(ro)
    try:
        q, done = await c.add("subject", "s", 30, "", "admin")
        assert done is False and c.unshared == 1
        ro.cfg = ro.cfg.model_copy(update={"retry_after_failure_s": 0.0})
        ro._down_until = 0.0
        assert await c.reconcile() is False
        assert (c.reconciles, c.written_back, c.unshared, c.last_reconciled) == (0, 0, 1, None)
        assert known(c) == {("subject", "s"): q}
    finally:
        await ro.close()
        await raw.execute_command("ACL", "DELUSER", user)


async def test_a_lift_record_read_from_redis_is_honoured_and_kept_a_minute_without_keep(
    shared: SharedState, raw: aioredis.Redis
) -> None:
    c = Containment(shared)
    at = time.time() - 5
    await raw.set(cm.lift_key(shared, "subject", "l"), orjson.dumps({"at": at}), px=60_000)
    before = time.time()
    assert await c.reconcile() is True
    [(pair, (lifted_at, keep))] = c._lifted.items()
    assert (pair, lifted_at) == (("subject", "l"), at)
    assert before + 60 <= keep <= time.time() + 60
    c._on_event(event("add", scope="subject", value="l", until=time.time() + 30, since=at - 1))
    assert known(c) == {}  # made before the lift: ended
    c._on_event(event("add", scope="subject", value="l", until=time.time() + 30, since=at + 1))
    assert list(known(c)) == [("subject", "l")]


async def test_an_unreadable_lift_record_in_redis_ends_no_entry_made_since_the_epoch(
    shared: SharedState, raw: aioredis.Redis
) -> None:
    c = Containment(shared)
    c._on_event(event("add", scope="subject", value="u", until=time.time() + 30, since=0.5))
    await raw.set(cm.lift_key(shared, "subject", "u"), b"garbage", px=60_000)
    assert await c.reconcile() is True
    assert list(known(c)) == [("subject", "u")]
    assert orjson.loads(await raw.get(cm.quarantine_key(shared, "subject", "u")))["since"] == 0.5


async def test_written_back_counts_across_reconciles(shared: SharedState, raw: aioredis.Redis) -> None:
    c = Containment(shared)
    for n, value in enumerate(("a", "b"), start=1):
        await c.add("subject", value, 30, "", "admin")
        await raw.delete(cm.quarantine_key(shared, "subject", value))
        assert await c.reconcile() is True
        assert c.written_back == n


async def test_a_redis_copy_within_a_second_is_the_same_entry_and_beyond_it_is_rewritten(
    shared: SharedState, raw: aioredis.Redis
) -> None:
    c = Containment(shared)
    q, _ = await c.add("token", "t", 60, "", "admin")
    key = cm.quarantine_key(shared, "token", "t")
    await raw.set(key, orjson.dumps({**q.doc(), "until": q.until - 1.0}), px=60_000)
    assert await c.reconcile() is True
    assert c.written_back == 0
    await raw.set(key, orjson.dumps({**q.doc(), "until": q.until - 1.5}), px=60_000)
    assert await c.reconcile() is True
    assert c.written_back == 1
    assert orjson.loads(await raw.get(key)) == q.doc()


async def test_a_lift_record_redis_holds_is_not_written_back(shared: SharedState, raw: aioredis.Redis) -> None:
    c = Containment(shared)
    at = time.time()
    key = cm.lift_key(shared, "device", "d")
    await raw.set(key, orjson.dumps({"at": at, "keep": at + 120}), px=120_000)
    async with Heard(raw, c.channel, sharded=False) as heard:
        assert await c.reconcile() is True
        assert await c.reconcile() is True
        assert await heard.mark() == []
    assert list(c._lifted) == [("device", "d")]
    assert await raw.pttl(key) <= 120_000


async def test_keys_of_unknown_scopes_do_not_stop_the_read_of_the_others(
    shared: SharedState, raw: aioredis.Redis, prefix: str
) -> None:
    c = Containment(shared)
    until_ = time.time() + 30
    for n in range(10):
        await raw.set(f"{prefix}q:{{c}}:user:u{n}", orjson.dumps({"until": until_}), px=30_000)
        await raw.set(cm.quarantine_key(shared, "subject", f"s{n}"), orjson.dumps({"until": until_}), px=30_000)
    assert await c.reconcile() is True
    assert sorted(known(c)) == sorted(("subject", f"s{n}") for n in range(10))


async def test_a_key_that_is_not_utf8_is_read_with_the_others(
    shared: SharedState, raw: aioredis.Redis, prefix: str
) -> None:
    c = Containment(shared)
    until_ = time.time() + 30
    await raw.set(prefix.encode() + b"q:{c}:subject:\xff", orjson.dumps({"until": until_}), px=30_000)
    await raw.set(cm.quarantine_key(shared, "subject", "fine"), orjson.dumps({"until": until_}), px=30_000)
    assert await c.reconcile() is True
    assert sorted(known(c)) == [("subject", "fine"), ("subject", "\ufffd")]


async def test_list_of_an_empty_redis_leaves_redis_usable(shared: SharedState, raw: aioredis.Redis) -> None:
    c = Containment(shared)
    assert await c.list() == []
    assert shared.available
    doc = {"scope": "tenant", "value": "t", "reason": "", "until": time.time() + 30, "by": "x", "since": 1.0}
    await raw.set(cm.quarantine_key(shared, "tenant", "t"), orjson.dumps(doc), px=30_000)
    assert await c.list() == [doc]


def test_a_lift_made_at_the_instant_of_an_entry_ends_it(clock: Callable[[float], None]) -> None:
    c = Containment(None)
    c._on_event(event("add", scope="subject", value="same", until=T0 + 60, since=T0 - 3))
    c._on_event(event("lift", scope="subject", value="same", at=T0 - 3, keep=T0 + 60))
    assert known(c) == {}


async def test_an_entry_lifted_elsewhere_is_no_longer_unshared(prefix: str) -> None:
    down = SharedState(RedisConfig(url="redis://127.0.0.1:1/0", key_prefix=prefix, timeout_ms=200))
    c = Containment(down)
    try:
        q, _ = await c.add("subject", "x", 30, "", "admin")
        assert c.unshared == 1
        c._on_event(event("lift", scope="subject", value="x", at=q.since + 1, keep=q.until + 60))
        assert known(c) == {} and c.unshared == 0  # nothing left to write back for it
    finally:
        await down.close()


@pytest.mark.parametrize(("seconds", "ms"), [(1.5, 1500), (0.0004, 1), (0.0, 1), (-3.0, 1), (0.0025, 2)])
def test_a_redis_lifetime_is_whole_milliseconds_and_never_below_one(seconds: float, ms: int) -> None:
    assert cm._ms(seconds) == ms


@pytest.fixture
async def slow_shared(redis_server: RedisServer, prefix: str) -> AsyncIterator[SharedState]:
    """A request path that gives up at 100 ms: the background reads and writes have 2 s."""
    state = SharedState(RedisConfig(url=redis_server.url, key_prefix=prefix, timeout_ms=100))
    yield state
    await state.close()


async def test_a_full_read_waits_out_a_redis_slower_than_the_request_deadline(
    slow_shared: SharedState, raw: aioredis.Redis
) -> None:
    c = Containment(slow_shared)
    doc = {"scope": "subject", "value": "p", "reason": "", "until": time.time() + 30, "by": "x", "since": 1.0}
    await raw.set(cm.quarantine_key(slow_shared, "subject", "p"), orjson.dumps(doc), px=30_000)
    try:
        await raw.execute_command("CLIENT", "PAUSE", 400, "ALL")
        assert await c.list() == [doc]
        await raw.execute_command("CLIENT", "PAUSE", 400, "ALL")
        assert await c.reconcile() is True
    finally:
        await raw.execute_command("CLIENT", "UNPAUSE")
    assert list(known(c)) == [("subject", "p")]


async def test_a_write_back_waits_out_a_redis_slower_than_the_request_deadline(
    slow_shared: SharedState, raw: aioredis.Redis
) -> None:
    c = Containment(slow_shared)
    q, _ = await c.add("subject", "w", 30, "", "admin")
    await raw.delete(cm.quarantine_key(slow_shared, "subject", "w"))
    try:
        await raw.execute_command("CLIENT", "PAUSE", 400, "WRITE")  # the read answers, the write waits
        assert await c.reconcile() is True
    finally:
        await raw.execute_command("CLIENT", "UNPAUSE")
    assert c.written_back == 1
    assert orjson.loads(await raw.get(cm.quarantine_key(slow_shared, "subject", "w"))) == q.doc()


# --- start -----------------------------------------------------------------------------


async def test_start_follows_the_channel_and_reconciles_after_subscribing(
    shared: SharedState, raw: aioredis.Redis
) -> None:
    c = Containment(shared)
    await raw.set(cm.quarantine_key(shared, "subject", "there"), orjson.dumps({"until": time.time() + 30}), px=30_000)
    try:
        await asyncio.wait_for(c.start(), 10)
        assert c._subscribed.is_set()  # by the subscription's reconcile, not by the timeout
        assert c._listener is not None and c._listener.get_name() == "quarantine-listener"
        assert c.reconciles == 1 and ("subject", "there") in known(c)
    finally:
        await c.stop()


async def test_start_without_an_answer_gives_up_waiting_and_reads_once(
    prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    down = SharedState(RedisConfig(url="redis://127.0.0.1:1/0", key_prefix=prefix, timeout_ms=100))
    c = Containment(down)
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.wait_for(c.start(), 15)
        assert loop.time() - started >= cm._FIRST_SUBSCRIPTION_S - 0.1
        assert not c._subscribed.is_set() and c.reconciles == 0
    finally:
        await c.stop()
        await down.close()


async def test_a_failed_reconcile_after_subscribing_is_said_and_start_goes_on(
    prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    down = SharedState(RedisConfig(url="redis://127.0.0.1:1/0", key_prefix=prefix, timeout_ms=100))
    c = Containment(down)
    try:
        with caplog.at_level(logging.WARNING, logger="vvault_pep.containment"):
            await c._resubscribed()
        assert c._subscribed.is_set()
        said = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "vvault_pep.containment"]
        assert said == [(logging.WARNING, "reconciling after subscribing failed; the watcher retries")]
    finally:
        await down.close()


async def test_a_reconcile_after_subscribing_that_answers_says_nothing(
    shared: SharedState, caplog: pytest.LogCaptureFixture
) -> None:
    c = Containment(shared)
    with caplog.at_level(logging.WARNING, logger="vvault_pep.containment"):
        await c._resubscribed()
    assert c._subscribed.is_set() and c.reconciles == 1
    assert [r for r in caplog.records if r.name == "vvault_pep.containment"] == []


async def test_with_push_start_hands_the_events_and_the_reconcile_to_the_channel(
    shared: SharedState, clock: Callable[[float], None]
) -> None:
    gen = Generation()
    push = Push(shared, gen)
    c = Containment(shared, push, gen)
    assert c.channel == push.channel
    await c.start()
    assert c._listener is None  # the push channel's owner follows it
    assert push._reconcilers == [c.reconcile]
    push._on_message(event("add", scope="subject", value="p", until=T0 + 30, since=T0))
    assert known(c) == {("subject", "p"): Quarantine("subject", "p", "", T0 + 30, "", T0)}
    push._on_message(event("lift", scope="subject", value="p", at=T0 + 1, keep=T0 + 90))
    assert known(c) == {} and c._lifted == {("subject", "p"): (T0 + 1, T0 + 90)}


# --- check: what Redis answers counts --------------------------------------------------


async def test_check_holds_what_only_redis_has_and_says_redis_answered(
    shared: SharedState, raw: aioredis.Redis
) -> None:
    c = Containment(shared)
    doc = {"scope": "tenant", "value": "t", "reason": "r", "until": time.time() + 30, "by": "x", "since": 1.0}
    await raw.set(cm.quarantine_key(shared, "tenant", "t"), orjson.dumps(doc), px=30_000)
    got = await c.check(Subject(scopes=(("subject", "s"), ("tenant", "t"))))
    assert got == Contained(Quarantine("tenant", "t", "r", doc["until"], "x", 1.0), True)
    assert await c.check(Subject(scopes=(("subject", "s"),))) == Contained(None, True)
    assert known(c) == {}


# --- on a Cluster ----------------------------------------------------------------------


async def test_on_a_cluster_a_quarantine_is_published_sharded_with_its_write(
    on_cluster: SharedState, cluster_raw: aioredis.Redis
) -> None:
    c = Containment(on_cluster)
    async with Heard(cluster_raw, c.channel, sharded=True) as heard:
        q, done = await c.add("subject", "s", 30, "r", "admin")
        assert done is True
        assert await heard.mark() == [{"op": "add", **q.doc()}]
        assert await c.lift("subject", "s") is True
        at, keep = c._lifted[("subject", "s")]
        assert await heard.mark() == [{"op": "lift", "scope": "subject", "value": "s", "at": at, "keep": keep}]
    assert await cluster_raw.get(cm.quarantine_key(on_cluster, "subject", "s")) is None


async def test_on_a_cluster_reconcile_reads_redis_and_writes_back_with_spublish(
    on_cluster: SharedState, cluster_raw: aioredis.Redis
) -> None:
    c = Containment(on_cluster)
    theirs = {"scope": "device", "value": "d", "reason": "t", "until": time.time() + 30, "by": "x", "since": 2.0}
    await cluster_raw.set(cm.quarantine_key(on_cluster, "device", "d"), orjson.dumps(theirs), px=30_000)
    mine, _ = await c.add("subject", "m", 30, "", "admin")
    await c.lift("token", "j")
    at, keep = c._lifted[("token", "j")]
    await cluster_raw.delete(cm.quarantine_key(on_cluster, "subject", "m"), cm.lift_key(on_cluster, "token", "j"))
    async with Heard(cluster_raw, c.channel, sharded=True) as heard:
        assert await c.reconcile() is True
        assert await heard.mark() == [
            {"op": "add", **mine.doc()},
            {"op": "lift", "scope": "token", "value": "j", "at": at, "keep": keep},
        ]
    assert known(c)[("device", "d")] == Quarantine("device", "d", "t", theirs["until"], "x", 2.0)
    assert (c.reconciles, c.written_back) == (1, 1)
    assert orjson.loads(await cluster_raw.get(cm.quarantine_key(on_cluster, "subject", "m"))) == mine.doc()


async def test_on_a_cluster_reconcile_reads_the_untagged_keys_of_an_earlier_version(
    on_cluster: SharedState, cluster_raw: aioredis.Redis, prefix: str
) -> None:
    c = Containment(on_cluster)
    until_ = time.time() + 30
    await cluster_raw.set(f"{prefix}q:subject:old", orjson.dumps({"until": until_, "since": 1.0}), px=30_000)
    await cluster_raw.set(cm.quarantine_key(on_cluster, "subject", "new"), orjson.dumps({"until": until_}), px=30_000)
    assert await c.reconcile() is True  # keys of two slots: read with one MGET per slot
    assert sorted(known(c)) == [("subject", "new"), ("subject", "old")]
    assert orjson.loads(await cluster_raw.get(cm.quarantine_key(on_cluster, "subject", "old")))["until"] == until_


async def test_on_a_cluster_list_shows_what_only_redis_holds(
    on_cluster: SharedState, cluster_raw: aioredis.Redis
) -> None:
    c = Containment(on_cluster)
    assert await c.list() == []
    doc = {"scope": "workload", "value": "w", "reason": "", "until": time.time() + 30, "by": "x", "since": 3.0}
    await cluster_raw.set(cm.quarantine_key(on_cluster, "workload", "w"), orjson.dumps(doc), px=30_000)
    assert await c.list() == [doc]
    assert on_cluster.available


async def test_on_a_cluster_check_reads_what_only_redis_holds(
    on_cluster: SharedState, cluster_raw: aioredis.Redis
) -> None:
    c = Containment(on_cluster)
    doc = {"scope": "subject", "value": "r", "reason": "", "until": time.time() + 30, "by": "x", "since": 3.0}
    await cluster_raw.set(cm.quarantine_key(on_cluster, "subject", "r"), orjson.dumps(doc), px=30_000)
    got = await c.check(Subject(scopes=(("subject", "r"),)))
    assert got == Contained(Quarantine("subject", "r", "", doc["until"], "x", 3.0), True)


@pytest.mark.parametrize(
    "blob", [b"garbage", b"{}", b'{"at": "x"}', b'{"at": true}', b'{"at": "inf"}', b'{"at": 1e999}', b'{"at": null}']
)
async def test_an_unreadable_lift_record_ends_no_quarantine_even_one_without_since(
    shared: SharedState, raw: aioredis.Redis, blob: bytes
) -> None:
    # An entry of an earlier version (no ``since``: 0.0) held in Redis, and a lift record that
    # cannot be read: the subject stays held, here and in Redis.
    key = cm.quarantine_key(shared, "subject", "old")
    await raw.set(key, orjson.dumps({"until": time.time() + 60}), px=60_000)
    await raw.set(cm.lift_key(shared, "subject", "old"), blob, px=60_000)
    c = Containment(shared)
    assert await c.reconcile() is True
    assert list(known(c)) == [("subject", "old")]
    assert await raw.get(key) is not None  # not deleted as lifted
    contained = await c.check(Subject(scopes=(("subject", "old"),)))
    assert contained.hit is not None and contained.hit.value == "old"


@pytest.mark.parametrize("at", [True, "inf", "1", None, [1]])
async def test_a_lift_event_with_an_odd_time_lifts_nothing(shared: SharedState, at: object) -> None:
    c = Containment(shared)
    c._on_event(event("add", scope="subject", value="v", until=time.time() + 30))  # no since: 0.0
    c._on_event(event("lift", scope="subject", value="v", at=at))
    assert list(known(c)) == [("subject", "v")]
    c._on_event(event("lift", scope="subject", value="v", at=time.time(), keep="never"))
    assert list(known(c)) == [("subject", "v")]


async def test_a_redis_copy_past_its_own_end_is_not_taken(shared: SharedState, raw: aioredis.Redis) -> None:
    # The key outlives the entry by the moment the write took (its PX counts from the write):
    # what it says has ended is not held again.
    ended = {"scope": "subject", "value": "over", "reason": "", "until": time.time() - 0.01, "by": "a", "since": 1.0}
    await raw.set(cm.quarantine_key(shared, "subject", "over"), orjson.dumps(ended), px=60_000)
    c = Containment(shared)
    g = c.generation
    assert await c.reconcile() is True
    assert known(c) == {} and c.written_back == 0
    assert c.generation == g
