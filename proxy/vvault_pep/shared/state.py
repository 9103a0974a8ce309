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
On a Cluster the same calls hold, with three rules the callers rely on:

* a pipeline is never a transaction across slots, and an ``MGET`` is split into
  one ``MGET`` per slot (all sent in the one pipeline: one round trip per node);
* keys that one command or script must read together carry the same hash tag —
  :meth:`SharedState.key_for` builds them (``<prefix><kind>:{<tag>}:<parts>``);
* pub/sub is sharded (``SPUBLISH``/``SSUBSCRIBE``): :meth:`SharedState.publish`
  and :meth:`SharedState.follow` pick the right commands for the topology, and
  ``follow`` resubscribes after a node loss or failover, telling its caller each
  time so that it can reconcile what it may have missed.

``MOVED``/``ASK`` redirections and a lost node are the client's to handle
(redis-py's :class:`~redis.asyncio.cluster.RedisCluster` refreshes its slot map);
reads go to masters only, since a replica may not have a quarantine yet.  A
Sentinel client asks the Sentinels (with their own timeouts) for the primary
again whenever its connection fails, so it follows a failover.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import sys
import time
from collections.abc import Awaitable, Callable, Generator, Sequence
from typing import Any, TypeVar

from ..config.models import Redis as RedisConfig


@contextlib.contextmanager
def _absent(module: str) -> Generator[None, None, None]:
    """``module`` cannot be imported inside the block (unless it already was)."""
    if module in sys.modules:
        yield
        return
    sys.modules[module] = None  # type: ignore[assignment]  # None here makes an import raise ImportError
    try:
        yield
    finally:
        del sys.modules[module]


# redis-py imports OpenTelemetry's metrics SDK whenever it is installed (it is here, for the
# tracing SDK), for client metrics that are off unless enabled, which the PEP never does:
# about 1 MB of every worker's memory.  It treats the SDK as optional, so it is kept out
# while redis-py loads; the PEP's own tracing does not use it.
with _absent("opentelemetry.sdk.metrics"):
    import redis.asyncio as aioredis
    from redis.asyncio.cluster import ClusterNode, RedisCluster
    from redis.asyncio.sentinel import Sentinel
    from redis.crc import key_slot
    from redis.exceptions import RedisClusterException, RedisError

log = logging.getLogger("vvault_pep.redis")


async def stop_task(task: asyncio.Task[Any], *, attempts: int = 4, wait_s: float = 0.5) -> None:
    """Cancel ``task`` and wait for it to end, within ``attempts`` × ``wait_s``.

    A task can miss a cancellation (a client library that catches it inside a read and
    carries on): it is cancelled again, and stopping goes on after the last wait rather
    than hang on a task that will not end.
    """
    for _ in range(attempts):
        if task.done():
            break
        task.cancel()
        await asyncio.wait({task}, timeout=wait_s)  # neither raises its end nor cancels it again
    if not task.done():
        log.warning("task %s did not end when cancelled; stopping without it", task.get_name())
    elif not task.cancelled() and task.exception() is not None:
        log.debug("task %s ended with %r", task.get_name(), task.exception())


T = TypeVar("T")


def _host_port(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


# The socket's own read timeout: above the longest deadline a caller gives (the full reads and
# write-backs, 2 s). Every call runs under its own asyncio deadline (``call``; the batches of the
# request path under ``redis.timeout_ms``), which also cuts a command mid-reply (redis-py then
# drops that connection). Were the socket's timeout ``timeout_ms``, no read could wait longer:
# a full reconcile would fail on a Redis that answers in 100 ms, and the watcher's longer probe
# would not be longer.
_SOCKET_TIMEOUT_S = 2.5


def make_client(cfg: RedisConfig) -> Any:
    timeout_s = cfg.timeout_ms / 1000
    common: dict[str, Any] = {
        "socket_timeout": max(timeout_s, _SOCKET_TIMEOUT_S),
        "socket_connect_timeout": timeout_s,
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
        # Masters only (no read_from_replicas, no load balancing): a replica may not have
        # a quarantine or an epoch bump yet.  require_full_coverage=False lets a replica
        # start, and keep serving the other slots, while one shard fails over.
        # max_connections is per node here.
        nodes = [ClusterNode(*_host_port(n)) for n in cfg.nodes]
        return RedisCluster.from_url(cfg.url, startup_nodes=nodes or None, require_full_coverage=False, **common)
    if cfg.mode == "sentinel":
        hosts = [_host_port(h) for h in cfg.sentinels]
        # The Sentinels get their own deadlines: without them a Sentinel that hangs
        # during a failover would hang every reconnection.
        sentinel_kwargs: dict[str, Any] = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}
        sentinel = Sentinel(hosts, sentinel_kwargs=sentinel_kwargs)  # type: ignore[no-untyped-call,unused-ignore]  # typed in newer redis-py
        if cfg.service_name is None:  # refused at config load; never reached
            raise ValueError("mode: sentinel needs service_name")
        return sentinel.master_for(cfg.service_name, **common)
    return aioredis.from_url(cfg.url, **common)


def _escape_tag(tag: str) -> str:
    # A brace inside the tag would end the hash tag early (Redis hashes up to the first
    # "}"), and a ":" could make two (tag, parts) pairs one key: neither can appear.
    return tag.replace("%", "%25").replace("{", "%7B").replace("}", "%7D").replace(":", "%3A")


# The hash tag of the small keys one request reads together: quarantines, lift records,
# cache epochs and the revision counter.  One tag puts them in one Cluster slot, so a
# request's containment and epoch reads are two MGETs to one node (docs/deploy.md).
CONTAINMENT_TAG = "c"
_MAX_BATCH = 512  # commands per pipeline
PROBE_S = 0.5  # how often the watcher asks whether Redis is there and still holds its data
FULL_S = 5.0  # how often the reconcilers run when nothing else asks for it
_PROBE_DEADLINE_S = 0.25  # the watcher's probe deadline, at least
# 1 when the marker was missing (and is now set): Redis lost what it held, or never had it.
_MARK = "if redis.call('SET', KEYS[1], '1', 'NX') then return 1 else return 0 end"


class Generation:
    """A number that moves whenever what a replica knows of shared state changes.

    Quarantines added or lifted, an epoch or the revision moved, the push channel
    entering or leaving fallback: a memo of anything derived from them stays valid while
    the number it was made under is the current one.  Only ever grows.
    """

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def bump(self) -> None:
        self.value += 1


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
        self._followers: set[asyncio.Task[None]] = set()
        self.subscriptions = 0  # (re)subscriptions made by follow(), all channels
        # channel → whether its subscription's connection is still open, asked at any time
        # (an end of stream is seen as soon as the loop reads it, before the follower wakes)
        self.alive: dict[str, Callable[[], bool]] = {}
        # Told whenever something may have been missed (a tripped circuit, an outage, lost
        # data): the push channel falls back to reads until it reconciled again.
        # With lost=True Redis was found without its data: every replica should hear of it.
        self.on_doubt: Callable[[bool], None] | None = None

    @property
    def available(self) -> bool:
        return time.monotonic() >= self._down_until

    @property
    def cluster(self) -> bool:
        return self.cfg.mode == "cluster"

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
        # The probe is not on the request path: it may wait longer than timeout_ms (a new
        # pooled connection's handshake on a busy loop), and a first failure is asked again
        # at once before it opens the circuit — an event loop that stalled past the deadline
        # (a collection right after start) is not an outage.
        probe_s = max(self.cfg.timeout_ms / 1000, _PROBE_DEADLINE_S)
        while True:
            mark = await self.call(lambda c: c.eval(_MARK, 1, marker), deadline_s=probe_s, trip=False)
            if mark is None:
                mark = await self.call(lambda c: c.eval(_MARK, 1, marker), deadline_s=probe_s)
            if mark is None:
                self._doubt()
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
                    self._doubt(lost=True)
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

    def key_for(self, kind: str, tag: str, *parts: str) -> str:
        """``<prefix><kind>:{<tag>}[:<part>...]``: every key of one tag is in one Cluster slot.

        Keys a script or a multi-key command reads together must share the tag (per
        subject for its risk counters, for example); keys of different tags may land on
        different nodes, and are then read by one command per slot.  The tag is escaped,
        so no value can end the hash tag early or make two tags one key.
        """
        key = f"{self.prefix}{kind}:{{{_escape_tag(tag)}}}"
        return key + "".join(":" + part for part in parts)

    async def call(
        self, op: Callable[[Any], Awaitable[T]], *, deadline_s: float | None = None, trip: bool = True
    ) -> T | None:
        """Run ``op(client)`` under the deadline; ``None`` when Redis cannot answer.

        ``trip=False``: a failure is counted but does not open the circuit (a heartbeat
        that comes late means "not healthy", not "Redis is down for everyone").
        """
        if not self.available:
            return None
        try:
            async with asyncio.timeout(deadline_s if deadline_s is not None else self.cfg.timeout_ms / 1000):
                return await op(self.client)
        except Exception as exc:  # timeouts, Redis and cluster errors, sockets: Redis did not answer
            if trip:
                self._failed(exc)
            else:
                self.errors += 1
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
        # The MGETs of the batch become one MGET (their keys in order), sent first.  On a
        # Cluster the keys of one MGET must share a slot: one MGET per slot, all in the one
        # pipeline (redis-py sends each node its part at once).
        mgets: list[tuple[_MGet, asyncio.Future[Any]]] = []
        others: list[tuple[Callable[[Any], object], asyncio.Future[Any]]] = []
        for add, fut in batch:
            if isinstance(add, _MGet):
                mgets.append((add, fut))
            else:
                others.append((add, fut))
        keys = [key for add, _ in mgets for key in add.keys]
        groups = _by_slot(keys) if self.cluster else ([keys] if keys else [])
        replies: list[Any] = []
        try:
            async with asyncio.timeout(self.cfg.timeout_ms / 1000):
                pipe = self.client.pipeline(transaction=False)
                for group in groups:
                    pipe.execute_command("MGET", *group)
                for add, _ in others:
                    add(pipe)
                replies = await pipe.execute(raise_on_error=False)
            self.batches += 1
            self.batched_commands += len(batch)
        except Exception as exc:  # any failure of the round trip (cluster errors are not RedisError)
            if type(exc) is RedisClusterException:
                # A command the Cluster client cannot route (keys of several slots): it
                # fails its own caller only, as a bad reply does on a single primary.
                if len(batch) > 1:
                    await asyncio.gather(*(self._send([one]) for one in batch))
                    return
                self._checked(exc)
            else:
                self._failed(exc)
            replies = []
        except BaseException:  # cancelled: nobody may be left waiting
            for _, fut in batch:
                if not fut.done():
                    fut.set_result(None)
            raise
        head, replies = replies[: len(groups)], replies[len(groups) :]
        if mgets:
            values: dict[str, Any] | None = None
            failed: set[str] = set()
            if len(head) == len(groups):
                values = {}
                for group, reply in zip(groups, head, strict=True):
                    if isinstance(reply, list) and len(reply) == len(group):
                        values.update(zip(group, reply, strict=True))
                    else:
                        self._checked(reply if isinstance(reply, Exception) else RedisError("bad MGET reply"))
                        failed.update(group)
            for add, fut in mgets:
                part = None
                if values is not None and not failed.intersection(add.keys):
                    part = [values[key] for key in add.keys]
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
        self._doubt()

    def _doubt(self, lost: bool = False) -> None:
        if self.on_doubt is not None:
            self.on_doubt(lost)

    def _checked(self, reply: Any) -> Any:
        if isinstance(reply, Exception):
            self.errors += 1
            log.warning("redis command failed: %s", type(reply).__name__)
            return None
        return reply

    # ------------------------------------------------------------ pub/sub

    async def publish(
        self, channel: str, payload: bytes, *, trip: bool = True, deadline_s: float | None = None
    ) -> bool:
        """Publish on ``channel`` (``SPUBLISH`` on a Cluster); False if Redis did not take it."""
        if self.cluster:
            return await self.call(lambda c: c.spublish(channel, payload), trip=trip, deadline_s=deadline_s) is not None
        return await self.call(lambda c: c.publish(channel, payload), trip=trip, deadline_s=deadline_s) is not None

    async def write_and_publish(self, write: Callable[[Any], object], channel: str, payload: bytes) -> bool:
        """``write(pipe)`` and a publish on ``channel``, in one round trip; False if either failed.

        On a single primary the two are one transaction (``MULTI``): a subscriber never
        hears of a write that did not happen.  On a Cluster the write's key and the
        channel may be in different slots, so the two are one pipeline, not atomic, and
        the publish is sharded (``SPUBLISH``).
        """

        async def op(c: Any) -> list[Any]:
            pipe = c.pipeline(transaction=not self.cluster)
            write(pipe)
            if self.cluster:
                pipe.spublish(channel, payload)
            else:
                pipe.publish(channel, payload)
            return list(await pipe.execute(raise_on_error=False))

        replies = await self.call(op)
        if not replies:
            return False
        failed = [r for r in replies if isinstance(r, Exception)]
        for reply in failed:
            self._checked(reply)  # counted and logged
        return not failed

    def follow(
        self,
        channel: str,
        on_message: Callable[[bytes], object],
        on_subscribed: Callable[[], Awaitable[object]] | None = None,
        *,
        name: str,
        on_lost: Callable[[], object] | None = None,
    ) -> asyncio.Task[None]:
        """Call ``on_message(payload)`` for every message on ``channel``, until :meth:`close`.

        A background task (named ``name``, kept and cancelled by :meth:`close`) that
        subscribes, and subscribes again after any loss — a dead node, a failover, a
        Cluster slot that moved.  Messages published while it was not subscribed are
        lost: ``on_subscribed()`` runs after every (re)subscription is confirmed, so the
        caller can re-read what the messages would have told it.  ``on_lost()`` runs as
        soon as a subscription is found broken.
        """
        task = asyncio.create_task(self._follow(channel, on_message, on_subscribed, on_lost), name=name)
        self._followers.add(task)
        task.add_done_callback(self._followers.discard)
        return task

    async def _follow(
        self,
        channel: str,
        on_message: Callable[[bytes], object],
        on_subscribed: Callable[[], Awaitable[object]] | None,
        on_lost: Callable[[], object] | None = None,
    ) -> None:
        wanted = ("ssubscribe",) if self.cluster else ("subscribe",)
        kinds = ("smessage",) if self.cluster else ("message",)
        confirm_s = max(1.0, 10 * self.cfg.timeout_ms / 1000)
        pause = 0.2  # doubles up to 1 s while subscribing keeps failing
        while True:
            pubsub: Any = None
            try:
                owner = None
                if self.cluster:
                    # A client that has sent no command yet has no slot map, and its
                    # SSUBSCRIBE would fail with SlotNotCoveredError: learn the map first.
                    await self.client.initialize()
                pubsub = self.client.pubsub()
                if self.cluster:
                    await pubsub.ssubscribe(channel)
                    owner = self.client.get_node_from_key(channel).name
                else:
                    await pubsub.subscribe(channel)
                async with asyncio.timeout(confirm_s):
                    while True:
                        first = await self._next_message(pubsub, 0.1)
                        if first is not None and _text(first.get("type")) in wanted:
                            break
                self.subscriptions += 1
                pause = 0.2
                self.alive[channel] = _liveness(pubsub, self.cluster)
                if on_subscribed is not None:
                    await on_subscribed()
                while True:
                    message = await self._next_message(pubsub, 1.0)
                    kind = _text(message.get("type")) if message is not None else ""
                    if message is not None and kind in kinds:
                        on_message(message["data"])
                    elif kind in wanted:
                        # The client reconnected and subscribed again by itself: what was
                        # published in between is lost, so this counts as a new subscription.
                        raise ConnectionError(f"{channel} was subscribed again silently")
                    if owner is not None and self.client.get_node_from_key(channel).name != owner:
                        raise ConnectionError(f"the slot of {channel} moved")
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a lost node, a failover, a moved slot: subscribe again
                self.alive.pop(channel, None)
                if on_lost is not None:
                    on_lost()
                log.warning("channel %s lost (%s); subscribing again in %.1fs", channel, type(exc).__name__, pause)
                if self.cluster:
                    # A keyed command for the channel's slot: on a lost node the client
                    # refreshes its slot map (its own way), so the next SSUBSCRIBE goes
                    # to the new owner even when no request is flowing.
                    await self.call(lambda c: c.exists(channel))
                await asyncio.sleep(pause)
                pause = min(1.0, pause * 2)
            finally:
                self.alive.pop(channel, None)
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        async with asyncio.timeout(1.0):
                            await pubsub.aclose()

    async def _next_message(self, pubsub: Any, timeout_s: float) -> dict[str, Any] | None:
        if self.cluster:
            message = await pubsub.get_sharded_message(timeout=timeout_s)
        else:
            message = await pubsub.get_message(timeout=timeout_s)
        if message is None and self.cluster and not pubsub.node_pubsub_mapping:
            raise ConnectionError("no shard subscription left")
        return message if isinstance(message, dict) else None

    async def close(self) -> None:
        if self._watcher is not None:
            await stop_task(self._watcher)
        for task in list(self._followers):
            await stop_task(task)
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            async with asyncio.timeout(2.0):
                await self.client.aclose()


def _by_slot(keys: list[str]) -> list[list[str]]:
    """The keys grouped by Cluster slot, each group in first-seen order, duplicates dropped."""
    groups: dict[int, dict[str, None]] = {}
    for key in keys:
        groups.setdefault(key_slot(key.encode()), {})[key] = None
    return [list(group) for group in groups.values()]


def _liveness(pubsub: Any, cluster: bool) -> Callable[[], bool]:
    """Whether the subscription's connections are open and have not seen their end.

    The end of a stream (the server closed it: a CLIENT KILL, a restart) is fed to the
    connection's reader as soon as the event loop reads it, before the following task
    wakes up and before the client tries to reconnect: asking here closes that gap.
    """
    parts = list(pubsub.node_pubsub_mapping.values()) if cluster else [pubsub]
    conns = [part.connection for part in parts]
    # The readers of the subscription as confirmed: a client that reconnects by itself
    # gets new ones, on a connection that missed whatever was published in between.
    readers: list[Any] = [getattr(conn, "_reader", None) for conn in conns]

    def alive() -> bool:
        for conn, reader in zip(conns, readers, strict=True):
            now: Any = getattr(conn, "_reader", None)
            if now is None or now is not reader or now.at_eof():
                return False
        return True

    return alive


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
