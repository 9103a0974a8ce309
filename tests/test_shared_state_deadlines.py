"""Each call's own deadline rules, not the socket's: a background read may wait out a slow Redis,
a request-path read never waits past ``redis.timeout_ms``. Against a real redis-server that a
``CLIENT PAUSE`` holds (its own server: the pause must not reach other tests)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator

import pytest
import redis
from tests.conftest import RedisServer

from vvault_pep.config import Redis as RedisConfig
from vvault_pep.shared.state import SharedState

PAUSE_MS = 800


@pytest.fixture(scope="module")
def paused_redis() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def shared(paused_redis: RedisServer) -> AsyncIterator[SharedState]:
    state = SharedState(RedisConfig(url=paused_redis.url, key_prefix="deadlines:", timeout_ms=200))
    assert await state.call(lambda c: c.set("deadlines:k", b"v")) is True  # connected, before any pause
    yield state
    await state.close()
    with redis.Redis(host="127.0.0.1", port=paused_redis.port, socket_timeout=5) as c:
        assert c.ping()  # answered once the pause is over: the next test starts unpaused


def _pause(server: RedisServer) -> float:
    with redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=5) as c:
        c.execute_command("CLIENT", "PAUSE", PAUSE_MS, "ALL")
    return time.monotonic()


async def test_a_background_read_waits_out_a_redis_slower_than_timeout_ms(
    paused_redis: RedisServer, shared: SharedState
) -> None:
    paused_at = _pause(paused_redis)
    value = await shared.call(lambda c: c.get("deadlines:k"), deadline_s=2.0)
    waited = time.monotonic() - paused_at
    assert value == b"v"  # the full reads' 2 s deadline, not the 200 ms socket timeout
    assert waited >= PAUSE_MS / 1000 - 0.1
    assert shared.errors == 0 and shared.available


async def test_a_request_path_read_still_gives_up_at_timeout_ms(paused_redis: RedisServer, shared: SharedState) -> None:
    paused_at = _pause(paused_redis)
    value = await shared.call(lambda c: c.get("deadlines:k"))  # the default deadline: redis.timeout_ms
    gave_up = time.monotonic() - paused_at
    assert value is None
    assert 0.15 <= gave_up < PAUSE_MS / 1000  # at its 200 ms, well before the pause ends
    assert shared.errors == 1
    batched = await shared.mget(["deadlines:k"])  # the request path's batches: the same deadline
    assert batched is None  # the circuit opened on the failure above: no second wait


async def test_the_batched_read_of_the_request_path_gives_up_at_timeout_ms(
    paused_redis: RedisServer, shared: SharedState
) -> None:
    paused_at = _pause(paused_redis)
    batched = await shared.mget(["deadlines:k"])
    gave_up = time.monotonic() - paused_at
    assert batched is None
    assert 0.15 <= gave_up < PAUSE_MS / 1000
