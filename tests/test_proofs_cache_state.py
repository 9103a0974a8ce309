"""What a replica knows of the cache's epochs and revision, rule by rule, on a real Redis.

:class:`~vvault_pep.decide.cache.DecisionCache` objects on one redis-server stand for
replicas (each test has its own key prefix); a real one-node Redis Cluster stands in where
the code takes the Cluster's own way.  What is checked is what decides whether an old
answer could match again: what a full read (:meth:`~DecisionCache.load`) takes from Redis
and what it leaves, what an event on the push channel may raise and what it may not, what
a write-back (:meth:`~DecisionCache.reconcile`) announces and what it keeps for later, when
a replica suspects that Redis lost data, how long the full read and the write-back wait
for a stalled Redis, and when the generation (the memo's validity) moves.  What a replica
keys on is read with Redis out of reach, so that only what it remembers answers.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from tests.conftest import RedisServer
from tests.heard import Heard, until
from tests.redis_topologies import OneNodeCluster

from vvault_pep.config import Cache
from vvault_pep.config.models import Redis as RedisConfig
from vvault_pep.decide.cache import DecisionCache, epoch_key, rev_key
from vvault_pep.shared.push import Push
from vvault_pep.shared.state import Generation, SharedState

DOWN = "redis://127.0.0.1:1/0"  # nothing listens there: every command fails at once
SCOPES = (("subject", "alice"), ("token", "j1"))


@pytest.fixture
def prefix() -> str:
    return f"s{uuid.uuid4().hex[:10]}:"


@pytest.fixture
async def raw(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_server.url)
    yield client
    await client.aclose()


class Replicas:
    """Replicas made on one Redis with one key prefix, all closed at the end of the test."""

    def __init__(self, url: str, prefix: str) -> None:
        self.url, self.prefix = url, prefix
        self._made: list[tuple[SharedState, DecisionCache, Push | None]] = []

    def cache(
        self,
        *,
        push: bool = False,
        timeout_ms: int = 2000,
        generation: Generation | None = None,
        url: str | None = None,
        mode: str = "standalone",
    ) -> DecisionCache:
        # A beat every 50 ms with 5 s to come back: on busy cores the channel stays healthy.
        cfg = RedisConfig(
            url=url or self.url,
            mode=mode,
            key_prefix=self.prefix,
            timeout_ms=timeout_ms,
            heartbeat_ms=50,
            heartbeat_deadline_ms=5000,
        )
        shared = SharedState(cfg)
        channel = Push(shared, Generation()) if push else None
        c = DecisionCache(Cache(), shared, push=channel, generation=generation)
        c.opa_revision = "b:1"
        self._made.append((shared, c, channel))
        return c

    async def close(self) -> None:
        for shared, c, channel in self._made:
            if channel is not None:
                await channel.stop()
            await c.stop()
            await shared.close()


@pytest.fixture
async def replicas(redis_server: RedisServer, prefix: str) -> AsyncIterator[Replicas]:
    made = Replicas(redis_server.url, prefix)
    yield made
    await made.close()


async def offline(c: DecisionCache, scopes: tuple[tuple[str, str], ...]) -> tuple[str, list[Any]]:
    """What ``c`` keys on with Redis out of reach: only what it remembers."""
    kept = c.shared
    down = SharedState(RedisConfig(url=DOWN, key_prefix="x:", timeout_ms=200))
    c.shared = down
    try:
        return await c.context(scopes)
    finally:
        c.shared = kept
        await down.close()


async def bump_without_redis(c: DecisionCache, scope: str, value: str) -> None:
    """A bump made while Redis cannot hear it: kept by ``c`` for a later write-back."""
    kept = c.shared
    down = SharedState(RedisConfig(url=DOWN, key_prefix="x:", timeout_ms=200))
    c.shared = down
    try:
        assert await c.invalidate(scope, value) is False
    finally:
        c.shared = kept
        await down.close()


async def pause(client: aioredis.Redis, ms: int) -> None:
    """Redis answers nobody for ``ms`` (not even an early UNPAUSE): a stalled server."""
    assert await client.execute_command("CLIENT", "PAUSE", ms, "ALL") == b"OK"


def unordered(events: list[Any]) -> list[bytes]:
    return sorted(orjson.dumps(e, option=orjson.OPT_SORT_KEYS) for e in events)


# --- the full read (the push channel's reconciliation) ---------------------------------


async def test_a_full_read_takes_every_epoch_and_the_revision_redis_holds_and_nothing_else(
    replicas: Replicas, raw: aioredis.Redis, prefix: str
) -> None:
    c = replicas.cache()
    epochs = f"{prefix}epoch:{{c}}:"
    await raw.set(f"{epochs}subject:alice", b"3")
    await raw.set(f"{epochs}workload:spiffe://td/ns/a/sa/w", b"2")  # a value with ":" in it
    await raw.set(f"{epochs}tenant:t:1", b"4")
    await raw.set(f"{prefix}rev:{{c}}", b"5")
    await raw.set(f"{epochs}device:".encode() + b"\xff\xfe", b"6")  # not UTF-8: read, harmless
    await raw.set(f"{epochs}user:bob", b"7")  # a scope no subject carries
    await raw.set(f"{epochs}token:j1", b"garbage")  # counts as 0
    other = f"s{uuid.uuid4().hex[:10]}:"  # another deployment on the same Redis, same prefix length
    await raw.set(f"{other}epoch:{{c}}:subject:alice", b"99")
    await raw.set(f"{other}epoch:{{c}}:certificate:ab", b"99")
    assert await c.load() is True
    scopes = (
        ("subject", "alice"),
        ("workload", "spiffe://td/ns/a/sa/w"),
        ("tenant", "t:1"),
        ("token", "j1"),
        ("certificate", "ab"),
        ("user", "bob"),
    )
    assert await offline(c, scopes) == (
        "b:1#5#0",
        [
            ["subject", "alice", 3, 0],
            ["workload", "spiffe://td/ns/a/sa/w", 2, 0],
            ["tenant", "t:1", 4, 0],
            ["token", "j1", 0, 0],
            ["certificate", "ab", 0, 0],
            ["user", "bob", 0, 0],
        ],
    )
    assert await offline(c, (("device", "\ufffd\ufffd"),)) == ("b:1#5#0", [["device", "\ufffd\ufffd", 6, 0]])


async def test_a_full_read_says_whether_it_read_redis(replicas: Replicas, raw: aioredis.Redis, prefix: str) -> None:
    assert await DecisionCache(Cache(), None).load() is False  # no Redis configured
    c = replicas.cache(url=DOWN, timeout_ms=200)
    assert await c.load() is False  # Redis away
    empty = replicas.cache()
    assert await empty.load() is True  # nothing held: a complete read all the same
    assert await offline(empty, SCOPES) == ("b:1#0#0", [["subject", "alice", 0, 0], ["token", "j1", 0, 0]])


async def test_a_full_read_only_moves_forward(replicas: Replicas, raw: aioredis.Redis, prefix: str) -> None:
    c = replicas.cache()
    await raw.set(f"{prefix}epoch:{{c}}:subject:alice", b"5")
    await raw.set(f"{prefix}rev:{{c}}", b"3")
    assert await c.load() is True
    await raw.set(f"{prefix}epoch:{{c}}:subject:alice", b"2")  # Redis lost data and was bumped since
    await raw.set(f"{prefix}rev:{{c}}", b"1")
    assert await c.load() is True
    assert await offline(c, SCOPES) == ("b:1#3#0", [["subject", "alice", 5, 0], ["token", "j1", 0, 0]])


# --- suspicion: Redis shows less than this replica knows ---------------------------------


@pytest.mark.parametrize("reader", ["context", "load"])
async def test_a_read_below_what_this_replica_knows_raises_suspicion_and_an_equal_one_does_not(
    replicas: Replicas, raw: aioredis.Redis, prefix: str, reader: str
) -> None:
    c = replicas.cache()
    assert c.shared is not None
    shared = c.shared

    async def read() -> None:
        if reader == "context":
            await c.context(SCOPES)
        else:
            assert await c.load() is True

    await read()  # all zero, as this replica knows them
    assert shared.suspect is False
    await c.invalidate("subject", "alice")
    await c.invalidate("subject", "alice")
    await c.bump_revision()
    await read()  # Redis holds what this replica knows
    assert shared.suspect is False
    await raw.set(f"{prefix}rev:{{c}}", b"0")  # lost
    await read()
    assert shared.suspect is True
    if reader == "context":  # an epoch lost is seen by the per-request read too
        shared.suspect = False
        await raw.set(f"{prefix}rev:{{c}}", b"1")
        await raw.delete(f"{prefix}epoch:{{c}}:subject:alice")
        await read()
        assert shared.suspect is True


async def test_a_reader_that_finds_redis_behind_gets_it_written_back(
    replicas: Replicas, raw: aioredis.Redis, prefix: str
) -> None:
    c = replicas.cache()
    assert c.shared is not None
    await c.invalidate("subject", "alice")
    passes: list[bool] = []

    async def noted(lost: bool) -> bool:
        passes.append(lost)
        return True

    c.shared.watch([c.reconcile, noted])
    await until(lambda: passes == [True])  # the first pass, at start, is done
    key = f"{prefix}epoch:{{c}}:subject:alice"
    await raw.delete(key)  # lost behind the watcher's back (its marker is still there)
    await c.context(SCOPES)
    # one past what this replica knew: another replica may have cached under 0
    await until(lambda: raw.get(key), timeout=10)
    assert await raw.get(key) == b"2"
    await until(lambda: len(passes) == 2)
    assert passes == [True, True]  # a pass after a loss, not a periodic one


# --- the generation: the memo of a request's static part stays valid while it holds ------


async def test_the_generation_moves_when_what_this_replica_knows_moves_and_only_then(
    replicas: Replicas, raw: aioredis.Redis, prefix: str
) -> None:
    gen = Generation()
    c = replicas.cache(generation=gen)
    assert c.generation == gen.value
    before = gen.value
    await c.invalidate("subject", "alice")
    await c.bump_revision()
    assert gen.value == before + 2  # the shared generation, not one of the cache's own
    moved = gen.value
    await c.context(SCOPES)  # Redis says what this replica knows
    assert await c.load() is True
    assert await c.reconcile(lost=True) is True
    assert gen.value == moved
    await raw.set(f"{prefix}epoch:{{c}}:token:j1", b"4")  # another replica's bump
    await c.context(SCOPES)
    assert gen.value == moved + 1
    await raw.set(f"{prefix}rev:{{c}}", b"2")
    assert await c.load() is True
    assert gen.value == moved + 2


# --- the push channel ------------------------------------------------------------------


async def test_while_the_channel_is_healthy_a_bump_elsewhere_is_known_without_a_read(
    replicas: Replicas, raw: aioredis.Redis, prefix: str
) -> None:
    a, b = replicas.cache(push=True), replicas.cache(push=True)
    assert b.push is not None and b.shared is not None
    await b.push.start(first_s=10)
    assert b.push.healthy
    reads = b.shared.batched_commands
    assert await b.context(SCOPES) == ("b:1#0#0", [["subject", "alice", 0, 0], ["token", "j1", 0, 0]])
    assert b.shared.batched_commands == reads  # no Redis command for it
    assert await a.invalidate("subject", "alice") is True
    assert await a.bump_revision() is True
    want = ("b:1#1#0", [["subject", "alice", 1, 0], ["token", "j1", 0, 0]])

    async def heard() -> bool:
        return await b.context(SCOPES) == want

    await until(heard)
    assert b.shared.batched_commands == reads
    assert b.push.healthy


@pytest.mark.parametrize(
    ("event", "scopes", "expected"),
    [
        ({"op": "epoch", "scope": "subject", "value": "alice", "n": 3}, SCOPES, ("b:1#0#0", [3, 0])),
        ({"op": "rev", "scope": "", "value": "", "n": 4}, SCOPES, ("b:1#4#0", [0, 0])),
        ({"op": "epoch", "scope": "token", "value": "j1", "n": 2}, SCOPES, ("b:1#0#0", [0, 2])),
    ],
)
async def test_an_event_on_the_channel_raises_what_it_names(
    replicas: Replicas, raw: aioredis.Redis, event: dict[str, Any], scopes: Any, expected: Any
) -> None:
    b = replicas.cache(push=True)
    assert b.push is not None
    await b.push.start(first_s=10)
    await raw.publish(b.push.channel, orjson.dumps(event))  # heard, though Redis holds no such value
    revision, numbers = expected
    want = (revision, [[s, v, n, 0] for (s, v), n in zip(scopes, numbers, strict=True)])

    async def heard() -> bool:
        return await b.context(scopes) == want

    await until(heard)


async def test_an_event_that_is_not_a_counter_of_a_known_scope_is_ignored(
    replicas: Replicas, raw: aioredis.Redis
) -> None:
    gen = Generation()
    b = replicas.cache(push=True, generation=gen)
    assert b.push is not None
    await b.push.start(first_s=10)
    ignored = [
        {"op": "rev", "scope": "", "value": "", "n": True},
        {"op": "rev", "scope": "", "value": "", "n": 2.5},
        {"op": "rev", "scope": "", "value": "", "n": "7"},
        {"op": "epoch", "scope": "subject", "value": "alice", "n": True},
        {"op": "epoch", "scope": "subject", "value": "alice", "n": 1.5},
        {"op": "epoch", "scope": "user", "value": "bob", "n": 5},
        {"op": "epoch", "scope": "subject", "value": 7, "n": 5},
        {"op": "epoch", "scope": "subject", "value": None, "n": 5},
        {"op": "EPOCH", "scope": "subject", "value": "alice", "n": 5},
    ]
    before = gen.value
    for event in ignored:
        await raw.publish(b.push.channel, orjson.dumps(event))
    await raw.publish(b.push.channel, orjson.dumps({"op": "epoch", "scope": "token", "value": "last", "n": 1}))
    last = (("token", "last"),)

    async def heard_last() -> bool:
        return (await b.context(last))[1] == [["token", "last", 1, 0]]

    await until(heard_last)  # the channel keeps its order: every event before it was handled
    assert gen.value == before + 1  # only the last one changed anything
    assert await offline(b, (("subject", "alice"), ("user", "bob"), ("subject", "7"))) == (
        "b:1#0#0",
        [["subject", "alice", 0, 0], ["user", "bob", 0, 0], ["subject", "7", 0, 0]],
    )


# --- the write-back ------------------------------------------------------------------


async def test_what_a_write_back_raises_is_announced_on_the_channel(
    replicas: Replicas, raw: aioredis.Redis, prefix: str
) -> None:
    a = replicas.cache(push=True)
    assert a.push is not None
    async with Heard(raw, a.push.channel) as heard:
        await a.invalidate("subject", "alice")
        await a.invalidate("token", "j1")
        await a.bump_revision()
        assert unordered(await heard.mark()) == unordered(
            [
                {"op": "epoch", "scope": "subject", "value": "alice", "n": 1},
                {"op": "epoch", "scope": "token", "value": "j1", "n": 1},
                {"op": "rev", "scope": "", "value": "", "n": 1},
            ]
        )
        await raw.delete(f"{prefix}epoch:{{c}}:subject:alice", f"{prefix}rev:{{c}}")  # lost
        assert await a.reconcile(lost=True) is True
        # what moved is announced, one past what this replica knew; the token's epoch did not move
        assert unordered(await heard.mark()) == unordered(
            [
                {"op": "epoch", "scope": "subject", "value": "alice", "n": 2},
                {"op": "rev", "scope": "", "value": "", "n": 2},
            ]
        )
        await bump_without_redis(a, "device", "d1")
        assert await a.reconcile(lost=False) is True
        assert await heard.mark() == [{"op": "epoch", "scope": "device", "value": "d1", "n": 1}]


@pytest.mark.parametrize("lost", [False, True])
async def test_a_bump_that_fails_while_a_write_back_is_in_flight_is_kept_for_the_next(
    replicas: Replicas, raw: aioredis.Redis, prefix: str, lost: bool
) -> None:
    c = replicas.cache()
    if lost:  # an epoch this replica knows, with nothing pending: the pass writes it back with 0 added
        assert await c.invalidate("subject", "alice") is True
    else:  # a bump Redis has not heard yet
        await bump_without_redis(c, "subject", "alice")
    await pause(raw, 1000)
    write_back = asyncio.create_task(c.reconcile(lost=lost))
    await asyncio.sleep(0)  # one turn: the write-back has taken what is pending and waits for Redis
    await bump_without_redis(c, "subject", "alice")  # fails at once, long before Redis answers
    assert await write_back is True
    assert c.unshared == 1  # the bump made meanwhile is still owed to Redis
    assert await c.reconcile(lost=False) is True
    assert c.unshared == 0
    assert await raw.get(f"{prefix}epoch:{{c}}:subject:alice") == b"2"  # both bumps, neither lost


async def test_a_complete_write_back_leaves_nothing_for_the_next_pass(
    replicas: Replicas, raw: aioredis.Redis, prefix: str
) -> None:
    c = replicas.cache()
    assert await c.invalidate("token", "j1") is True  # known, nothing pending
    assert await c.bump_revision() is True
    # a periodic pass with nothing pending sends nothing: it completes with Redis gone
    kept = c.shared
    c.shared = SharedState(RedisConfig(url=DOWN, key_prefix=prefix, timeout_ms=200))
    try:
        assert await c.reconcile(lost=False) is True
        assert await c.reconcile(lost=True) is False  # a pass after a loss does need Redis
    finally:
        await c.shared.close()
        c.shared = kept
    await bump_without_redis(c, "subject", "alice")
    assert await c.reconcile(lost=False) is True
    assert await raw.get(f"{prefix}epoch:{{c}}:subject:alice") == b"1"
    c.shared = SharedState(RedisConfig(url=DOWN, key_prefix=prefix, timeout_ms=200))
    try:
        assert c.unshared == 0
        assert await c.reconcile(lost=False) is True
    finally:
        await c.shared.close()
        c.shared = kept


# --- deadlines -----------------------------------------------------------------------


@pytest.mark.parametrize("op", ["load", "reconcile"])
async def test_a_full_read_and_a_write_back_give_a_stalled_redis_two_seconds_at_most(
    replicas: Replicas, raw: aioredis.Redis, op: str
) -> None:
    c = replicas.cache(timeout_ms=5000)  # each command may wait 5 s; the whole pass does not
    assert await c.invalidate("subject", "alice") is True

    async def run() -> bool:
        return await (c.load() if op == "load" else c.reconcile(lost=True))

    await pause(raw, 2600)
    started = time.monotonic()
    assert await run() is False  # given up: the push channel and the watcher try again later
    assert time.monotonic() - started >= 1.9
    assert await raw.ping() is True  # Redis answers again (the pause is over)
    await until(run)  # and the pass completes once the circuit closes again


# --- on a Cluster ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_node_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OneNodeCluster]:
    node = OneNodeCluster(tmp_path_factory.mktemp("cache-cluster"))
    node.start()
    yield node
    node.stop()


@pytest.fixture
async def cluster_raw(one_node_cluster: OneNodeCluster) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(one_node_cluster.url)  # every slot is on this node
    yield client
    await client.aclose()


async def test_on_a_cluster_bumps_are_published_sharded_and_a_full_read_finds_the_epochs(
    replicas: Replicas, one_node_cluster: OneNodeCluster, cluster_raw: aioredis.Redis, prefix: str
) -> None:
    a = replicas.cache(push=True, url=one_node_cluster.url, mode="cluster")
    assert a.push is not None and a.shared is not None
    async with Heard(cluster_raw, a.push.channel, sharded=True) as heard:
        assert await a.invalidate("subject", "alice") is True
        assert await a.bump_revision() is True
        assert await heard.mark() == [
            {"op": "epoch", "scope": "subject", "value": "alice", "n": 1},
            {"op": "rev", "scope": "", "value": "", "n": 1},
        ]
    await cluster_raw.set(epoch_key(a.shared, "token", "j1"), b"3")
    await cluster_raw.set(rev_key(a.shared), b"4")
    b = replicas.cache(url=one_node_cluster.url, mode="cluster")
    assert await b.load() is True
    assert await offline(b, SCOPES) == ("b:1#4#0", [["subject", "alice", 1, 0], ["token", "j1", 3, 0]])
    empty = Replicas(one_node_cluster.url, f"s{uuid.uuid4().hex[:10]}:")
    try:
        # no epoch at all (nothing to MGET, which a Cluster could not route): a complete read still
        assert await empty.cache(mode="cluster").load() is True
    finally:
        await empty.close()
