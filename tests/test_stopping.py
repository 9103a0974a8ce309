"""Stopping never hangs on a background task that misses its cancellation.

A client library can catch a cancellation inside a read and carry on; a replica's stop
(and with it a rolling restart) must not wait on such a task forever.  The Redis-backed
parts stop through this helper; their stop against real servers is exercised by every
test that starts and stops a replica (tests/test_redis_topologies.py among them).
"""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from vvault_pep.shared.state import stop_task

pytestmark = pytest.mark.timeout(30)


async def test_a_task_that_misses_one_cancellation_is_cancelled_again_and_ends() -> None:
    missed = asyncio.Event()

    async def stubborn() -> None:
        try:
            await asyncio.Event().wait()  # blocked until cancelled
        except asyncio.CancelledError:
            missed.set()  # swallowed, as a library's read loop might
        await asyncio.Event().wait()

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    await stop_task(task, attempts=3, wait_s=0.5)
    assert missed.is_set() and task.cancelled()


async def test_a_task_that_never_ends_holds_stopping_only_for_the_bound(caplog: pytest.LogCaptureFixture) -> None:
    release = asyncio.Event()

    async def deaf() -> None:
        while not release.is_set():
            try:
                await asyncio.sleep(0.05)
            except asyncio.CancelledError:
                continue

    task = asyncio.create_task(deaf(), name="deaf-follower")
    await asyncio.sleep(0)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="vvault_pep.redis"):
        await stop_task(task, attempts=2, wait_s=0.2)
    took = time.monotonic() - started
    assert 0.35 <= took < 5 and not task.done()
    assert "deaf-follower did not end when cancelled" in caplog.text
    release.set()
    await task  # let it end, so the loop closes clean


async def test_a_finished_task_is_left_alone() -> None:
    async def quick() -> int:
        return 1

    task = asyncio.create_task(quick())
    await task
    await stop_task(task)
    assert task.result() == 1
