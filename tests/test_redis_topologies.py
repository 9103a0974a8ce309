"""Shared state on every Redis topology: standalone, Sentinel and Cluster, all real.

The same checks run against each (``topology`` is parametrised): the request path's
reads batched, keys of one tag in one slot, pub/sub between replicas, the decision
cache's L2 shared by two PEP replicas, a quarantine made on one replica enforced on the
other, and what a request costs Redis.  The failover tests kill the Sentinel primary and
the Cluster master serving a quarantined subject's slot while two replicas are under load:
every answer must stay right (never an allow for the quarantined subject) and the time
the PEP takes to use Redis again is measured.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis
from redis.crc import key_slot
from tests.conftest import RedisServer, Upstream
from tests.idp import Issuer
from tests.redis_topologies import SERVICE, ClusterTopology, SentinelTopology
from tests.support import ROUTES, OpaProcess, client_context, config_doc

from vvault_pep.app.runtime import PepRuntime
from vvault_pep.config import Config, Redis
from vvault_pep.shared.state import SharedState

ADMIN = "topology-admin-token-0123456789abcdef"
SECRET_PATH = "/v1/tenants/{tenant}/secrets/{path*}"
T_ROUTES: list[dict[str, Any]] = [
    {
        "name": "t_gate",
        "host": "gate.t.test",
        "path": SECRET_PATH,
        "methods": ["GET"],
        "upstream": "vvault",
        "policy": "faults/subject_gate",
        "cache": {"ttl_s": 60},
        "authn": {"require": "user"},
    },
    {
        "name": "t_nocache",
        "host": "nocache.t.test",
        "path": SECRET_PATH,
        "methods": ["GET"],
        "upstream": "vvault",
        "policy": "faults/subject_gate",
        "cache": "off",
        "authn": {"require": "user"},
    },
    {
        "name": "t_limited",
        "host": "limited.t.test",
        "path": SECRET_PATH,
        "methods": ["GET"],
        "upstream": "vvault",
        "policy": "faults/plain_true",
        "authn": {"require": "user"},
        "rate_limit": {"per": "subject", "rate_per_s": 0.5, "burst": 3},
    },
]


@dataclass
class Topology:
    name: str
    redis: dict[str, Any]  # the config's redis section, minus the key prefix
    masters: Callable[[], list[int]]  # ports of the data nodes that take writes now
    cluster: ClusterTopology | None = None
    sentinel: SentinelTopology | None = None
    prefix: str = field(default_factory=lambda: f"t{uuid.uuid4().hex[:8]}:")

    def config(self, **extra: Any) -> Redis:
        return Redis.model_validate({**self.redis, "key_prefix": self.prefix, **extra})


@pytest.fixture(params=["standalone", "sentinel", "cluster"])
def topology(request: pytest.FixtureRequest) -> Topology:
    """One of the three topologies; each started once per session, and only when asked for."""
    if request.param == "standalone":
        server: RedisServer = request.getfixturevalue("redis_server")
        return Topology("standalone", {"url": server.url}, lambda: [server.port])
    if request.param == "sentinel":
        s: SentinelTopology = request.getfixturevalue("redis_sentinel")
        # The url's host is not used in sentinel mode: the Sentinels name the primary.
        section = {"url": "redis://sentinel", "mode": "sentinel", "sentinels": s.sentinels, "service_name": SERVICE}
        return Topology("sentinel", section, lambda: [s.primary()], sentinel=s)
    c: ClusterTopology = request.getfixturevalue("redis_cluster")
    return Topology("cluster", {"url": c.url, "mode": "cluster", "nodes": c.nodes}, c.masters, cluster=c)


def command_calls(ports: list[int], command: str) -> int:
    """How many times the data nodes ran ``command`` (INFO commandstats, summed)."""
    total = 0
    for port in ports:
        with redis.Redis(host="127.0.0.1", port=port, socket_timeout=2) as c:
            total += int(c.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0))
    return total


def all_calls(ports: list[int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for port in ports:
        with redis.Redis(host="127.0.0.1", port=port, socket_timeout=2) as c:
            for name, stats in c.info("commandstats").items():
                out[name] = out.get(name, 0) + int(stats["calls"])
    return out


# ------------------------------------------------------------------ SharedState on each topology


@pytest.fixture
async def shared(topology: Topology) -> AsyncIterator[SharedState]:
    state = SharedState(topology.config(timeout_ms=2000))
    yield state
    await state.close()


async def test_reads_of_one_turn_are_one_pipeline_and_every_caller_gets_its_values(
    topology: Topology, shared: SharedState
) -> None:
    keys = [shared.key("k", str(i)) for i in range(12)]  # untagged: spread over the slots
    for i, key in enumerate(keys):
        assert await shared.call(lambda c, k=key, v=i: c.set(k, str(v).encode())) is True
    slots = {key_slot(k.encode()) for k in keys}
    mgets = command_calls(topology.masters(), "mget")
    before = shared.batches
    replies = await asyncio.gather(
        shared.mget(keys[:4]),
        shared.mget([keys[5], shared.key("missing"), keys[0]]),
        shared.one(lambda p: p.get(keys[7])),
        shared.mget(keys[4:]),
    )
    assert replies == [
        [b"0", b"1", b"2", b"3"],
        [b"5", None, b"0"],
        b"7",
        [str(i).encode() for i in range(4, 12)],
    ]
    assert shared.batches - before == 1  # one pipeline, whatever the topology
    sent = command_calls(topology.masters(), "mget") - mgets
    # one MGET on a single primary; on a Cluster one per slot touched (never one per key)
    assert sent == (len(slots | {key_slot(shared.key("missing").encode())}) if topology.cluster else 1)


async def test_keys_of_one_tag_share_a_slot_so_a_script_can_read_them(topology: Topology, shared: SharedState) -> None:
    tag = "https://idp.example|alice}{:x"  # braces and colons cannot end the tag early
    keys = [shared.key_for("risk", tag, part) for part in ("w", "baseline", "nets")]
    assert len({key_slot(k.encode()) for k in keys}) == 1
    assert all(k.count("{") == 1 and k.count("}") == 1 for k in keys)
    assert shared.key_for("risk", "a:b", "c") != shared.key_for("risk", "a", "b:c")
    script = "redis.call('SET', KEYS[1], 1); redis.call('SET', KEYS[2], 2); return redis.call('INCR', KEYS[3])"
    assert await shared.one(lambda p: p.eval(script, 3, *keys)) == 1
    assert await shared.mget(keys) == [b"1", b"2", b"1"]


async def test_a_message_published_by_one_replica_reaches_the_other(
    topology: Topology, shared: SharedState, caplog: pytest.LogCaptureFixture
) -> None:
    other = SharedState(topology.config(timeout_ms=2000))
    got: list[bytes] = []
    subscribed = asyncio.Event()

    async def on_subscribed() -> None:
        subscribed.set()

    try:
        other.follow(shared.key("events"), got.append, on_subscribed, name="test-follow")
        async with asyncio.timeout(20):
            await subscribed.wait()
        # at the first try: a Cluster client that had sent nothing yet once failed it (no slot map)
        assert [r.getMessage() for r in caplog.records if "lost" in r.getMessage()] == []
        assert await shared.publish(shared.key("events"), b"hello") is True
        async with asyncio.timeout(10):
            while got != [b"hello"]:
                await asyncio.sleep(0.02)
        if topology.cluster is not None:
            assert command_calls(topology.masters() + topology.cluster.replicas(), "spublish") >= 1
    finally:
        await other.close()


# ------------------------------------------------------------------ two PEP replicas on each topology


def pep_config(
    pki: Path,
    opa: OpaProcess,
    upstream: Upstream,
    idp: Issuer,
    topology: Topology,
    risk: dict[str, Any] | None = None,
    **redis_extra: Any,
) -> Config:
    doc = config_doc(
        pki,
        opa_url=opa.url,
        upstream_port=upstream.port,
        cache=True,
        routes=T_ROUTES + ROUTES,
        redis={**topology.redis, "key_prefix": topology.prefix, "timeout_ms": 300, "retry_after_failure_s": 0.2,
               **redis_extra},
        risk=risk or {"enabled": False},  # risk bands would split cache keys as the load runs
        admin={"host": "127.0.0.1", "port": 0, "token": ADMIN},
        identity={"issuers": [{"name": "corp", "issuer": idp.url, "audiences": ["vvault"], "allow_http": True}]},
    )  # fmt: skip
    return Config.model_validate(doc)


@pytest.fixture
async def pair(
    pki: Path, opa: OpaProcess, upstream: Upstream, idp: Issuer, topology: Topology
) -> AsyncIterator[tuple[PepRuntime, PepRuntime]]:
    peps = [PepRuntime(pep_config(pki, opa, upstream, idp, topology)) for _ in (1, 2)]
    try:
        for pep in peps:
            await pep.start()
        yield peps[0], peps[1]
    finally:
        for pep in peps:
            await pep.stop()


class Client:
    """Keep-alive mTLS client for one PEP (the demo reader's certificate)."""

    def __init__(self, pki: Path, pep: PepRuntime) -> None:
        self.pep = pep
        self.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_context(pki, "reader")))

    async def get(self, host: str, token: str, timeout: float = 10) -> tuple[int, str]:
        async with self.http.get(
            f"https://localhost:{self.pep.port}/v1/tenants/acme/secrets/db-password",
            headers={"Host": host, "Authorization": f"Bearer {token}"},
            timeout=aiohttp.ClientTimeout(total=timeout),
        ) as resp:
            body = await resp.json(content_type=None) if resp.status >= 400 else {}
            return resp.status, body.get("code", "")

    async def close(self) -> None:
        await self.http.close()


