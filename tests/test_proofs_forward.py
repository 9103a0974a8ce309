"""Forwarding promises with no other proof: body limits, upstream mTLS, an upstream dying mid-answer.

* a declared ``Content-Length`` over ``limits.max_body_bytes`` is a 413 before
  routing (an unknown path gets 413, not 404) and nothing reaches the upstream;
* a chunked body is counted as it streams and cut at the limit: 413, and the
  upstream never holds a complete body (no blob stored);
* ``upstreams.*.tls`` with a client certificate: an upstream that requires
  one sees the PEP's certificate; without it the upstream refuses and the
  client gets a 502, never a plaintext fallback;
* a response header the upstream's ``Connection`` names is hop-by-hop: it
  never reaches the client;
* an upstream that dies after its status line: the client's connection is
  cut short (fewer bytes than the Content-Length it was promised) and the
  audit record says ``aborted: upstream_failed``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from examples.vvault_api.app import STORE
from tests.conftest import Upstream
from tests.support import ROUTES, OpaProcess, RawResponse, client_context, config_doc, get, raw_https

from vvault_pep.app.runtime import PepRuntime
from vvault_pep.config import Config

LIMIT = 4096
EXTRA_ROUTES: list[dict[str, Any]] = [
    {
        "name": "mtls_up",
        "path": "/mtls/{rest*}",
        "methods": ["GET"],
        "upstream": "mtls",
        "policy": "faults/plain_true",
        "cache": "off",
    },
    {
        "name": "mtls_up_nocert",
        "path": "/nocert/{rest*}",
        "methods": ["GET"],
        "upstream": "mtls_nocert",
        "policy": "faults/plain_true",
        "cache": "off",
    },
    {
        "name": "dying_up",
        "path": "/dying/{rest*}",
        "methods": ["GET"],
        "upstream": "dying",
        "policy": "faults/plain_true",
        "cache": "off",
    },
]


@contextlib.asynccontextmanager
async def _serve(app: web.Application, ssl_context: ssl.SSLContext | None = None) -> AsyncIterator[int]:
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await site.start()
    try:
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


def _mtls_upstream(seen: list[dict[str, Any]]) -> web.Application:
    async def handler(request: web.Request) -> web.Response:
        cert = request.transport.get_extra_info("peercert") if request.transport else None
        subject = {k: v for rdn in (cert or {}).get("subject", ()) for k, v in rdn}
        seen.append({"path": request.path, "client_cn": subject.get("commonName")})
        return web.json_response({"client_cn": subject.get("commonName")})

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    return app


def _dying_upstream() -> web.Application:
    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(status=200, headers={"Content-Length": "1000000", "Content-Type": "text/plain"})
        await resp.prepare(request)
        await resp.write(b"x" * 1000)
        assert request.transport is not None
        request.transport.abort()  # the upstream process dies mid-answer
        return resp

    async def connection_named(request: web.Request) -> web.Response:
        # X-Hop is hop-by-hop for this hop only, because Connection names it
        return web.Response(text="ok", headers={"Connection": "X-Hop", "X-Hop": "upstream-only", "X-Kept": "1"})

    app = web.Application()
    app.router.add_get("/dying/connection-named", connection_named)
    app.router.add_get("/{tail:.*}", handler)
    return app


@pytest.fixture(scope="module")
async def proofs_pep(pki: Path, opa: OpaProcess, upstream: Upstream) -> AsyncIterator[tuple[PepRuntime, list[Any]]]:
    seen: list[dict[str, Any]] = []
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki / "ca.pem"))
    server_ctx.load_cert_chain(str(pki / "server.pem"), str(pki / "server-key.pem"))
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    async with _serve(_mtls_upstream(seen), server_ctx) as mtls_port, _serve(_dying_upstream()) as dying_port:
        doc = config_doc(
            pki,
            opa_url=opa.url,
            upstream_port=upstream.port,
            limits={"max_body_bytes": LIMIT},
            routes=[*ROUTES, *EXTRA_ROUTES],
        )
        ca = str(pki / "ca.pem")
        doc["upstreams"]["mtls"] = {
            "url": f"https://127.0.0.1:{mtls_port}",
            "tls": {
                "ca_file": ca,
                "cert_file": str(pki / "client-ops.pem"),
                "key_file": str(pki / "client-ops-key.pem"),
                "server_hostname": "localhost",
            },
        }
        doc["upstreams"]["mtls_nocert"] = {
            "url": f"https://127.0.0.1:{mtls_port}",
            "tls": {"ca_file": ca, "server_hostname": "localhost"},
            "connect_timeout_s": 5,
        }
        doc["upstreams"]["dying"] = {"url": f"http://127.0.0.1:{dying_port}"}
        runtime = PepRuntime(Config.model_validate(doc))
        await runtime.start()
        try:
            yield runtime, seen
        finally:
            await runtime.stop()


def _records(caplog: pytest.LogCaptureFixture, request_id: str | None = None) -> list[dict[str, Any]]:
    out = [r.audit for r in caplog.records if hasattr(r, "audit")]
    return [r for r in out if request_id is None or r.get("request_id") == request_id]


@pytest.mark.parametrize("path", ["/v1/tenants/acme/blobs/declared", "/no/such/route"])
async def test_declared_oversize_body_is_413_before_routing(
    proofs_pep: tuple[PepRuntime, list[Any]],
    pki: Path,
    upstream: Upstream,
    caplog: pytest.LogCaptureFixture,
    path: str,
) -> None:
    pep, _ = proofs_pep
    before = upstream.count()
    head = f"PUT {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {LIMIT + 1}\r\nConnection: close\r\n\r\n"
    with caplog.at_level(logging.INFO, logger="vvault_pep.audit"):
        # Only the head is sent: the refusal must not wait for a body it will never read.
        resp = await _one_response(pep.port, client_context(pki, "reader"), head.encode())
    assert resp.status == 413
    assert orjson.loads(resp.body)["code"] == "sanitize.body_too_large"
    assert upstream.count() == before
    [record] = _records(caplog, resp.headers["x-request-id"])
    assert (record["status"], record["route"], record["result"]["code"]) == (413, None, "sanitize.body_too_large")


async def test_body_at_the_limit_goes_through(proofs_pep: tuple[PepRuntime, list[Any]], pki: Path) -> None:
    pep, _ = proofs_pep
    body = b"b" * LIMIT
    head = f"PUT /v1/tenants/acme/blobs/at-limit HTTP/1.1\r\nHost: localhost\r\nContent-Length: {LIMIT}\r\n"
    resp = await raw_https(pep.port, client_context(pki, "reader"), head.encode() + b"Connection: close\r\n\r\n" + body)
    assert resp.status == 201
    assert orjson.loads(resp.body)["bytes"] == LIMIT


async def test_oversize_chunked_body_is_cut_and_never_stored(
    proofs_pep: tuple[PepRuntime, list[Any]], pki: Path, upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    pep, _ = proofs_pep
    piece = b"c" * 1024
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for _ in range(LIMIT // len(piece) + 2)) + b"0\r\n\r\n"
    head = b"PUT /v1/tenants/acme/blobs/chunked-big HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n"
    with caplog.at_level(logging.INFO, logger="vvault_pep.audit"):
        resp = await raw_https(pep.port, client_context(pki, "reader"), head + b"Connection: close\r\n\r\n" + chunks)
    assert resp.status == 413
    assert orjson.loads(resp.body)["code"] == "sanitize.body_too_large"
    # The upstream may have seen the request start, never a whole body: nothing stored.
    assert ("acme", "chunked-big") not in upstream.app[STORE].blobs
    assert all("body_len" not in e for e in upstream.seen_path("/v1/tenants/acme/blobs/chunked-big"))
    [record] = _records(caplog, resp.headers["x-request-id"])
    # The record keeps the policy's result (it allowed); the status says the body was refused.
    assert (record["status"], record["upstream_status"]) == (413, None)


async def test_upstream_mtls_presents_the_pep_certificate(proofs_pep: tuple[PepRuntime, list[Any]], pki: Path) -> None:
    pep, seen = proofs_pep
    resp = await raw_https(pep.port, client_context(pki, "reader"), get("/mtls/hello"))
    assert resp.status == 200
    assert orjson.loads(resp.body) == {"client_cn": "demo-ops"}
    assert seen[-1] == {"path": "/mtls/hello", "client_cn": "demo-ops"}


async def test_upstream_requiring_a_certificate_refuses_a_pep_without_one(
    proofs_pep: tuple[PepRuntime, list[Any]], pki: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pep, seen = proofs_pep
    before = len(seen)
    with caplog.at_level(logging.INFO, logger="vvault_pep.audit"):
        resp = await raw_https(pep.port, client_context(pki, "reader"), get("/nocert/hello"))
    assert resp.status == 502
    # TLS 1.3 lets the client finish its handshake before the server checks for a
    # certificate: the refusal arrives as a reset on the first read, not a failed connect.
    assert orjson.loads(resp.body)["code"] == "upstream.error"
    assert len(seen) == before
    [record] = _records(caplog, resp.headers["x-request-id"])
    assert record["status"] == 502


async def _one_response(port: int, ctx: ssl.SSLContext, request: bytes) -> RawResponse:
    """Read exactly one response (head + Content-Length bytes), without waiting for the close."""
    async with asyncio.timeout(10):
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost")
        try:
            writer.write(request)
            await writer.drain()
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            lines = head.split("\r\n")
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
            body = await reader.readexactly(int(headers["content-length"]))
        finally:
            writer.close()
    return RawResponse(int(lines[0].split(" ")[1]), headers, body)


async def _read_all(port: int, ctx: ssl.SSLContext, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost")
    data = b""
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(10):
            while True:
                try:
                    part = await reader.read(65536)
                except (ConnectionError, ssl.SSLError):
                    break
                if not part:
                    break
                data += part
    finally:
        writer.close()
    return data


async def test_upstream_dying_mid_response_cuts_the_client_and_is_recorded(
    proofs_pep: tuple[PepRuntime, list[Any]], pki: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pep, _ = proofs_pep
    with caplog.at_level(logging.INFO, logger="vvault_pep.audit"):
        data = await _read_all(pep.port, client_context(pki, "reader"), get("/dying/x"))
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        assert b"content-length: 1000000" in head.lower()
        assert 0 < len(body) < 1_000_000  # cut short, never padded or completed
        request_id = next(
            line.split(b":", 1)[1].strip().decode()
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"x-request-id:")
        )

        async def recorded() -> dict[str, Any]:
            while not (found := _records(caplog, request_id)):
                await asyncio.sleep(0.02)
            return found[0]

        record = await asyncio.wait_for(recorded(), 10)
    assert record["aborted"] == "upstream_failed"
    assert record["upstream_status"] == 200
    assert record["bytes_out"] < 1_000_000


async def test_response_headers_named_by_connection_stay_with_the_upstream_hop(
    proofs_pep: tuple[PepRuntime, list[Any]], pki: Path
) -> None:
    pep, _ = proofs_pep
    resp = await raw_https(pep.port, client_context(pki, "reader"), get("/dying/connection-named"))
    assert (resp.status, resp.body) == (200, b"ok")
    assert resp.headers["x-kept"] == "1"
    assert "x-hop" not in resp.headers
