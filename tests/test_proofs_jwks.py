"""Signing keys: which JWKs are fit to verify, how a key set is fetched, kept and refreshed.

Keys are real public keys (RSA, EC P-256/P-384/P-521, Ed25519) in real JWK form; the key
documents are served over real HTTP (and HTTPS with the test PKI) by a small server whose
answers each test sets.  The key set's clock is injected where staleness is the point.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from tests.idp import public_jwk

from vvault_pep.config.models import Issuer, JwksTiming
from vvault_pep.errors import PepError
from vvault_pep.identity import jwks as jwks_module
from vvault_pep.identity.jwks import _ALG_KTY, _MAX_AGE, _STALE_RETRY_S, KeySet, _default_alg, parse_jwks

RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)
P256 = ec.generate_private_key(ec.SECP256R1())
P384 = ec.generate_private_key(ec.SECP384R1())
P521 = ec.generate_private_key(ec.SECP521R1())
ED = ed25519.Ed25519PrivateKey.generate()
ALL = ("RS256", "PS256", "ES256", "ES384", "ES512", "EdDSA")


def jwk(key: Any, kid: str | None = "k", alg: str | None = None, **extra: Any) -> dict[str, Any]:
    doc = public_jwk(key, kid or "", alg or "x", **extra)
    if alg is None:
        doc.pop("alg")
    if kid is None:
        doc.pop("kid")
    return {k: v for k, v in doc.items() if v is not None}


def test_the_algorithm_families() -> None:
    assert _ALG_KTY == {
        "RS256": ("RSA", None),
        "RS384": ("RSA", None),
        "RS512": ("RSA", None),
        "PS256": ("RSA", None),
        "PS384": ("RSA", None),
        "PS512": ("RSA", None),
        "ES256": ("EC", "P-256"),
        "ES384": ("EC", "P-384"),
        "ES512": ("EC", "P-521"),
        "EdDSA": ("OKP", None),
    }
    assert _STALE_RETRY_S == 1.0


# -- parsing a key set ----------------------------------------------------------------------------


@pytest.mark.parametrize("doc", [None, [], "keys", {}, {"keys": {}}, {"keys": None}, {"keys": "k"}])
def test_not_a_jwk_set(doc: Any) -> None:
    with pytest.raises(ValueError, match="not a JWK Set"):
        parse_jwks(doc, ALL)


def test_each_key_type_with_its_fields() -> None:
    keys = parse_jwks(
        {
            "keys": [
                jwk(RSA, "r", "RS256"),
                jwk(P256, "e", None),
                jwk(P384, "e3", "ES384"),
                jwk(P521, "e5", None),
                jwk(ED, "ed", None),
            ]
        },
        ALL,
    )
    assert [(k.kid, k.kty, k.crv, k.alg) for k in keys] == [
        ("r", "RSA", None, "RS256"),
        ("e", "EC", "P-256", None),
        ("e3", "EC", "P-384", "ES384"),
        ("e5", "EC", "P-521", None),
        ("ed", "OKP", "Ed25519", None),
    ]
    # a key without its own alg is loaded for the first allowed algorithm of its family
    assert [k.jwk.algorithm_name for k in keys] == ["RS256", "ES256", "ES384", "ES512", "EdDSA"]


def test_a_key_without_a_kid() -> None:
    [key] = parse_jwks({"keys": [jwk(P256, None, "ES256")]}, ALL)
    assert key.kid is None


@pytest.mark.parametrize(
    ("raw", "allowed"),
    [
        ("not a key", ALL),
        (None, ALL),
        ({"kty": "oct", "k": "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0", "kid": "k"}, (*ALL, "HS256")),
        (jwk(RSA), ("ES256",)),
        (jwk(P256), ("RS256", "EdDSA")),
        (jwk(ED), ("RS256", "ES256")),
        (jwk(P256, use="enc"), ALL),
        (jwk(P256, use="SIG"), ALL),
        (jwk(P256, key_ops=["sign"]), ALL),
        (jwk(P256, key_ops=[]), ALL),
        (jwk(P256, key_ops="encrypt"), ALL),
        ({**jwk(P256), "d": "AAAA"}, ALL),
        ({**jwk(RSA), "p": "AAAA"}, ALL),
        ({**jwk(P256), "kid": 5}, ALL),
        ({**jwk(P256), "kid": ["k"]}, ALL),
        (jwk(P256, alg="ES256"), ("ES384",)),
        (jwk(P521), ("ES256", "ES384")),  # an EC key of a curve no allowed algorithm uses
        ({**jwk(P256), "x": "!!"}, ALL),
        ({**jwk(RSA), "n": 5}, ALL),
        ({"kty": "EC", "crv": "P-256"}, ALL),
        ({"kty": "RSA"}, ALL),
    ],
)
def test_keys_unfit_to_verify_are_dropped(raw: Any, allowed: tuple[str, ...]) -> None:
    if "ES256" in allowed:
        keep = jwk(P256, "good", "ES256")
    elif "ES384" in allowed:
        keep = jwk(P384, "good", "ES384")
    else:
        keep = jwk(RSA, "good", "RS256")
    keys = parse_jwks({"keys": [raw, keep]}, allowed)
    assert [k.kid for k in keys] == ["good"]


@pytest.mark.parametrize(
    "extra", [{"use": "sig"}, {"key_ops": ["verify"]}, {"key_ops": ["sign", "verify"]}, {"use": "sig", "x5u": "x"}]
)
def test_keys_fit_to_verify_are_kept(extra: dict[str, Any]) -> None:
    raw = {**jwk(P256), **extra}
    [key] = parse_jwks({"keys": [raw]}, ("ES256",))
    assert key.kid == "k"


@pytest.mark.parametrize(
    ("kty", "crv", "allowed", "alg"),
    [
        ("RSA", None, ("ES256", "PS256", "RS256"), "PS256"),
        ("EC", "P-384", ("ES256", "ES384"), "ES384"),
        ("EC", "P-256", ("ES384", "ES256"), "ES256"),
        ("OKP", "Ed25519", ("RS256", "EdDSA"), "EdDSA"),
        ("RSA", "anything", ("RS384",), "RS384"),
    ],
)
def test_the_default_algorithm(kty: str, crv: str | None, allowed: tuple[str, ...], alg: str) -> None:
    assert _default_alg(kty, crv, allowed) == alg


@pytest.mark.parametrize(
    ("kty", "crv", "allowed"),
    [("EC", "P-521", ("ES256",)), ("RSA", None, ("ES256", "EdDSA")), ("oct", None, ("HS256",)), ("EC", None, ALL)],
)
def test_no_default_algorithm(kty: str, crv: str | None, allowed: tuple[str, ...]) -> None:
    with pytest.raises(ValueError, match="no allowed algorithm for this key"):
        _default_alg(kty, crv, allowed)


def one(raw: dict[str, Any]) -> Any:
    [key] = parse_jwks({"keys": [raw]}, ALL)
    return key


@pytest.mark.parametrize(
    ("raw", "alg", "fits"),
    [
        (jwk(RSA), "RS256", True),
        (jwk(RSA), "PS256", True),
        (jwk(RSA, alg="RS256"), "PS256", False),
        (jwk(RSA, alg="PS256"), "PS256", True),
        (jwk(RSA), "ES256", False),
        (jwk(RSA), "HS256", False),
        (jwk(P256), "ES256", True),
        (jwk(P256), "ES384", False),
        (jwk(P384), "ES384", True),
        (jwk(P384), "ES256", False),
        (jwk(P521), "ES512", True),
        (jwk(P256), "EdDSA", False),
        (jwk(ED), "EdDSA", True),
        (jwk(ED), "RS256", False),
        (jwk(P256, alg="ES384"), "ES384", False),  # pinned to another curve's algorithm: fits none
        (jwk(P256, alg="ES384"), "ES256", False),
        (jwk(P384, alg="ES256"), "ES256", False),
    ],
)
def test_a_key_fits_an_algorithm(raw: dict[str, Any], alg: str, fits: bool) -> None:
    assert one(raw).fits(alg) is fits


# -- fetching -------------------------------------------------------------------------------------


class Docs:
    """An HTTP server whose answers a test sets: path → (status, body, headers); hits counted."""

    def __init__(self) -> None:
        self.answers: dict[str, tuple[int, bytes, dict[str, str]]] = {}
        self.hits: dict[str, int] = {}
        self.url = ""
        self.gate: asyncio.Event | None = None
        self.pause_s: float | None = None
        self.runner: web.AppRunner | None = None

    def set(self, path: str, doc: Any, status: int = 200, **headers: str) -> None:
        body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
        self.answers[path] = (status, body, {k.replace("_", "-"): v for k, v in headers.items()})

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.hits[request.path] = self.hits.get(request.path, 0) + 1
        if self.gate is not None:
            await self.gate.wait()
        status, body, headers = self.answers.get(request.path, (404, b"", {}))
        if self.pause_s is None:
            return web.Response(status=status, body=body, headers=headers, content_type="application/json")
        # The body in two pieces with a pause between them, as a slow network delivers it;
        # chunked, so the length is known only at its end.
        resp = web.StreamResponse(status=status, headers={**headers, "Content-Type": "application/json"})
        await resp.prepare(request)
        await resp.write(body[: len(body) // 2])
        await asyncio.sleep(self.pause_s)
        await resp.write(body[len(body) // 2 :])
        await resp.write_eof()
        return resp

    async def start(self, ssl_context: ssl.SSLContext | None = None) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1" if ssl_context is None else "localhost", 0, ssl_context=ssl_context)
        await site.start()
        port = self.runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}" if ssl_context is None else f"https://localhost:{port}"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.fixture
async def docs() -> AsyncIterator[Docs]:
    d = Docs()
    await d.start()
    yield d
    await d.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def issuer_for(docs: Docs, **over: Any) -> Issuer:
    timing = over.pop("jwks", {})
    base: dict[str, Any] = {
        "name": "corp",
        "issuer": docs.url,
        "audiences": ("vvault",),
        "allow_http": True,
        "algorithms": ALL,
        "jwks": JwksTiming(**timing),
    }
    return Issuer(**{**base, **over})


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def serve_keys(docs: Docs, *keys: dict[str, Any], path: str = "/jwks", **headers: str) -> None:
    docs.set(path, {"keys": list(keys)}, **headers)


async def test_discovery_then_the_key_set(docs: Docs, session: aiohttp.ClientSession) -> None:
    docs.set("/.well-known/openid-configuration", {"issuer": docs.url, "jwks_uri": f"{docs.url}/jwks"})
    serve_keys(docs, jwk(P256, "a", "ES256"), jwk(RSA, "b", "RS256"))
    ks = KeySet(issuer_for(docs), session, clock=Clock())
    assert ks.kids == [] and ks.fresh_enough() is False
    assert await ks.refresh() is True
    assert ks.kids == ["a", "b"]
    assert (ks.fetches, ks.failures) == (1, 0)
    assert docs.hits == {"/.well-known/openid-configuration": 1, "/jwks": 1}


async def test_an_issuer_with_a_trailing_slash_is_discovered_once_slashed(
    docs: Docs, session: aiohttp.ClientSession
) -> None:
    docs.set("/.well-known/openid-configuration", {"issuer": docs.url + "/", "jwks_uri": f"{docs.url}/jwks"})
    serve_keys(docs, jwk(P256, "a"))
    ks = KeySet(issuer_for(docs, issuer=docs.url + "/"), session)
    assert await ks.refresh() is True and ks.kids == ["a"]


async def test_a_configured_jwks_uri_skips_discovery(docs: Docs, session: aiohttp.ClientSession) -> None:
    serve_keys(docs, jwk(P256, "a"), path="/keys")
    ks = KeySet(issuer_for(docs, jwks_uri=f"{docs.url}/keys"), session)
    assert await ks.refresh() is True and ks.kids == ["a"]
    assert docs.hits == {"/keys": 1}


async def test_a_jwks_file(tmp_path: Path, docs: Docs, session: aiohttp.ClientSession) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [jwk(ED, "f")]}))
    clock = Clock()
    ks = KeySet(issuer_for(docs, jwks_file=path, jwks={"default_ttl_s": 120}), session, clock=clock)
    assert await ks.refresh() is True and ks.kids == ["f"]
    assert docs.hits == {}
    assert ks._expires_at == clock.now + 120  # a file has no max-age: the default lifetime


def warned(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "vvault_pep.jwks"]


@pytest.mark.parametrize(
    ("discovery", "reason"),
    [
        ({"issuer": "https://other.example", "jwks_uri": "/jwks"}, "ValueError"),
        ({"jwks_uri": "http://x/jwks"}, "ValueError"),
        ("not an object", "ValueError"),
        ({"issuer": None}, "ValueError"),
        ({"issuer": "SELF", "jwks_uri": None}, "ValueError"),
        ({"issuer": "SELF", "jwks_uri": 5}, "ValueError"),
        ({"issuer": "SELF", "jwks_uri": "ftp://x/jwks"}, "ValueError"),
        ({"issuer": "SELF", "jwks_uri": "/jwks"}, "ValueError"),
    ],
)
async def test_a_discovery_document_that_cannot_be_used(
    docs: Docs, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture, discovery: Any, reason: str
) -> None:
    if isinstance(discovery, dict) and discovery.get("issuer") == "SELF":
        discovery = {**discovery, "issuer": docs.url}
    docs.set("/.well-known/openid-configuration", discovery)
    serve_keys(docs, jwk(P256, "a"))
    ks = KeySet(issuer_for(docs), session)
    with caplog.at_level(logging.WARNING, logger="vvault_pep.jwks"):
        assert await ks.refresh() is False
    assert (ks.fetches, ks.failures, ks.kids) == (1, 1, [])
    assert warned(caplog) == [f"JWKS refresh for issuer corp failed: {reason}"]
    assert "/jwks" not in docs.hits


async def test_a_plain_http_jwks_uri_needs_allow_http(pki: Path, caplog: pytest.LogCaptureFixture) -> None:
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(pki / "server.pem", pki / "server-key.pem")
    tls, plain = Docs(), Docs()
    await tls.start(server)
    await plain.start()
    client = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client)) as s:
            serve_keys(tls, jwk(P256, "tls-key"))
            serve_keys(plain, jwk(P256, "plain-key"))
            secure = Issuer(name="corp", issuer=tls.url, audiences=("vvault",))
            tls.set("/.well-known/openid-configuration", {"issuer": tls.url, "jwks_uri": f"{plain.url}/jwks"})
            ks = KeySet(secure, s)
            with caplog.at_level(logging.WARNING, logger="vvault_pep.jwks"):
                assert await ks.refresh() is False
            assert warned(caplog) == ["JWKS refresh for issuer corp failed: ValueError"]
            assert plain.hits == {}
            tls.set("/.well-known/openid-configuration", {"issuer": tls.url, "jwks_uri": f"{tls.url}/jwks"})
            assert await ks.refresh() is True and ks.kids == ["tls-key"]
            relaxed = secure.model_copy(update={"allow_http": True})
            tls.set("/.well-known/openid-configuration", {"issuer": tls.url, "jwks_uri": f"{plain.url}/jwks"})
            ks2 = KeySet(relaxed, s)
            assert await ks2.refresh() is True and ks2.kids == ["plain-key"]
    finally:
        await tls.stop()
        await plain.stop()


@pytest.mark.parametrize("status", [201, 204, 301, 302, 404, 500, 503])
async def test_only_a_200_is_a_key_set_and_redirects_are_not_followed(
    docs: Docs, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture, status: int
) -> None:
    serve_keys(docs, jwk(P256, "moved"), path="/elsewhere")
    docs.set("/jwks", {"keys": [jwk(P256, "a")]}, status=status, Location=f"{docs.url}/elsewhere")
    ks = KeySet(issuer_for(docs, jwks_uri=f"{docs.url}/jwks"), session)
    with caplog.at_level(logging.WARNING, logger="vvault_pep.jwks"):
        assert await ks.refresh() is False
    assert ks.kids == [] and ks.failures == 1
    assert "/elsewhere" not in docs.hits
    assert warned(caplog) == ["JWKS refresh for issuer corp failed: ValueError"]


async def test_the_document_size_limit_is_exact(docs: Docs, session: aiohttp.ClientSession) -> None:
    body = json.dumps({"keys": [jwk(P256, "a")]}).encode()
    docs.set("/jwks", body)
    exact = KeySet(issuer_for(docs, jwks_uri=f"{docs.url}/jwks", jwks={"max_document_bytes": len(body)}), session)
    assert await exact.refresh() is True and exact.kids == ["a"]
    over = KeySet(issuer_for(docs, jwks_uri=f"{docs.url}/jwks", jwks={"max_document_bytes": len(body) - 1}), session)
    assert await over.refresh() is False and over.kids == []


async def test_a_document_that_comes_in_pieces_is_read_whole(docs: Docs, session: aiohttp.ClientSession) -> None:
    # A read of what had arrived would parse the first half: not JSON, and no keys.
    serve_keys(docs, *(jwk(P256, f"k{i}") for i in range(20)))
    docs.pause_s = 0.2  # the network's pause; the answer must not depend on its length
    ks = KeySet(issuer_for(docs, jwks_uri=f"{docs.url}/jwks"), session)
    assert await ks.refresh() is True
    assert sorted(ks.kids) == sorted(f"k{i}" for i in range(20))


async def test_a_document_nested_past_the_parsers_depth_is_a_failed_refresh(
    docs: Docs, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    # Well under the size limit; uncaught, it would end the refresher and fail the start.
    docs.set("/jwks", b"[" * 200_000)
    ks = KeySet(issuer_for(docs, jwks_uri=f"{docs.url}/jwks"), session)
    with caplog.at_level(logging.WARNING, logger="vvault_pep.jwks"):
        assert await ks.refresh() is False
    assert ks.kids == [] and ks.failures == 1
    assert warned(caplog) == ["JWKS refresh for issuer corp failed: RecursionError"]


async def test_a_document_that_goes_on_past_the_limit_is_refused(docs: Docs, session: aiohttp.ClientSession) -> None:
    body = json.dumps({"keys": [jwk(P256, "a")], "pad": "x" * 4096}).encode()
    docs.set("/jwks", body)
    docs.pause_s = 0.05
    ks = KeySet(issuer_for(docs, jwks_uri=f"{docs.url}/jwks", jwks={"max_document_bytes": len(body) - 1}), session)
    assert await ks.refresh() is False and ks.kids == [] and ks.failures == 1


@pytest.mark.parametrize("body", [b"not json", b'{"keys": {}}', b"[]", b"\xff"])
async def test_a_document_that_is_not_a_key_set(docs: Docs, session: aiohttp.ClientSession, body: bytes) -> None:
    docs.set("/jwks", body)
    ks = KeySet(issuer_for(docs, jwks_uri=f"{docs.url}/jwks"), session)
    assert await ks.refresh() is False and ks.failures == 1


async def test_a_slow_document_times_out(docs: Docs, session: aiohttp.ClientSession) -> None:
    serve_keys(docs, jwk(P256, "a"))
    docs.gate = asyncio.Event()
    ks = KeySet(issuer_for(docs, jwks_uri=f"{docs.url}/jwks", jwks={"fetch_timeout_s": 0.2}), session)
    try:
        async with asyncio.timeout(20):
            assert await ks.refresh() is False
    finally:
        docs.gate.set()
    assert ks.failures == 1


async def test_a_dead_server(session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture) -> None:
    ks = KeySet(
        Issuer(name="dead", issuer="http://127.0.0.1:9", audiences=("v",), allow_http=True, algorithms=ALL), session
    )
    with caplog.at_level(logging.WARNING, logger="vvault_pep.jwks"):
        assert await ks.refresh() is False
    [message] = warned(caplog)
    assert message.startswith("JWKS refresh for issuer dead failed: Client")


async def test_a_failed_fetch_keeps_the_keys_it_had(docs: Docs, session: aiohttp.ClientSession) -> None:
    serve_keys(docs, jwk(P256, "a"))
    clock = Clock()
    ks = KeySet(issuer_for(docs, jwks_uri=f"{docs.url}/jwks"), session, clock=clock)
    assert await ks.refresh() is True
    fetched_at = ks._fetched_at
    docs.set("/jwks", b"", status=503)
    clock.now += 10
    assert await ks.refresh() is False
    assert ks.kids == ["a"] and ks._fetched_at == fetched_at
    assert (ks.fetches, ks.failures) == (2, 1)


@pytest.mark.parametrize(
    ("cache_control", "ttl"),
    [
        (None, 300.0),
        ("max-age=600", 600.0),
        ("public, max-age=600", 600.0),
        ("public,max-age=600", 600.0),
        ("MAX-AGE = 600", 600.0),
        ("max-age=10", 60.0),  # clamped up to min_ttl_s
        ("max-age=0", 60.0),
        ("max-age=999999", 86_400.0),  # clamped down to max_ttl_s
        ("s-maxage=600", 300.0),
        ("no-cache", 300.0),
        ("x-max-age=600", 300.0),
        ("max-age=abc", 300.0),
    ],
)
async def test_the_lifetime_from_cache_control(
    docs: Docs, session: aiohttp.ClientSession, cache_control: str | None, ttl: float
) -> None:
    headers = {"Cache-Control": cache_control} if cache_control is not None else {}
    serve_keys(docs, jwk(P256, "a"), **headers)
    clock = Clock()
    ks = KeySet(issuer_for(docs, jwks_uri=f"{docs.url}/jwks"), session, clock=clock)
    assert await ks.refresh() is True
    assert ks._fetched_at == clock.now
    assert ks._expires_at == clock.now + ttl


def test_the_max_age_pattern() -> None:
    assert _MAX_AGE.search("private, max-age=42, must-revalidate").group(1) == "42"  # type: ignore[union-attr]
    assert _MAX_AGE.search("max-age=42").group(1) == "42"  # type: ignore[union-attr]
    assert _MAX_AGE.search("smax-age=42") is None


async def test_concurrent_refreshes_share_one_fetch(docs: Docs, session: aiohttp.ClientSession) -> None:
    serve_keys(docs, jwk(P256, "a"))
    docs.gate = asyncio.Event()
    ks = KeySet(issuer_for(docs, jwks_uri=f"{docs.url}/jwks"), session)
    waiting = [asyncio.create_task(ks.refresh()) for _ in range(5)]
    async with asyncio.timeout(10):
        while docs.hits.get("/jwks", 0) == 0:
            await asyncio.sleep(0.01)
    docs.gate.set()
    assert await asyncio.gather(*waiting) == [True] * 5
    assert ks.fetches == 1 and docs.hits == {"/jwks": 1}
    assert await ks.refresh() is True and ks.fetches == 2  # a finished fetch is not reused


# -- staleness and key lookup --------------------------------------------------------------------


@pytest.mark.parametrize(("age", "fresh"), [(0, True), (3599, True), (3600, True), (3600.5, False), (10_000, False)])
async def test_fresh_enough_up_to_max_staleness(
    docs: Docs, session: aiohttp.ClientSession, age: float, fresh: bool
) -> None:
    serve_keys(docs, jwk(P256, "a"))
    clock = Clock()
    ks = KeySet(issuer_for(docs, jwks_uri=f"{docs.url}/jwks"), session, clock=clock)
    await ks.refresh()
    clock.now += age
    assert ks.fresh_enough() is fresh


async def test_a_fetch_at_clock_zero_is_still_a_fetch(docs: Docs, session: aiohttp.ClientSession) -> None:
    serve_keys(docs, jwk(P256, "a"))
    ks = KeySet(issuer_for(docs, jwks_uri=f"{docs.url}/jwks"), session, clock=Clock(0.0))
    await ks.refresh()
    assert ks.fresh_enough() is True


async def test_key_for_picks_by_kid_and_algorithm(docs: Docs, session: aiohttp.ClientSession) -> None:
    serve_keys(docs, jwk(P256, "a"), jwk(RSA, "a"), jwk(P384, "b"), jwk(ED, "c", "EdDSA"))
    ks = KeySet(issuer_for(docs, jwks_uri=f"{docs.url}/jwks"), session)
    await ks.refresh()
    assert (await ks.key_for("a", "ES256")).kty == "EC"
    assert (await ks.key_for("a", "RS256")).kty == "RSA"
    assert (await ks.key_for("b", "ES384")).crv == "P-384"
    assert (await ks.key_for("c", "EdDSA")).kty == "OKP"
    assert ks.fetches == 1


async def test_without_a_kid_only_an_unambiguous_key(docs: Docs, session: aiohttp.ClientSession) -> None:
    serve_keys(docs, jwk(P256, "a"), jwk(RSA, "r1"), jwk(RSA, "r2"))
    ks = KeySet(issuer_for(docs, jwks_uri=f"{docs.url}/jwks", jwks={"unknown_kid_cooldown_s": 0}), session)
    await ks.refresh()
    assert (await ks.key_for(None, "ES256")).kid == "a"
    with pytest.raises(PepError) as exc:
        await ks.key_for(None, "RS256")
    assert exc.value.code == "authn.unknown_key"
    assert exc.value.detail == "the token's signing key is not known for its issuer"


async def test_a_kid_of_another_family_is_unknown(docs: Docs, session: aiohttp.ClientSession) -> None:
    serve_keys(docs, jwk(P256, "a"))
    ks = KeySet(issuer_for(docs, jwks_uri=f"{docs.url}/jwks"), session)
    await ks.refresh()
    with pytest.raises(PepError) as exc:
        await ks.key_for("a", "RS256")
    assert exc.value.code == "authn.unknown_key"


async def test_an_unknown_kid_refetches_at_most_once_per_cooldown(docs: Docs, session: aiohttp.ClientSession) -> None:
    serve_keys(docs, jwk(P256, "a"))
    clock = Clock()
    ks = KeySet(issuer_for(docs, jwks_uri=f"{docs.url}/jwks"), session, clock=clock)
    await ks.refresh()
    for _ in range(3):
        with pytest.raises(PepError):
            await ks.key_for("new", "ES256")
    assert ks.fetches == 2  # one refetch for the first unknown kid, none for the next two
    clock.now += 29.9
    with pytest.raises(PepError):
        await ks.key_for("new", "ES256")
    assert ks.fetches == 2
    serve_keys(docs, jwk(P256, "a"), jwk(P256, "new"))
    clock.now += 0.1  # the 30 s cooldown is over, exactly
    assert (await ks.key_for("new", "ES256")).kid == "new"
    assert ks.fetches == 3
    assert ks.kids == ["a", "new"]  # and the known key is still there


async def test_a_kid_that_appears_on_the_refetch_is_found(docs: Docs, session: aiohttp.ClientSession) -> None:
    serve_keys(docs, jwk(P256, "a"))
    ks = KeySet(issuer_for(docs, jwks_uri=f"{docs.url}/jwks"), session, clock=Clock())
    await ks.refresh()
    serve_keys(docs, jwk(P256, "a"), jwk(P256, "rotated"))
    assert (await ks.key_for("rotated", "ES256")).kid == "rotated"


async def test_never_fetched_tries_once_then_fails_closed(docs: Docs, session: aiohttp.ClientSession) -> None:
    docs.set("/jwks", b"", status=503)
    clock = Clock()
    ks = KeySet(issuer_for(docs, jwks_uri=f"{docs.url}/jwks"), session, clock=clock)
    with pytest.raises(PepError) as exc:
        await ks.key_for("a", "ES256")
    assert (exc.value.code, exc.value.status) == ("authn.keys_unavailable", 503)
    assert exc.value.detail == "the issuer's signing keys are unavailable"
    assert ks.fetches == 1
    clock.now += 0.9
    with pytest.raises(PepError):
        await ks.key_for("a", "ES256")
    assert ks.fetches == 1  # at most one attempt per second
    clock.now += 0.1
    serve_keys(docs, jwk(P256, "a"))
    assert (await ks.key_for("a", "ES256")).kid == "a"
    assert ks.fetches == 2


async def test_stale_keys_serve_until_max_staleness_then_fail_closed(
    docs: Docs, session: aiohttp.ClientSession
) -> None:
    serve_keys(docs, jwk(P256, "a"))
    clock = Clock()
    ks = KeySet(issuer_for(docs, jwks_uri=f"{docs.url}/jwks", jwks={"max_staleness_s": 100}), session, clock=clock)
    await ks.refresh()
    docs.set("/jwks", b"", status=503)
    clock.now += 100
    assert (await ks.key_for("a", "ES256")).kid == "a"  # stale but within the limit: no fetch
    assert ks.fetches == 1
    clock.now += 1
    with pytest.raises(PepError) as exc:
        await ks.key_for("a", "ES256")
    assert exc.value.code == "authn.keys_unavailable"
    assert ks.fetches == 2
    serve_keys(docs, jwk(P256, "a"))
    clock.now += 1
    assert (await ks.key_for("a", "ES256")).kid == "a"  # the IdP is back: fresh again
    assert ks.fetches == 3


# -- the background refresher --------------------------------------------------------------------


class Stop(Exception):
    pass


async def first_delay(ks: KeySet, monkeypatch: pytest.MonkeyPatch) -> float:
    """The refresher's first sleep, without sleeping."""
    delays: list[float] = []

    async def sleep(delay: float) -> None:
        delays.append(delay)
        raise Stop

    monkeypatch.setattr(jwks_module.asyncio, "sleep", sleep)
    try:
        with pytest.raises(Stop):
            await ks._refresher()
    finally:
        monkeypatch.undo()
    return delays[0]