async def admin(pep: PepRuntime, method: str, path: str, json: Any = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http:
        async with http.request(
            method, f"http://127.0.0.1:{pep.admin_port}{path}", json=json, headers={"Authorization": f"Bearer {ADMIN}"}
        ) as resp:
            return resp.status, await resp.json(content_type=None)


async def quarantine(pep: PepRuntime, subject: str, ttl_s: int, reason: str) -> tuple[int, Any]:
    return await admin(
        pep, "POST", "/admin/quarantines", {"scope": "subject", "value": subject, "ttl_s": ttl_s, "reason": reason}
    )


@pytest.fixture
async def clients(pki: Path, pair: tuple[PepRuntime, PepRuntime]) -> AsyncIterator[tuple[Client, Client]]:
    a, b = Client(pki, pair[0]), Client(pki, pair[1])
    yield a, b
    await a.close()
    await b.close()


async def test_a_decision_cached_by_one_replica_is_an_l2_hit_on_the_other(
    pair: tuple[PepRuntime, PepRuntime], clients: tuple[Client, Client], idp: Issuer
) -> None:
    a, b = pair
    token = idp.token(sub=f"l2-{uuid.uuid4().hex[:6]}")
    assert await clients[0].get("gate.t.test", token) == (200, "")
    assert a.cache is not None and b.cache is not None
    await a.cache.drain()
    before = dict(b.cache.stats)
    assert await clients[1].get("gate.t.test", token) == (200, "")
    assert b.cache.stats["l2"] - before["l2"] == 1 and b.cache.stats["miss"] == before["miss"]
    assert await clients[1].get("gate.t.test", token) == (200, "")
    assert b.cache.stats["l1"] - before["l1"] == 1


async def test_a_quarantine_made_on_one_replica_is_enforced_on_the_other(
    pair: tuple[PepRuntime, PepRuntime], clients: tuple[Client, Client], idp: Issuer
) -> None:
    a, _ = pair
    name = f"q-{uuid.uuid4().hex[:6]}"
    token, bystander = idp.token(sub=name), idp.token(sub=f"{name}-other")
    for client in clients:
        assert await client.get("gate.t.test", token) == (200, "")  # a cached allow on both
    status, body = await quarantine(a, f"{idp.url}|{name}", 60, "test")
    assert (status, body["shared"]) == (201, True)
    for client in reversed(clients):
        assert await client.get("gate.t.test", token) == (403, "containment.quarantined")
        assert await client.get("gate.t.test", bystander) == (200, "")
    assert (await admin(pair[1], "DELETE", f"/admin/quarantines/subject/{idp.url}|{name}"))[0] == 200
    for client in clients:
        assert await client.get("gate.t.test", token) == (200, "")


async def test_a_rate_limit_is_shared_by_the_replicas(clients: tuple[Client, Client], idp: Issuer) -> None:
    token = idp.token(sub=f"burst-{uuid.uuid4().hex[:6]}")
    statuses = [(await client.get("limited.t.test", token))[0] for client in (clients[0], clients[1], clients[0])]
    assert statuses == [200, 200, 200]  # the burst of 3, spread over both replicas
    assert await clients[1].get("limited.t.test", token) == (429, "ratelimit.exceeded")
    assert await clients[0].get("limited.t.test", idp.token(sub=f"other-{uuid.uuid4().hex[:6]}")) == (200, "")


async def _request_costs(
    topology: Topology, pair: tuple[PepRuntime, PepRuntime], clients: tuple[Client, Client], idp: Issuer
) -> dict[str, dict[str, int]]:
    """A miss, an L2 hit and an L1 hit; ``background`` is non-empty when a watcher's probe
    (an EVAL every 0.5 s per replica, then perhaps a reconciliation) fell inside one, or
    when the push channel was not known healthy throughout (then scopes are read)."""
    a, b = pair
    token = idp.token(sub=f"cost-{uuid.uuid4().hex[:6]}")
    cost: dict[str, dict[str, int]] = {"background": {}}
    for pep in pair:
        async with asyncio.timeout(15):
            while pep.push is None or not pep.push.healthy:
                await asyncio.sleep(0.02)
    for label, client, pep in (("miss", 0, a), ("l2", 1, b), ("l1", 1, b)):
        nodes = topology.masters()
        fallbacks = sum(p.push.fallbacks for p in pair if p.push is not None)
        before, trips = all_calls(nodes), pep.shared.batches  # type: ignore[union-attr]
        assert await clients[client].get("gate.t.test", token) == (200, "")
        await pep.cache.drain()  # type: ignore[union-attr]
        after = all_calls(nodes)
        cost[label] = {
            k.removeprefix("cmdstat_"): after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)
        }
        # connection set-up (this test's, and a Sentinel client's PING on a new pooled
        # connection), replicas' acknowledgements, and the background re-read of
        # quarantines (every 5 s): none of them per request
        for probe in ("eval", "scan"):
            if probe in cost[label]:
                cost["background"][probe] = cost[label][probe]
        if sum(p.push.fallbacks for p in pair if p.push is not None) != fallbacks:
            cost["background"]["fallback"] = 1
        # + the push channel's heartbeats (every heartbeat_ms per replica)
        for other in ("info", "hello", "client|setinfo", "ping", "replconf", "scan", "cluster|slots", "cluster|shards",
                      "publish", "spublish"):  # fmt: skip
            cost[label].pop(other, None)
        cost[label]["round_trips"] = pep.shared.batches - trips  # type: ignore[union-attr]
    return cost


