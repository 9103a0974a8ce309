"""Attacks from review: each once fixed, kept here so it stays fixed."""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
import time
from pathlib import Path

import orjson
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from tests.conftest import Upstream
from tests.support import OpaProcess, client_context, get, make_config, raw_https

from vvault_pep.app.runtime import PepRuntime


async def test_decision_headers_replace_the_clients_never_sit_beside_them(
    pep: PepRuntime, pki: Path, upstream: Upstream
) -> None:
    resp = await raw_https(
        pep.port,
        client_context(pki, "reader"),
        get(
            "/v1/tenants/acme/stream/10",
            "X-User-Id: mallory",
            "x-tenant: globex",
            "X-Request-ID: mine",
            host="user.test",
        ),
    )
    assert resp.status == 200
    [seen] = upstream.seen_with(resp.headers["x-request-id"])
    values = [(k.lower(), v) for k, v in seen["headers"]]
    assert [v for k, v in values if k == "x-user-id"] == ["alice"]
    assert [v for k, v in values if k == "x-tenant"] == ["acme"]
    assert [v for k, v in values if k == "x-request-id"] == [resp.headers["x-request-id"]]


@pytest.mark.parametrize(
    "header",
    [
        "True-Client-IP: 10.0.0.1",
        "X-Forwarded: for=10.0.0.1",
        "Client-IP: 10.0.0.1",
        "X-Cluster-Client-IP: 10.0.0.1",
        "CF-Connecting-IP: 10.0.0.1",
        "X-Original-Host: evil.example",
        "X-Forwarded-Server: evil.example",
    ],
)
async def test_more_client_ip_and_host_spoofing_headers_are_stripped(
    pep: PepRuntime, pki: Path, upstream: Upstream, header: str
) -> None:
    resp = await raw_https(pep.port, client_context(pki, "reader"), get("/v1/tenants/acme/secrets/db-password", header))
    assert resp.status == 200
    [seen] = upstream.seen_with(resp.headers["x-request-id"])
    name = header.split(":")[0].lower()
    assert name not in {k.lower() for k, _ in seen["headers"]}


@pytest.mark.parametrize(
    "path",
    [
        "/v1/tenants/acme/..;/..;/globex/secrets/x",
        "/v1/tenants/acme/.;x/secrets/x",
        "/v1/tenants/acme/secrets/..;jsessionid=1/x",
    ],
)
async def test_dot_segments_with_parameters_are_refused(
    pep: PepRuntime, pki: Path, upstream: Upstream, path: str
) -> None:
    resp = await raw_https(pep.port, client_context(pki, "reader"), get(path))
    assert resp.status == 400
    assert orjson.loads(resp.body)["code"] == "sanitize.ambiguous_path"
    assert upstream.seen_with(resp.headers["x-request-id"]) == []


async def test_total_header_size_is_limited(pep: PepRuntime, pki: Path) -> None:
    big = [f"X-Pad-{i}: {'a' * 7000}" for i in range(12)]  # each header fine, 84 KB together
    resp = await raw_https(pep.port, client_context(pki, "reader"), get("/v1/tenants/acme/secrets/db-password", *big))
    assert resp.status == 431


def _short_lived_cert(pki: Path, tmp: Path, seconds: int) -> tuple[Path, Path, dt.datetime]:
    ca_key = serialization.load_pem_private_key((pki / "ca-key.pem").read_bytes(), None)
    ca = x509.load_pem_x509_certificate((pki / "ca.pem").read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    not_after = now + dt.timedelta(seconds=seconds)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "vvault-pep demo"),
            x509.NameAttribute(NameOID.COMMON_NAME, "short-lived"),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier("spiffe://demo.vvault/client/reader")]),
            critical=False,
        )
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.public_key()), critical=False)  # type: ignore[arg-type]
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    cert_path, key_path = tmp / "short.pem", tmp / "short-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path, not_after


