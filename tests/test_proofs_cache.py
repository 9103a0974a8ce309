"""The decision cache never outranks containment, never mixes routes, never reopens when Redis fails.

* a quarantine written straight to Redis — the way another replica's would
  land, with no cache reset and no channel message — beats an allow this
  replica holds in L1; the allow is still cached (it comes back once lifted),
  so the 403 came from containment and not from a reset;
* an undefined or malformed answer is never stored, even on a route that
  caches denies: OPA is asked again every time;
* two routes with the same ``cache.key`` projection and the same policy never
  share an entry: the second route is a miss, and OPA sees its own route;
* with Redis down, an invalidation and a data push are honoured by the replica
  that received them (``shared: false``): the cached allow is not served, and
  after Redis comes back the old answer does not return.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis
from tests.conftest import RedisServer, Upstream
from tests.idp import Issuer
from tests.support import ROUTES, OpaProcess, client_context, config_doc, start_opa

from vvault_pep.app.runtime import PepRuntime
from vvault_pep.config import Config

ADMIN = "proofs-admin-token-0123456789abcdef-0123"
SECRET_PATH = "/v1/tenants/{tenant}/secrets/{path*}"
PROOF_ROUTES: list[dict[str, Any]] = [
    {
        "name": "p_gate",
        "host": "gate.proof.test",
        "path": SECRET_PATH,
        "methods": ["GET"],
        "upstream": "vvault",
        "policy": "faults/subject_gate",
        "cache": {"ttl_s": 60},
        "authn": {"require": "user"},
    },
    # answers that must never be stored: undefined, malformed
    *(
        {
            "name": f"p_{shape}",
            "host": f"{shape}.proof.test",
            "path": SECRET_PATH,
            "methods": ["GET"],
            "upstream": "vvault",
            "policy": policy,
            "cache": {"ttl_s": 60, "deny_ttl_s": 60},
        }
        for shape, policy in (("malformed", "faults/allow_as_string"), ("undefined", "vvault/nonexistent/decision"))
    ),
    # the same policy and the same projection on two routes
    *(
        {
            "name": name,
            "host": f"{name.removeprefix('p_').replace('_', '-')}.proof.test",
            "path": SECRET_PATH,
            "methods": ["GET"],
            "upstream": "vvault",
            "policy": "faults/echo_all",
            "cache": {"ttl_s": 60, "key": ["identity.subject"]},
            "authn": {"require": "user"},
        }
        for name in ("p_proj_one", "p_proj_two")
    ),
]


def proof_config(pki: Path, opa: OpaProcess, upstream: Upstream, idp: Issuer, redis_url: str) -> Config:
    return Config.model_validate(
        config_doc(
            pki,
            opa_url=opa.url,
            upstream_port=upstream.port,
            cache=True,
            routes=PROOF_ROUTES + ROUTES,
            redis={"url": redis_url, "timeout_ms": 200, "retry_after_failure_s": 0.2},
            risk={"enabled": False},
            admin={"host": "127.0.0.1", "port": 0, "token": ADMIN, "token_may_push": True},
            identity={"issuers": [{"name": "corp", "issuer": idp.url, "audiences": ["vvault"], "allow_http": True}]},
        )
    )


@pytest.fixture(scope="module")
def own_opa() -> AsyncIterator[OpaProcess]:
    """An OPA of its own: the data pushes below must not reach the session's."""
    proc = start_opa()
    yield proc  # type: ignore[misc]
    proc.stop()


