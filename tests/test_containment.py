"""Quarantine, revocation and rate limits: real Redis, real OPA, two PEP instances."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from tests.conftest import RedisServer, Upstream
from tests.idp import Issuer
from tests.support import ROUTES, OpaProcess, client_context, config_doc

from vvault_pep.app.runtime import PepRuntime
from vvault_pep.config import Config, RateLimit
from vvault_pep.core.decision import parse_obligation
from vvault_pep.shared.ratelimit import RateLimiter

ADMIN = "containment-admin-token-0123456789abcdef"
SECRET_PATH = "/v1/tenants/{tenant}/secrets/{path*}"
HOSTS: list[dict[str, Any]] = [
    {
        "name": "k_policy_limited",
        "host": "policy-limited.k.test",
        "path": SECRET_PATH,
        "methods": ["GET"],
        "upstream": "vvault",
        "policy": "faults/policy_limited",
        "authn": {"require": "user"},
    },
    {
        "name": "k_gate",
        "host": "gate.k.test",
        "path": SECRET_PATH,
        "methods": ["GET"],
        "upstream": "vvault",
        "policy": "faults/subject_gate",
        "cache": {"ttl_s": 60},
        "authn": {"require": "user"},
    },
    {
        "name": "k_trip",
        "host": "trip.k.test",
        "path": SECRET_PATH,
        "methods": ["GET"],
        "upstream": "vvault",
        "policy": "faults/quarantine_me",
        "authn": {"require": "user"},
    },
    {
        "name": "k_limited",
        "host": "limited.k.test",
        "path": SECRET_PATH,
        "methods": ["GET"],
        "upstream": "vvault",
        "policy": "faults/plain_true",
        "authn": {"require": "user"},
        "rate_limit": {"per": "subject", "rate_per_s": 0.05, "burst": 3},
    },
]


def doc_for(pki: Path, opa: OpaProcess, upstream: Upstream, idp: Issuer, redis_url: str) -> dict[str, Any]:
    return config_doc(
        pki,
        opa_url=opa.url,
        upstream_port=upstream.port,
        cache=True,
        routes=HOSTS + ROUTES,
        redis={"url": redis_url, "timeout_ms": 200, "retry_after_failure_s": 0.2},
        admin={"host": "127.0.0.1", "port": 0, "token": ADMIN},
        identity={"issuers": [{"name": "corp", "issuer": idp.url, "audiences": ["vvault"], "allow_http": True}]},
    )


@pytest.fixture(scope="module")
async def pair(
    pki: Path, opa: OpaProcess, upstream: Upstream, idp: Issuer, redis_server: RedisServer
) -> AsyncIterator[tuple[PepRuntime, PepRuntime]]:
    peps = [PepRuntime(Config.model_validate(doc_for(pki, opa, upstream, idp, redis_server.url))) for _ in (1, 2)]
    for pep in peps:
        await pep.start()
    yield peps[0], peps[1]
    for pep in peps:
        await pep.stop()


async def hit(pep: PepRuntime, pki: Path, host: str, token: str) -> tuple[int, dict[str, Any], Any]:
    connector = aiohttp.TCPConnector(ssl=client_context(pki, "reader"), force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http:
        async with http.get(
            f"https://localhost:{pep.port}/v1/tenants/acme/secrets/db-password",
            headers={"Host": host, "Authorization": f"Bearer {token}"},
        ) as resp:
            body = await resp.json(content_type=None) if resp.status >= 400 else {}
            return resp.status, body, resp.headers


async def admin(pep: PepRuntime, method: str, path: str, json: Any = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http:
        async with http.request(
            method, f"http://127.0.0.1:{pep.admin_port}{path}", json=json, headers={"Authorization": f"Bearer {ADMIN}"}
        ) as resp:
            return resp.status, await resp.json(content_type=None)


async def test_a_quarantine_obligation_on_one_instance_blocks_the_subject_on_the_other(
    pair: tuple[PepRuntime, PepRuntime], pki: Path, idp: Issuer
) -> None:
    a, b = pair
    zed, other = idp.token(sub="zed"), idp.token(sub="yolanda")
    for token in (zed, other):
        await hit(b, pki, "gate.k.test", token)
        assert (await hit(b, pki, "gate.k.test", token))[0] == 200  # cached allow on B
    status, body, _ = await hit(a, pki, "trip.k.test", zed)  # the policy trips and quarantines zed
    assert (status, body["code"]) == (403, "policy.compromised")
    # at once: the very next request on B is refused (no wait for a sync or a cache expiry)
    status, body, _ = await hit(b, pki, "gate.k.test", zed)
    assert (status, body["code"]) == (403, "containment.quarantined")
    assert "test trip-wire" in body["detail"]
    assert (await hit(b, pki, "gate.k.test", other))[0] == 200  # only zed
    status, listing = await admin(b, "GET", "/admin/quarantines")
    assert any(q["scope"] == "subject" and q["value"] == f"{idp.url}|zed" for q in listing["quarantines"])
    # lifted through the admin API of the other instance: access is back everywhere
    assert (await admin(b, "DELETE", f"/admin/quarantines/subject/{idp.url}|zed"))[0] == 200
    for pep in (a, b):
        assert (await hit(pep, pki, "gate.k.test", zed))[0] == 200


async def test_a_revoked_token_is_refused_on_both_instances(
    pair: tuple[PepRuntime, PepRuntime], pki: Path, idp: Issuer
) -> None:
    a, b = pair
    exp = int(time.time()) + 300
    stolen = idp.token(sub="xavier", jti="stolen-jti-1", exp=exp)
    fresh = idp.token(sub="xavier", jti="fresh-jti-2", exp=exp)
    for pep in (a, b):
        assert (await hit(pep, pki, "gate.k.test", stolen))[0] == 200
    status, _ = await admin(a, "POST", "/admin/revocations", {"jti": "stolen-jti-1", "exp": exp})
    assert status == 201
    for pep in (b, a):
        status, body, _ = await hit(pep, pki, "gate.k.test", stolen)
        assert (status, body["code"]) == (403, "containment.quarantined")
        assert (await hit(pep, pki, "gate.k.test", fresh))[0] == 200  # the subject itself is not contained


async def test_rate_limit_is_shared_across_instances(
    pair: tuple[PepRuntime, PepRuntime], pki: Path, idp: Issuer
) -> None:
    a, b = pair
    token = idp.token(sub="burst-user")
    statuses = [(await hit(pep, pki, "limited.k.test", token))[0] for pep in (a, b, a)]
    assert statuses == [200, 200, 200]  # the burst of 3, spread over both instances
    status, body, headers = await hit(b, pki, "limited.k.test", token)
    assert (status, body["code"]) == (429, "ratelimit.exceeded")
    assert int(headers["Retry-After"]) >= 1
    assert (await hit(a, pki, "limited.k.test", idp.token(sub="someone-else")))[0] == 200


async def test_the_policy_can_return_a_rate_limit(pair: tuple[PepRuntime, PepRuntime], pki: Path, idp: Issuer) -> None:
    a, b = pair
    token = idp.token(sub="policy-limited-user")
    assert [(await hit(pep, pki, "policy-limited.k.test", token))[0] for pep in (a, b, a)] == [200, 200, 429]


async def test_redis_down_keeps_local_containment_and_a_local_limit(
    pki: Path, opa: OpaProcess, upstream: Upstream, idp: Issuer
) -> None:
    redis = RedisServer()
    redis.start()
    pep = PepRuntime(Config.model_validate(doc_for(pki, opa, upstream, idp, redis.url)))
    await pep.start()
    try:
        wanda = idp.token(sub="wanda")
        assert (await hit(pep, pki, "trip.k.test", wanda))[0] == 403  # quarantined while Redis was up
        redis.stop()
        status, body, _ = await hit(pep, pki, "gate.k.test", wanda)
        assert (status, body["code"]) == (403, "containment.quarantined")  # an outage lifts nothing
        token = idp.token(sub="local-limit")
        statuses = [(await hit(pep, pki, "limited.k.test", token))[0] for _ in range(4)]
        assert statuses == [200, 200, 200, 429]  # the per-replica limit, never unlimited
        assert (await hit(pep, pki, "gate.k.test", idp.token(sub="bystander")))[0] == 200  # still judged
        redis.start()  # the same port: the PEP recovers by itself
        async with asyncio.timeout(10):
            while (await pep.shared.call(lambda c: c.ping())) is None:  # type: ignore[union-attr]
                await asyncio.sleep(0.1)
        assert (await hit(pep, pki, "gate.k.test", idp.token(sub="after")))[0] == 200
    finally:
        await pep.stop()
        redis.stop()


@pytest.mark.parametrize(
    ("raw", "parsed"),
    [
        ({"type": "quarantine", "scope": "subject", "ttl_s": 60, "reason": "r"}, ("subject", 60.0, "r")),
        ({"type": "quarantine", "scope": "token"}, ("token", 900.0, "")),
        ({"type": "quarantine", "scope": "planet"}, None),
        ({"type": "quarantine", "scope": "subject", "ttl_s": 0}, None),
        ({"type": "quarantine", "scope": "subject", "ttl_s": True}, None),
        ({"type": "quarantine", "scope": "subject", "ttl_s": 10**9}, None),
        ({"type": "notify"}, None),
        ("quarantine", None),
    ],
)
def test_parse_obligation(raw: Any, parsed: Any) -> None:
    assert parse_obligation(raw) == parsed


async def test_local_gcra() -> None:
    limiter = RateLimiter(None)
    limit = RateLimit(per="subject", rate_per_s=1000, burst=2)
    verdicts = [await limiter.check(limit, "k") for _ in range(3)]
    assert [v.allowed for v in verdicts] == [True, True, False]
    assert 0 < verdicts[2].retry_after_s <= 0.001


async def test_admin_api_over_mtls_authorised_by_opa(
    pki: Path,
    opa: OpaProcess,
    upstream: Upstream,
    idp: Issuer,
    redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import logging

    doc = doc_for(pki, opa, upstream, idp, redis_server.url)
    doc["admin"] = {
        "host": "127.0.0.1",
        "port": 0,
        "policy": "vvault/admin/decision",
        "tls": {
            "cert_file": str(pki / "server.pem"),
            "key_file": str(pki / "server-key.pem"),
            "client_ca_file": str(pki / "ca.pem"),
            "client_auth": "optional",
        },
    }
    pep = PepRuntime(Config.model_validate(doc))
    await pep.start()
    url = f"https://localhost:{pep.admin_port}"
    body = {"scope": "subject", "value": f"{idp.url}|vic", "ttl_s": 60, "reason": "incident 42"}

    async def call(cert: str | None, method: str, path: str, json: Any = None) -> int:
        connector = aiohttp.TCPConnector(ssl=client_context(pki, cert), force_close=True)
        async with aiohttp.ClientSession(connector=connector) as http:
            async with http.request(method, url + path, json=json) as resp:
                return resp.status

    try:
        assert await call(None, "GET", "/healthz") == 200  # probes need no certificate
        assert await call(None, "POST", "/admin/quarantines", body) == 401
        with caplog.at_level(logging.INFO, logger="vvault_pep.audit"):
            assert await call("reader", "POST", "/admin/quarantines", body) == 403  # not an admin
            assert await call("ops", "POST", "/admin/quarantines", body) == 201
        records = [r.audit for r in caplog.records if getattr(r, "audit", {}).get("admin_action") == "quarantine.add"]
        assert [(r["result"]["allow"], r["admin"]) for r in records] == [
            (False, None),  # the call without a certificate is on record too
            (False, "spiffe://demo.vvault/client/reader"),
            (True, "spiffe://demo.vvault/client/ops"),
        ]
        status, _, _ = await hit(pep, pki, "gate.k.test", idp.token(sub="vic"))
        assert status == 403
        assert await call("ops", "DELETE", f"/admin/quarantines/subject/{idp.url}|vic") == 200
        assert (await hit(pep, pki, "gate.k.test", idp.token(sub="vic")))[0] == 200
    finally:
        await pep.stop()


async def test_admin_refusals_are_audited_and_inputs_checked(
    pair: tuple[PepRuntime, PepRuntime], caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    a, _ = pair
    with caplog.at_level(logging.INFO, logger="vvault_pep.audit"):
        async with aiohttp.ClientSession() as http:
            async with http.post(
                f"http://127.0.0.1:{a.admin_port}/admin/quarantines", json={}, headers={"Authorization": "Bearer wrong"}
            ) as resp:
                assert resp.status == 401
    refused = [r.audit for r in caplog.records if getattr(r, "audit", {}).get("admin_action") == "quarantine.add"]
    assert refused[-1]["result"] == {"allow": False}
    assert refused[-1]["code"] == "admin.bad_token"
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {ADMIN}"}) as http:
        async with http.post(f"http://127.0.0.1:{a.admin_port}/admin/quarantines", json=["a", "list"]) as resp:
            assert resp.status == 400
        async with http.delete(f"http://127.0.0.1:{a.admin_port}/admin/quarantines/planet/x") as resp:
            assert resp.status == 400


async def test_posture_header_name_is_owned_whatever_it_is_called(
    pki: Path, opa: OpaProcess, upstream: Upstream, idp: Issuer, redis_server: RedisServer
) -> None:
    doc = doc_for(pki, opa, upstream, idp, redis_server.url)
    doc["posture"] = {"header": "X-Device-Trust"}
    pep = PepRuntime(Config.model_validate(doc))
    await pep.start()
    try:
        connector = aiohttp.TCPConnector(ssl=client_context(pki, "reader"), force_close=True)
        async with aiohttp.ClientSession(connector=connector) as http:
            async with http.get(
                f"https://localhost:{pep.port}/v1/tenants/acme/secrets/db-password",
                headers={"X-Device-Trust": "assertion-material"},
            ) as resp:
                assert resp.status == 200
                request_id = resp.headers["X-Request-Id"]
        [seen] = upstream.seen_with(request_id)
        assert "x-device-trust" not in {k.lower() for k, _ in seen["headers"]}
    finally:
        await pep.stop()


async def test_a_replica_started_later_still_holds_quarantines_through_an_outage(
    pki: Path, opa: OpaProcess, upstream: Upstream, idp: Issuer
) -> None:
    redis = RedisServer()
    redis.start()
    first = PepRuntime(Config.model_validate(doc_for(pki, opa, upstream, idp, redis.url)))
    await first.start()
    later: PepRuntime | None = None
    try:
        value = f"{idp.url}|quinn"
        assert (
            await admin(
                first, "POST", "/admin/quarantines", {"scope": "subject", "value": value, "ttl_s": 120, "reason": "r"}
            )
        )[0] == 201
        later = PepRuntime(Config.model_validate(doc_for(pki, opa, upstream, idp, redis.url)))
        await later.start()  # never heard the quarantine on the channel
        redis.stop()
        status, body, _ = await hit(later, pki, "gate.k.test", idp.token(sub="quinn"))
        assert (status, body["code"]) == (403, "containment.quarantined")
    finally:
        if later is not None:
            await later.stop()
        await first.stop()
        redis.stop()
