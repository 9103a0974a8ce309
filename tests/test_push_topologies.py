"""The push channel on Sentinel and on a Cluster (sharded pub/sub in the containment slot).

One test per topology (they are expensive): a quarantine and an epoch bump made on one
replica reach the other through the channel — the bump announced by the script that
makes it, ``SPUBLISH`` inside the script on a Cluster — and the other replica answers
from what it heard, with no read; then every subscription is killed on every data node,
both replicas fall back to reads at once, and come back to pushed state after
reconciling.  (Zero commands per L1 hit on the three topologies: the costs test in
``tests/test_redis_topologies.py``.)
"""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
import redis
from tests.idp import Issuer
from tests.test_redis_topologies import (  # noqa: F401 (fixtures)
    Client,
    Topology,
    clients,
    pair,
    quarantine,
    topology,
)

from vvault_pep.app.runtime import PepRuntime

REFUSED = (403, "containment.quarantined")


async def healthy(*peps: PepRuntime) -> None:
    async with asyncio.timeout(20):
        while not all(p.push is not None and p.push.healthy for p in peps):
            await asyncio.sleep(0.02)


def kill_subscriptions(where: Topology) -> int:
    killed = 0
    for port in where.masters():
        with redis.Redis(host="127.0.0.1", port=port, socket_timeout=5) as c:
            killed += int(c.execute_command("CLIENT", "KILL", "TYPE", "pubsub"))
    return killed


@pytest.mark.parametrize("topology", ["sentinel", "cluster"], indirect=True)
async def test_quarantines_and_epochs_reach_the_other_replica_by_push_and_a_killed_channel_falls_back(
    topology: Topology,  # noqa: F811
    pair: tuple[PepRuntime, PepRuntime],  # noqa: F811
    clients: tuple[Client, Client],  # noqa: F811
    idp: Issuer,
) -> None:
    a, b = pair
    assert a.cache is not None and b.cache is not None and b.shared is not None and b.push is not None
    await healthy(a, b)
    name = f"pt-{uuid.uuid4().hex[:6]}"
    value = f"{idp.url}|{name}"
    token = idp.token(sub=name)
    assert await clients[1].get("gate.t.test", token) == (200, "")
    # An epoch bump on A (a revocation of the subject's entries): B hears it, not reads it.
    pair_ = ("subject", value)
    assert await a.cache.invalidate(*pair_)
    assert a.cache.unshared == 0  # the script ran (and announced) on this topology
    started = time.monotonic()
    while b.cache._epochs.get(pair_, 0) < a.cache._epochs[pair_]:
        assert time.monotonic() - started < 5, "B never heard the epoch bump"
        await asyncio.sleep(0.01)
    print(f"\n{topology.name}: epoch bump heard by the other replica in {time.monotonic() - started:.3f}s")
    status, body = await quarantine(a, value, 120, "push on " + topology.name)
    assert (status, body["shared"]) == (201, True)
    trips = b.shared.batches
    assert await clients[1].get("gate.t.test", token) == REFUSED
    assert b.shared.batches == trips and b.push.healthy  # from what it heard
    # Every subscription killed: reads at once, then pushed state again.
    fallbacks = b.push.fallbacks
    assert await asyncio.to_thread(kill_subscriptions, topology) >= 2
    assert await clients[1].get("gate.t.test", token) == REFUSED
    assert b.push.fallbacks > fallbacks
    started = time.monotonic()
    await healthy(a, b)
    print(f"\n{topology.name}: push channel healthy again {time.monotonic() - started:.2f}s after the kill")
    for client in clients:
        assert await client.get("gate.t.test", token) == REFUSED
