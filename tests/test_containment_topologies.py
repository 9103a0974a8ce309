"""Containment on standalone, Sentinel and Cluster: what survives Redis loss, on each.

The two-replica checks of containment that matter most, run on every topology (the
``topology`` and ``pair`` fixtures of ``test_redis_topologies``): a flushed Redis gets
every quarantine back while both replicas keep refusing, and a quarantine made while
Redis would not take it reaches the other replica.  Then four ``vvault-pep serve``
processes share one Cluster under load: a quarantine issued on one is enforced by all
four on the next request, and one rate limit holds across the four.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis
import yaml
from tests.conftest import Upstream
from tests.idp import Issuer
from tests.redis_topologies import ClusterTopology
from tests.support import ROUTES, OpaProcess, ServeProcess, client_context, config_doc, start_serve
from tests.test_redis_topologies import (  # noqa: F401 (fixtures)
    ADMIN,
    T_ROUTES,
    Client,
    Topology,
    clients,
    pair,
    quarantine,
    topology,
)

from vvault_pep.app.runtime import PepRuntime
from vvault_pep.shared.containment import quarantine_key

REFUSED = (403, "containment.quarantined")


def each_master(where: Topology, *command: Any) -> None:
    for port in where.masters():
        with redis.Redis(host="127.0.0.1", port=port, socket_timeout=5) as c:
            c.execute_command(*command)


async def in_redis(pep: PepRuntime, key: str) -> bool:
    assert pep.shared is not None
    return bool(await pep.shared.call(lambda c: c.exists(key)))


async def test_a_flushed_redis_lifts_nothing_and_gets_the_quarantine_back(
    topology: Topology,  # noqa: F811
    pair: tuple[PepRuntime, PepRuntime],  # noqa: F811
    clients: tuple[Client, Client],  # noqa: F811
    idp: Issuer,
) -> None:
    a, b = pair
    assert a.shared is not None
    name = f"fl-{uuid.uuid4().hex[:6]}"
    value = f"{idp.url}|{name}"
    token = idp.token(sub=name)
    status, body = await quarantine(b, value, 120, "flush test")
    assert (status, body["shared"]) == (201, True)
    key = quarantine_key(a.shared, "subject", value)
    assert await in_redis(a, key)
    await asyncio.to_thread(each_master, topology, "FLUSHALL")
    assert not await in_redis(a, key)
    started = time.monotonic()
    while True:  # refused on both replicas throughout, until Redis holds it again
        for client in clients:
            assert await client.get("gate.t.test", token) == REFUSED, "a flush lifted a quarantine"
        if await in_redis(a, key):
            break
        assert time.monotonic() - started < 15, "the quarantine was never written back"
        await asyncio.sleep(0.05)
    print(f"\n{topology.name}: flushed quarantine written back in {time.monotonic() - started:.2f}s")


async def test_a_quarantine_made_while_redis_refuses_writes_reaches_the_other_replica(
    topology: Topology,  # noqa: F811
    pair: tuple[PepRuntime, PepRuntime],  # noqa: F811
    clients: tuple[Client, Client],  # noqa: F811
    idp: Issuer,
) -> None:
    a, b = pair
    assert a.shared is not None
    name = f"out-{uuid.uuid4().hex[:6]}"
    value = f"{idp.url}|{name}"
    token = idp.token(sub=name)
    for client in clients:
        assert await client.get("gate.t.test", token) == (200, "")  # a cached allow on both
    # Writes (and publishes) wait on every master for longer than the PEP's deadline
    # (300 ms), shorter than the Sentinels' down-after (1 s): the PEP cannot share.
    await asyncio.to_thread(each_master, topology, "CLIENT", "PAUSE", 700, "WRITE")
    status, body = await quarantine(a, value, 120, "made in an outage")
    made = time.monotonic()
    assert (status, body["shared"]) == (201, False)
    assert await clients[0].get("gate.t.test", token) == REFUSED  # held here at once
    while await clients[1].get("gate.t.test", token) != REFUSED:
        assert time.monotonic() - made < 15, "the other replica never enforced it"
        await asyncio.sleep(0.05)
    reached = time.monotonic() - made
    while not await in_redis(b, quarantine_key(a.shared, "subject", value)):
        assert time.monotonic() - made < 15
        await asyncio.sleep(0.05)
    assert await clients[1].get("gate.t.test", token) == REFUSED
    print(f"\n{topology.name}: outage-made quarantine enforced on the other replica after {reached:.2f}s")


@pytest.mark.parametrize("topology", ["standalone"], indirect=True)
async def test_a_quarantine_under_an_earlier_untagged_key_survives_the_upgrade(
    topology: Topology,  # noqa: F811
    pair: tuple[PepRuntime, PepRuntime],  # noqa: F811
    clients: tuple[Client, Client],  # noqa: F811
    idp: Issuer,
) -> None:
    a, _ = pair
    assert a.shared is not None and a.containment is not None
    name = f"up-{uuid.uuid4().hex[:6]}"
    value = f"{idp.url}|{name}"
    old = a.shared.key("q", "subject", value)  # how an earlier version named it
    doc = orjson.dumps({"reason": "before the upgrade", "until": time.time() + 120, "by": "admin", "since": 1.0})
    assert await a.shared.call(lambda c: c.set(old, doc, ex=120))
    assert await a.containment.reconcile()
    assert await in_redis(a, quarantine_key(a.shared, "subject", value))  # written back, tagged
    for client in clients:  # the other replica reads it from Redis
        assert await client.get("gate.t.test", idp.token(sub=name)) == REFUSED


# ------------------------------------------------------------------ four processes, one Cluster


def serve_config(
    tmp_path: Path, pki: Path, opa: OpaProcess, upstream: Upstream, idp: Issuer, cluster: ClusterTopology, prefix: str
) -> Path:
    doc = config_doc(
        pki,
        opa_url=opa.url,
        upstream_port=upstream.port,
        cache=True,
        routes=T_ROUTES + ROUTES,
        redis={"url": cluster.url, "mode": "cluster", "nodes": cluster.nodes, "key_prefix": prefix, "timeout_ms": 500},
        risk={"enabled": False},
        admin={"host": "127.0.0.1", "port": 0, "token": ADMIN},
        identity={"issuers": [{"name": "corp", "issuer": idp.url, "audiences": ["vvault"], "allow_http": True}]},
    )
    path = tmp_path / "pep.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


class Replica:
    def __init__(self, pki: Path, served: ServeProcess) -> None:
        self.served = served
        self.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_context(pki, "reader")))

    async def get(self, host: str, token: str) -> tuple[int, str]:
        async with self.http.get(
            f"https://localhost:{self.served.port}/v1/tenants/acme/secrets/db-password",
            headers={"Host": host, "Authorization": f"Bearer {token}"},
            timeout=aiohttp.ClientTimeout(total=10),
        ) as resp:
            body = await resp.json(content_type=None) if resp.status >= 400 else {}
            return resp.status, body.get("code", "")

    async def admin(self, method: str, path: str, json: Any = None) -> tuple[int, Any]:
        async with self.http.request(
            method,
            f"http://127.0.0.1:{self.served.admin_port}{path}",
            json=json,
            headers={"Authorization": f"Bearer {ADMIN}"},
        ) as resp:
            return resp.status, await resp.json(content_type=None)


async def test_four_processes_on_one_cluster_enforce_a_quarantine_at_once_and_share_a_limit(
    tmp_path: Path, pki: Path, opa: OpaProcess, upstream: Upstream, idp: Issuer, redis_cluster: ClusterTopology
) -> None:
    path = serve_config(tmp_path, pki, opa, upstream, idp, redis_cluster, f"four{uuid.uuid4().hex[:6]}:")
    served = await asyncio.gather(*(start_serve(path) for _ in range(4)))
    replicas = [Replica(pki, s) for s in served]
    name = f"four-{uuid.uuid4().hex[:6]}"
    bad, good = idp.token(sub=f"{name}-mallory"), idp.token(sub=f"{name}-alice")
    answers: list[tuple[float, int, str, int, str]] = []  # sent, replica, who, status, code
    stop = asyncio.Event()

    async def load(i: int, who: str, token: str) -> None:
        while not stop.is_set():
            sent = time.monotonic()
            status, code = await replicas[i].get("gate.t.test", token)
            answers.append((sent, i, who, status, code))

    try:
        for r in replicas:  # a cached allow for the subject about to be quarantined, on all four
            assert await r.get("gate.t.test", bad) == (200, "")
        tasks = [
            asyncio.create_task(load(i, who, token), name=f"load-{i}-{who}")
            for i in range(4)
            for who, token in (("mallory", bad), ("alice", good))
        ]
        async with asyncio.timeout(20):
            while len(answers) < 80:
                await asyncio.sleep(0.02)
        asked = time.monotonic()
        status, body = await replicas[0].admin(
            "POST", "/admin/quarantines", {"scope": "subject", "value": f"{idp.url}|{name}-mallory", "ttl_s": 120}
        )
        acked = time.monotonic()
        assert (status, body["shared"]) == (201, True)
        async with asyncio.timeout(20):  # load goes on after the quarantine, on every replica
            while min(sum(1 for t, i, *_ in answers if i == n and t > acked) for n in range(4)) < 10:
                await asyncio.sleep(0.02)
        stop.set()
        await asyncio.gather(*tasks)
        # Every request sent after the acknowledgement is refused, on all four: the bound is
        # the next request (each one reads the quarantine from Redis).
        after = [(i, s, c) for t, i, who, s, c in answers if who == "mallory" and t > acked]
        assert {(s, c) for _, s, c in after} == {REFUSED}
        assert {i for i, *_ in after} == {0, 1, 2, 3}
        first = [
            min(t for t, i, who, s, c in answers if who == "mallory" and i == n and (s, c) == REFUSED) for n in range(4)
        ]
        assert {(s, c) for _, _, who, s, c in answers if who == "alice"} == {(200, "")}
        print(
            f"\nfour processes: quarantine acknowledged in {1000 * (acked - asked):.1f} ms; refused everywhere "
            f"from {1000 * (max(first) - asked):.1f} ms after the request; {len(answers)} requests judged"
        )
        # One rate limit (burst 3) across the four processes.
        limited = idp.token(sub=f"{name}-burst")
        statuses = [(await r.get("limited.t.test", limited))[0] for r in replicas[:3]]
        assert statuses == [200, 200, 200]
        assert await replicas[3].get("limited.t.test", limited) == (429, "ratelimit.exceeded")
    finally:
        stop.set()
        for r in replicas:
            await r.http.close()
        for s in served:
            s.proc.terminate()
        for s in served:
            await s.proc.wait()
