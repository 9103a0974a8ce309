"""The subject's names come from verified checks only: what containment and the keys can follow.

A unit table for the corners of :func:`subject_of` and :func:`client_key`,
then the promise end to end: a device id the PEP did not verify (an
assertion bound to someone else) is never a quarantine scope — a policy that
quarantines "the device" of such a request quarantines nothing, so a
client cannot get another's device contained by naming it.  Real device
issuer, real OPA, real Redis, real TLS.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from tests.conftest import RedisServer, Upstream
from tests.idp import Issuer, posture_assertion
from tests.support import OpaProcess, client_context, config_doc

from vvault_pep.app.runtime import PepRuntime
from vvault_pep.config import Config
from vvault_pep.core.principal import NOBODY, Identity, Subject, UserToken, Workload, client_key, subject_of
from vvault_pep.core.request import PeerCertificate

ISS = "https://idp.example"
SVID = "spiffe://demo.vvault/client/reader"


def user(sub: str | None = "alice", tenant: str | None = "acme") -> UserToken:
    return UserToken(ISS, sub, tenant, (), (), (), (), None, None, None, "j-1", 2_000_000_000, None)


def peer(sha: str = "ab" * 32) -> PeerCertificate:
    now = dt.datetime.now(dt.UTC)
    return PeerCertificate("CN=x", "CN=ca", "x", (), (SVID,), SVID, sha, "x5t", "1", "", "", now, now)


@pytest.mark.parametrize(
    ("device", "expected"),
    [
        ({"verified": True, "id": "dev-1"}, "dev-1"),
        ({"verified": True, "id": ""}, None),
        ({"verified": True, "id": 42}, None),
        ({"verified": True, "id": ["dev-1"]}, None),
        ({"verified": "true", "id": "dev-1"}, None),
        ({"verified": False, "reason": "not_bound", "id": "dev-1"}, None),
        (None, None),
    ],
)
def test_only_a_verified_string_device_id_is_a_device(device: dict[str, Any] | None, expected: str | None) -> None:
    who = subject_of(Identity(user(), None), None, device, {})
    assert who.device == expected
    assert ("device", expected) in who.scopes if expected else all(s != "device" for s, _ in who.scopes)


def test_tenants_never_hold_a_missing_or_repeated_tenant() -> None:
    assert subject_of(Identity(user(tenant=None), None), None, None, {}).tenants == ()
    wl = Workload(SVID, "demo.vvault", "/client/reader")
    assert subject_of(Identity(user(tenant=None), wl), peer(), None, {}).tenants == ()
    same = subject_of(Identity(user(tenant="acme"), wl), peer(), None, {SVID: "acme"})
    assert same.tenants == ("acme",)
    assert [v for s, v in same.scopes if s == "tenant"] == ["acme"]


def test_client_key_is_the_certificate_else_the_address_else_unknown() -> None:
    assert client_key(Subject(certificate="ab" * 32), "10.0.0.1") == "cert:" + "ab" * 32
    assert client_key(NOBODY, "10.0.0.1") == "ip:10.0.0.1"
    assert client_key(NOBODY, None) == "unknown"
    assert client_key(NOBODY, "") == "unknown"


PATH = "/v1/tenants/{tenant}/secrets/{path*}"
ROUTES = [
    {"name": "d_trip", "host": "trip.d.test", "path": PATH, "methods": ["GET"], "upstream": "vvault",
     "policy": "faults/quarantine_device", "authn": {"require": "user"}},
    {"name": "d_plain", "host": "plain.d.test", "path": PATH, "methods": ["GET"], "upstream": "vvault",
     "policy": "faults/plain_true", "authn": {"require": "user"}},
]  # fmt: skip


@pytest.fixture
async def pep(
    pki: Path, opa: OpaProcess, upstream: Upstream, idp: Issuer, devices: Issuer, redis_server: RedisServer
) -> AsyncIterator[PepRuntime]:
    doc = config_doc(
        pki,
        opa_url=opa.url,
        upstream_port=upstream.port,
        routes=ROUTES,
        redis={"url": redis_server.url, "timeout_ms": 200, "retry_after_failure_s": 0.2},
        identity={"issuers": [{"name": "corp", "issuer": idp.url, "audiences": ["vvault"], "allow_http": True}]},
        posture={
            "issuers": [{"name": "devices", "issuer": devices.url, "audiences": ["vvault-pep"], "allow_http": True}],
            "max_age_s": 60,
        },
    )
    runtime = PepRuntime(Config.model_validate(doc))
    await runtime.start()
    yield runtime
    await runtime.stop()


async def hit(
    pep: PepRuntime, pki: Path, host: str, token: str, posture: str, caplog: pytest.LogCaptureFixture
) -> tuple[int, dict[str, Any]]:
    headers = {"Host": host, "Authorization": f"Bearer {token}", "X-Device-Posture": posture}
    connector = aiohttp.TCPConnector(ssl=client_context(pki, "reader"), force_close=True)
    with caplog.at_level(logging.INFO, logger="vvault_pep.audit"):
        async with aiohttp.ClientSession(connector=connector) as http:
            async with http.get(
                f"https://localhost:{pep.port}/v1/tenants/acme/secrets/db-password", headers=headers
            ) as resp:
                await resp.read()
                status, request_id = resp.status, resp.headers["X-Request-Id"]
    [record] = [r.audit for r in caplog.records if getattr(r, "audit", {}).get("request_id") == request_id]
    return status, record


async def test_an_unverified_device_id_is_never_quarantined(
    pep: PepRuntime, pki: Path, idp: Issuer, devices: Issuer, caplog: pytest.LogCaptureFixture
) -> None:
    device = "dev-victim-1"
    alice = idp.token(sub="alice")
    verified = posture_assertion(devices, sub="alice", device_id=device)
    lifted = posture_assertion(devices, sub="alice-victim", device_id=device)  # signed, but bound to another
    assert (await hit(pep, pki, "plain.d.test", alice, verified, caplog))[0] == 200

    # the policy quarantines "the device" of a request whose device is not verified: nothing to contain
    status, record = await hit(pep, pki, "trip.d.test", alice, lifted, caplog)
    assert status == 403
    assert (record["input"]["device"]["verified"], record["input"]["device"]["reason"]) == (False, "not_bound")
    assert record["obligations"] == [
        {"type": "quarantine", "scope": "device", "executed": False, "why": "no such scope"}
    ]
    assert all(scope != "device" for scope, _ in record["scopes"])
    assert (await hit(pep, pki, "plain.d.test", alice, verified, caplog))[0] == 200
    assert [q for q in await pep.containment.list() if q["scope"] == "device"] == []

    # the same obligation on a verified device does contain it: the test above can fail
    status, record = await hit(pep, pki, "trip.d.test", alice, verified, caplog)
    assert status == 403
    [done] = record["obligations"]
    assert (done["scope"], done["value"], done["executed"]) == ("device", device, True)
    status, record = await hit(pep, pki, "plain.d.test", alice, verified, caplog)
    assert (status, record["result"]["code"]) == (403, "containment.quarantined")
    assert await pep.containment.lift("device", device)
