"""mTLS at the door: real certificates over real sockets."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest
from tests.conftest import Upstream
from tests.support import OpaProcess, client_context, get, make_config, raw_https

from vvault_pep.listener import CertificateRefused, parse_peer
from vvault_pep.runtime import PepRuntime


async def _handshake_then_get(port: int, ctx: ssl.SSLContext) -> int:
    """Status of one GET, or raise the TLS/connection error the client saw."""
    resp = await raw_https(port, ctx, get("/v1/tenants/acme/secrets/db-password"), timeout=5)
    return resp.status


async def test_trusted_client_certificate_is_accepted(pep: PepRuntime, pki: Path) -> None:
    assert await _handshake_then_get(pep.port, client_context(pki, "reader")) == 200


async def test_client_without_certificate_fails_the_handshake(pep: PepRuntime, pki: Path) -> None:
    with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
        await _handshake_then_get(pep.port, client_context(pki, None))


@pytest.mark.parametrize("name", ["stranger", "expired"])
async def test_untrusted_or_expired_certificate_fails_the_handshake(pep: PepRuntime, pki: Path, name: str) -> None:
    with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
        await _handshake_then_get(pep.port, client_context(pki, name))


@pytest.mark.parametrize("name", ["no-eku", "server-eku", "leaf-ca"])
async def test_certificate_without_client_auth_eku_or_with_ca_true_is_refused(
    pep: PepRuntime, pki: Path, upstream: Upstream, name: str
) -> None:
    before = upstream.count()
    with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
        await _handshake_then_get(pep.port, client_context(pki, name))
    assert upstream.count() == before


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
async def test_tls_1_1_is_refused(pep: PepRuntime, pki: Path) -> None:
    ctx = client_context(pki, "reader")
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this client really offer TLS 1.1
    ctx.minimum_version = ssl.TLSVersion.TLSv1_1
    ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        await _handshake_then_get(pep.port, ctx)


async def test_server_does_not_trust_the_system_store(pep: PepRuntime, pki: Path) -> None:
    # The PEP's CA bundle holds only the demo CA: its trust list sent in the
    # CertificateRequest must name that CA and nothing else.
    ctx = client_context(pki, "reader")
    _, writer = await asyncio.open_connection("127.0.0.1", pep.port, ssl=ctx, server_hostname="localhost")
    try:
        ssl_obj = writer.get_extra_info("ssl_object")
        assert ssl_obj.version() in ("TLSv1.2", "TLSv1.3")
    finally:
        writer.close()
    from vvault_pep.listener import server_context

    server_ctx = server_context(pep.config.listener.tls)
    names = [dict(x[0] for x in c["subject"])["commonName"] for c in server_ctx.get_ca_certs()]
    assert names == ["vvault demo CA"]


async def test_optional_client_auth_lets_the_policy_decide(pki: Path, opa: OpaProcess, upstream: Upstream) -> None:
    config = make_config(
        pki, opa_url=opa.url, upstream_port=upstream.port, listener={"tls": {"client_auth": "optional"}}
    )
    runtime = PepRuntime(config)
    await runtime.start()
    try:
        resp = await raw_https(runtime.port, client_context(pki, None), get("/v1/tenants/acme/secrets/db-password"))
        assert resp.status == 403
        assert b"policy.no_client_cert" in resp.body
        assert await _handshake_then_get(runtime.port, client_context(pki, "reader")) == 200
    finally:
        await runtime.stop()


def test_peer_certificate_becomes_data(pki: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert = x509.load_pem_x509_certificate((pki / "client-reader.pem").read_bytes())
    peer = parse_peer(cert.public_bytes(serialization.Encoding.DER))
    assert peer.subject == "CN=demo-reader,O=vvault-pep demo"
    assert peer.issuer == "CN=vvault demo CA,O=vvault-pep demo"
    assert peer.spiffe_id == "spiffe://demo.vvault/client/reader"
    assert peer.uri_sans == ("spiffe://demo.vvault/client/reader",)
    assert len(peer.sha256) == 64
    assert peer.not_after.endswith("Z")


@pytest.mark.parametrize(
    ("name", "why"), [("no-eku", "no extendedKeyUsage"), ("server-eku", "clientAuth"), ("leaf-ca", "CA:TRUE")]
)
def test_parse_peer_refuses(pki: Path, name: str, why: str) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert = x509.load_pem_x509_certificate((pki / f"client-{name}.pem").read_bytes())
    with pytest.raises(CertificateRefused, match=why):
        parse_peer(cert.public_bytes(serialization.Encoding.DER))


async def test_plain_http_on_the_tls_port_gets_nothing(pep: PepRuntime) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", pep.port)
    writer.write(get("/v1/tenants/acme/secrets/db-password"))
    await writer.drain()
    async with asyncio.timeout(10):
        data = await reader.read(-1)
    writer.close()
    assert b"db-password" not in data and b"s3cr3t" not in data
    assert not data.startswith(b"HTTP/1.1 200")
