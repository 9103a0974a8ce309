"""The request path's Redis reads: batched into one round trip, failures kept apart.

Against a real redis-server.  What a user would check: concurrent requests share
round trips (the ``round_trips`` counter), every caller gets its own reply, one
bad command fails only its caller, a dead Redis is ``None`` for all and opens
the circuit, and a short per-caller deadline does not fail the others.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from tests.conftest import RedisServer

from vvault_pep.config import Redis
from vvault_pep.shared.state import SharedState


@pytest.fixture
async def shared(redis_server: RedisServer) -> AsyncIterator[SharedState]:
    state = SharedState(Redis(url=redis_server.url, timeout_ms=2000, key_prefix="t-shared:"))
    await state.call(lambda c: c.mset({"t-shared:a": b"1", "t-shared:b": b"2", "t-shared:list": b"x"}))
    await state.call(lambda c: c.delete("t-shared:set"))
    await state.call(lambda c: c.sadd("t-shared:set", b"m"))
    yield state
    await state.close()


async def test_reads_of_one_loop_turn_share_a_round_trip(shared: SharedState) -> None:
    before = shared.batches
    replies = await asyncio.gather(
        *(shared.one(lambda p, k=k: p.get(f"t-shared:{k}")) for k in ("a", "b", "missing")),
        shared.one(lambda p: p.mget(["t-shared:a", "t-shared:b"])),
        shared.one(lambda p: p.eval("return redis.call('INCRBY', KEYS[1], ARGV[1])", 1, "t-shared:a", 41)),
    )
    assert replies == [b"1", b"2", None, [b"1", b"2"], 42]
    assert shared.batches - before == 1
    # the next turn is a round trip of its own
    assert await shared.one(lambda p: p.get("t-shared:a")) == b"42"
    assert shared.batches - before == 2


async def test_mgets_of_one_turn_are_one_command_and_each_gets_its_own_values(shared: SharedState) -> None:
    before = shared.batches
    calls = await shared.call(lambda c: c.info("commandstats"))
    mgets_before = (calls or {}).get("cmdstat_mget", {}).get("calls", 0)
    replies = await asyncio.gather(
        shared.mget(["t-shared:a", "t-shared:missing"]),
        shared.mget(["t-shared:b"]),
        shared.one(lambda p: p.get("t-shared:b")),
        shared.mget(["t-shared:missing", "t-shared:a", "t-shared:b"]),
    )
    assert replies == [[b"1", None], [b"2"], b"2", [None, b"1", b"2"]]
    assert shared.batches - before == 1
    calls = await shared.call(lambda c: c.info("commandstats"))
    assert calls is not None and calls["cmdstat_mget"]["calls"] - mgets_before == 1


async def test_a_bad_command_fails_only_its_caller(shared: SharedState) -> None:
    errors = shared.errors
    good, bad, script_error = await asyncio.gather(
        shared.one(lambda p: p.get("t-shared:b")),
        shared.one(lambda p: p.get("t-shared:set")),  # WRONGTYPE
        shared.one(lambda p: p.eval("return redis.call('NOPE')", 0)),
    )
    assert (good, bad, script_error) == (b"2", None, None)
    assert shared.errors == errors + 2
    assert shared.available  # a wrong reply is not an outage


async def test_a_short_deadline_gives_up_alone(shared: SharedState) -> None:
    slow = "redis.call('GET', KEYS[1]); local t = redis.call('TIME'); local s = t[1] * 1e6 + t[2]; " \
           "while true do local n = redis.call('TIME'); if n[1] * 1e6 + n[2] - s > 200000 then break end end; " \
           "return 1"  # fmt: skip
    late = shared.late
    hurried, patient = await asyncio.gather(
        shared.one(lambda p: p.eval(slow, 1, "t-shared:a"), deadline_s=0.02),
        shared.one(lambda p: p.get("t-shared:b")),
    )
    assert (hurried, patient) == (None, b"2")
    assert shared.late == late + 1
    assert shared.available


async def test_no_redis_is_none_for_everyone_and_opens_the_circuit(down_port: int) -> None:
    port = down_port  # nothing listens here
    state = SharedState(Redis(url=f"redis://127.0.0.1:{port}/0", timeout_ms=500, retry_after_failure_s=30))
    try:
        replies = await asyncio.gather(*(state.one(lambda p: p.get("k")) for _ in range(3)))
        assert replies == [None, None, None]
        assert state.errors == 1 and not state.available
        # while the circuit is open nothing is sent: no deadline is paid per request
        sent = state.batches
        assert await asyncio.wait_for(state.one(lambda p: p.get("k")), 0.05) is None
        assert state.batches == sent
    finally:
        await state.close()


async def test_a_redis_restart_is_survived() -> None:
    """A Redis killed under a pooled connection: a None, then answers again after the pause."""
    server = RedisServer()
    server.start()
    state = SharedState(Redis(url=server.url, timeout_ms=1000, retry_after_failure_s=0))
    try:
        assert await state.one(lambda p: p.set("k", b"v")) is True
        server.stop()
        assert await state.one(lambda p: p.get("k")) is None
        server.start()
        deadline = asyncio.get_running_loop().time() + 10
        while await state.one(lambda p: p.ping()) is not True:
            assert asyncio.get_running_loop().time() < deadline, "redis never came back"
            await asyncio.sleep(0.05)
    finally:
        await state.close()
        server.stop()
