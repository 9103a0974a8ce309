"""Device posture when the device service's keys are gone: a dependency fault, so 503, never a guess.

An assertion that does not verify is data (``verified: false`` and a reason,
the policy decides); but when the PEP cannot fetch the device service's keys
at all it cannot tell a good assertion from a forged one, and the request is
refused (503 ``authn.keys_unavailable``) before the policy or the upstream
sees it.  Real device issuer over HTTP, real OPA, real TLS.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest
from tests.conftest import Upstream
from tests.idp import Issuer, posture_assertion
from tests.support import ROUTES, OpaProcess, client_context, config_doc

from vvault_pep.app.runtime import PepRuntime
from vvault_pep.config import Config, Posture
from vvault_pep.core.principal import Identity, UserToken
from vvault_pep.core.request import PeerCertificate
from vvault_pep.identity.posture import PostureVerifier

QUERY = "/v1/tenants/acme/collections/customers/query"


@pytest.fixture
async def dead_devices() -> AsyncIterator[Issuer]:
    """A device trust service whose discovery and JWKS answer 503 from the start."""
    issuer = Issuer()
    await issuer.start()
    issuer.failing = True
    yield issuer
    await issuer.stop()


async def test_device_keys_unavailable_is_503_and_reaches_neither_policy_nor_upstream(
    pki: Path,
    opa: OpaProcess,
    upstream: Upstream,
    idp: Issuer,
    dead_devices: Issuer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    doc = config_doc(
        pki,
        opa_url=opa.url,
        upstream_port=upstream.port,
        routes=ROUTES,
        identity={"issuers": [{"name": "corp", "issuer": idp.url, "audiences": ["vvault"], "allow_http": True}]},
        posture={
            "issuers": [
                {"name": "devices", "issuer": dead_devices.url, "audiences": ["vvault-pep"], "allow_http": True}
            ],
            "max_age_s": 60,
        },
    )
    pep = PepRuntime(Config.model_validate(doc))
    await pep.start()
    try:
        headers = {
            "Content-Type": "application/json",
            "Authorization": f"Bearer {idp.token(sub='alice', roles=['pii-analyst'])}",
            "X-Device-Posture": posture_assertion(dead_devices),
        }
        connector = aiohttp.TCPConnector(ssl=client_context(pki, "reader"), force_close=True)
        with caplog.at_level(logging.INFO, logger="vvault_pep.audit"):
            async with aiohttp.ClientSession(connector=connector) as http:
                async with http.post(
                    f"https://localhost:{pep.port}{QUERY}", data=b'{"vector": [1, 0], "top_k": 1}', headers=headers
                ) as resp:
                    status, body = resp.status, await resp.read()
                    request_id = resp.headers["X-Request-Id"]
        assert status == 503
        assert resp.headers["Content-Type"].startswith("application/problem+json")
        assert orjson.loads(body)["code"] == "authn.keys_unavailable"
        assert dead_devices.fetches["jwks"] + dead_devices.fetches["discovery"] >= 1  # it did try
        assert upstream.seen_with(request_id) == []
        [record] = [r.audit for r in caplog.records if getattr(r, "audit", {}).get("request_id") == request_id]
        assert (record["status"], record["result"]["code"]) == (503, "authn.keys_unavailable")
        assert record.get("input") is None  # the policy was never asked
    finally:
        await pep.stop()


# -- the verifier itself: real assertions, real JWKS over HTTP, the whole answer compared ----------

X5T = "EyhP8tY76VIAaI_fN4EwKoTpl37TVuJ0f5AVPkuYJ_A"


@pytest.fixture
async def own_devices() -> AsyncIterator[Issuer]:
    """A device service with two ES256 keys: a verifier that forgot the kid could not choose."""
    issuer = Issuer()
    issuer.add_key("ec-2")
    await issuer.start()
    yield issuer
    await issuer.stop()


def verifier(devices: Issuer, binding: str = "either") -> PostureVerifier:
    cfg = Posture.model_validate(
        {
            "issuers": [{"name": "devices", "issuer": devices.url, "audiences": ["vvault-pep"], "allow_http": True}],
            "max_age_s": 60,
            "binding": binding,
        }
    )
    return PostureVerifier(cfg)


def alice() -> Identity:
    return Identity(UserToken("https://idp", "alice", None, (), (), (), (), None, None, None, None, 0, None), None)


def cert(x5t: str = X5T) -> PeerCertificate:
    now = dt.datetime.now(dt.UTC)
    return PeerCertificate("CN=x", "CN=ca", "x", (), (), None, "ab" * 32, x5t, "1", "", "", now, now)


async def test_a_verified_assertion_is_the_whole_device(own_devices: Issuer) -> None:
    v = verifier(own_devices)
    await v.start()
    try:
        got = await v.assess([posture_assertion(own_devices, key="ec-2", iat=time.time() - 10.5)], alice(), None)
    finally:
        await v.stop()
    age = got.pop("age_s")
    assert isinstance(age, float) and 10 <= age < 40
    assert age == round(age, 3)
    assert got == {
        "issuer": own_devices.url,
        "id": "dev-7f3a",
        "managed": True,
        "platform": "macOS",
        "os_version": "15.4",
        "patch_age_days": 3,
        "disk_encrypted": True,
        "screen_lock": True,
        "edr_running": True,
        "compliance_score": 92,
        "verified": True,
        "reason": None,
    }


async def test_an_assertion_without_iat_is_stale_not_an_error(own_devices: Issuer) -> None:
    v = verifier(own_devices)
    await v.start()
    try:
        got = await v.assess([posture_assertion(own_devices, iat=None)], alice(), None)
    finally:
        await v.stop()
    assert (got["verified"], got["reason"], got["age_s"]) == (False, "stale", None)


@pytest.mark.parametrize(
    ("binding", "sub", "cnf", "verified"),
    [
        ("subject", "alice", None, True),
        ("subject", "mallory", X5T, False),  # bound by subject only: a matching certificate is not enough
        ("cnf", "alice", None, False),  # bound by certificate only: a matching subject is not enough
        ("cnf", "mallory", X5T, True),
        ("either", "alice", None, True),
        ("either", "alice", "other-thumbprint", False),  # a cnf names one device: its subject does not rescue it
        ("either", "mallory", X5T, True),
    ],
)
async def test_binding_modes(own_devices: Issuer, binding: str, sub: str, cnf: str | None, verified: bool) -> None:
    v = verifier(own_devices, binding)
    await v.start()
    try:
        claims = {"cnf": {"x5t#S256": cnf}} if cnf else {}
        got = await v.assess([posture_assertion(own_devices, sub=sub, **claims)], alice(), cert())
    finally:
        await v.stop()
    assert (got["verified"], got["reason"]) == ((True, None) if verified else (False, "not_bound"))


async def test_an_assertion_over_8_kib_is_invalid(own_devices: Issuer) -> None:
    def of_length(n: int) -> str:
        pad = n
        while True:
            token = posture_assertion(own_devices, pad="x" * pad)
            if len(token) == n:
                return token
            pad += n - len(token) if abs(n - len(token)) > 2 else (1 if len(token) < n else -1)

    v = verifier(own_devices)
    await v.start()
    try:
        assert (await v.assess([of_length(8192)], alice(), None))["verified"] is True
        assert await v.assess([of_length(8193)], alice(), None) == {"verified": False, "reason": "invalid"}
    finally:
        await v.stop()
