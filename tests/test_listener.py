"""mTLS at the door: real certificates over real sockets."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest
from tests.conftest import Upstream
from tests.support import OpaProcess, client_context, get, make_config, raw_https

from vvault_pep.app.runtime import PepRuntime
from vvault_pep.core.request import CertificateRefused, parse_peer


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
    from vvault_pep.edge.listener import server_context

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


async def test_rotated_server_certificate_is_served_without_a_restart(
    tmp_path: Path, pki: Path, opa: OpaProcess, upstream: Upstream
) -> None:
    import os
    import shutil

    live = tmp_path / "live"
    live.mkdir()
    for name in ("server.pem", "server-key.pem", "ca.pem"):
        shutil.copy(pki / name, live / name)
    config = make_config(
        pki,
        opa_url=opa.url,
        upstream_port=upstream.port,
        listener={
            "tls": {
                "cert_file": str(live / "server.pem"),
                "key_file": str(live / "server-key.pem"),
                "client_ca_file": str(live / "ca.pem"),
                "reload_interval_s": 0.1,
            }
        },
    )
    runtime = PepRuntime(config)
    await runtime.start()
    try:

        async def served_serial() -> int:
            _, writer = await asyncio.open_connection(
                "127.0.0.1", runtime.port, ssl=client_context(pki, "reader"), server_hostname="localhost"
            )
            der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
            writer.close()
            from cryptography import x509

            return x509.load_der_x509_certificate(der).serial_number

        before = await served_serial()
        # the same CA issues a new server certificate (as cert-manager would), swapped in atomically
        new_cert, new_key = _reissue(pki, tmp_path)
        os.replace(new_key, live / "server-key.pem")
        os.replace(new_cert, live / "server.pem")
        async with asyncio.timeout(10):
            while runtime.tls_reloads == 0:
                await asyncio.sleep(0.05)
        after = await served_serial()
        assert after != before
        assert await _handshake_then_get(runtime.port, client_context(pki, "reader")) == 200
    finally:
        await runtime.stop()


def _reissue(pki: Path, tmp: Path) -> tuple[Path, Path]:
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_key = serialization.load_pem_private_key((pki / "ca-key.pem").read_bytes(), None)
    ca = x509.load_pem_x509_certificate((pki / "ca.pem").read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    cert_path, key_path = tmp / "new-server.pem", tmp / "new-server-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path
