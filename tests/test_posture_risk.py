"""Device posture and risk signals: a real device-trust issuer, real Redis, real OPA, starter policy."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from tests.conftest import RedisServer, Upstream
from tests.idp import Issuer, posture_assertion
from tests.support import ROUTES, OpaProcess, client_context, config_doc

from vvault_pep.app.runtime import PepRuntime
from vvault_pep.config import Config, Risk
from vvault_pep.shared.risk import network_of, off_hours, score

QUERY = "/v1/tenants/acme/collections/customers/query"  # class pii: needs a compliant device


def pep_doc(pki: Path, opa: OpaProcess, upstream: Upstream, idp: Issuer, devices: Issuer, redis_url: str) -> dict:  # type: ignore[type-arg]
    return config_doc(
        pki,
        opa_url=opa.url,
        upstream_port=upstream.port,
        routes=ROUTES,
        redis={"url": redis_url, "timeout_ms": 200, "retry_after_failure_s": 0.2},
        identity={"issuers": [{"name": "corp", "issuer": idp.url, "audiences": ["vvault"], "allow_http": True}]},
        posture={
            "issuers": [{"name": "devices", "issuer": devices.url, "audiences": ["vvault-pep"], "allow_http": True}],
            "max_age_s": 60,
        },
        risk={"timeout_ms": 200},
    )


@pytest.fixture(scope="module")
async def pair(
    pki: Path, opa: OpaProcess, upstream: Upstream, idp: Issuer, devices: Issuer, redis_server: RedisServer
) -> AsyncIterator[tuple[PepRuntime, PepRuntime]]:
    peps = [
        PepRuntime(Config.model_validate(pep_doc(pki, opa, upstream, idp, devices, redis_server.url))) for _ in (1, 2)
    ]
    for pep in peps:
        await pep.start()
    yield peps[0], peps[1]
    for pep in peps:
        await pep.stop()


def assertion(devices: Issuer, *, sub: str = "alice", key: str = "ec-1", **over: Any) -> str:
    return posture_assertion(devices, sub=sub, key=key, **over)


async def query(
    pep: PepRuntime, pki: Path, token: str | None, posture: str | list[str] | None, caplog: pytest.LogCaptureFixture
) -> tuple[int, dict[str, Any]]:
    headers: list[tuple[str, str]] = [("Content-Type", "application/json")]
    if token:
        headers.append(("Authorization", f"Bearer {token}"))
    for value in [posture] if isinstance(posture, str) else posture or []:
        headers.append(("X-Device-Posture", value))
    connector = aiohttp.TCPConnector(ssl=client_context(pki, "reader"), force_close=True)
    with caplog.at_level(logging.INFO, logger="vvault_pep.audit"):
        async with aiohttp.ClientSession(connector=connector) as http:
            async with http.post(
                f"https://localhost:{pep.port}{QUERY}", data=b'{"vector": [1, 0], "top_k": 1}', headers=headers
            ) as resp:
                await resp.read()
                status, request_id = resp.status, resp.headers["X-Request-Id"]
    [record] = [r.audit for r in caplog.records if getattr(r, "audit", {}).get("request_id") == request_id]
    return status, record


async def test_a_valid_posture_assertion_reaches_the_policy(
    pair: tuple[PepRuntime, PepRuntime],
    pki: Path,
    idp: Issuer,
    devices: Issuer,
    upstream: Upstream,
    caplog: pytest.LogCaptureFixture,
) -> None:
    a, _ = pair
    status, record = await query(a, pki, idp.token(sub="alice", roles=["pii-analyst"]), assertion(devices), caplog)
    assert status == 200
    device = record["input"]["device"]
    assert device["verified"] is True
    assert (device["id"], device["managed"], device["compliance_score"]) == ("dev-7f3a", True, 92)
    assert 0 <= device["age_s"] < 60
    assert record["device_id"] == "dev-7f3a"
    # the assertion itself is never forwarded nor logged
    [seen] = upstream.seen_with(record["request_id"])
    assert "x-device-posture" not in {k.lower() for k, _ in seen["headers"]}
    assert "X-Device-Posture" not in json.dumps(record)


@pytest.mark.parametrize(
    ("name", "make", "reason"),
    [
        ("absent", lambda d, t: None, "absent"),
        ("spoofed plain header", lambda d, t: "managed=true; encrypted=true", "invalid"),
        ("expired", lambda d, t: assertion(d, iat=int(time.time()) - 300, exp=int(time.time()) - 120), "expired"),
        ("stale", lambda d, t: assertion(d, iat=int(time.time()) - 90), "stale"),
        ("unsigned", lambda d, t: ".".join(assertion(d).split(".")[:2]) + ".", "bad_signature"),
        ("alg none", lambda d, t: _none(assertion(d)), "invalid"),
        ("tampered", lambda d, t: _tamper(assertion(d)), "bad_signature"),
        ("signed by the identity provider, not the device service", lambda d, t: t.token(sub="alice"), "invalid"),
        ("replayed for another subject", lambda d, t: assertion(d, sub="mallory"), "not_bound"),
        ("two assertions", lambda d, t: [assertion(d), assertion(d)], "invalid"),
    ],
)
async def test_bad_posture_is_unverified_and_the_sensitive_route_is_denied(
    pair: tuple[PepRuntime, PepRuntime],
    pki: Path,
    idp: Issuer,
    devices: Issuer,
    caplog: pytest.LogCaptureFixture,
    name: str,
    make: Any,
    reason: str,
) -> None:
    a, _ = pair
    status, record = await query(a, pki, idp.token(sub="alice", roles=["pii-analyst"]), make(devices, idp), caplog)
    assert record["input"]["device"]["verified"] is False, name
    assert record["input"]["device"]["reason"] == reason, name
    assert status == 403
    assert (
        "policy.device_required" in record["result"]["reasons"][0]
        or record["result"]["code"] == "policy.device_required"
    )


def _none(token: str) -> str:
    import base64

    body = token.split(".")[1]
    head = base64.urlsafe_b64encode(b'{"alg":"none"}').rstrip(b"=").decode()
    return f"{head}.{body}."


def _tamper(token: str) -> str:
    head, body, sig = token.split(".")
    import base64

    claims = json.loads(base64.urlsafe_b64decode(body + "=="))
    claims["compliance_score"] = 100
    return ".".join((head, base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode(), sig))


async def test_posture_bound_by_certificate(
    pair: tuple[PepRuntime, PepRuntime], pki: Path, devices: Issuer, caplog: pytest.LogCaptureFixture
) -> None:
    import base64
    import hashlib

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    der = x509.load_pem_x509_certificate((pki / "client-reader.pem").read_bytes()).public_bytes(
        serialization.Encoding.DER
    )
    thumb = base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()
    a, _ = pair
    status, record = await query(a, pki, None, assertion(devices, sub="device-cert", cnf={"x5t#S256": thumb}), caplog)
    assert record["input"]["device"]["verified"] is True
    assert status == 200
    _, record = await query(a, pki, None, assertion(devices, sub="device-cert", cnf={"x5t#S256": "x" * 43}), caplog)
    assert record["input"]["device"]["reason"] == "not_bound"


async def test_denials_feed_a_shared_risk_score(
    pair: tuple[PepRuntime, PepRuntime], pki: Path, idp: Issuer, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = pair
    token = idp.token(sub="risky")
    first = (await query(a, pki, token, None, caplog))[1]["input"]["risk"]
    assert first["available"] is True
    assert first["signals"]["recent_denials"] == 0
    for pep in (a, b, a):  # denied three times (no device), on both instances
        await query(pep, pki, token, None, caplog)
    for pep in (a, b):  # what each counted reaches Redis, and comes back, at its flush
        assert pep.risk is not None and await pep.risk.flush()
    later = (await query(b, pki, token, None, caplog))[1]["input"]["risk"]
    assert later["signals"]["recent_denials"] == 4
    assert later["score"] == 24
    assert later["band"] == "low"


async def test_risk_unavailable_when_redis_is_down_and_the_request_is_still_judged(
    pki: Path, opa: OpaProcess, upstream: Upstream, idp: Issuer, devices: Issuer, caplog: pytest.LogCaptureFixture
) -> None:
    redis = RedisServer()
    redis.start()
    pep = PepRuntime(Config.model_validate(pep_doc(pki, opa, upstream, idp, devices, redis.url)))
    await pep.start()
    try:
        redis.stop()
        status, record = await query(
            pep, pki, idp.token(sub="alice", roles=["pii-analyst"]), assertion(devices), caplog
        )
        assert record["input"]["risk"] == {"available": False, "score": None, "band": "unknown", "signals": {}}
        assert status == 200  # judged by the policy as usual (which may demand risk; the starter does not)
    finally:
        await pep.stop()
        redis.stop()


@pytest.mark.parametrize(
    ("signals", "expected"),
    [
        ({}, (0, "low")),
        ({"rate_spike": True}, (30, "medium")),
        ({"new_network": True, "device_change": True}, (35, "medium")),
        ({"recent_denials": 9}, (30, "medium")),
        (
            {"rate_spike": True, "new_network": True, "recent_denials": 5, "device_change": True, "off_hours": True},
            (100, "high"),
        ),
    ],
)
def test_score_formula(signals: dict[str, Any], expected: tuple[int, str]) -> None:
    assert score(signals) == expected


def test_networks_and_hours() -> None:
    import datetime as dt

    assert network_of("10.1.2.3") == "10.1.2.0/24"
    assert network_of("2001:db8::1") == "2001:db8::/64"
    assert network_of("not an ip") == ""
    cfg = Risk(tenant_timezones={"acme": "Europe/Berlin"})
    monday_noon_utc = dt.datetime(2026, 11, 23, 11, 0, tzinfo=dt.UTC)
    saturday = dt.datetime(2026, 11, 28, 11, 0, tzinfo=dt.UTC)
    night = dt.datetime(2026, 11, 23, 23, 0, tzinfo=dt.UTC)
    assert off_hours(cfg, "acme", monday_noon_utc) is False
    assert off_hours(cfg, "acme", saturday) is True
    assert off_hours(cfg, "acme", night) is True
    assert off_hours(cfg, "globex", night) is False  # no time zone configured: no signal
