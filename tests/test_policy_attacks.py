"""The policy library tried as an attacker would: the shipped policies/ through the real PEP.

Each test is one bypass the library once allowed, sent over mTLS with real certificates and
really signed tokens, judged by a real OPA; it checks the status, the reason code and
whether the upstream (or OPA's data) was reached.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from tests.conftest import RedisServer, Upstream
from tests.idp import Issuer, posture_assertion
from tests.support import ROUTES, OpaProcess, client_context, config_doc, start_opa

from vvault_pep.app.runtime import PepRuntime
from vvault_pep.config import Config

ROTATIONS = {
    "name": "rotations",
    "path": "/v1/tenants/{tenant}/rotations/{path*}",
    "methods": ["POST"],
    "upstream": "vvault",
    "policy": "vvault/authz/decision",
}


@pytest.fixture(scope="module")
def attack_opa() -> Iterator[OpaProcess]:
    proc = start_opa()  # its own: these tests write grants and admins
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
async def other_idp() -> AsyncIterator[Issuer]:
    """A second, equally trusted issuer whose users share names with corp's."""
    issuer = Issuer()
    await issuer.start()
    yield issuer
    await issuer.stop()


def _doc(pki: Path, opa: OpaProcess, upstream: Upstream, idp: Issuer, other: Issuer, **sections: Any) -> dict[str, Any]:
    admin_tls = {
        "cert_file": str(pki / "server.pem"),
        "key_file": str(pki / "server-key.pem"),
        "client_ca_file": str(pki / "ca.pem"),
    }
    return config_doc(
        pki,
        opa_url=opa.url,
        upstream_port=upstream.port,
        routes=[ROTATIONS, *ROUTES],
        listener={"tls": {"client_auth": "optional"}},
        admin={"host": "127.0.0.1", "port": 0, "tls": admin_tls, "policy": "vvault/admin/decision"},
        identity={
            "issuers": [
                {"name": "corp", "issuer": idp.url, "audiences": ["vvault"], "allow_http": True},
                {"name": "partner", "issuer": other.url, "audiences": ["vvault"], "allow_http": True},
            ],
            "workload": {"trust_domains": ["prod.vvault", "demo.vvault"]},
        },
        **sections,
    )


@pytest.fixture(scope="module")
async def pep(
    pki: Path,
    attack_opa: OpaProcess,
    upstream: Upstream,
    idp: Issuer,
    other_idp: Issuer,
    devices: Issuer,
    redis_server: RedisServer,
) -> AsyncIterator[PepRuntime]:
    doc = _doc(
        pki,
        attack_opa,
        upstream,
        idp,
        other_idp,
        redis={"url": redis_server.url, "timeout_ms": 200},
        risk={"timeout_ms": 1000},  # known on every request, even on a busy machine (unknown is read-only)
        posture={
            "issuers": [{"name": "devices", "issuer": devices.url, "audiences": ["vvault-pep"], "allow_http": True}]
        },
    )
    runtime = PepRuntime(Config.model_validate(doc))
    await runtime.start()
    yield runtime
    await runtime.stop()


async def call(
    pep: PepRuntime,
    pki: Path,
    method: str,
    path: str,
    *,
    token: str | None = None,
    cert: str | None = None,
    posture: str | None = None,
) -> tuple[int, Any, str]:
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
            doc = json.loads(body) if body[:1] in (b"{", b"[") else body
            return resp.status, doc, resp.headers.get("X-Request-Id", "")


async def admin(
    pep: PepRuntime, pki: Path, method: str, path: str, doc: Any = None, *, cert: str = "ops", token: str | None = None
) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    connector = aiohttp.TCPConnector(ssl=client_context(pki, cert), force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http:
        async with http.request(method, f"https://localhost:{pep.admin_port}{path}", json=doc, headers=headers) as resp:
            return resp.status, await resp.text()


async def opa_data(opa: OpaProcess, path: str, doc: Any = None) -> Any:
    """OPA's own data API, as its operator would use it (not through the PEP)."""
    async with aiohttp.ClientSession() as http:
        if doc is not None:
            async with http.put(f"{opa.url}/v1/data/{path}", json=doc) as resp:
                assert resp.status == 204
                return None
        async with http.get(f"{opa.url}/v1/data/{path}") as resp:
            return (await resp.json()).get("result")


def rfc3339(when: dt.datetime) -> str:
    return when.replace(microsecond=0).isoformat().replace("+00:00", "Z")


def grant(idp: Issuer, ticket: str, sub: str, role: str, *, minutes: int = 30, tenant: str = "acme") -> dict[str, str]:
    until = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=minutes)
    return {
        "subject": sub,
        "issuer": idp.url,
        "role": role,
        "tenant": tenant,
        "ticket": ticket,
        "not_after": rfc3339(until),
    }


