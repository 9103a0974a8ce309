"""x-forwarded-client-cert: Envoy's format, emitted to upstreams, believed from trusted front proxies only."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import jsonschema
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from tests.conftest import Upstream
from tests.support import OpaProcess, client_context, config_doc

from vvault_pep.app.runtime import PepRuntime
from vvault_pep.config import Config, Xfcc
from vvault_pep.core.request import parse_peer
from vvault_pep.core.xfcc import Element, XfccError, emit, forwarded_peer, parse

SECRET = "/v1/tenants/acme/secrets/db-password"
FRONT = "spiffe://demo.vvault/client/ops"  # the front proxy, by its own certificate
READER = "spiffe://demo.vvault/client/reader"
INDEXER = "spiffe://prod.vvault/ns/platform/sa/indexer"
H1 = "468ed33be74eee6556d90c0149c1309e9ba61d6425303443c0748a02dd8de688"
SCHEMA = json.loads((Path(__file__).parent.parent / "docs" / "policy-input.v1.schema.json").read_text())


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        # Envoy's documented example shape: By, Hash, a quoted Subject, URI, repeated DNS
        (
            f'By=http://frontend.lyft.com;Hash={H1};Subject="/C=US/ST=CA/L=San Francisco/OU=Lyft/CN=Test Client";'
            "URI=http://testclient.lyft.com;DNS=lyft.com;DNS=www.lyft.com",
            [
                Element(
                    by=("http://frontend.lyft.com",),
                    hash=H1,
                    subject="/C=US/ST=CA/L=San Francisco/OU=Lyft/CN=Test Client",
                    uri=("http://testclient.lyft.com",),
                    dns=("lyft.com", "www.lyft.com"),
                )
            ],
        ),
        # two elements (two proxies), keys in any case, quoted values holding , ; = and \"
        (
            f'by=spiffe://a/x;hash={H1.upper()},By=spiffe://b/y;Hash={H1};Subject="CN=a\\"b,O=c;d=e"',
            [
                Element(by=("spiffe://a/x",), hash=H1),
                Element(by=("spiffe://b/y",), hash=H1, subject='CN=a"b,O=c;d=e'),
            ],
        ),
        (f"Hash={H1};Future=1", [Element(hash=H1)]),  # an unknown key is ignored
    ],
)
def test_parse_reads_envoys_format(value: str, expected: list[Element]) -> None:
    assert parse(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "",
        f"Hash={H1};Subject",  # a pair without '='
        f'Hash={H1};Subject="CN=a',  # unterminated quote
        f'Hash={H1};Subject="CN=a"x',  # text after the quotes
        f'Hash={H1};Subject=CN"a',  # a quote inside an unquoted value
        "Hash=abc",  # not a SHA-256
        f"Hash={H1};Hash={H1}",  # twice in one element
        ",".join([f"Hash={H1}"] * 17),  # more elements than any real chain of proxies
    ],
)
def test_parse_refuses_what_is_not_xfcc(value: str) -> None:
    with pytest.raises(XfccError):
        parse(value)


def reader_peer(pki: Path) -> Any:
    cert = x509.load_pem_x509_certificate((pki / "client-reader.pem").read_bytes())
    return parse_peer(cert.public_bytes(Encoding.DER))


def test_emitted_value_parses_back_to_the_same_certificate(pki: Path) -> None:
    peer = reader_peer(pki)
    value = emit(peer, "spiffe://demo.vvault/pep")
    assert value.startswith(f'By=spiffe://demo.vvault/pep;Hash={peer.sha256};Subject="')
    [element] = parse(value)
    assert element == Element(
        by=("spiffe://demo.vvault/pep",), hash=peer.sha256, subject=peer.subject, uri=(READER,), dns=()
    )


@pytest.fixture
async def pep(pki: Path, opa: OpaProcess, upstream: Upstream) -> AsyncIterator[PepRuntime]:
    doc = config_doc(
        pki,
        opa_url=opa.url,
        upstream_port=upstream.port,
        identity={"workload": {"trust_domains": ["demo.vvault", "prod.vvault"]}},
        xfcc={"trusted_proxies": [{"spiffe_id": FRONT}], "by": "spiffe://demo.vvault/pep"},
    )
    doc["upstreams"]["vvault"]["xfcc"] = True
    runtime = PepRuntime(Config.model_validate(doc))
    await runtime.start()
    yield runtime
    await runtime.stop()


async def get(pep: PepRuntime, pki: Path, cert: str, xfcc: str | None) -> tuple[int, dict[str, Any], str]:
    connector = aiohttp.TCPConnector(ssl=client_context(pki, cert), force_close=True)
    headers = {"X-Forwarded-Client-Cert": xfcc} if xfcc is not None else {}
    async with aiohttp.ClientSession(connector=connector) as http:
        async with http.get(f"https://localhost:{pep.port}{SECRET}", headers=headers) as resp:
            return resp.status, json.loads(await resp.read()), resp.headers["X-Request-Id"]


def sent_xfcc(upstream: Upstream, rid: str) -> list[str]:
    [seen] = upstream.seen_with(rid)
    return [v for k, v in seen["headers"] if k.lower() == "x-forwarded-client-cert"]


def record_of(caplog: pytest.LogCaptureFixture, rid: str) -> dict[str, Any]:
    [record] = [r.audit for r in caplog.records if getattr(r, "audit", {}).get("request_id") == rid]  # type: ignore[attr-defined]
    return record  # type: ignore[no-any-return]


async def test_xfcc_from_an_untrusted_client_is_stripped_and_replaced(
    pep: PepRuntime, pki: Path, upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    forged = f"By={FRONT};Hash={'0' * 64};URI={INDEXER}"  # the reader claims to be the indexer
    with caplog.at_level(logging.INFO, logger="vvault_pep.audit"):
        status, _, rid = await get(pep, pki, "reader", forged)
    assert status == 200  # as the reader itself: acme is the reader's tenant
    record = record_of(caplog, rid)
    assert record["spiffe_id"] == READER and "forwarded_by" not in record
    assert record["input"]["identity"]["workload"]["spiffe_id"] == READER
    peer = reader_peer(pki)
    # the upstream sees the PEP's one element for the real client, never the forged one
    assert sent_xfcc(upstream, rid) == [emit(peer, "spiffe://demo.vvault/pep")]
    [element] = parse(sent_xfcc(upstream, rid)[0])
    assert element.hash == peer.sha256 and element.uri == (READER,)


def pem_of(pki: Path, name: str) -> str:
    return quote((pki / f"client-{name}.pem").read_text(), safe="")


async def test_xfcc_from_the_trusted_front_proxy_becomes_the_identity(
    pep: PepRuntime, pki: Path, upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    peer = reader_peer(pki)
    # the one element the front proxy set (SANITIZE_SET, with the client certificate itself:
    # Envoy's set_current_client_cert_details cert: true)
    value = f'By={FRONT};Hash={peer.sha256};Cert="{pem_of(pki, "reader")}";URI={READER}'
    with caplog.at_level(logging.INFO, logger="vvault_pep.audit"):
        status, _, rid = await get(pep, pki, "ops", value)
        assert status == 200
        record = record_of(caplog, rid)
        assert record["spiffe_id"] == READER and record["forwarded_by"] == FRONT
        assert record["client_cert_sha256"] == peer.sha256
        assert record["input"]["tls"]["client_cert"]["issuer"] == peer.issuer
        assert record["input"]["tls"]["forwarded_by"]["spiffe_id"] == FRONT
        assert record["input"]["identity"]["workload"]["spiffe_id"] == READER
        jsonschema.validate(record["input"], SCHEMA)
        [element] = parse(sent_xfcc(upstream, rid)[0])
        assert element.hash == peer.sha256 and element.uri == (READER,)

        # the proxy forwards another client, the indexer: its own rights, not the reader's
        indexer = x509.load_pem_x509_certificate((pki / "client-indexer.pem").read_bytes())
        digest = hashlib.sha256(indexer.public_bytes(Encoding.DER)).hexdigest()
        value = f"By={FRONT};Hash={digest};Cert={pem_of(pki, 'indexer')};URI={INDEXER}"
        status, doc, rid = await get(pep, pki, "ops", value)
        assert status == 403
        assert record_of(caplog, rid)["spiffe_id"] == INDEXER

        # without Cert the issuer is unknown: the shipped policy, which checks it, denies
        status, doc, rid = await get(pep, pki, "ops", f"By={FRONT};Hash={peer.sha256};URI={READER}")
        assert (status, doc["code"]) == (403, "policy.untrusted_issuer")
        assert record_of(caplog, rid)["spiffe_id"] == READER
        jsonschema.validate(record_of(caplog, rid)["input"], SCHEMA)


async def test_the_front_proxy_is_a_conduit_never_a_principal(pep: PepRuntime, pki: Path, upstream: Upstream) -> None:
    # without XFCC the request has no client certificate at all (client_auth: required)
    status, doc, rid = await get(pep, pki, "ops", None)
    assert (status, doc["code"]) == (401, "tls.client_cert_required")
    assert upstream.seen_with(rid) == []
    # an element the proxy did not append (By is not the proxy), or that is malformed: refused
    peer = reader_peer(pki)
    for bad in (f"By=spiffe://elsewhere/p;Hash={peer.sha256};URI={READER}", f"Hash={peer.sha256};URI={READER}", "By="):
        status, doc, rid = await get(pep, pki, "ops", bad)
        assert (status, doc["code"]) == (400, "sanitize.bad_xfcc"), bad
        assert upstream.seen_with(rid) == []


def test_a_forwarded_cert_must_match_its_hash(pki: Path) -> None:
    proxy = parse_peer(x509.load_pem_x509_certificate((pki / "client-ops.pem").read_bytes()).public_bytes(Encoding.DER))
    pem = (pki / "client-reader.pem").read_bytes().decode()
    reader = reader_peer(pki)
    element = Element(by=(FRONT,), hash=reader.sha256, cert=quote(pem, safe=""))
    full = forwarded_peer(element, proxy, require_client_auth_eku=True)
    assert full == reader  # with Cert, every field (issuer, serial, validity) is the certificate's
    with pytest.raises(XfccError, match="does not match"):
        forwarded_peer(Element(by=(FRONT,), hash="3" * 64, cert=quote(pem)), proxy, require_client_auth_eku=True)
    bare = forwarded_peer(Element(by=(FRONT,), hash=reader.sha256, uri=(READER,)), proxy, require_client_auth_eku=True)
    assert (bare.spiffe_id, bare.issuer, bare.x5t_s256) == (READER, "", reader.x5t_s256)
    assert bare.valid_until == proxy.valid_until


def test_front_proxies_are_named_by_exactly_one_verified_identity() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        Xfcc.model_validate({"trusted_proxies": [{}]})
    with pytest.raises(ValueError, match="exactly one"):
        Xfcc.model_validate({"trusted_proxies": [{"spiffe_id": FRONT, "sha256": "a" * 64}]})
    with pytest.raises(ValueError):
        Xfcc.model_validate({"trusted_proxies": [{"sha256": "not-hex"}]})
