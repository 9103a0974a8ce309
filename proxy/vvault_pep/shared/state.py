"""Shared state: the Redis connection every replica shares, behind a deadline.

One client (standalone, Sentinel or Cluster; TLS with ``rediss://``; ACL
username and password), one pool.  :meth:`SharedState.call` runs a command
under ``redis.timeout_ms`` and turns every failure into ``None`` — the caller
decides what "Redis could not answer" means for it, and it is never "allow".
After a failure Redis is skipped for ``retry_after_failure_s`` so a dead Redis
costs one deadline, not one per request.

:meth:`SharedState.one` is the request path's way in: single commands queued
in the same turn of the event loop — a request's risk script, quarantine
check and cache epochs, and those of every other request in flight — go to
Redis as one pipeline, one round trip, with the same deadline and the same
``None`` on failure.

:meth:`SharedState.watch` keeps replicas and Redis in step: it probes Redis
every ``PROBE_S`` with a marker key, and runs the reconcilers (containment,
cache epochs) on every return after an outage, whenever the marker is gone
(Redis restarted empty, was flushed, or failed over to a replica without the
data) and every ``FULL_S`` regardless.  ``reachable``, ``down_since`` and
``outages`` say where things stand for ``/readyz``, metrics and the audit record.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Generator, Sequence
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import RedisError

from ..config.models import Redis as RedisConfig

log = logging.getLogger("vvault_pep.redis")
T = TypeVar("T")


def make_client(cfg: RedisConfig) -> Any:
    common: dict[str, Any] = {
        "socket_timeout": cfg.timeout_ms / 1000,
        "socket_connect_timeout": cfg.timeout_ms / 1000,
        "max_connections": cfg.max_connections,
        "decode_responses": False,
    }
    if cfg.username is not None:
        common["username"] = cfg.username
    if cfg.password is not None:
        common["password"] = cfg.password
    if cfg.url.startswith("rediss://") and cfg.ca_file is not None:
        common["ssl_ca_certs"] = str(cfg.ca_file)
        common["ssl_cert_reqs"] = ssl.CERT_REQUIRED
    if cfg.mode == "cluster":
        common.pop("max_connections")
        return RedisCluster.from_url(cfg.url, **common)
    if cfg.mode == "sentinel":
        hosts = [(h.rsplit(":", 1)[0], int(h.rsplit(":", 1)[1])) for h in cfg.sentinels]
        sentinel = Sentinel(hosts, socket_timeout=cfg.timeout_ms / 1000)  # type: ignore[no-untyped-call]
        assert cfg.service_name is not None
        return sentinel.master_for(cfg.service_name, **common)
    return aioredis.from_url(cfg.url, **common)


_MAX_BATCH = 512  # commands per pipeline
PROBE_S = 0.5  # how often the watcher asks whether Redis is there and still holds its data
FULL_S = 5.0  # how often the reconcilers run when nothing else asks for it
# 1 when the marker was missing (and is now set): Redis lost what it held, or never had it.
_MARK = "if redis.call('SET', KEYS[1], '1', 'NX') then return 1 else return 0 end"


class _Reply:
    """A queued command's reply: await it (or don't: nothing is left hanging)."""

    __slots__ = ("_deadline_s", "_fut", "_shared")

    def __init__(self, shared: SharedState, fut: asyncio.Future[Any] | None, deadline_s: float | None) -> None:
        self._shared, self._fut, self._deadline_s = shared, fut, deadline_s

    def __await__(self) -> Generator[Any, None, Any]:
        return self._shared._wait(self._fut, self._deadline_s).__await__()


class _MGet:
    """An MGET waiting for its round trip (merged with the turn's other MGETs)."""

    __slots__ = ("keys",)

    def __init__(self, keys: list[str]) -> None:
        self.keys = keys


class SharedState:
    def __init__(self, cfg: RedisConfig, client: Any | None = None) -> None:
        self.cfg = cfg
        self.client = client if client is not None else make_client(cfg)
        self.prefix = cfg.key_prefix
        self._down_until = 0.0
        self.errors = 0
        self.batches = 0  # pipelines sent by one(): commands per round trip = commands / batches
        self.batched_commands = 0
        self._pending: list[tuple[Callable[[Any], object] | _MGet, asyncio.Future[Any]]] = []
        self.late = 0  # callers that stopped waiting at their own, shorter deadline
        self._flushes: set[asyncio.Task[None]] = set()
        self.reachable = True  # as the watcher last saw it
        self.down_since: float | None = None  # unix time the current outage was noticed
        self.outages = 0
        self.data_losses = 0  # times the marker was gone: restart without data, flush, failover
        self.trips = 0  # failures that opened the circuit (a lost connection, a timeout)
        self.suspect = False  # a reader saw Redis behind what this replica knows: reconcile soon
        self._watcher: asyncio.Task[None] | None = None

    @property
    def available(self) -> bool:
        return time.monotonic() >= self._down_until

    def key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    def watch(self, reconcilers: Sequence[Callable[[bool], Awaitable[bool]]]) -> None:
        """Start the watcher (see the module docstring); stopped by :meth:`close`."""
        self._watcher = asyncio.create_task(self._watch(tuple(reconcilers)), name="redis-watch")

    async def _watch(self, reconcilers: tuple[Callable[[bool], Awaitable[bool]], ...]) -> None:
        """Each reconciler is called with ``lost``: whether Redis may have lost or missed
        writes since the last run (a return after an outage, a missing marker, a tripped
        circuit, a reader's suspicion) rather than a periodic pass."""
        marker = self.key("alive")
        due = True  # reconcile at the first answer
        last_full = time.monotonic()
        seen_trips = self.trips
        first = True
        while True:
            mark = await self.call(lambda c: c.eval(_MARK, 1, marker))
            if mark is None:
                if self.reachable:
                    self.reachable, self.down_since = False, time.time()
                    self.outages += 1
                    log.warning("redis unreachable: enforcing what this replica knows")
                due = True
            else:
                if not self.reachable:
                    log.warning(
                        "redis is back after %.1fs: reconciling", time.time() - (self.down_since or time.time())
                    )
                    self.reachable, self.down_since = True, None
                if int(mark) == 1 and not first:
                    self.data_losses += 1
                    log.warning(
                        "redis lost its data (restart, flush or failover): writing back what this replica holds"
                    )
                trips, suspect = self.trips, self.suspect
                lost = due or int(mark) == 1 or trips != seen_trips or suspect
                if lost or time.monotonic() - last_full >= FULL_S:
                    self.suspect = False
                    done = True
                    for reconcile in reconcilers:
                        try:
                            done = await reconcile(lost) and done
                        except Exception:  # a reconciler's bug must not end the watcher
                            log.exception("reconciling with redis failed")
                            done = False
                    if done:
                        due, last_full, seen_trips = False, time.monotonic(), trips
                    elif suspect:
                        self.suspect = True
                first = False
            await asyncio.sleep(PROBE_S)

    async def call(self, op: Callable[[Any], Awaitable[T]], *, deadline_s: float | None = None) -> T | None:
        """Run ``op(client)`` under the deadline; ``None`` when Redis cannot answer."""
        if not self.available:
            return None
        try:
            async with asyncio.timeout(deadline_s if deadline_s is not None else self.cfg.timeout_ms / 1000):
                return await op(self.client)
        except Exception as exc:  # timeouts, Redis and cluster errors, sockets: Redis did not answer
            self._failed(exc)
            return None

    def one(self, add: Callable[[Any], object], *, deadline_s: float | None = None) -> Awaitable[Any]:
        """One command, queued now with the others of this loop turn; await its reply or ``None``.

        ``add(pipe)`` queues exactly one command on a Redis pipeline (``pipe.get(key)``,
        ``pipe.eval(script, n, *keys_and_args)``).  The command is queued when ``one`` is
        called, not when it is awaited: a request can queue several reads and then await
        them, and they share one round trip without a task each.  The round trip has
        ``redis.timeout_ms``; a caller with a shorter ``deadline_s`` stops waiting at its
        own deadline and gets ``None`` without failing the others.  A reply that is an
        error (a wrong type, a script error) is ``None`` for its caller alone; a failed
        round trip is ``None`` for every caller in it and opens the circuit like :meth:`call`.
        """
        return _Reply(self, self._enqueue(add), deadline_s)

    def mget(self, keys: list[str], *, deadline_s: float | None = None) -> Awaitable[list[Any] | None]:
        """``MGET keys`` as :meth:`one` does it; every MGET of a loop turn is one command."""
        return _Reply(self, self._enqueue(_MGet(keys)), deadline_s)

    def _enqueue(self, add: Callable[[Any], object] | _MGet) -> asyncio.Future[Any] | None:
        if not self.available:
            return None
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        if not self._pending:
            loop.call_soon(self._flush)
        self._pending.append((add, fut))
        return fut

    async def _wait(self, fut: asyncio.Future[Any] | None, deadline_s: float | None) -> Any:
        if fut is None:
            return None
        if deadline_s is None or deadline_s >= self.cfg.timeout_ms / 1000:
            return await fut
        try:
            async with asyncio.timeout(deadline_s):
                return await fut
        except TimeoutError:
            self.late += 1
            return None

    def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[:_MAX_BATCH], self._pending[_MAX_BATCH:]
            task = asyncio.get_running_loop().create_task(self._send(batch))
            self._flushes.add(task)
            task.add_done_callback(self._flushes.discard)

    async def _send(self, batch: list[tuple[Callable[[Any], object] | _MGet, asyncio.Future[Any]]]) -> None:
        # The MGETs of the batch become one MGET (their keys in order), sent first.  On
        # Cluster the keys go as one GET each: the keys of one MGET must share a slot there.
        cluster = self.cfg.mode == "cluster"
        mgets: list[tuple[_MGet, asyncio.Future[Any]]] = []
        others: list[tuple[Callable[[Any], object], asyncio.Future[Any]]] = []
        for add, fut in batch:
            if isinstance(add, _MGet):
                mgets.append((add, fut))
            else:
                others.append((add, fut))
        keys = [key for add, _ in mgets for key in add.keys]
        replies: list[Any] = []
        try:
            async with asyncio.timeout(self.cfg.timeout_ms / 1000):
                pipe = self.client.pipeline(transaction=False)
                if keys and cluster:
                    for key in keys:
                        pipe.get(key)
                elif keys:
                    pipe.mget(keys)
                for add, _ in others:
                    add(pipe)
                replies = await pipe.execute(raise_on_error=False)
            self.batches += 1
            self.batched_commands += len(batch)
        except Exception as exc:  # any failure of the round trip (cluster errors are not RedisError)
            self._failed(exc)
            replies = []
        except BaseException:  # cancelled: nobody may be left waiting
            for _, fut in batch:
                if not fut.done():
                    fut.set_result(None)
            raise
        if keys:
            head, replies = (replies[: len(keys)], replies[len(keys) :]) if cluster else (replies[:1], replies[1:])
            values: list[Any] | None = None
            if cluster and len(head) == len(keys):
                values = head
            elif not cluster and head:
                values = head[0] if isinstance(head[0], list) else self._checked(head[0])
            at = 0
            for add, fut in mgets:
                n = len(add.keys)
                part = values[at : at + n] if isinstance(values, list) and len(values) >= at + n else None
                at += n
                if part is not None and any(isinstance(r, Exception) for r in part):
                    part = self._checked(next(r for r in part if isinstance(r, Exception)))
                if not fut.done():  # the request went away meanwhile
                    fut.set_result(part)
        for i, (_, fut) in enumerate(others):
            if not fut.done():
                fut.set_result(self._checked(replies[i] if i < len(replies) else None))

    def _failed(self, exc: BaseException) -> None:
        self.errors += 1
        self.trips += 1
        self._down_until = time.monotonic() + self.cfg.retry_after_failure_s
        log.warning("redis unavailable: %s", type(exc).__name__)

    def _checked(self, reply: Any) -> Any:
        if isinstance(reply, Exception):
            self.errors += 1
            log.warning("redis command failed: %s", type(reply).__name__)
            return None
        return reply

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        with contextlib.suppress(RedisError, OSError):
            await self.client.aclose()