def mfa_token(idp: Issuer, sub: str, **claims: Any) -> str:
    return idp.token(sub=sub, tenant="acme", amr=["pwd", "mfa"], auth_time=int(time.time()) - 30, **claims)


def bound_mfa_token(idp: Issuer, pki: Path, sub: str, cert: str = "ops") -> str:
    """An MFA token bound (RFC 8705 cnf.x5t#S256) to the client certificate ``cert``."""
    return mfa_token(idp, sub, cnf={"x5t#S256": thumbprint(pki, cert)})


def thumbprint(pki: Path, cert: str) -> str:
    import base64

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    der = x509.load_pem_x509_certificate((pki / f"client-{cert}.pem").read_bytes()).public_bytes(
        serialization.Encoding.DER
    )
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()


# ------------------------------------------------------------------ workload grants: kind and segment


async def test_a_workload_grant_stops_at_a_segment_boundary(pep: PepRuntime, pki: Path, upstream: Upstream) -> None:
    status, _, _ = await call(pep, pki, "POST", "/v1/tenants/acme/collections/docs/query", cert="indexer")
    assert status == 200
    status, body, request_id = await call(
        pep, pki, "POST", "/v1/tenants/acme/collections/docs-hr/query", cert="indexer"
    )
    assert (status, body["code"]) == (403, "policy.tenant_not_entitled")
    assert upstream.seen_with(request_id) == []


async def test_a_collection_grant_is_not_a_secret_grant(pep: PepRuntime, pki: Path, upstream: Upstream) -> None:
    for path in ("docs-signing-key", "docs", "docs/signing-key"):
        status, body, request_id = await call(pep, pki, "GET", f"/v1/tenants/acme/secrets/{path}", cert="indexer")
        assert (status, body["code"]) == (403, "policy.tenant_not_entitled"), path
        assert upstream.seen_with(request_id) == []


# ------------------------------------------------------------------ a CN never spells a SPIFFE ID


async def test_a_cn_spelling_a_spiffe_id_is_not_that_workload(pep: PepRuntime, pki: Path, upstream: Upstream) -> None:
    status, _, _ = await call(pep, pki, "GET", "/v1/tenants/globex/secrets/db-password", cert="ops")
    assert status == 200  # the real ops workload may
    status, body, request_id = await call(pep, pki, "GET", "/v1/tenants/globex/secrets/db-password", cert="cn-spoof")
    assert (status, body["code"]) == (403, "policy.unknown_client")
    assert upstream.seen_with(request_id) == []


