"""The vvault policy library end to end: real OPA, real tokens, certificates, posture and Redis."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from examples.vvault_api.app import STORE
from tests.conftest import RedisServer, Upstream
from tests.idp import Issuer, posture_assertion
from tests.support import ROUTES, OpaProcess, client_context, config_doc, start_opa

from vvault_pep.app.runtime import PepRuntime
from vvault_pep.config import Config

ADMIN = "library-admin-token-0123456789abcdef-xyz"
ROTATIONS = {
    "name": "rotations",
    "path": "/v1/tenants/{tenant}/rotations/{path*}",
    "methods": ["POST"],
    "upstream": "vvault",
    "policy": "vvault/authz/decision",
}


@pytest.fixture(scope="module")
def lib_opa() -> Iterator[OpaProcess]:
    proc = start_opa()  # its own: these tests push grants and thresholds
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
async def pep(
    pki: Path, lib_opa: OpaProcess, upstream: Upstream, idp: Issuer, devices: Issuer, redis_server: RedisServer
) -> AsyncIterator[PepRuntime]:
    doc = config_doc(
        pki,
        opa_url=lib_opa.url,
        upstream_port=upstream.port,
        routes=[ROTATIONS, *ROUTES],
        listener={"tls": {"client_auth": "optional"}},
        redis={"url": redis_server.url, "timeout_ms": 200},
        # Risk must be judged on every request here: past its deadline it is unknown, and
        # the risk test would see a read where it expects a quarantine.
        risk={"timeout_ms": 1000},
        admin={"host": "127.0.0.1", "port": 0, "token": ADMIN, "token_may_push": True},
        identity={
            "issuers": [{"name": "corp", "issuer": idp.url, "audiences": ["vvault"], "allow_http": True}],
            "workload": {"trust_domains": ["prod.vvault", "demo.vvault"]},
        },
        posture={
            "issuers": [{"name": "devices", "issuer": devices.url, "audiences": ["vvault-pep"], "allow_http": True}]
        },
    )
    runtime = PepRuntime(Config.model_validate(doc))
    await runtime.start()
    yield runtime
    await runtime.stop()


def device(devices: Issuer, sub: str, **over: Any) -> str:
    return posture_assertion(devices, sub=sub, **over)


async def call(
    pep: PepRuntime,
    pki: Path,
    method: str,
    path: str,
    *,
    token: str | None = None,
    posture: str | None = None,
    cert: str | None = None,
) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if posture:
        headers["X-Device-Posture"] = posture
    connector = aiohttp.TCPConnector(ssl=client_context(pki, cert), force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http:
        async with http.request(
            method,
            f"https://localhost:{pep.port}{path}",
            headers=headers,
            data=b'{"vector": [1, 0]}' if method in ("POST", "PUT") else None,
        ) as resp:
            body = await resp.read()
            return resp.status, json.loads(body) if body[:1] in (b"{", b"[") else body


async def admin(pep: PepRuntime, method: str, path: str, doc: Any) -> int:
    async with aiohttp.ClientSession() as http:
        async with http.request(
            method, f"http://127.0.0.1:{pep.admin_port}{path}", json=doc, headers={"Authorization": f"Bearer {ADMIN}"}
        ) as resp:
            return resp.status


async def test_cross_tenant_read_is_denied(pep: PepRuntime, pki: Path, idp: Issuer) -> None:
    token = idp.token(sub="alice", tenant="acme", roles=["reader"])
    assert (await call(pep, pki, "GET", "/v1/tenants/acme/secrets/db-password", token=token))[0] == 200
    status, body = await call(pep, pki, "GET", "/v1/tenants/globex/secrets/db-password", token=token)
    assert (status, body["code"]) == (403, "policy.tenant_not_entitled")


async def test_workload_crosses_tenants_only_with_a_grant(pep: PepRuntime, pki: Path) -> None:
    ok, _ = await call(pep, pki, "POST", "/v1/tenants/acme/collections/docs/query", cert="indexer")
    assert ok == 200
    status, body = await call(pep, pki, "POST", "/v1/tenants/globex/collections/docs/query", cert="indexer")
    assert (status, body["code"]) == (403, "policy.tenant_not_entitled")


async def test_pii_needs_a_compliant_device(
    pep: PepRuntime, pki: Path, idp: Issuer, devices: Issuer, upstream: Upstream
) -> None:
    upstream.app[STORE].secrets[("acme", "pii/ssn")] = {"value": "123-45-6789", "version": 1, "updated": time.time()}
    token = idp.token(sub="pat", tenant="acme", roles=["pii-analyst"])
    status, body = await call(
        pep, pki, "GET", "/v1/tenants/acme/secrets/pii/ssn", token=token, posture=device(devices, "pat", managed=False)
    )
    assert (status, body["code"]) == (403, "policy.device_required")
    status, body = await call(
        pep, pki, "GET", "/v1/tenants/acme/secrets/pii/ssn", token=token, posture=device(devices, "pat")
    )
    assert (status, body["value"]) == (200, "123-45-6789")


async def test_key_rotation_needs_mfa_fresh_auth_and_elevation(
    pep: PepRuntime, pki: Path, idp: Issuer, devices: Issuer
) -> None:
    path = "/v1/tenants/acme/rotations/tokens/api"
    posture = device(devices, "kim")
    now = int(time.time())

    async def rotate(**claims: Any) -> tuple[int, Any]:
        token = idp.token(sub="kim", tenant="acme", roles=[], **claims)
        return await call(pep, pki, "POST", path, token=token, posture=posture)

    assert (await rotate(amr=["pwd"]))[1]["code"] == "policy.mfa_required"
    assert (await rotate(amr=["pwd", "mfa"], auth_time=now - 3600))[1]["code"] == "policy.auth_too_old"
    assert (await rotate(amr=["pwd", "mfa"], auth_time=now - 30))[1]["code"] == "policy.elevation_required"
    until = dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(seconds=3)
    grant = {
        "subject": "kim",
        "issuer": idp.url,
        "role": "key-admin",
        "tenant": "acme",
        "ticket": "CHG-4242",
        "not_after": until.isoformat().replace("+00:00", "Z"),
    }
    assert await admin(pep, "POST", "/admin/grants", grant) == 201
    status, body = await rotate(amr=["pwd", "mfa"], auth_time=now - 30)
    assert status == 200
    assert body["version"] >= 1
    async with asyncio.timeout(10):  # the grant expires by itself
        while dt.datetime.now(dt.UTC) <= until:
            await asyncio.sleep(0.05)
    assert (await rotate(amr=["pwd", "mfa"], auth_time=now - 30))[1]["code"] == "policy.elevation_required"


async def test_a_lister_sees_secrets_without_values(pep: PepRuntime, pki: Path, idp: Issuer) -> None:
    token = idp.token(sub="lee", tenant="acme", roles=["lister"])
    status, body = await call(pep, pki, "GET", "/v1/tenants/acme/secrets/db-password", token=token)
    assert status == 200
    assert body["path"] == "db-password"
    assert "value" not in body


async def test_risk_makes_writes_read_only_then_quarantines(pep: PepRuntime, pki: Path, idp: Issuer) -> None:
    assert (
        await admin(
            pep,
            "PUT",
            "/admin/opa/data/vvault/risk",
            {"read_only_above": 5, "quarantine_above": 20, "quarantine_ttl_s": 60},
        )
        == 200
    )
    token = idp.token(sub="rita", tenant="acme", roles=["writer"])
    read = ("GET", "/v1/tenants/acme/secrets/app/config")
    write = ("PUT", "/v1/tenants/acme/secrets/app/config")
    other_tenant = ("GET", "/v1/tenants/globex/secrets/app/config")

    async def go(req: tuple[str, str]) -> str:
        status, body = await call(pep, pki, *req, token=token)
        return "ok" if status < 400 else body["code"]

    assert await go(write) == "ok"  # risk 0
    assert await go(other_tenant) == "policy.tenant_not_entitled"  # one denial: risk 6
    assert await go(write) == "policy.risk_read_only"  # writes stop …
    assert await go(read) in ("ok",)  # … reads go on (risk 12)
    assert await go(other_tenant) == "policy.tenant_not_entitled"
    assert await go(other_tenant) == "policy.tenant_not_entitled"  # risk now 24 > 20
    assert await go(read) == "policy.risk_quarantine"  # denied, and the subject quarantined
    assert await go(read) == "containment.quarantined"
