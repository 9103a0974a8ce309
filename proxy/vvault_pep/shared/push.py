"""Pushed shared state: what an L1 hit may trust without asking Redis.

Quarantines, lifts, scope epochs and the revision counter are written to Redis
and announced on one channel (``<prefix>push:{c}``, in the containment hash
tag's slot, so a Lua script can bump a counter and announce it atomically on a
Cluster too).  Every replica follows that channel into its local state, and
while the channel is **known healthy** the request path answers containment and
the cache's revision and epochs from that state, with no Redis command.

Healthy means all of:

* subscribed, and a full reconciliation (every quarantine, lift record, epoch and
  the revision read from Redis) completed *after* that subscription was confirmed;
* a heartbeat of this replica's own, published on the channel at ``t``, was heard
  back, and ``now <= t + heartbeat_ms + heartbeat_deadline_ms``.  Redis delivers a
  channel's messages to a subscriber in the order it ran the publishes, so hearing
  our beat of ``t`` means every event published before ``t`` was heard and applied:
  an event this replica missed was published after ``t``, less than the **window**
  (``heartbeat_ms + heartbeat_deadline_ms``, 0.5 s by default) before any request
  that trusts the local state;
* nothing cast doubt since: no lost subscription, no tripped circuit, no sign that
  Redis lost its data (:meth:`doubt`, called by the watcher and the circuit).

Whenever one of these fails the request path falls back to today's per-request
reads (merged with what this replica knows: nothing shrinks by absence), and it
returns to the local answer only after a new full reconciliation that followed the
(re)subscription, and a heartbeat heard after it.  ``generation`` counts every change
of what this replica knows or of the mode (see :class:`~vvault_pep.shared.state.Generation`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from .state import CONTAINMENT_TAG, Generation, SharedState, stop_task

log = logging.getLogger("vvault_pep.push")

_RETRY_S = (0.1, 0.2, 0.5, 1.0)  # pauses between failed reconciliations


class Push:
    def __init__(self, shared: SharedState, generation: Generation) -> None:
        self.shared = shared
        self.generation = generation
        self.channel = shared.key_for("push", CONTAINMENT_TAG)
        self.interval_s = shared.cfg.heartbeat_ms / 1000
        self.deadline_s = shared.cfg.heartbeat_deadline_ms / 1000
        self.window_s = (shared.cfg.heartbeat_ms + shared.cfg.heartbeat_deadline_ms) / 1000
        self._handlers: dict[str, Callable[[dict[str, Any]], None]] = {}
        self._reconcilers: list[Callable[[], Awaitable[bool]]] = []
        self._nonce = os.urandom(8).hex()
        self._seq = 0
        self._sent: dict[int, float] = {}  # beat number → monotonic time it was sent
        self._subscription = 0  # number of the current subscription; 0: none
        self._subscriptions = 0  # subscriptions made (numbers are never reused)
        self._reconciled = 0  # the subscription after which a full reconciliation completed
        self._since = 0.0  # monotonic time of the doubt a reconciliation must follow
        self._doubts = 0  # doubts and (re)subscriptions: a reconciliation must start after the last
        self._valid_until = 0.0  # monotonic: last own beat heard + window
        self._trusted = False  # the mode the request path last saw
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._announcing: set[asyncio.Task[None]] = set()
        self._follower: asyncio.Task[None] | None = None
        self._first = asyncio.Event()  # the first time the channel became healthy
        self.fallbacks = 0  # times the request path fell back to reads
        self.recoveries = 0  # times it returned to the local answer
        self.beats_heard = 0
        self.reconciles = 0
        shared.on_doubt = self.doubt

    def handle(self, op: str, handler: Callable[[dict[str, Any]], None]) -> None:
        self._handlers[op] = handler

    def reconciler(self, reconcile: Callable[[], Awaitable[bool]]) -> None:
        """A full read of what Redis holds, merged into local state; True when it completed."""
        self._reconcilers.append(reconcile)

    @property
    def healthy(self) -> bool:
        """Whether the request path may answer from local state now (see the module docstring)."""
        alive = self.shared.alive.get(self.channel)
        ok = (
            self._subscription != 0
            and self._reconciled == self._subscription
            and time.monotonic() <= self._valid_until
            and alive is not None
            and alive()
        )
        if ok != self._trusted:
            self._switch(ok)
        return ok

    def _switch(self, ok: bool) -> None:
        self._trusted = ok
        self.generation.bump()
        if ok:
            self.recoveries += 1
            self._first.set()
            log.info("push channel healthy: L1 hits answered from local state")
        else:
            self.fallbacks += 1
            log.warning("push channel not known healthy: per-request reads")

    def doubt(self, lost: bool = False) -> None:
        """Something may have been missed (data loss, a tripped circuit): reads until reconciled.

        ``lost``: this replica found Redis without its data (the marker gone); only the first
        replica to probe finds that, so it tells the others on the channel.
        """
        if lost:
            self._announce_loss()
        self._reconciled = 0
        self._doubts += 1
        self._since = time.monotonic()
        self._valid_until = 0.0
        _ = self.healthy
        self._wake.set()

    async def start(self, first_s: float) -> None:
        """Follow the channel and beat; wait up to ``first_s`` for the channel to become healthy."""
        self._follower = self.shared.follow(
            self.channel, self._on_message, self._on_subscribed, name="push-follow", on_lost=self._on_lost
        )
        self._tasks = [
            asyncio.create_task(self._beat(), name="push-heartbeat"),
            asyncio.create_task(self._reconcile_loop(), name="push-reconcile"),
        ]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(first_s):
                await self._first.wait()

    async def stop(self) -> None:
        for task in [*self._tasks, *self._announcing]:
            await stop_task(task)
        self._tasks = []

    # ------------------------------------------------------------ the channel

    async def _on_subscribed(self) -> None:
        self._subscriptions += 1
        self._subscription = self._subscriptions
        self.doubt()  # a new subscription may have missed anything: reconcile after it

    def _on_lost(self) -> None:
        self._subscription = 0
        self._reconciled = 0
        self._valid_until = 0.0
        _ = self.healthy

    def _on_message(self, data: bytes) -> None:
        try:
            event = orjson.loads(data)
            op = event["op"]
            if op == "beat":
                self._heard_beat(event)
                return
            if op == "lost":
                self.doubt()  # another replica found Redis without its data
                return
            handler = self._handlers.get(op)
            if handler is not None:
                handler(event)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            return

    def _heard_beat(self, event: dict[str, Any]) -> None:
        if event.get("from") != self._nonce:
            return  # another replica's: proves nothing about our subscription
        sent = self._sent.pop(int(event["seq"]), None)
        if sent is None or sent < self._since:
            return  # sent before the last doubt: it cannot vouch for what followed
        self.beats_heard += 1
        self._valid_until = max(self._valid_until, sent + self.window_s)
        _ = self.healthy

    def _announce_loss(self) -> None:
        async def announce() -> None:
            await self.shared.publish(self.channel, orjson.dumps({"op": "lost", "from": self._nonce}))

        task = asyncio.create_task(announce(), name="push-announce-loss")
        self._announcing.add(task)
        task.add_done_callback(self._announcing.discard)

    async def _beat(self) -> None:
        while True:
            self._seq += 1
            now = time.monotonic()
            self._sent[self._seq] = now
            for seq in [s for s, at in self._sent.items() if at < now - 4 * self.window_s]:
                del self._sent[seq]
            beat = orjson.dumps({"op": "beat", "from": self._nonce, "seq": self._seq})
            # A beat that fails or comes late only makes the channel not healthy (the
            # window lapses); it does not open the circuit for every other caller.
            await self.shared.publish(self.channel, beat, trip=False, deadline_s=self.deadline_s)
            _ = self.healthy  # a lapsed window is noticed even when no request asks
            await asyncio.sleep(self.interval_s)

    async def _reconcile_loop(self) -> None:
        failures = 0
        while True:
            await self._wake.wait()
            self._wake.clear()
            subscription, doubts = self._subscription, self._doubts
            if subscription == 0 or self._reconciled == subscription:
                continue
            done = True
            for reconcile in self._reconcilers:
                try:
                    done = await reconcile() and done
                except Exception:  # a reconciler's bug must not end the loop; reads meanwhile
                    log.exception("reconciling the pushed state failed")
                    done = False
            if done and (subscription, doubts) == (self._subscription, self._doubts):
                self.reconciles += 1
                failures = 0
                self._reconciled = subscription
                _ = self.healthy
            else:
                await asyncio.sleep(_RETRY_S[min(failures, len(_RETRY_S) - 1)])
                failures += 1
                self._wake.set()