async def test_what_a_request_costs_redis(
    topology: Topology, pair: tuple[PepRuntime, PepRuntime], clients: tuple[Client, Client], idp: Issuer
) -> None:
    """Operations per request (INFO commandstats on the data nodes): the figures of docs/deploy.md."""
    a, b = pair
    assert a.shared is not None and a.cache is not None and b.shared is not None
    for _ in range(40):
        cost = await _request_costs(topology, pair, clients, idp)
        if not cost.pop("background"):
            break
    else:
        raise AssertionError("the watchers' probes never left a request alone")
    print(f"\n{topology.name}: redis operations per request: {cost}")
    # quarantines + revision + epochs of the subject, tenant and token: pushed into each
    # replica, so nothing on every topology while the channel is healthy (while it is not,
    # one MGET to one node: on a Cluster they share one hash tag)
    assert cost["l1"] == {"round_trips": 0}
    # the route's index (once per route and revision per replica, then remembered for
    # 5 s: a second attempt finds it known) and the entry
    index = cost["l2"].get("get", 0) - 1
    assert index in (0, 1)
    assert cost["l2"] == {"get": 1 + index, "round_trips": 1 + index}
    # + the entry and its index written, off the request path, in one more round trip
    index = cost["miss"].get("get", 0) - 1
    assert index in (0, 1)
    assert cost["miss"] == {"get": 1 + index, "set": 2, "round_trips": 2 + index}