@pytest.mark.parametrize(
    ("cache_control", "elapsed", "delay"),
    [
        ("max-age=600", 0, 480.0),  # 80 % of the lifetime
        ("max-age=600", 100, 400.0),  # 80 % of what is left
        ("max-age=600", 600, 5.0),  # expired: retry within the cooldown
        ("max-age=600", 700, 5.0),
        ("max-age=600", 599.99, 0.05),  # never a busy loop
    ],
)
async def test_the_refresh_delay(
    docs: Docs,
    session: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
    cache_control: str,
    elapsed: float,
    delay: float,
) -> None:
    serve_keys(docs, jwk(P256, "a"), Cache_Control=cache_control)
    clock = Clock()
    ks = KeySet(issuer_for(docs, jwks_uri=f"{docs.url}/jwks"), session, clock=clock)
    await ks.refresh()
    clock.now += elapsed
    assert await first_delay(ks, monkeypatch) == pytest.approx(delay)


@pytest.mark.parametrize(("min_ttl", "delay"), [(60, 5.0), (5, 5.0), (2, 2.0), (0.01, 0.05)])
async def test_the_retry_delay_before_any_fetch(
    docs: Docs, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch, min_ttl: float, delay: float
) -> None:
    ks = KeySet(issuer_for(docs, jwks={"min_ttl_s": min_ttl}), session, clock=Clock())
    assert await first_delay(ks, monkeypatch) == pytest.approx(delay)


