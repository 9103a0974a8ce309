"""Identity: real OIDC issuer over HTTP, real signed tokens, real mTLS, real OPA."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from tests.conftest import Upstream
from tests.idp import Issuer, Trap, b64, public_jwk, unsigned
from tests.support import ROUTES, OpaProcess, client_context, config_doc

from vvault_pep.app.runtime import PepRuntime
from vvault_pep.config import Config

HMAC_ISSUER = "https://hmac.example"
HMAC_SECRET = "0123456789abcdef0123456789abcdef-test-only"

SECRET_PATH = "/v1/tenants/{tenant}/secrets/{path*}"
# One host per requirement, all on the example upstream's real secrets path.
ID_ROUTES: list[dict[str, Any]] = [
    {
        "name": f"id_{name}",
        "host": f"{name}.id.test",
        "path": SECRET_PATH,
        "methods": ["GET"],
        "upstream": "vvault",
        "policy": "faults/echo_identity",
        "authn": authn,
    }
    for name, authn in (
        ("user", {"require": "user"}),
        ("workload", {"require": "workload"}),
        ("both", {"require": "user+workload"}),
        ("bound", {"require": "user", "bound_token": True}),
        ("open", {"require": "none"}),
    )
]
SECRET = "/v1/tenants/acme/secrets/db-password"
USER = "user.id.test"


def identity_config(idp: Issuer, **jwks: Any) -> dict[str, Any]:
    return {
        "issuers": [
            {
                "name": "corp",
                "issuer": idp.url,
                "audiences": ["vvault"],
                "allow_http": True,
                "typ": "at+jwt",
                "leeway_s": 0,
                "passthrough_claims": ["email"],
                "jwks": {"unknown_kid_cooldown_s": 3600, **jwks},
            },
            {
                "name": "hmac",
                "issuer": HMAC_ISSUER,
                "audiences": ["vvault"],
                "algorithms": ["HS256"],
                "shared_secret": HMAC_SECRET,
            },
        ],
        "workload": {"trust_domains": ["demo.vvault"]},
    }


async def start_pep(pki: Path, opa: OpaProcess, upstream: Upstream, idp: Issuer, **jwks: Any) -> PepRuntime:
    doc = config_doc(
        pki,
        opa_url=opa.url,
        upstream_port=upstream.port,
        listener={"tls": {"client_auth": "optional"}},
        routes=ID_ROUTES + ROUTES,
        identity=identity_config(idp, **jwks),
    )
    runtime = PepRuntime(Config.model_validate(doc))
    await runtime.start()
    return runtime


@pytest.fixture(scope="session")
async def id_pep(pki: Path, opa: OpaProcess, upstream: Upstream, idp: Issuer) -> AsyncIterator[PepRuntime]:
    runtime = await start_pep(pki, opa, upstream, idp)
    yield runtime
    await runtime.stop()


async def call(
    pep: PepRuntime, pki: Path, host: str, token: str | None = None, cert: str | None = "reader", query: str = ""
) -> tuple[int, dict[str, Any], Any]:
    hdrs = {"Host": host}
    if token is not None:
        hdrs["Authorization"] = f"Bearer {token}"
    connector = aiohttp.TCPConnector(ssl=client_context(pki, cert), force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http:
        url = f"https://localhost:{pep.port}{SECRET}{query}"
        async with http.get(url, headers=hdrs, server_hostname="localhost") as resp:
            body = await resp.read()
            doc = json.loads(body) if resp.headers.get("Content-Type") == "application/problem+json" else {}
            return resp.status, doc, resp.headers


def seen_headers(upstream: Upstream, headers: Any) -> dict[str, str]:
    [entry] = upstream.seen_with(headers["X-Request-Id"])
    return dict(entry["headers"])


@pytest.mark.parametrize("kid", ["rsa-1", "ec-1", "ed-1"])
async def test_valid_tokens_are_accepted_and_reach_the_policy(
    id_pep: PepRuntime, pki: Path, idp: Issuer, upstream: Upstream, kid: str
) -> None:
    status, _, headers = await call(id_pep, pki, USER, idp.token(kid, sub=f"alice-{kid}"))
    assert status == 200
    seen = seen_headers(upstream, headers)
    assert seen["X-Vvault-Subject"] == f"alice-{kid}"
    assert seen["X-Vvault-Kind"] == "user+workload"  # token plus the reader's SPIFFE certificate


async def test_hmac_only_for_the_issuer_with_a_shared_secret(id_pep: PepRuntime, pki: Path, idp: Issuer) -> None:
    claims = idp.claims(iss=HMAC_ISSUER)
    good = jwt.encode(claims, HMAC_SECRET, algorithm="HS256", headers={"typ": "at+jwt"})
    assert (await call(id_pep, pki, USER, good))[0] == 200
    bad = jwt.encode(claims, HMAC_SECRET + "x", algorithm="HS256", headers={"typ": "at+jwt"})
    status, doc, _ = await call(id_pep, pki, USER, bad)
    assert (status, doc["code"]) == (401, "authn.bad_signature")


def _hs256_with_public_key(idp: Issuer) -> str:
    pem = (
        idp.keys["rsa-1"][0]
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    signing_input = (
        b64(json.dumps({"alg": "HS256", "typ": "at+jwt", "kid": "rsa-1"}).encode())
        + "."
        + b64(json.dumps(idp.claims()).encode())
    )
    sig = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64(sig)


def _signed_raw(idp: Issuer, payload: bytes, header: dict[str, Any] | None = None) -> str:
    key, _ = idp.keys["rsa-1"]
    return jwt.api_jws.encode(
        payload, key, algorithm="RS256", headers={"kid": "rsa-1", "typ": "at+jwt", **(header or {})}
    )


def _duplicate_sub(iss: str) -> str:
    exp = int(time.time()) + 300
    return '{"iss":"' + iss + '","sub":"alice","sub":"admin","aud":"vvault","exp":' + str(exp) + "}"


ATTACKER = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _attacker_token(idp: Issuer, kid: str, extra: dict[str, Any]) -> str:
    return jwt.encode(idp.claims(), ATTACKER, algorithm="RS256", headers={"kid": kid, "typ": "at+jwt", **extra})


REJECTED: list[tuple[str, Any, int, str]] = [
    *[
        (
            f"alg_{spelling}",
            lambda i, s=spelling: unsigned({"alg": s, "typ": "at+jwt"}, i.claims()),
            401,
            "authn.bad_algorithm",
        )
        for spelling in ("none", "None", "NONE", "nOnE", " none")
    ],
    ("hs256_with_public_key", _hs256_with_public_key, 401, "authn.bad_algorithm"),
    (
        "es256_zero_signature",
        lambda i: unsigned({"alg": "ES256", "kid": "ec-1", "typ": "at+jwt"}, i.claims(), b"\0" * 64),
        401,
        "authn.bad_signature",
    ),
    ("expired", lambda i: i.token(exp=int(time.time()) - 10), 401, "authn.expired"),
    ("missing_exp", lambda i: i.token(exp=None), 401, "authn.missing_claim"),
    ("future_nbf", lambda i: i.token(nbf=int(time.time()) + 600), 401, "authn.not_yet_valid"),
    ("lookalike_issuer", lambda i: i.token(iss="https://idp.example.com.evil"), 401, "authn.unknown_issuer"),
    ("issuer_suffix", lambda i: i.token(iss=i.url + ".evil"), 401, "authn.unknown_issuer"),
    ("issuer_trailing_slash", lambda i: i.token(iss=i.url + "/"), 401, "authn.unknown_issuer"),
    ("wrong_audience", lambda i: i.token(aud="other-api"), 401, "authn.wrong_audience"),
    ("missing_audience", lambda i: i.token(aud=None), 401, "authn.wrong_audience"),
    ("id_token_typ", lambda i: i.token(headers={"typ": "JWT"}), 401, "authn.wrong_type"),
    ("no_typ", lambda i: _signed_raw(i, json.dumps(i.claims()).encode(), {"typ": None}), 401, "authn.wrong_type"),
    ("unknown_crit", lambda i: i.token(headers={"crit": ["exp-ext"], "exp-ext": 1}), 401, "authn.unsupported_crit"),
    ("jwe", lambda i: "eyJhbGciOiJSU0EtT0FFUCIsImVuYyI6IkEyNTZHQ00ifQ.a.b.c.d", 401, "authn.encrypted_token"),
    (
        "duplicate_payload_keys",
        lambda i: _signed_raw(
            i,
            (_duplicate_sub(i.url)).encode(),
        ),
        401,
        "authn.malformed",
    ),
    (
        "duplicate_header_keys",
        lambda i: ".".join(
            (
                b64(b'{"alg":"RS256","alg":"none","kid":"rsa-1","typ":"at+jwt"}'),
                i.token().split(".")[1],
                i.token().split(".")[2],
            )
        ),
        401,
        "authn.malformed",
    ),
    ("not_a_jwt", lambda i: "abc.def", 401, "authn.malformed"),
    ("garbage_segments", lambda i: "!!!.###.$$$", 401, "authn.malformed"),
    ("kid_traversal", lambda i: i.token(headers={"kid": "../../../../etc/passwd"}), 401, "authn.unknown_key"),
    ("kid_sql", lambda i: i.token(headers={"kid": "' OR '1'='1' --"}), 401, "authn.unknown_key"),
    ("kid_crlf", lambda i: i.token(headers={"kid": "rsa-1\r\nX-Injected: 1"}), 401, "authn.unknown_key"),
    ("kid_10kb", lambda i: i.token(headers={"kid": "k" * 10_000}), 431, "sanitize.headers_too_large"),
    (
        "tampered_payload",
        lambda i: ".".join(
            (i.token().split(".")[0], b64(json.dumps(i.claims(sub="root")).encode()), i.token().split(".")[2])
        ),
        401,
        "authn.bad_signature",
    ),
]


@pytest.mark.parametrize(("name", "make", "status", "code"), REJECTED, ids=[r[0] for r in REJECTED])
async def test_bad_tokens_are_rejected_without_reaching_upstream(
    id_pep: PepRuntime, pki: Path, idp: Issuer, upstream: Upstream, name: str, make: Any, status: int, code: str
) -> None:
    before = upstream.count()
    got, doc, headers = await call(id_pep, pki, USER, make(idp))
    assert (got, doc.get("code")) == (status, code)
    if status == 401:
        assert headers["WWW-Authenticate"].startswith('Bearer realm="vvault-pep", error="invalid_token"')
    assert upstream.count() == before
    assert "eyJ" not in json.dumps(doc)  # the token is never echoed


async def test_tokens_never_reach_a_log_line(
    id_pep: PepRuntime, pki: Path, idp: Issuer, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    tokens = [idp.token(sub="carol"), idp.token(exp=int(time.time()) - 5), _hs256_with_public_key(idp)]
    with caplog.at_level(logging.DEBUG):
        for token in tokens:
            await call(id_pep, pki, USER, token)
    text = caplog.text + json.dumps([getattr(r, "audit", None) for r in caplog.records])
    for token in tokens:
        for part in token.split("."):
            assert part not in text


@pytest.mark.parametrize("header", ["jku", "x5u", "jwk", "x5c"])
async def test_token_named_key_sources_are_never_fetched_or_used(
    id_pep: PepRuntime, pki: Path, idp: Issuer, trap: Trap, upstream: Upstream, header: str
) -> None:
    attacker_jwk = public_jwk(ATTACKER, "attacker", "RS256")
    value: Any = {
        "jku": f"{trap.url}/jwks.json",
        "x5u": f"{trap.url}/cert.pem",
        "jwk": attacker_jwk,
        "x5c": [base64.b64encode(b"not really a cert").decode()],
    }[header]
    before = upstream.count()
    status, doc, _ = await call(id_pep, pki, USER, _attacker_token(idp, "attacker", {header: value}))
    assert (status, doc["code"]) == (401, "authn.unknown_key")
    # the attacker's key under a real kid fails on the signature
    status, doc, _ = await call(id_pep, pki, USER, _attacker_token(idp, "rsa-1", {header: value}))
    assert (status, doc["code"]) == (401, "authn.bad_signature")
    assert trap.hits == []
    assert upstream.count() == before


async def test_one_megabyte_header_is_refused(id_pep: PepRuntime, pki: Path, upstream: Upstream) -> None:
    before = upstream.count()
    status, doc, _ = await call(id_pep, pki, USER, "a" * (1 << 20))
    assert status == 431
    assert doc["code"] == "sanitize.headers_too_large"
    assert upstream.count() == before


async def test_missing_token_gets_a_bare_challenge(id_pep: PepRuntime, pki: Path) -> None:
    status, doc, headers = await call(id_pep, pki, USER)
    assert (status, doc["code"]) == (401, "authn.required")
    assert headers["WWW-Authenticate"] == 'Bearer realm="vvault-pep"'


async def test_token_in_query_string_is_refused(id_pep: PepRuntime, pki: Path, idp: Issuer) -> None:
    token = idp.token()
    status, doc, headers = await call(id_pep, pki, USER, query=f"?access_token={token}")
    assert (status, doc["code"]) == (400, "authn.token_in_query")
    assert 'error="invalid_request"' in headers["WWW-Authenticate"]
    status, doc, _ = await call(id_pep, pki, USER, token, query=f"?access_token={token}")
    assert (status, doc["code"]) == (400, "authn.token_in_query")


async def test_invalid_token_on_an_open_route_is_still_refused(id_pep: PepRuntime, pki: Path, idp: Issuer) -> None:
    status, doc, _ = await call(id_pep, pki, "open.id.test", idp.token(exp=int(time.time()) - 5))
    assert (status, doc["code"]) == (401, "authn.expired")
    status, _, _ = await call(id_pep, pki, "open.id.test", None, cert=None)
    assert status == 200


async def test_identity_reaches_the_policy_input(id_pep: PepRuntime, pki: Path, idp: Issuer, caplog) -> None:  # type: ignore[no-untyped-def]
    import logging

    with caplog.at_level(logging.INFO, logger="vvault_pep.audit"):
        status, _, headers = await call(id_pep, pki, USER, idp.token(sub="bob", email="bob@example.com"))
    assert status == 200
    [record] = [r.audit for r in caplog.records if getattr(r, "audit", {}).get("request_id") == headers["X-Request-Id"]]
    assert record["identity"]["subject"] == "bob"
    assert record["identity"]["issuer"] == idp.url
    assert record["identity"]["tenant"] == "acme"
    assert record["identity"]["workload"] == "spiffe://demo.vvault/client/reader"


# --- workload identity -------------------------------------------------------


async def test_workload_route_accepts_a_trusted_spiffe_certificate(
    id_pep: PepRuntime, pki: Path, upstream: Upstream
) -> None:
    status, _, headers = await call(id_pep, pki, "workload.id.test")
    assert status == 200
    seen = seen_headers(upstream, headers)
    assert seen["X-Vvault-Kind"] == "workload"
    assert seen["X-Vvault-Workload"] == "spiffe://demo.vvault/client/reader"


# Certificates with a foreign or malformed SPIFFE ID never get this far: they are
# refused at the handshake (tests/test_tls_hardening.py).
@pytest.mark.parametrize("cert", [None])
async def test_workload_route_refuses_others(id_pep: PepRuntime, pki: Path, cert: str | None) -> None:
    status, doc, _ = await call(id_pep, pki, "workload.id.test", cert=cert)
    assert (status, doc["code"]) == (401, "authn.untrusted_workload")


async def test_user_plus_workload_needs_both(id_pep: PepRuntime, pki: Path, idp: Issuer, upstream: Upstream) -> None:
    status, _, headers = await call(id_pep, pki, "both.id.test", idp.token(sub="svc-user"))
    assert status == 200
    assert seen_headers(upstream, headers)["X-Vvault-Kind"] == "user+workload"
    assert (await call(id_pep, pki, "both.id.test", idp.token(), cert=None))[1]["code"] == "authn.untrusted_workload"
    assert (await call(id_pep, pki, "both.id.test"))[1]["code"] == "authn.required"


# --- RFC 8705 certificate-bound tokens ---------------------------------------


def _thumbprint(pki: Path, name: str) -> str:
    from cryptography import x509

    der = x509.load_pem_x509_certificate((pki / f"client-{name}.pem").read_bytes()).public_bytes(
        serialization.Encoding.DER
    )
    return b64(hashlib.sha256(der).digest())


async def test_bound_token_only_over_its_certificate(
    id_pep: PepRuntime, pki: Path, idp: Issuer, upstream: Upstream
) -> None:
    token = idp.token(cnf={"x5t#S256": _thumbprint(pki, "reader")})
    status, _, headers = await call(id_pep, pki, "bound.id.test", token, cert="reader")
    assert status == 200
    assert seen_headers(upstream, headers)["X-Vvault-Bound"] == "true"
    # the same (now cached) token over another certificate, or none
    for cert in ("ops", None):
        status, doc, _ = await call(id_pep, pki, "bound.id.test", token, cert=cert)
        assert (status, doc["code"]) == (401, "authn.cert_binding_mismatch")
    # a bound token is checked on every route, not only those that require binding
    status, doc, _ = await call(id_pep, pki, USER, token, cert="ops")
    assert (status, doc["code"]) == (401, "authn.cert_binding_mismatch")


async def test_route_requiring_binding_refuses_an_unbound_token(id_pep: PepRuntime, pki: Path, idp: Issuer) -> None:
    status, doc, _ = await call(id_pep, pki, "bound.id.test", idp.token())
    assert (status, doc["code"]) == (401, "authn.unbound_token")


# --- JWKS lifecycle (each test its own issuer state and PEP) -----------------


@pytest.fixture
async def fresh_idp() -> AsyncIterator[Issuer]:
    issuer = Issuer()
    await issuer.start()
    yield issuer
    await issuer.stop()


async def test_key_rotation_mid_traffic(pki: Path, opa: OpaProcess, upstream: Upstream, fresh_idp: Issuer) -> None:
    pep = await start_pep(pki, opa, upstream, fresh_idp, unknown_kid_cooldown_s=0)
    try:
        old = fresh_idp.token("rsa-1")
        assert (await call(pep, pki, USER, old))[0] == 200
        fetches = fresh_idp.fetches["jwks"]
        fresh_idp.add_key("ec-2")
        fresh_idp.published.discard("rsa-1")
        assert (await call(pep, pki, USER, fresh_idp.token("ec-2")))[0] == 200
        assert fresh_idp.fetches["jwks"] == fetches + 1  # exactly one refetch for the new kid
        status, doc, _ = await call(pep, pki, USER, old)  # cached before, but its key is withdrawn
        assert (status, doc["code"]) == (401, "authn.unknown_key")
    finally:
        await pep.stop()


async def test_kid_flood_costs_at_most_one_fetch_and_evicts_nothing(
    pki: Path, opa: OpaProcess, upstream: Upstream, fresh_idp: Issuer
) -> None:
    pep = await start_pep(pki, opa, upstream, fresh_idp, unknown_kid_cooldown_s=3600)
    try:
        fetches = fresh_idp.fetches["jwks"]
        results = await asyncio.gather(
            *(call(pep, pki, USER, _attacker_token(fresh_idp, uuid.uuid4().hex, {})) for _ in range(40))
        )
        assert {(s, d["code"]) for s, d, _ in results} == {(401, "authn.unknown_key")}
        assert fresh_idp.fetches["jwks"] <= fetches + 1
        assert (await call(pep, pki, USER, fresh_idp.token("ec-1")))[0] == 200
    finally:
        await pep.stop()


async def test_idp_down_keeps_cached_keys_until_max_staleness(
    pki: Path, opa: OpaProcess, upstream: Upstream, fresh_idp: Issuer
) -> None:
    pep = await start_pep(pki, opa, upstream, fresh_idp, max_staleness_s=120)
    try:
        assert pep.authn is not None
        keyset = pep.authn.keysets[fresh_idp.url]
        cached = fresh_idp.token("ed-1")
        assert (await call(pep, pki, USER, cached))[0] == 200
        fresh_idp.failing = True
        assert await keyset.refresh() is False
        assert (await call(pep, pki, USER, fresh_idp.token("rsa-1")))[0] == 200  # last good keys still serve
        real = keyset.clock
        keyset.clock = lambda: real() + 121  # past the staleness limit
        for token in (fresh_idp.token("rsa-1"), cached):
            status, doc, _ = await call(pep, pki, USER, token)
            assert (status, doc["code"]) == (503, "authn.keys_unavailable")
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{pep.admin_port}/readyz") as resp:
                assert resp.status == 503
                assert (await resp.json())["checks"]["jwks"] == {"corp": False}
        fresh_idp.failing = False  # the IdP is back: the next request refetches and works
        keyset.clock = real
        assert (await call(pep, pki, USER, fresh_idp.token("rsa-1")))[0] == 200
    finally:
        await pep.stop()


async def test_keys_refresh_in_the_background_within_cache_control_bounds(
    pki: Path, opa: OpaProcess, upstream: Upstream, fresh_idp: Issuer
) -> None:
    fresh_idp.max_age = 0  # asks for no caching; clamped up to min_ttl_s
    pep = await start_pep(pki, opa, upstream, fresh_idp, min_ttl_s=0.5, default_ttl_s=0.5)
    try:
        start = fresh_idp.fetches["jwks"]
        fresh_idp.add_key("ec-bg")
        async with asyncio.timeout(10):  # no request needed: the refresher finds the new key
            while "ec-bg" not in pep.authn.keysets[fresh_idp.url].kids:  # type: ignore[union-attr]
                await asyncio.sleep(0.05)
        assert fresh_idp.fetches["jwks"] > start
        fetches = fresh_idp.fetches["jwks"]
        assert (await call(pep, pki, USER, fresh_idp.token("ec-bg")))[0] == 200
        assert fresh_idp.fetches["jwks"] <= fetches + 1  # at most the refresher's own tick
    finally:
        await pep.stop()


async def test_cached_token_never_outlives_its_exp(id_pep: PepRuntime, pki: Path, idp: Issuer) -> None:
    exp = int(time.time()) + 2
    token = idp.token(exp=exp)
    assert (await call(id_pep, pki, USER, token))[0] == 200
    async with asyncio.timeout(10):
        while time.time() < exp:
            await asyncio.sleep(0.05)
    status, doc, _ = await call(id_pep, pki, USER, token)
    assert (status, doc["code"]) == (401, "authn.expired")


def test_jwks_filters_unusable_keys() -> None:
    from vvault_pep.identity.jwks import parse_jwks

    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    doc = {
        "keys": [
            public_jwk(rsa_key, "good", "RS256"),
            public_jwk(rsa_key, "enc", "RS256", use="enc"),
            {"kty": "oct", "kid": "sym", "k": b64(b"secret-secret-secret")},
            public_jwk(ec_key, "ec-as-rsa", "RS256"),
            public_jwk(rsa_key, "ops", "RS256", key_ops=["encrypt"]),
            {"kty": "RSA", "kid": "broken", "n": "AA", "e": "AQAB"},
            "not a key",
        ]
    }
    keys = parse_jwks(doc, ("RS256", "ES256"))
    assert [k.kid for k in keys] == ["good"]
    assert keys[0].fits("RS256") and not keys[0].fits("ES256") and not keys[0].fits("PS256")