# ------------------------------------------------------------------ failover under load


@dataclass
class Load:
    """Requests from two replicas, for an allowed and a quarantined subject, until stopped."""

    answers: list[tuple[float, str, int, str]] = field(default_factory=list)  # (t, who, status, code)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self, client: Client, who: str, token: str) -> None:
        while not self.stop.is_set():
            try:
                status, code = await client.get("nocache.t.test" if who == "fresh" else "gate.t.test", token)
            except (aiohttp.ClientError, TimeoutError):
                status, code = 0, "transport"
            self.answers.append((time.monotonic(), who, status, code))


def _quarantine_key(topology: Topology, issuer: str, name: str) -> str:
    return f"{topology.prefix}q:{{c}}:subject:{issuer}|{name}"  # containment's hash tag


async def _failover_under_load(
    topology: Topology,
    pair: tuple[PepRuntime, PepRuntime],
    clients: tuple[Client, Client],
    idp: Issuer,
    kill: Callable[[str], int],
) -> dict[str, float]:
    a, b = pair
    assert a.shared is not None and b.shared is not None
    name = f"fo-{uuid.uuid4().hex[:6]}"
    bad, good = idp.token(sub=f"{name}-mallory"), idp.token(sub=f"{name}-alice")
    qkey = _quarantine_key(topology, idp.url, f"{name}-mallory")
    status, body = await quarantine(a, f"{idp.url}|{name}-mallory", 120, "failover test")
    assert (status, body["shared"]) == (201, True)
    # Replicated before the kill (Redis replication is asynchronous; what an unreplicated
    # write means is the containment's reconciliation, not this test's).
    master = await asyncio.to_thread(topology_master_of, topology, qkey)
    with redis.Redis(host="127.0.0.1", port=master, socket_timeout=5) as c:
        assert int(c.execute_command("WAIT", 1, 3000)) >= 1
    for client in clients:
        assert await client.get("gate.t.test", bad) == (403, "containment.quarantined")
        assert await client.get("gate.t.test", good) == (200, "")
    # A subscriber on a channel of the killed node's slot (hash tag: the quarantine's key).
    channel = f"{topology.prefix}events{{c}}"
    assert key_slot(channel.encode()) == key_slot(qkey.encode())
    heard: list[bytes] = []
    watcher = SharedState(topology.config(timeout_ms=300, retry_after_failure_s=0.2))
    subscribed = asyncio.Event()

    async def on_subscribed() -> None:
        subscribed.set()

    watcher.follow(channel, heard.append, on_subscribed, name="test-watcher")
    async with asyncio.timeout(20):
        await subscribed.wait()
    assert await a.shared.publish(channel, b"before")
    async with asyncio.timeout(10):
        while b"before" not in heard:
            await asyncio.sleep(0.02)

    load = Load()
    workers = [
        asyncio.create_task(load.run(client, who, token), name=f"load-{i}-{who}")
        for i, client in enumerate(clients)
        for who, token in (("mallory", bad), ("alice", good), ("fresh", good))
    ]
    try:
        async with asyncio.timeout(10):
            while len(load.answers) < 30:
                await asyncio.sleep(0.02)
        killed_at = time.monotonic()
        await asyncio.to_thread(kill, qkey)

        async def redis_back(pep: PepRuntime) -> bool:
            shared = pep.shared
            assert shared is not None
            return await shared.call(lambda c: c.get(qkey)) is not None

        # Recovered: each replica reads the quarantined subject's key from Redis again.
        async with asyncio.timeout(40):
            while not (await redis_back(a) and await redis_back(b)):
                await asyncio.sleep(0.05)
        recovered_at = time.monotonic()
        # The subscriber is back too: a message published now is heard.
        async with asyncio.timeout(40):
            while not [m for m in heard if m.startswith(b"after")]:
                await a.shared.publish(channel, b"after")
                await asyncio.sleep(0.1)
        heard_at = time.monotonic()
        async with asyncio.timeout(10):  # some load after the recovery too
            while sum(1 for t, *_ in load.answers if t > recovered_at) < 30:
                await asyncio.sleep(0.02)
    finally:
        load.stop.set()
        await asyncio.gather(*workers)
        await watcher.close()

    during = [x for x in load.answers if killed_at <= x[0] <= recovered_at]
    # Never an allow for the quarantined subject: before, during and after the failover.
    assert {(s, c) for _, who, s, c in load.answers if who == "mallory"} <= {
        (403, "containment.quarantined"),
        (503, ""),
    }
    assert not [x for x in load.answers if x[1] == "mallory" and x[2] == 200]
    # The allowed subject stays allowed (L1 and OPA carry on while Redis is away).
    assert {(s, c) for _, who, s, c in load.answers if who != "mallory"} == {(200, "")}
    assert during, "no request was judged during the failover"
    # A quarantine made after the recovery is shared again, and enforced on the other replica.
    late = f"{name}-late"
    status, body = await quarantine(b, f"{idp.url}|{late}", 60, "after")
    assert (status, body["shared"]) == (201, True)
    assert await clients[0].get("gate.t.test", idp.token(sub=late)) == (403, "containment.quarantined")
    return {
        "recovery_s": recovered_at - killed_at,
        "pubsub_recovery_s": heard_at - killed_at,
        "requests": len(load.answers),
        "requests_during": len(during),
    }