async def test_a_cn_spelling_a_spiffe_id_is_not_an_admin(
    pep: PepRuntime, pki: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert (await admin(pep, pki, "GET", "/admin/cache", cert="ops"))[0] == 200
    with caplog.at_level(logging.INFO, logger="vvault_pep.audit"):
        status, _ = await admin(pep, pki, "GET", "/admin/cache", cert="cn-spoof")
    assert status == 403
    records = [r.audit for r in caplog.records if getattr(r, "audit", {}).get("admin_action") == "cache.read"]
    assert [r["result"]["allow"] for r in records] == [True, False]  # each call on record, once
    record = records[-1]
    assert record["result"] == {"allow": False}
    assert record["admin"].startswith("x509:")  # named in its own namespace, not as the ops SPIFFE ID


# ------------------------------------------------------------------ JIT grants: issuer and role


async def test_a_jit_grant_is_for_its_issuers_subject_only(
    pep: PepRuntime, pki: Path, idp: Issuer, other_idp: Issuer, devices: Issuer, upstream: Upstream
) -> None:
    path = "/v1/tenants/acme/rotations/tokens/api"
    assert (await admin(pep, pki, "POST", "/admin/grants", grant(idp, "CHG-ISS", "kim", "key-admin")))[0] == 201
    posture = posture_assertion(devices, sub="kim")
    status, body, request_id = await call(pep, pki, "POST", path, token=mfa_token(other_idp, "kim"), posture=posture)
    assert (status, body["code"]) == (403, "policy.elevation_required")
    assert upstream.seen_with(request_id) == []
    status, _, _ = await call(pep, pki, "POST", path, token=mfa_token(idp, "kim"), posture=posture)
    assert status == 200
    assert (await admin(pep, pki, "DELETE", "/admin/grants/CHG-ISS"))[0] == 200


async def test_a_read_only_grant_does_not_let_a_key_admin_rotate(
    pep: PepRuntime, pki: Path, idp: Issuer, devices: Issuer, upstream: Upstream
) -> None:
    path = "/v1/tenants/acme/rotations/tokens/api"
    assert (await admin(pep, pki, "POST", "/admin/grants", grant(idp, "CHG-RO", "ken", "reader")))[0] == 201
    token = mfa_token(idp, "ken", roles=["key-admin"])
    status, body, request_id = await call(
        pep, pki, "POST", path, token=token, posture=posture_assertion(devices, sub="ken")
    )
    assert (status, body["code"]) == (403, "policy.elevation_required")
    assert upstream.seen_with(request_id) == []
    assert (await admin(pep, pki, "DELETE", "/admin/grants/CHG-RO"))[0] == 200


async def test_a_grant_needs_an_issuer(pep: PepRuntime, pki: Path, idp: Issuer, attack_opa: OpaProcess) -> None:
    body = grant(idp, "CHG-NOISS", "kim", "reader")
    del body["issuer"]
    assert (await admin(pep, pki, "POST", "/admin/grants", body))[0] == 403  # the admin policy refuses it
    assert await opa_data(attack_opa, "vvault/grants/CHG-NOISS") is None


# ------------------------------------------------------------------ the limits hold on every channel


async def test_opa_pushes_need_a_policy_admin_with_mfa(
    pep: PepRuntime, pki: Path, idp: Issuer, attack_opa: OpaProcess, caplog: pytest.LogCaptureFixture
) -> None:
    classes = await opa_data(attack_opa, "vvault/classes")
    # "*" is every action but the pushes: ops may quarantine, not rewrite the rules.
    assert (await admin(pep, pki, "PUT", "/admin/opa/data/vvault/classes", classes))[0] == 403
    await opa_data(attack_opa, "vvault/admins", {"spiffe://demo.vvault/client/ops": ["*", "policy-admin"]})
    try:
        status, _ = await admin(pep, pki, "PUT", "/admin/opa/data/vvault/classes", classes)
        assert status == 403  # a policy admin, but no MFA sign-in
        stale = idp.token(sub="pat", amr=["pwd", "mfa"], auth_time=int(time.time()) - 7200)
        assert (await admin(pep, pki, "PUT", "/admin/opa/data/vvault/classes", classes, token=stale))[0] == 403
        with caplog.at_level(logging.INFO, logger="vvault_pep.audit"):
            status, _ = await admin(
                pep, pki, "PUT", "/admin/opa/data/vvault/classes", classes, token=bound_mfa_token(idp, pki, "pat")
            )
        assert status == 200
        records = [r.audit for r in caplog.records if getattr(r, "audit", {}).get("admin_action") == "opa.data.put"]
        assert [r["result"]["allow"] for r in records] == [False, False, False, True]  # each refusal on record
        record = records[-1]
        written = json.dumps(classes, separators=(",", ":")).encode()
        assert record["result"] == {"allow": True}
        assert record["sha256"] == hashlib.sha256(written).hexdigest()
        rego = "package vvault.extra\n\nx := 1\n"
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=client_context(pki, "ops"), force_close=True)
        ) as http:
            url = f"https://localhost:{pep.admin_port}/admin/opa/policies/extra"
            async with http.put(url, data=rego) as resp:
                assert resp.status == 403  # no MFA
            async with http.put(
                url, data=rego, headers={"Authorization": f"Bearer {bound_mfa_token(idp, pki, 'pat')}"}
            ) as resp:
                assert resp.status == 200
    finally:
        await opa_data(attack_opa, "vvault/admins", {"spiffe://demo.vvault/client/ops": ["*"]})