async def test_the_refresher_refreshes_and_goes_on(docs: Docs, session: aiohttp.ClientSession) -> None:
    serve_keys(docs, jwk(P256, "a"), Cache_Control="max-age=0")
    ks = KeySet(issuer_for(docs, jwks_uri=f"{docs.url}/jwks", jwks={"min_ttl_s": 0.01}), session)
    await ks.start()
    try:
        assert ks.fetches >= 1 and ks.kids == ["a"]
        assert ks._task is not None and ks._task.get_name() == "jwks-refresh-corp"
        async with asyncio.timeout(20):
            while ks.fetches < 3:  # a lifetime of 0.01 s: refreshed again and again
                await asyncio.sleep(0.02)
    finally:
        await ks.stop()
    assert ks._task.done()


async def test_start_fetches_once_and_a_failure_is_not_fatal(docs: Docs, session: aiohttp.ClientSession) -> None:
    docs.set("/jwks", b"", status=500)
    ks = KeySet(issuer_for(docs, jwks_uri=f"{docs.url}/jwks"), session)
    await ks.start()
    try:
        assert (ks.fetches, ks.failures) == (1, 1)
        assert ks.fresh_enough() is False
    finally:
        await ks.stop()


async def test_stop_cancels_a_fetch_in_flight(docs: Docs, session: aiohttp.ClientSession) -> None:
    serve_keys(docs, jwk(P256, "a"))
    docs.gate = asyncio.Event()
    ks = KeySet(issuer_for(docs, jwks_uri=f"{docs.url}/jwks"), session)
    waiting = asyncio.create_task(ks.refresh())
    async with asyncio.timeout(10):
        while not docs.hits:
            await asyncio.sleep(0.01)
    inflight = ks._inflight
    assert inflight is not None and inflight.get_name() == "jwks-fetch-corp"
    await ks.stop()
    docs.gate.set()
    assert inflight.cancelled()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await ks.stop()  # twice is fine