def topology_master_of(topology: Topology, key: str) -> int:
    if topology.cluster is not None:
        return topology.cluster.master_of(key)
    assert topology.sentinel is not None
    return topology.sentinel.primary()


@pytest.mark.parametrize("topology", ["sentinel"], indirect=True)
async def test_sentinel_failover_under_load_keeps_every_answer_right(
    topology: Topology, pair: tuple[PepRuntime, PepRuntime], clients: tuple[Client, Client], idp: Issuer
) -> None:
    sentinel = topology.sentinel
    assert sentinel is not None
    old = sentinel.primary()
    try:
        figures = await _failover_under_load(topology, pair, clients, idp, lambda _key: sentinel.kill_primary())
        assert sentinel.primary() != old  # the PEP follows the promoted replica
    finally:
        await asyncio.to_thread(sentinel.heal)
    print(f"\nsentinel failover: {figures}")
    assert figures["recovery_s"] < 30


@pytest.mark.parametrize("topology", ["cluster"], indirect=True)
async def test_cluster_master_of_the_quarantined_slot_killed_under_load_keeps_every_answer_right(
    topology: Topology, pair: tuple[PepRuntime, PepRuntime], clients: tuple[Client, Client], idp: Issuer
) -> None:
    cluster = topology.cluster
    assert cluster is not None
    killed: list[int] = []

    def kill(key: str) -> int:
        killed.append(cluster.master_of(key))
        cluster.kill(killed[0])
        return killed[0]

    try:
        figures = await _failover_under_load(topology, pair, clients, idp, kill)
        assert killed and killed[0] not in cluster.masters()  # a replica took its slots
    finally:
        await asyncio.to_thread(cluster.heal)
    print(f"\ncluster failover: {figures}")
    assert figures["recovery_s"] < 30