async def test_a_pushed_policy_that_comes_in_pieces_is_pushed_whole(
    pep: PepRuntime, pki: Path, idp: Issuer, attack_opa: OpaProcess, caplog: pytest.LogCaptureFixture
) -> None:
    """A body read only as far as it had arrived would push its first piece alone: here a
    module valid by itself, without the rule the second piece adds."""
    first, second = b"package vvault.pieces\n\nx := 1\n", b"y := 2\n"

    async def pieces() -> AsyncIterator[bytes]:
        yield first
        await asyncio.sleep(0.2)  # the network's pause between two pieces: the answer must not depend on it
        yield second

    await opa_data(attack_opa, "vvault/admins", {"spiffe://demo.vvault/client/ops": ["*", "policy-admin"]})
    try:
        headers = {"Authorization": f"Bearer {bound_mfa_token(idp, pki, 'pat')}", "Content-Type": "text/plain"}
        connector = aiohttp.TCPConnector(ssl=client_context(pki, "ops"), force_close=True)
        with caplog.at_level(logging.INFO, logger="vvault_pep.audit"):
            async with aiohttp.ClientSession(connector=connector) as http:
                url = f"https://localhost:{pep.admin_port}/admin/opa/policies/pieces"
                async with http.put(url, data=pieces(), headers=headers) as resp:
                    assert resp.status == 200, await resp.text()
        assert await opa_data(attack_opa, "vvault/pieces") == {"x": 1, "y": 2}
        [record] = [r.audit for r in caplog.records if getattr(r, "audit", {}).get("admin_action") == "opa.policy.put"]
        assert record["sha256"] == hashlib.sha256(first + second).hexdigest()
    finally:
        await opa_data(attack_opa, "vvault/admins", {"spiffe://demo.vvault/client/ops": ["*"]})
        async with aiohttp.ClientSession() as http, http.delete(f"{attack_opa.url}/v1/policies/pieces") as resp:
            assert resp.status in (200, 404)


async def test_a_stolen_admin_certificate_with_the_thiefs_own_mfa_token_cannot_push(
    pep: PepRuntime, pki: Path, idp: Issuer, attack_opa: OpaProcess, caplog: pytest.LogCaptureFixture
) -> None:
    classes = await opa_data(attack_opa, "vvault/classes")
    await opa_data(attack_opa, "vvault/admins", {"spiffe://demo.vvault/client/ops": ["*", "policy-admin"]})
    try:
        path = "/admin/opa/data/vvault/classes"
        # the thief's own MFA sign-in, unbound: not the admin's
        assert (await admin(pep, pki, "PUT", path, classes, token=mfa_token(idp, "mallory")))[0] == 403
        # bound, but to the thief's own certificate
        with caplog.at_level(logging.INFO, logger="vvault_pep.audit"):
            status, text = await admin(
                pep, pki, "PUT", path, classes, token=bound_mfa_token(idp, pki, "mallory", "reader")
            )
        assert (status, json.loads(text)["code"]) == (401, "authn.cert_binding_mismatch")
        records = [r.audit for r in caplog.records if getattr(r, "audit", {}).get("admin_action") == "opa.data.put"]
        assert [(r["result"]["allow"], r["code"]) for r in records] == [
            (False, "admin.denied"),
            (False, "authn.cert_binding_mismatch"),
        ]
        # the admin's own token, bound to the admin certificate
        assert (await admin(pep, pki, "PUT", path, classes, token=bound_mfa_token(idp, pki, "pat")))[0] == 200
    finally:
        await opa_data(attack_opa, "vvault/admins", {"spiffe://demo.vvault/client/ops": ["*"]})


