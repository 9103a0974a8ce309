"""Where L2 decision entries live: a store every replica shares, read when L1 misses.

A store keeps opaque blobs by ``(kind, key)`` until an instant (unix time): an entry ends when
its answer or its token does, however late its write reaches the store.  ``kind`` is
``dec`` (an entry) or ``idx`` (a route's ``cache.vary`` index).  What a blob holds, and how
its key is made, is :mod:`.cache`'s.  :class:`RedisStore` is the PEP's; another backend is a
class with the two methods and a line in :data:`STORES` (a name → a factory of the shared
state); :class:`~.cache.DecisionCache` picks ``"redis"`` when Redis is configured, or takes a
store given to it.  There is no config option naming the store.  The revision counter and
the scope epochs stay in :class:`~vvault_pep.shared.state.SharedState`: they are shared state
that never shrinks, not cache entries.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from ..shared.state import SharedState


class DecisionStore(Protocol):
    def get(self, kind: str, key: str) -> Awaitable[bytes | None]:
        """The blob, or None (absent, expired, or the store did not answer in time)."""
        ...

    def put(self, kind: str, key: str, blob: bytes, expires_at: float) -> Awaitable[Any]:
        """Keep the blob until ``expires_at`` (unix seconds, in the future when called)."""
        ...


class RedisStore:
    """Entries in Redis, each command riding in the round trip of its loop turn."""

    def __init__(self, shared: SharedState) -> None:
        self.shared = shared

    def get(self, kind: str, key: str) -> Awaitable[bytes | None]:
        shared = self.shared
        return shared.one(lambda p: p.get(shared.key(kind, key)))

    def put(self, kind: str, key: str, blob: bytes, expires_at: float) -> Awaitable[Any]:
        shared = self.shared
        # An absolute expiry (SET … PXAT, Redis 6.2): a write that waited in a busy loop or a
        # slow round trip still ends with the token, where a relative one would add the wait.
        at_ms = int(expires_at * 1000)
        return shared.one(lambda p: p.set(shared.key(kind, key), blob, pxat=at_ms))


class MemoryStore:
    """Entries in this process, expiring like Redis keys: for unit tests and a single replica."""

    def __init__(self) -> None:
        self.blobs: dict[tuple[str, str], tuple[bytes, float]] = {}

    async def get(self, kind: str, key: str) -> bytes | None:
        found = self.blobs.get((kind, key))
        if found is None or found[1] <= time.monotonic():
            self.blobs.pop((kind, key), None)
            return None
        return found[0]

    async def put(self, kind: str, key: str, blob: bytes, expires_at: float) -> None:
        self.blobs[(kind, key)] = (blob, time.monotonic() + (expires_at - time.time()))


StoreFactory = Callable[[SharedState], DecisionStore]

# The L2 stores by name, the one list: adding one is a class and a line here.
STORES: dict[str, StoreFactory] = {
    "redis": RedisStore,
    "memory": lambda _shared: MemoryStore(),
}


def store_named(name: str, shared: SharedState) -> DecisionStore:
    """The store registered as ``name``, built on ``shared``; KeyError if none is."""
    return STORES[name](shared)