async def test_a_certificate_that_expires_on_an_open_connection_stops_working(
    pep: PepRuntime, pki: Path, tmp_path: Path
) -> None:
    # long enough for the first request on 2 busy cores, short enough to wait out
    cert, key, not_after = _short_lived_cert(pki, tmp_path, 6)
    ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    ctx.load_cert_chain(str(cert), str(key))
    reader, writer = await asyncio.open_connection("127.0.0.1", pep.port, ssl=ctx, server_hostname="localhost")
    request = b"GET /v1/tenants/acme/secrets/db-password HTTP/1.1\r\nHost: localhost\r\n\r\n"

    async def one() -> int:
        writer.write(request)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")).split(b":")[1])
        await reader.readexactly(length)
        return int(head.split(b" ")[1])

    try:
        assert await one() == 200
        async with asyncio.timeout(10):
            while dt.datetime.now(dt.UTC) < not_after:
                await asyncio.sleep(0.05)
        assert await one() == 401  # same connection, certificate now expired
    finally:
        writer.close()


async def test_no_tls_session_resumption(pep: PepRuntime, pki: Path) -> None:
    import socket

    ctx = client_context(pki, "reader")

    def connect(session: ssl.SSLSession | None) -> tuple[ssl.SSLSession | None, bool]:
        with socket.create_connection(("127.0.0.1", pep.port), timeout=5) as raw:
            with ctx.wrap_socket(raw, server_hostname="localhost", session=session) as tls:
                tls.sendall(
                    b"GET /v1/tenants/acme/secrets/db-password HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
                )
                while tls.recv(65536):
                    pass
                return tls.session, tls.session_reused

    session, _ = await asyncio.to_thread(connect, None)
    _, reused = await asyncio.to_thread(connect, session)
    assert reused is False


async def test_a_trickling_body_is_cut_off(pki: Path, opa: OpaProcess, upstream: Upstream) -> None:
    config = make_config(pki, opa_url=opa.url, upstream_port=upstream.port, limits={"body_idle_timeout_s": 0.5})
    runtime = PepRuntime(config)
    await runtime.start()
    try:
        ctx = client_context(pki, "reader")
        reader, writer = await asyncio.open_connection("127.0.0.1", runtime.port, ssl=ctx, server_hostname="localhost")
        writer.write(b"PUT /v1/tenants/acme/blobs/slow HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\nx")
        await writer.drain()
        started = time.monotonic()
        async with asyncio.timeout(10):
            head = await reader.readuntil(b"\r\n\r\n")
        writer.close()
        assert head.startswith(b"HTTP/1.1 408")
        assert b"Connection: close" in head
        assert time.monotonic() - started < 5
    finally:
        await runtime.stop()


async def test_a_bad_chunk_after_good_ones_ends_the_request(pep: PepRuntime, pki: Path, upstream: Upstream) -> None:
    ctx = client_context(pki, "reader")
    before = len(upstream.seen_path("/v1/tenants/acme/blobs/badchunk"))
    reader, writer = await asyncio.open_connection("127.0.0.1", pep.port, ssl=ctx, server_hostname="localhost")
    big = b"a" * (70 << 10)  # past limits.buffer_body_bytes: streamed, not received whole first
    writer.write(
        b"PUT /v1/tenants/acme/blobs/badchunk HTTP/1.1\r\nHost: localhost\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + f"{len(big):x}".encode() + b"\r\n" + big + b"\r\n"
    )
    await writer.drain()
    async with asyncio.timeout(10):  # the request (and its good chunk) is already upstream …
        while len(upstream.seen_path("/v1/tenants/acme/blobs/badchunk")) == before:
            await asyncio.sleep(0.01)
    writer.write(b"zz\r\nhello\r\n0\r\n\r\n")  # … when the bad chunk arrives
    await writer.drain()
    async with asyncio.timeout(10):
        head = await reader.readuntil(b"\r\n\r\n")
    writer.close()
    assert head.startswith(b"HTTP/1.1 400")


async def test_listener_host_allowlist(pki: Path, opa: OpaProcess, upstream: Upstream) -> None:
    config = make_config(pki, opa_url=opa.url, upstream_port=upstream.port, listener={"hosts": ["localhost"]})
    runtime = PepRuntime(config)
    await runtime.start()
    try:
        ctx = client_context(pki, "reader")
        ok = await raw_https(runtime.port, ctx, get("/v1/tenants/acme/secrets/db-password"))
        assert ok.status == 200
        bad = await raw_https(runtime.port, ctx, get("/v1/tenants/acme/secrets/db-password", host="evil.example"))
        assert bad.status == 421
        assert orjson.loads(bad.body)["code"] == "sanitize.unknown_host"
    finally:
        await runtime.stop()