async def test_a_data_push_cannot_write_a_grant_the_grant_api_would_refuse(
    pep: PepRuntime, pki: Path, idp: Issuer, attack_opa: OpaProcess
) -> None:
    await opa_data(attack_opa, "vvault/admins", {"spiffe://demo.vvault/client/ops": ["*", "policy-admin"]})
    try:
        token = bound_mfa_token(idp, pki, "pat")
        seventy_years = grant(idp, "CHG-70Y", "kim", "key-admin", minutes=70 * 365 * 24 * 60)
        status, _ = await admin(pep, pki, "PUT", "/admin/opa/data/vvault/grants/CHG-70Y", seventy_years, token=token)
        assert status == 403
        standing = grant(idp, "CHG-ADM", "kim", "vvault-admin")
        status, _ = await admin(pep, pki, "PUT", "/admin/opa/data/vvault/grants/CHG-ADM", standing, token=token)
        assert status == 403
        wholesale = {"CHG-ALL": grant(idp, "CHG-ALL", "kim", "reader")}
        status, _ = await admin(pep, pki, "PUT", "/admin/opa/data/vvault/grants", wholesale, token=token)
        assert status == 403
        assert await opa_data(attack_opa, "vvault/grants") == {}
        ok = grant(idp, "CHG-OK", "kim", "reader")
        assert (await admin(pep, pki, "PUT", "/admin/opa/data/vvault/grants/CHG-OK", ok, token=token))[0] == 200
        assert (await opa_data(attack_opa, "vvault/grants/CHG-OK")) == ok
    finally:
        await opa_data(attack_opa, "vvault/admins", {"spiffe://demo.vvault/client/ops": ["*"]})
        await opa_data(attack_opa, "vvault/grants", {})


async def test_grant_limits_hold_on_a_token_admin_api_too(
    pki: Path, attack_opa: OpaProcess, upstream: Upstream, idp: Issuer, other_idp: Issuer
) -> None:
    secret = "attack-admin-token-0123456789abcdef-xyz"
    doc = _doc(pki, attack_opa, upstream, idp, other_idp)
    doc["admin"] = {"host": "127.0.0.1", "port": 0, "token": secret, "token_may_push": True}
    runtime = PepRuntime(Config.model_validate(doc))
    await runtime.start()
    try:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {secret}"}) as http:
            base = f"http://127.0.0.1:{runtime.admin_port}/admin/opa/data/vvault/grants"
            long = grant(idp, "CHG-70Y", "kim", "key-admin", minutes=70 * 365 * 24 * 60)
            async with http.put(f"{base}/CHG-70Y", json=long) as resp:
                assert resp.status == 400
                assert "24 hours" in await resp.text()
            async with http.put(base, json={"CHG-70Y": long}) as resp:
                assert resp.status == 400
        assert await opa_data(attack_opa, "vvault/grants") == {}
    finally:
        await runtime.stop()


# ------------------------------------------------------------------ unknown is not low; recency


async def test_unknown_risk_makes_writes_read_only(
    pki: Path, attack_opa: OpaProcess, upstream: Upstream, idp: Issuer, other_idp: Issuer
) -> None:
    runtime = PepRuntime(Config.model_validate(_doc(pki, attack_opa, upstream, idp, other_idp)))  # no Redis
    await runtime.start()
    try:
        token = idp.token(sub="wes", tenant="acme", roles=["writer"])
        status, _, _ = await call(runtime, pki, "GET", "/v1/tenants/acme/secrets/db-password", token=token)
        assert status == 200
        status, body, request_id = await call(runtime, pki, "PUT", "/v1/tenants/acme/secrets/app/config", token=token)
        assert (status, body["code"]) == (403, "policy.risk_read_only")
        assert upstream.seen_with(request_id) == []
    finally:
        await runtime.stop()


async def test_a_future_auth_time_is_refused(pep: PepRuntime, pki: Path, idp: Issuer, upstream: Upstream) -> None:
    token = idp.token(sub="root", tenant="acme", roles=["vvault-admin"], amr=["mfa"], auth_time=int(time.time()) + 3600)
    status, body, request_id = await call(pep, pki, "GET", "/v1/admin/tenants", token=token)
    assert (status, body["code"]) == (401, "authn.not_yet_valid")
    assert upstream.seen_with(request_id) == []