def test_a_key_without_use_is_a_signing_key() -> None:
    raw = jwk(P256, "no-use")
    del raw["use"]
    [key] = parse_jwks({"keys": [raw]}, ALL)
    assert key.kid == "no-use"


@pytest.mark.parametrize("key", [P256, ED, RSA])
def test_a_published_private_key_is_never_used(key: Any) -> None:
    from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

    if isinstance(key, ec.EllipticCurvePrivateKey):
        private = json.loads(ECAlgorithm.to_jwk(key))
    elif isinstance(key, ed25519.Ed25519PrivateKey):
        private = json.loads(OKPAlgorithm.to_jwk(key))
    else:
        private = json.loads(RSAAlgorithm.to_jwk(key))
    assert "d" in private  # a whole private key, one that would load
    private.update(kid="leaked", use="sig")
    assert [k.kid for k in parse_jwks({"keys": [private, jwk(P256, "good")]}, ALL)] == ["good"]


def test_rsa_private_parts_without_d_are_refused_too() -> None:
    from jwt.algorithms import RSAAlgorithm

    private = json.loads(RSAAlgorithm.to_jwk(RSA))
    del private["d"]
    private.update(kid="leaked", use="sig")
    assert [k.kid for k in parse_jwks({"keys": [private, jwk(P256, "good")]}, ALL)] == ["good"]


async def test_failures_are_counted_one_by_one(docs: Docs, session: aiohttp.ClientSession) -> None:
    docs.set("/jwks", b"", status=503)
    ks = KeySet(issuer_for(docs, jwks_uri=f"{docs.url}/jwks"), session)
    for n in (1, 2, 3):
        assert await ks.refresh() is False
        assert (ks.fetches, ks.failures) == (n, n)


async def test_an_issuer_with_a_path_is_discovered_under_it(docs: Docs, session: aiohttp.ClientSession) -> None:
    issuer = f"{docs.url}/realmX"
    docs.set("/realmX/.well-known/openid-configuration", {"issuer": issuer, "jwks_uri": f"{docs.url}/jwks"})
    serve_keys(docs, jwk(P256, "a"))
    ks = KeySet(issuer_for(docs, issuer=issuer), session)
    assert await ks.refresh() is True and ks.kids == ["a"]
