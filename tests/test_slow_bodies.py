"""Slow clients cannot starve the upstream pool: body deadlines, in-flight limits, a fast 503.

A real PEP (real OPA, real TLS) in front of a loopback upstream whose pool holds two
connections.  Slow clients trickle their bodies a byte at a time; everyone else must
still be served at once, and every slow request ends at its deadline with 408 and a
record saying so.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from tests.idp import Issuer
from tests.support import OpaProcess, client_context, config_doc

from vvault_pep.app.runtime import PepRuntime
from vvault_pep.config import Config
from vvault_pep.core.principal import Identity, UserToken, Workload
from vvault_pep.core.principal import subject_of as _subject
from vvault_pep.decide.inflight import InFlight
from vvault_pep.errors import PepError

POOL = 2
DEADLINE_S = 1.5
PER_CLIENT = 4
SEEN: list[str] = []
RELEASE: dict[str, asyncio.Event] = {}


async def blob(request: web.Request) -> web.Response:
    SEEN.append(request.path)
    try:
        size = len(await request.read())
    except (aiohttp.ClientPayloadError, ConnectionError):
        return web.Response(status=499)  # the PEP gave up on the client mid-body
    return web.json_response({"bytes": size}, status=201)


async def ping(request: web.Request) -> web.Response:
    SEEN.append(request.path)
    return web.json_response({"ok": True})


async def hold(request: web.Request) -> web.Response:
    SEEN.append(request.path)
    await RELEASE["hold"].wait()
    return web.json_response({"held": True})


async def big(request: web.Request) -> web.StreamResponse:
    SEEN.append(request.path)
    response = web.StreamResponse()
    response.content_length = 64 << 20
    await response.prepare(request)
    chunk = b"b" * (1 << 20)
    with contextlib.suppress(ConnectionError):
        for _ in range(64):
            await response.write(chunk)
    return response


@pytest.fixture(scope="module")
async def slow_upstream() -> AsyncIterator[int]:
    app = web.Application(client_max_size=1 << 24)
    app.router.add_put("/blobs/{name}", blob)
    app.router.add_get("/ping", ping)
    app.router.add_get("/hold", hold)
    app.router.add_get("/big", big)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield runner.addresses[0][1]
    await runner.cleanup()


@pytest.fixture(scope="module")
async def pep(pki: Path, opa: OpaProcess, slow_upstream: int) -> AsyncIterator[PepRuntime]:
    routes = [
        {
            "name": "blobs",
            "path": "/blobs/{name}",
            "methods": ["PUT"],
            "upstream": "small",
            "policy": "faults/plain_true",
        },
        {"name": "ping", "path": "/ping", "methods": ["GET"], "upstream": "small", "policy": "faults/plain_true"},
        {"name": "hold", "path": "/hold", "methods": ["GET"], "upstream": "small", "policy": "faults/plain_true"},
        {"name": "big", "path": "/big", "methods": ["GET"], "upstream": "small", "policy": "faults/plain_true"},
    ]
    doc = config_doc(
        pki,
        opa_url=opa.url,
        upstream_port=slow_upstream,
        routes=routes,
        limits={
            "body_deadline_s": DEADLINE_S,
            "body_idle_timeout_s": 10,  # the idle gap alone would never cut a byte a tenth of a second
            "max_in_flight_per_client": PER_CLIENT,
            "send_idle_timeout_s": 0.5,
        },
    )
    doc["upstreams"] = {
        "small": {"url": f"http://127.0.0.1:{slow_upstream}", "max_connections": POOL, "pool_timeout_s": 0.3}
    }
    runtime = PepRuntime(Config.model_validate(doc))
    await runtime.start()
    yield runtime
    await runtime.stop()


async def _wait_for(condition: Any, what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def _trickle(port: int, ctx: ssl.SSLContext, path: str, *, length: int, first: bytes = b"") -> dict[str, Any]:
    """A PUT whose body comes one byte every 0.1 s after ``first``; the answer's head and timing."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost")
    writer.write(f"PUT {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {length}\r\n\r\n".encode() + first)
    started = time.monotonic()

    async def drip() -> None:
        with contextlib.suppress(ConnectionError):
            for _ in range(length - len(first) - 1):  # never the last byte
                writer.write(b"x")
                await writer.drain()
                await asyncio.sleep(0.1)

    dripping = asyncio.create_task(drip(), name="drip")
    try:
        async with asyncio.timeout(15):
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    finally:
        dripping.cancel()
        writer.close()
    lines = head.split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    return {"status": int(lines[0].split(" ")[1]), "elapsed": time.monotonic() - started, "headers": headers}


def _records(caplog: pytest.LogCaptureFixture, request_ids: set[str]) -> list[dict[str, Any]]:
    return [r.audit for r in caplog.records if getattr(r, "audit", {}).get("request_id") in request_ids]