@pytest.mark.parametrize("topology", ["standalone", "cluster"], indirect=True)
async def test_memory_per_cached_decision_and_per_subject(
    pki: Path, opa: OpaProcess, upstream: Upstream, idp: Issuer, topology: Topology
) -> None:
    """MEMORY USAGE of what one request leaves in Redis: the sizing figures of docs/deploy.md."""
    pep = PepRuntime(pep_config(pki, opa, upstream, idp, topology, risk={"enabled": True, "timeout_ms": 2000}))
    await pep.start()
    client = Client(pki, pep)
    try:
        name = f"mem-{uuid.uuid4().hex[:6]}"
        assert await client.get("gate.t.test", idp.token(sub=name)) == (200, "")
        assert pep.cache is not None
        await pep.cache.drain()
        assert (await quarantine(pep, f"{idp.url}|{name}", 60, "sizing"))[0] == 201
        usage: dict[str, int] = {}
        ports = topology.masters()
        for port in ports:
            with redis.Redis(host="127.0.0.1", port=port, socket_timeout=2) as c:
                for key in c.scan_iter(match=f"{topology.prefix}*", count=500):
                    kind = key.decode()[len(topology.prefix) :].split(":")[0]
                    usage[kind] = usage.get(kind, 0) + int(c.memory_usage(key, samples=0) or 0)
    finally:
        await client.close()
        await pep.stop()
    print(f"\n{topology.name}: bytes in Redis after one request and one quarantine: {usage}")
    # one cached decision = its entry (dec) and the route's index (idx, shared by the route)
    assert 0 < usage["dec"] < 1024 and 0 < usage["idx"] < 512
    # a subject's risk state (window counter, baseline, networks) and one quarantine
    assert 0 < usage["risk"] < 2048 and 0 < usage["q"] < 1024


