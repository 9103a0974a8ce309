"""The ``redis`` section: each topology's fields, refused combinations, and the clients built.

Building a client opens no connection, so these need no server; the topologies themselves run
for real in ``tests/test_redis_topologies.py``.
"""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError
from redis.asyncio.cluster import RedisCluster

from vvault_pep.config import Redis
from vvault_pep.shared.state import SharedState, _by_slot, make_client


@pytest.mark.parametrize(
    ("section", "error"),
    [
        ({"url": "redis://r:6379", "mode": "sentinel"}, "mode: sentinel needs sentinels and service_name"),
        ({"url": "redis://r", "mode": "sentinel", "sentinels": ["s1"], "service_name": "p"}, "'s1' is not host:port"),
        ({"url": "redis://r", "mode": "sentinel", "sentinels": ["s1:0"], "service_name": "p"}, "is not host:port"),
        ({"url": "redis://r:6379", "mode": "cluster", "nodes": ["10.0.0.5:x"]}, "'10.0.0.5:x' is not host:port"),
        ({"url": "redis://r:6379", "nodes": ["10.0.0.5:6379"]}, "nodes is for mode: cluster"),
        ({"url": "redis://r:6379", "sentinels": ["s:26379"], "service_name": "p"}, "sentinels is for mode: sentinel"),
        ({"url": "unix:///run/redis.sock", "mode": "cluster"}, "mode: cluster needs a redis:// or rediss:// url"),
    ],
)
def test_refused(section: dict[str, Any], error: str) -> None:
    with pytest.raises(ValidationError, match=error):
        Redis.model_validate(section)


def test_a_cluster_client_reads_from_masters_and_knows_every_starting_node() -> None:
    cfg = Redis(url="redis://10.0.0.5:6379", mode="cluster", nodes=("10.0.0.6:6379", "[::1]:7000"), timeout_ms=80)
    client = make_client(cfg)
    assert isinstance(client, RedisCluster)
    assert client.read_from_replicas is False and client.load_balancing_strategy is None
    starting = {(n.host, n.port) for n in client.nodes_manager.startup_nodes.values()}
    assert starting == {("10.0.0.5", 6379), ("10.0.0.6", 6379), ("::1", 7000)}


def test_a_sentinel_client_has_its_own_deadlines() -> None:
    cfg = Redis(url="redis://x", mode="sentinel", sentinels=("10.0.0.7:26379",), service_name="p", timeout_ms=80)
    client = make_client(cfg)
    manager = client.connection_pool.sentinel_manager
    [sentinel] = manager.sentinels
    kwargs = sentinel.connection_pool.connection_kwargs
    assert (kwargs["socket_timeout"], kwargs["socket_connect_timeout"]) == (0.08, 0.08)
    assert client.connection_pool.service_name == "p"


@pytest.mark.parametrize(
    ("tag", "parts", "key"),
    [
        ("alice", ("w",), "p:risk:{alice}:w"),
        ("https://idp|a", (), "p:risk:{https%3A//idp|a}"),
        ("a}b{c", ("x", "y"), "p:risk:{a%7Db%7Bc}:x:y"),
        ("100%", (), "p:risk:{100%25}"),
    ],
)
def test_key_for(tag: str, parts: tuple[str, ...], key: str) -> None:
    shared = SharedState(Redis(url="redis://127.0.0.1:1", key_prefix="p:"))
    assert shared.key_for("risk", tag, *parts) == key


def test_keys_by_slot_keep_their_order_and_drop_duplicates() -> None:
    groups = _by_slot(["{a}1", "b", "{a}2", "{a}1", "c"])
    assert ["{a}1", "{a}2"] in groups and sum(len(g) for g in groups) == 4