async def test_slow_small_bodies_hold_no_pooled_connection_and_are_cut_at_the_deadline(
    pep: PepRuntime, pki: Path, caplog: pytest.LogCaptureFixture
) -> None:
    slow_ctx, ctx = client_context(pki, "ops"), client_context(pki, "reader")
    ops = f"client:cert:{_thumbprint(pki, 'ops')}"
    assert pep.pipeline is not None and pep.upstreams is not None
    with caplog.at_level(logging.INFO, logger="vvault_pep.audit"):
        attack = [
            asyncio.create_task(_trickle(pep.port, slow_ctx, f"/blobs/slow-{i}", length=100), name=f"slow-{i}")
            for i in range(PER_CLIENT)  # N = 4 slow clients > a pool of M = 2
        ]
        await _wait_for(lambda: pep.pipeline.inflight.count(ops) == PER_CLIENT, "every slow client in flight")
        assert pep.upstreams.in_use("small") == 0  # trickling into the PEP, not into the pool
        connector = aiohttp.TCPConnector(ssl=ctx)
        latencies = []
        async with aiohttp.ClientSession(connector=connector) as http:
            for i in range(5):
                started = time.monotonic()
                async with http.get(f"https://localhost:{pep.port}/ping") as resp:
                    assert resp.status == 200
                async with http.put(f"https://localhost:{pep.port}/blobs/fast-{i}", data=b"y" * 1000) as resp:
                    assert resp.status == 201
                    assert (await resp.json())["bytes"] == 1000
                latencies.append(time.monotonic() - started)
                assert latencies[-1] < 1.0  # served at once, not after the slow ones
        print(f"GET + 1 kB PUT during the attack: max {max(latencies) * 1000:.1f} ms")
        # The same client over its in-flight limit is refused at once, before its body.
        over = await _trickle(pep.port, slow_ctx, "/blobs/one-too-many", length=100)
        assert over["status"] == 429 and over["elapsed"] < 1.0
        assert over["headers"]["retry-after"] == "1"
        assert all(not task.done() for task in attack)  # all of that happened during the attack
        cut = await asyncio.gather(*attack)
    for answer in cut:
        assert answer["status"] == 408
        assert DEADLINE_S - 0.1 <= answer["elapsed"] < DEADLINE_S + 3
        assert answer["headers"]["connection"] == "close"
    records = _records(caplog, {answer["headers"]["x-request-id"] for answer in cut})
    assert len(records) == PER_CLIENT
    for record in records:
        assert record["status"] == 408
        assert record["error"]["code"] == "sanitize.body_deadline"
        assert record["request_path"].startswith("/blobs/slow-")
    assert not [p for p in SEEN if p.startswith("/blobs/slow-")]  # the upstream never saw them
    [over_record] = _records(caplog, {over["headers"]["x-request-id"]})
    assert over_record["error"]["code"] == "ratelimit.concurrency"


async def test_a_slow_streamed_upload_is_cut_at_its_deadline_and_frees_its_connection(
    pep: PepRuntime, pki: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert pep.upstreams is not None
    with caplog.at_level(logging.INFO, logger="vvault_pep.audit"):
        # Past limits.buffer_body_bytes: streamed upstream as it comes, holding one connection.
        task = asyncio.create_task(
            _trickle(pep.port, client_context(pki, "ops"), "/blobs/big", length=1 << 20, first=b"z" * (80 << 10))
        )
        await _wait_for(lambda: "/blobs/big" in SEEN, "the upload to reach the upstream")
        assert pep.upstreams.in_use("small") == 1
        answer = await task
    assert answer["status"] == 408
    assert DEADLINE_S - 0.1 <= answer["elapsed"] < DEADLINE_S + 3
    [record] = _records(caplog, {answer["headers"]["x-request-id"]})
    assert record["error"]["code"] == "sanitize.body_deadline"
    await _wait_for(lambda: pep.upstreams is not None and pep.upstreams.in_use("small") == 0, "the connection back")


async def test_a_full_pool_answers_503_with_retry_after_at_once(pep: PepRuntime, pki: Path) -> None:
    RELEASE["hold"] = asyncio.Event()
    assert pep.upstreams is not None
    base = f"https://localhost:{pep.port}"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_context(pki, "reader"))) as http:

        async def held() -> int:
            async with http.get(f"{base}/hold") as resp:
                return resp.status

        holders = [asyncio.create_task(held()) for _ in range(POOL)]
        await _wait_for(lambda: pep.upstreams is not None and pep.upstreams.in_use("small") == POOL, "a full pool")
        started = time.monotonic()
        async with http.get(f"{base}/ping") as resp:
            assert resp.status == 503
            assert resp.headers["Retry-After"] == "1"
            assert (await resp.json())["code"] == "upstream.saturated"
        assert time.monotonic() - started < 1.5  # pool_timeout_s is 0.3: not a hang
        RELEASE["hold"].set()
        assert await asyncio.gather(*holders) == [200] * POOL
        async with http.get(f"{base}/ping") as resp:
            assert resp.status == 200