@pytest.mark.parametrize("topology", ["standalone", "cluster"], indirect=True)
async def test_risk_signals_of_an_l1_hit_are_counted_locally_and_flushed_in_one_script(
    pki: Path, opa: OpaProcess, upstream: Upstream, idp: Issuer, topology: Topology
) -> None:
    # flush_ms 1000: the subject's state stays fresh (2 x flush_ms) through the slow INFO calls
    risk = {"enabled": True, "timeout_ms": 2000, "flush_ms": 1000}
    pep = PepRuntime(pep_config(pki, opa, upstream, idp, topology, risk=risk))
    await pep.start()
    client = Client(pki, pep)
    try:
        name = f"risky-{uuid.uuid4().hex[:6]}"
        token = idp.token(sub=name)
        assert await client.get("gate.t.test", token) == (200, "")  # the script, on the request
        assert pep.cache is not None and pep.shared is not None and pep.risk is not None
        assert pep.push is not None and pep.push.healthy
        await pep.cache.drain()
        await pep.risk.flush()
        nodes = topology.masters()
        before, trips, l1, local = all_calls(nodes), pep.shared.batches, pep.cache.stats["l1"], pep.risk.local
        assert await client.get("gate.t.test", token) == (200, "")
        assert (pep.cache.stats["l1"], pep.risk.local) == (l1 + 1, local + 1)
        assert pep.shared.batches - trips == 0  # counted here, no round trip
        assert await pep.risk.flush()
        after = all_calls(nodes)
        assert pep.shared.batches - trips == 1
        scripts = sum(after.get(k, 0) - before.get(k, 0) for k in ("cmdstat_eval", "cmdstat_evalsha"))
        assert scripts >= 1  # the flush: its keys share the subject's hash tag, one slot, one script
        window = pep.shared.key_for("risk", f"sub:{idp.url}|{name}", "w", str(int(time.time()) // 60))
        assert int(await pep.shared.call(lambda c: c.get(window)) or 0) in (1, 2)  # 2, unless the window turned
    finally:
        await client.close()
        await pep.stop()


async def test_a_command_that_cannot_be_sent_fails_only_its_caller(topology: Topology, shared: SharedState) -> None:
    """On a Cluster a script over keys of two slots cannot be routed: its caller alone gets None."""
    a, b = shared.key("a"), shared.key("b")  # untagged: two slots (checked below)
    assert key_slot(a.encode()) != key_slot(b.encode())
    assert await shared.call(lambda c: c.set(a, b"1")) is True
    script = "return redis.call('GET', KEYS[1])"
    good, cross, alone = await asyncio.gather(
        shared.mget([a]),
        shared.one(lambda p: p.eval(script + " .. (redis.call('GET', KEYS[2]) or '')", 2, a, b)),
        shared.one(lambda p: p.eval(script, 1, a)),
    )
    assert good == [b"1"] and alone == b"1"
    assert cross is None if topology.cluster is not None else cross == b"1"
    assert shared.available  # not an outage
