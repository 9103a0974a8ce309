"""Shared state: the Redis connection every replica shares, behind a deadline.

One client (standalone, Sentinel or Cluster; TLS with ``rediss://``; ACL
username and password), one pool.  :meth:`SharedState.call` runs a command
under ``redis.timeout_ms`` and turns every failure into ``None`` — the caller
decides what "Redis could not answer" means for it, and it is never "allow".
After a failure Redis is skipped for ``retry_after_failure_s`` so a dead Redis
costs one deadline, not one per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import RedisError

from .config import Redis as RedisConfig

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


class SharedState:
    def __init__(self, cfg: RedisConfig, client: Any | None = None) -> None:
        self.cfg = cfg
        self.client = client if client is not None else make_client(cfg)
        self.prefix = cfg.key_prefix
        self._down_until = 0.0
        self.errors = 0

    @property
    def available(self) -> bool:
        return time.monotonic() >= self._down_until

    def key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    async def call(self, op: Callable[[Any], Awaitable[T]], *, deadline_s: float | None = None) -> T | None:
        """Run ``op(client)`` under the deadline; ``None`` when Redis cannot answer."""
        if not self.available:
            return None
        try:
            async with asyncio.timeout(deadline_s if deadline_s is not None else self.cfg.timeout_ms / 1000):
                return await op(self.client)
        except (TimeoutError, RedisError, OSError) as exc:
            self.errors += 1
            self._down_until = time.monotonic() + self.cfg.retry_after_failure_s
            log.warning("redis unavailable: %s", type(exc).__name__)
            return None

    async def close(self) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self.client.aclose()