async def test_a_client_that_stops_reading_the_answer_is_cut_off(
    pep: PepRuntime, pki: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert pep.upstreams is not None
    with caplog.at_level(logging.INFO, logger="vvault_pep.audit"):
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", pep.port, ssl=client_context(pki, "reader"), server_hostname="localhost"
        )
        writer.write(b"GET /big HTTP/1.1\r\nHost: localhost\r\n\r\n")
        async with asyncio.timeout(10):
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        assert head.startswith("HTTP/1.1 200")
        request_id = next(
            line.split(":", 1)[1].strip() for line in head.split("\r\n") if line.startswith("X-Request-Id")
        )
        # ... and then never reads again: 64 MiB cannot fit in the socket buffers.
        await _wait_for(lambda: pep.upstreams is not None and pep.upstreams.in_use("small") == 0, "the connection back")
        await _wait_for(lambda: bool(_records(caplog, {request_id})), "the record")
        writer.close()
    [record] = _records(caplog, {request_id})
    assert record["aborted"] == "client_stalled"
    assert 0 < record["bytes_out"] < 64 << 20


async def test_one_subject_is_limited_across_its_certificates(
    pki: Path, opa: OpaProcess, slow_upstream: int, idp: Issuer
) -> None:
    routes = [
        {"name": n, "path": f"/{n}", "methods": ["GET"], "upstream": "small", "policy": "faults/plain_true",
         "authn": {"require": "user"}}
        for n in ("ping", "hold")
    ]  # fmt: skip
    doc = config_doc(
        pki,
        opa_url=opa.url,
        upstream_port=slow_upstream,
        routes=routes,
        identity={"issuers": [{"name": "corp", "issuer": idp.url, "audiences": ["vvault"], "allow_http": True}]},
        limits={"max_in_flight_per_subject": 1},
    )
    doc["upstreams"] = {"small": {"url": f"http://127.0.0.1:{slow_upstream}"}}
    runtime = PepRuntime(Config.model_validate(doc))
    await runtime.start()
    RELEASE["hold"] = asyncio.Event()
    base = f"https://localhost:{runtime.port}"
    try:
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_context(pki, "reader"))) as on_reader,
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_context(pki, "ops"))) as on_ops,
        ):

            def bearer(sub: str) -> dict[str, str]:
                return {"Authorization": f"Bearer {idp.token(sub=sub)}"}

            async def held() -> int:
                async with on_reader.get(f"{base}/hold", headers=bearer("alice")) as resp:
                    return resp.status

            holding = asyncio.create_task(held())
            await _wait_for(lambda: runtime.upstreams is not None and runtime.upstreams.in_use("small") == 1, "alice")
            async with on_ops.get(f"{base}/ping", headers=bearer("alice")) as resp:
                assert resp.status == 429  # alice again, from another certificate
                assert (await resp.json())["code"] == "ratelimit.concurrency"
            async with on_ops.get(f"{base}/ping", headers=bearer("bob")) as resp:
                assert resp.status == 200  # the same certificate, another subject
            RELEASE["hold"].set()
            assert await holding == 200
            async with on_ops.get(f"{base}/ping", headers=bearer("alice")) as resp:
                assert resp.status == 200  # the slot came back
    finally:
        RELEASE["hold"].set()
        await runtime.stop()


def _thumbprint(pki: Path, name: str) -> str:
    cert = x509.load_pem_x509_certificate((pki / f"client-{name}.pem").read_bytes())
    return hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()


def subject_of(identity: Identity) -> str | None:
    """The in-flight key of the pipeline: the typed subject's principal."""
    return _subject(identity, None, None, {}).principal


def _user(issuer: str, sub: str) -> Identity:
    token = UserToken(issuer, sub, None, (), (), (), (), None, None, None, None, 0, None)
    return Identity(token, None)


@pytest.mark.parametrize(
    ("identity", "subject"),
    [
        (_user("https://corp.example", "alice"), "https://corp.example|alice"),
        (_user("https://partner.example", "alice"), "https://partner.example|alice"),
        (
            Identity(None, Workload("spiffe://prod.vvault/ns/a/sa/b", "prod.vvault", "/ns/a/sa/b")),
            "spiffe://prod.vvault/ns/a/sa/b",
        ),
        (Identity(None, None), None),
    ],
)
def test_the_subject_key_is_issuer_qualified_or_the_workload(identity: Identity, subject: str | None) -> None:
    assert subject_of(identity) == subject


def test_in_flight_limits_per_subject_across_certificates_and_release_on_exit() -> None:
    limits = InFlight(per_client=10, per_subject=2)
    alice = subject_of(_user("https://corp.example", "alice"))
    with limits.hold("cert:a", alice), limits.hold("cert:b", alice):
        with pytest.raises(PepError) as refused, limits.hold("cert:c", alice):
            pass
        assert refused.value.code == "ratelimit.concurrency"
        assert refused.value.headers == (("Retry-After", "1"),)
        with limits.hold("cert:c", subject_of(_user("https://partner.example", "alice"))):
            pass  # another issuer's alice is another person
    assert limits.count("client:cert:a") == 0 and limits.count(f"subject:{alice}") == 0
    with limits.hold("cert:a", alice):
        assert limits.count(f"subject:{alice}") == 1
