"""The L2 store behind the decision cache, with an in-memory store standing in for Redis.

The same behaviour against a real Redis is in tests/test_cache.py (two replicas sharing one
redis-server); here the cache's own rules run in a second, without any server:

* a second replica (a second cache over the same store) finds the entry the first stored:
  ``l2``, the same answer, then ``l1``;
* an entry past its lifetime is a miss, on L2 as on L1;
* a corrupt or foreign blob under the key is a miss, never an answer;
* a route that does not cache never reads or writes the store.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import pytest

from vvault_pep.config import Cache, Route
from vvault_pep.decide.cache import CacheHints, DecisionCache
from vvault_pep.decide.store import MemoryStore

ROUTE = Route(name="r", path="/r", upstream="u", policy="p/q", cache={"ttl_s": 60})
OFF = Route(name="off", path="/off", upstream="u", policy="p/q", cache="off")
DOC: dict[str, Any] = {"request": {"id": "1", "path": "/r"}, "identity": {"subject": "kim"}}
SCOPES = (("subject", "corp|kim"),)


async def replica(store: MemoryStore) -> DecisionCache:
    cache = DecisionCache(Cache(), None, store=store)
    cache.opa_revision = "p:policy"
    return cache


async def ask(cache: DecisionCache, route: Route = ROUTE) -> tuple[Any, str]:
    result, layer, _, _ = await cache.lookup(route, DOC, await cache.context(SCOPES))
    return result, layer


async def put(cache: DecisionCache, result: Any, ttl_s: float = 60, route: Route = ROUTE) -> None:
    revision, epochs = await cache.context(SCOPES)
    cache.store(route, DOC, result, ttl_s=ttl_s, hints=CacheHints(), revision=revision, epochs=epochs)
    await cache.drain()


async def test_a_second_replica_finds_what_the_first_stored() -> None:
    store = MemoryStore()
    one, two = await replica(store), await replica(store)
    assert await ask(two) == (None, "miss")
    await put(one, {"allow": True, "code": "policy.allowed"})
    assert await ask(two) == ({"allow": True, "code": "policy.allowed"}, "l2")
    assert await ask(two) == ({"allow": True, "code": "policy.allowed"}, "l1")
    assert sorted(kind for kind, _ in store.blobs) == ["dec", "idx"]


async def test_an_entry_that_ended_before_its_write_ran_is_not_written() -> None:
    store = MemoryStore()
    one = await replica(store)
    await put(one, {"allow": True}, ttl_s=1e-9)  # over before the write's task starts
    assert store.blobs == {}
    await put(one, {"allow": True})
    assert sorted(kind for kind, _ in store.blobs) == ["dec", "idx"]


async def test_an_expired_entry_is_a_miss_on_both_layers() -> None:
    store = MemoryStore()
    one, two = await replica(store), await replica(store)
    await put(one, {"allow": True}, ttl_s=0.05)
    await asyncio.sleep(0.1)  # past the entry's own lifetime, kept by the store and by L1
    assert await ask(one) == (None, "miss")
    assert await ask(two) == (None, "miss")


@pytest.mark.parametrize("blob", [b"not json", orjson.dumps({"r": True}), orjson.dumps({"r": True, "exp": "x"})])
async def test_a_corrupt_or_foreign_blob_is_a_miss(blob: bytes) -> None:
    store = MemoryStore()
    one, two = await replica(store), await replica(store)
    await put(one, {"allow": True})
    [key] = [k for kind, k in store.blobs if kind == "dec"]
    await store.put("dec", key, blob, time.time() + 60)
    assert await ask(two) == (None, "miss")


async def test_a_route_that_does_not_cache_never_touches_the_store() -> None:
    store = MemoryStore()
    cache = await replica(store)
    await put(cache, {"allow": True}, route=OFF)
    assert await ask(cache, OFF) == (None, "bypass")
    assert store.blobs == {}