class Audit(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if isinstance(getattr(record, "audit", None), dict):
            self.records.append(record.audit)  # type: ignore[attr-defined]


@pytest.fixture
def audit() -> AsyncIterator[Audit]:
    handler = Audit()
    logger = logging.getLogger("vvault_pep.audit")
    old = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler  # type: ignore[misc]
    logger.removeHandler(handler)
    logger.setLevel(old)


async def ask(pep: PepRuntime, pki: Path, audit: Audit, host: str, token: str) -> tuple[int, str, dict[str, Any]]:
    """(status, the error code or "", the audit record)."""
    connector = aiohttp.TCPConnector(ssl=client_context(pki, "reader"), force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http:
        async with http.get(
            f"https://localhost:{pep.port}/v1/tenants/acme/secrets/db-password",
            headers={"Host": host, "Authorization": f"Bearer {token}"},
        ) as resp:
            body = await resp.read()
            status, request_id = resp.status, resp.headers["X-Request-Id"]
    code = orjson.loads(body).get("code", "") if status >= 400 else ""
    assert pep.cache is not None
    await pep.cache.drain()
    [record] = [r for r in audit.records if r.get("request_id") == request_id]
    return status, code, record


async def admin(pep: PepRuntime, method: str, path: str, body: Any) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http:
        async with http.request(
            method, f"http://127.0.0.1:{pep.admin_port}{path}", json=body, headers={"Authorization": f"Bearer {ADMIN}"}
        ) as resp:
            return resp.status, await resp.json(content_type=None)


@pytest.fixture
async def pep_with_redis(
    pki: Path, own_opa: OpaProcess, upstream: Upstream, idp: Issuer
) -> AsyncIterator[tuple[PepRuntime, RedisServer]]:
    redis = RedisServer()
    redis.start()
    pep = PepRuntime(proof_config(pki, own_opa, upstream, idp, redis.url))
    await pep.start()
    try:
        yield pep, redis
    finally:
        await pep.stop()
        redis.stop()


async def test_a_quarantine_from_redis_beats_a_cached_allow_without_any_reset(
    pep_with_redis: tuple[PepRuntime, RedisServer], pki: Path, idp: Issuer, upstream: Upstream, audit: Audit
) -> None:
    pep, redis = pep_with_redis
    token = idp.token(sub="q-user")
    assert (await ask(pep, pki, audit, "gate.proof.test", token))[0] == 200
    status, _, record = await ask(pep, pki, audit, "gate.proof.test", token)
    assert (status, record["cache"]) == (200, "l1")
    # Another replica's quarantine: the key and its event on the push channel, as that
    # replica writes them — no epoch bump.
    key = f"vvault-pep:q:{{c}}:subject:{idp.url}|q-user"
    client = aioredis.from_url(redis.url)
    assert pep.push is not None and pep.push.healthy and pep.containment is not None
    try:
        doc = {"reason": "from another replica", "until": time.time() + 60, "by": "replica-b"}
        await client.set(key, json.dumps(doc), px=60_000)
        event = {"op": "add", "scope": "subject", "value": f"{idp.url}|q-user", **doc}
        assert await client.publish(pep.push.channel, json.dumps(event)) == 1
        async with asyncio.timeout(10):  # heard, not read: no request asks Redis meanwhile
            while not pep.containment._local:
                await asyncio.sleep(0.01)
        status, code, record = await ask(pep, pki, audit, "gate.proof.test", token)
        assert (status, code) == (403, "containment.quarantined")
        assert record["upstream_status"] is None
        assert upstream.seen_with(record["request_id"]) == []
        await client.delete(key)
    finally:
        await client.aclose()
    # The allow was in L1 all along: only containment stood in front of it.
    assert pep.containment is not None
    pep.containment._local.clear()  # what a lift on the other replica would publish
    status, _, record = await ask(pep, pki, audit, "gate.proof.test", token)
    assert (status, record["cache"]) == (200, "l1")


async def test_two_routes_with_the_same_projection_never_share_an_entry(
    pep_with_redis: tuple[PepRuntime, RedisServer], pki: Path, idp: Issuer, upstream: Upstream, audit: Audit
) -> None:
    pep, _ = pep_with_redis
    token = idp.token(sub="proj-user")
    assert (await ask(pep, pki, audit, "proj-one.proof.test", token))[2]["cache"] == "miss"
    assert (await ask(pep, pki, audit, "proj-one.proof.test", token))[2]["cache"] == "l1"
    status, _, record = await ask(pep, pki, audit, "proj-two.proof.test", token)
    assert (status, record["cache"]) == (200, "miss")
    [seen] = upstream.seen_with(record["request_id"])
    echo = json.loads(dict(seen["headers"])["X-Vvault-Echo"])
    assert echo["route"] == "p_proj_two"


async def _until_redis_answers(pep: PepRuntime) -> None:
    assert pep.cache is not None and pep.cache.shared is not None
    shared = pep.cache.shared
    async with asyncio.timeout(20):
        while await shared.call(lambda c: c.ping()) is None:
            await asyncio.sleep(0.1)


async def test_redis_down_invalidation_and_data_push_hold_here_and_for_good(
    pep_with_redis: tuple[PepRuntime, RedisServer], pki: Path, idp: Issuer, audit: Audit
) -> None:
    pep, redis = pep_with_redis
    inv, rev = idp.token(sub="inv-user"), idp.token(sub="rev-user")
    for token in (inv, rev):
        await ask(pep, pki, audit, "gate.proof.test", token)
        status, _, record = await ask(pep, pki, audit, "gate.proof.test", token)
        assert (status, record["cache"]) == (200, "l1")
    redis.stop()

    # invalidation: honoured at once on this replica
    status, body = await admin(
        pep, "POST", "/admin/cache/invalidate", {"scope": "subject", "value": f"{idp.url}|inv-user"}
    )
    assert (status, body["shared"]) == (200, False)
    status, _, record = await ask(pep, pki, audit, "gate.proof.test", inv)
    assert (status, record["cache"]) == (200, "miss")

    # data push: rev-user is revoked; the cached allow must not be served
    status, body = await admin(pep, "PUT", "/admin/opa/data/faults_data", {"revoked": ["rev-user"]})
    assert (status, body["revision_shared"]) == (200, False)
    status, code, _ = await ask(pep, pki, audit, "gate.proof.test", rev)
    assert (status, code) == (403, "policy.revoked")

    # Redis back (empty: it kept nothing): the old allow does not return
    redis.start()
    await _until_redis_answers(pep)
    status, code, _ = await ask(pep, pki, audit, "gate.proof.test", rev)
    assert (status, code) == (403, "policy.revoked")
    status, body = await admin(pep, "PUT", "/admin/opa/data/faults_data", {"revoked": []})
    assert status == 200
    assert (await ask(pep, pki, audit, "gate.proof.test", rev))[0] == 200


@pytest.mark.parametrize(("shape", "code"), [("malformed", "pdp.malformed_decision"), ("undefined", "pdp.undefined")])
async def test_undefined_and_malformed_answers_are_never_cached(
    pep_with_redis: tuple[PepRuntime, RedisServer], pki: Path, idp: Issuer, audit: Audit, shape: str, code: str
) -> None:
    pep, _ = pep_with_redis
    token = idp.token(sub=f"{shape}-user")
    for _ in range(2):
        status, got, record = await ask(pep, pki, audit, f"{shape}.proof.test", token)
        assert (status, got, record["cache"]) == (403, code, "miss")
