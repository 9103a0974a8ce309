"""Listening to a real Redis from a test: a channel's events in order, and waiting for a condition."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable
from typing import Any

import orjson
import redis.asyncio as aioredis


async def until(check: Callable[[], Any], timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        got = check()
        if asyncio.iscoroutine(got):
            got = await got
        if got:
            return
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


class Heard:
    """What a subscriber on a real Redis hears on a channel (SSUBSCRIBE on a Cluster)."""

    def __init__(self, client: aioredis.Redis, channel: str, *, sharded: bool = False) -> None:
        self.client, self.channel, self.sharded = client, channel, sharded
        self.events: list[Any] = []
        self._pubsub: Any = None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Heard:
        self._pubsub = self.client.pubsub()
        if self.sharded:
            await self._pubsub.ssubscribe(self.channel)
        else:
            await self._pubsub.subscribe(self.channel)
        confirmed = asyncio.Event()

        async def listen() -> None:
            while True:
                message = await self._pubsub.get_message(timeout=1.0)
                if message is None:
                    continue
                if message["type"] in ("subscribe", "ssubscribe"):
                    confirmed.set()
                elif message["type"] in ("message", "smessage"):
                    self.events.append(orjson.loads(message["data"]))

        self._task = asyncio.create_task(listen(), name="test-heard")
        await asyncio.wait_for(confirmed.wait(), 10)
        return self

    async def mark(self) -> list[Any]:
        """Every event heard before a marker published now (a channel keeps its order)."""
        marker = {"op": "marker", "n": uuid.uuid4().hex}
        await self.client.execute_command("SPUBLISH" if self.sharded else "PUBLISH", self.channel, orjson.dumps(marker))
        await until(lambda: marker in self.events)
        at = self.events.index(marker)
        before, self.events = self.events[:at], self.events[at + 1 :]
        return before

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        with contextlib.suppress(Exception):
            await self._pubsub.aclose()
