"""The lean upstream client against an upstream that writes exact bytes.

The upstream here is a raw asyncio server: it parses each request with llhttp
(httptools) and answers with the bytes the request's path names, so it can send
what no framework would — the response side of request smuggling (duplicate
or conflicting Content-Length, Content-Length with Transfer-Encoding, bad
chunking, a second answer glued to the first), an answer cut short, interim
1xx answers.  Every request goes through a real PEP (real mTLS, real OPA).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httptools
import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID
from tests.support import OpaProcess, client_context, config_doc

from vvault_pep.app.runtime import PepRuntime
from vvault_pep.config import Config


def ok(body: bytes = b"ok", *extra: str) -> bytes:
    head = "".join(f"{h}\r\n" for h in extra)
    return f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n{head}\r\n".encode() + body


@dataclass
class Answer:
    data: bytes
    close: bool = False  # close the connection right after writing
    hold: asyncio.Event | None = None  # answer only once set
    later: bytes = b""  # written on the then idle connection once ``go`` is set
    go: asyncio.Event | None = None
    drop_if_reused: bool = False  # close without a word unless first on its connection


@dataclass
class Seen:
    conn: int
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    peer: dict[str, Any] | None


@dataclass
class RawUpstream:
    answers: dict[str, Answer]
    seen: list[Seen] = field(default_factory=list)
    connections: int = 0
    closed: set[int] = field(default_factory=set)
    port: int = 0

    def saw(self, path: str) -> list[Seen]:
        return [s for s in self.seen if s.path == path]


class _RawProtocol(asyncio.Protocol):
    def __init__(self, up: RawUpstream) -> None:
        self.up = up
        up.connections += 1
        self.conn = up.connections
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.served = 0
        self._new()

    def connection_lost(self, exc: Exception | None) -> None:
        self.up.closed.add(self.conn)

    def _new(self) -> None:
        self.url = b""
        self.headers: dict[str, str] = {}
        self.body = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.close()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode().lower()] = value.decode()

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        assert self.transport is not None
        path = self.url.decode().split("?")[0]
        peer = self.transport.get_extra_info("peercert")
        self.up.seen.append(Seen(self.conn, self.parser.get_method().decode(), path, self.headers, self.body, peer))
        self._new()
        answer = self.up.answers.get(path, Answer(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"))
        self.served += 1
        if answer.drop_if_reused and self.served > 1:
            self.transport.close()
            return
        if answer.go is not None:
            asyncio.get_running_loop().create_task(self._trailing(answer))
        if answer.hold is not None:
            asyncio.get_running_loop().create_task(self._later(answer))
        else:
            self._send(answer)

    async def _trailing(self, answer: Answer) -> None:
        assert answer.go is not None and self.transport is not None
        await answer.go.wait()
        self.transport.write(answer.later)

    async def _later(self, answer: Answer) -> None:
        assert answer.hold is not None
        await answer.hold.wait()
        self._send(answer)

    def _send(self, answer: Answer) -> None:
        assert self.transport is not None
        self.transport.write(answer.data)
        if answer.close:
            self.transport.close()


ANSWERS: dict[str, Answer] = {
    "/lean/ok": Answer(ok(b"the right answer")),
    "/lean/other": Answer(ok(b"another answer")),
    "/lean/dup-cl": Answer(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 8\r\n\r\nsmuggled"),
    "/lean/same-cl": Answer(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello"),
    "/lean/cl-te": Answer(
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    ),
    "/lean/bad-chunk": Answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"),
    "/lean/open-quote": Answer(
        b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;name="unclosed\r\nhello\r\n0\r\n\r\n'
    ),
    "/lean/chunked": Answer(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n"
    ),
    "/lean/longer": Answer(ok(b"hi") + b"EXTRA BYTES"),
    "/lean/glued": Answer(ok(b"first") + ok(b"glued answer meant for the next request")),
    "/lean/cut": Answer(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000, close=True),
    "/lean/interim": Answer(
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 103 Early Hints\r\nLink: </hint.css>; rel=preload\r\n\r\n" + ok(b"final")
    ),
    "/lean/head": Answer(b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\nX-App: head\r\n\r\n"),
    "/lean/no-content": Answer(b"HTTP/1.1 204 No Content\r\nContent-Length: 7\r\n\r\n"),
    "/lean/switch": Answer(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n"),
    "/lean/huge-head": Answer(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 2_000_000 + b"\r\nContent-Length: 2\r\n\r\nhi"),
    "/lean/huge-trailer": Answer(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\nX-Trailer: "
        + b"t" * 2_000_000
        + b"\r\n\r\n"
    ),
    "/lean/trailer": Answer(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\nX-Trailer: late\r\n\r\n"
    ),
    "/lean/flaky": Answer(ok(b"answered on a fresh connection"), drop_if_reused=True),
    "/lean/not-modified": Answer(b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\n\r\n'),
    "/lean/upload": Answer(ok(b"stored")),
    "/tls/ok": Answer(ok(b"over mTLS")),
}


async def _serve(up: RawUpstream, ctx: ssl.SSLContext | None = None) -> asyncio.Server:
    server = await asyncio.get_running_loop().create_server(lambda: _RawProtocol(up), "127.0.0.1", 0, ssl=ctx)
    up.port = server.sockets[0].getsockname()[1]
    return server


ROUTES = [
    {
        "name": name,
        "path": f"/{name}/{{kind}}",
        "methods": ["GET", "HEAD", "PUT", "POST"],
        "upstream": name,
        "policy": "faults/plain_true",
    }
    for name in ("lean", "tiny", "tls", "nocert")
]


@dataclass
class Lab:
    pep: PepRuntime
    raw: RawUpstream
    tiny: RawUpstream
    tls: RawUpstream
    hold: asyncio.Event


@pytest.fixture(scope="module")
async def lab(pki: Path, opa: OpaProcess) -> AsyncIterator[Lab]:
    hold = asyncio.Event()
    raw = RawUpstream(dict(ANSWERS))
    tiny = RawUpstream({"/tiny/hold": Answer(ok(b"held"), hold=hold), "/tiny/ok": Answer(ok())})
    tls_up = RawUpstream(dict(ANSWERS))
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki / "ca.pem"))
    server_ctx.load_cert_chain(str(pki / "server.pem"), str(pki / "server-key.pem"))
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    servers = [await _serve(raw), await _serve(tiny), await _serve(tls_up, server_ctx)]
    doc = config_doc(pki, opa_url=opa.url, upstream_port=raw.port, routes=ROUTES)
    tls_block = {"ca_file": str(pki / "ca.pem"), "server_hostname": "localhost"}
    doc["upstreams"] = {
        "lean": {"url": f"http://127.0.0.1:{raw.port}", "read_timeout_s": 5},
        "tiny": {"url": f"http://127.0.0.1:{tiny.port}", "max_connections": 1, "pool_timeout_s": 0.2},
        "tls": {
            "url": f"https://127.0.0.1:{tls_up.port}",
            "tls": {
                **tls_block,
                "cert_file": str(pki / "client-reader.pem"),
                "key_file": str(pki / "client-reader-key.pem"),
            },
        },
        "nocert": {"url": f"https://127.0.0.1:{tls_up.port}", "tls": tls_block},
    }
    runtime = PepRuntime(Config.model_validate(doc))
    await runtime.start()
    yield Lab(runtime, raw, tiny, tls_up, hold)
    hold.set()
    await runtime.stop()
    for server in servers:
        server.close()


@pytest.fixture
async def http(pki: Path) -> AsyncIterator[aiohttp.ClientSession]:
    connector = aiohttp.TCPConnector(ssl=client_context(pki, "reader"))
    async with aiohttp.ClientSession(connector=connector) as session:
        yield session


async def _get(http: aiohttp.ClientSession, lab: Lab, path: str, method: str = "GET") -> tuple[int, Any, bytes]:
    async with http.request(method, f"https://localhost:{lab.pep.port}{path}") as resp:
        return resp.status, resp.headers, await resp.read()


def _records(caplog: pytest.LogCaptureFixture, request_id: str) -> list[dict[str, Any]]:
    return [r.audit for r in caplog.records if getattr(r, "audit", {}).get("request_id") == request_id]


async def _wait_for(check: Callable[[], bool], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def _then_fresh_and_right(http: aiohttp.ClientSession, lab: Lab, before: Seen) -> None:
    """The next request is answered rightly, on a connection other than ``before``'s."""
    status, _, body = await _get(http, lab, "/lean/ok")
    assert (status, body) == (200, b"the right answer")
    assert lab.raw.saw("/lean/ok")[-1].conn != before.conn


@pytest.mark.parametrize("kind", ["dup-cl", "same-cl", "cl-te"], ids=["conflicting-cl", "duplicate-cl", "cl-with-te"])
async def test_ambiguous_framing_is_a_502_and_the_connection_is_dropped(
    lab: Lab, http: aiohttp.ClientSession, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="vvault_pep.audit"):
        status, headers, body = await _get(http, lab, f"/lean/{kind}")
    assert status == 502
    assert headers["Content-Type"] == "application/problem+json"
    assert b"upstream.error" in body and b"smuggled" not in body and b"hello" not in body
    [record] = _records(caplog, headers["X-Request-Id"])
    assert (record["status"], record["error"]["code"], record["upstream_status"]) == (502, "upstream.error", None)
    await _then_fresh_and_right(http, lab, lab.raw.saw(f"/lean/{kind}")[-1])


@pytest.mark.parametrize("kind", ["bad-chunk", "open-quote"], ids=["bad-chunk-size", "unclosed-quote-extension"])
async def test_bad_chunking_aborts_the_answer_and_drops_the_connection(
    lab: Lab, http: aiohttp.ClientSession, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="vvault_pep.audit"):
        async with http.get(f"https://localhost:{lab.pep.port}/lean/{kind}") as resp:
            request_id = resp.headers["X-Request-Id"]
            with pytest.raises((aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError)):
                await resp.read()
        await _wait_for(lambda: bool(_records(caplog, request_id)), "the audit record")
    [record] = _records(caplog, request_id)
    assert record["aborted"] == "upstream_failed"
    assert record["bytes_out"] == 0  # not a byte of "hello" reached the client
    await _then_fresh_and_right(http, lab, lab.raw.saw(f"/lean/{kind}")[-1])


async def test_a_valid_chunked_answer_with_an_extension_passes_whole(lab: Lab, http: aiohttp.ClientSession) -> None:
    status, _, body = await _get(http, lab, "/lean/chunked")
    assert (status, body) == (200, b"hello world")


@pytest.mark.parametrize("kind", ["longer", "glued"], ids=["body-longer-than-cl", "second-answer-glued"])
async def test_bytes_after_a_complete_answer_never_answer_the_next_request(
    lab: Lab, http: aiohttp.ClientSession, kind: str
) -> None:
    status, _, body = await _get(http, lab, f"/lean/{kind}")
    assert status == 200
    assert body == (b"hi" if kind == "longer" else b"first")
    await _then_fresh_and_right(http, lab, lab.raw.saw(f"/lean/{kind}")[-1])


async def test_an_answer_cut_short_aborts_the_client_and_is_audited(
    lab: Lab, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="vvault_pep.audit"):
        async with http.get(f"https://localhost:{lab.pep.port}/lean/cut") as resp:
            assert resp.status == 200
            request_id = resp.headers["X-Request-Id"]
            with pytest.raises((aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError)):
                await resp.read()
        await _wait_for(lambda: bool(_records(caplog, request_id)), "the audit record")
    [record] = _records(caplog, request_id)
    assert record["aborted"] == "upstream_failed"
    assert record["bytes_out"] <= 1000
    await _then_fresh_and_right(http, lab, lab.raw.saw("/lean/cut")[-1])


async def test_interim_answers_are_skipped(lab: Lab, http: aiohttp.ClientSession) -> None:
    status, headers, body = await _get(http, lab, "/lean/interim")
    assert (status, body) == (200, b"final")
    assert "Link" not in headers  # the 103's header belongs to no final answer


async def test_head_204_and_304_carry_no_body_and_keep_the_connection(lab: Lab, http: aiohttp.ClientSession) -> None:
    status, headers, body = await _get(http, lab, "/lean/head", method="HEAD")
    assert (status, body, headers["X-App"]) == (200, b"", "head")
    assert lab.raw.saw("/lean/head")[-1].method == "HEAD"
    status, headers, body = await _get(http, lab, "/lean/no-content")
    assert (status, body) == (204, b"")
    status, headers, body = await _get(http, lab, "/lean/not-modified")
    assert (status, body, headers["ETag"]) == (304, b"", '"v1"')
    status, _, body = await _get(http, lab, "/lean/ok")
    assert (status, body) == (200, b"the right answer")
    # 204, 304 and the next answer on one connection: no body was awaited after either
    conns = {lab.raw.saw(p)[-1].conn for p in ("/lean/no-content", "/lean/not-modified", "/lean/ok")}
    assert len(conns) == 1


async def test_keep_alive_reuses_one_connection(lab: Lab, http: aiohttp.ClientSession) -> None:
    before = lab.raw.connections
    for _ in range(5):
        status, _, body = await _get(http, lab, "/lean/other")
        assert (status, body) == (200, b"another answer")
    assert len({s.conn for s in lab.raw.saw("/lean/other")[-5:]}) == 1
    assert lab.raw.connections - before <= 1


async def test_request_bodies_stream_with_their_framing(lab: Lab, http: aiohttp.ClientSession) -> None:
    big = bytes(range(256)) * 1024  # 256 KiB: more than the PEP buffers before it connects

    async def pieces() -> AsyncIterator[bytes]:
        for i in range(0, len(big), 16384):
            yield big[i : i + 16384]

    url = f"https://localhost:{lab.pep.port}/lean/upload"
    async with http.put(url, data=pieces()) as resp:  # chunked from the client
        assert (resp.status, await resp.read()) == (200, b"stored")
    seen = lab.raw.saw("/lean/upload")[-1]
    assert seen.headers.get("transfer-encoding") == "chunked" and "content-length" not in seen.headers
    assert seen.body == big
    async with http.put(url, data=pieces(), headers={"Content-Length": str(len(big))}) as resp:
        assert (resp.status, await resp.read()) == (200, b"stored")
    seen = lab.raw.saw("/lean/upload")[-1]
    assert seen.headers.get("content-length") == str(len(big)) and "transfer-encoding" not in seen.headers
    assert seen.body == big
    async with http.post(url, data=b"small") as resp:  # buffered whole, written with its length
        assert resp.status == 200
    seen = lab.raw.saw("/lean/upload")[-1]
    assert (seen.method, seen.headers.get("content-length"), seen.body) == ("POST", "5", b"small")


async def test_a_full_pool_is_a_fast_503(lab: Lab, http: aiohttp.ClientSession) -> None:
    base = f"https://localhost:{lab.pep.port}"
    held = asyncio.create_task(_get(http, lab, "/tiny/hold"))
    await _wait_for(lambda: bool(lab.tiny.saw("/tiny/hold")), "the upstream to hold the only connection")
    started = time.monotonic()
    async with http.get(f"{base}/tiny/ok") as resp:
        assert resp.status == 503
        assert resp.headers["Retry-After"] == "1"
        assert b"upstream.saturated" in await resp.read()
    assert time.monotonic() - started < 3
    assert not lab.tiny.saw("/tiny/ok")  # never reached the upstream
    lab.hold.set()
    assert (await held)[::2] == (200, b"held")


async def test_upstream_mtls_presents_the_client_certificate_and_reuses_the_connection(
    lab: Lab, http: aiohttp.ClientSession, pki: Path
) -> None:
    for _ in range(2):
        status, _, body = await _get(http, lab, "/tls/ok")
        assert (status, body) == (200, b"over mTLS")
    first, second = lab.tls.saw("/tls/ok")[-2:]
    assert first.conn == second.conn
    assert first.peer is not None
    subject = dict(item for rdn in first.peer["subject"] for item in rdn)
    cert = x509.load_pem_x509_certificate((pki / "client-reader.pem").read_bytes())
    assert subject["commonName"] == cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert first.headers["host"] == "localhost"  # the tls block's server name


async def test_upstream_mtls_without_a_client_certificate_is_refused(lab: Lab, http: aiohttp.ClientSession) -> None:
    before = len(lab.tls.seen)
    status, _, body = await _get(http, lab, "/nocert/ok")
    assert status == 502
    assert b"upstream.unavailable" in body or b"upstream.error" in body
    assert len(lab.tls.seen) == before  # the upstream served nothing


async def test_an_unasked_protocol_switch_is_a_502(lab: Lab, http: aiohttp.ClientSession) -> None:
    status, _, body = await _get(http, lab, "/lean/switch")
    assert status == 502 and b"upstream.error" in body
    await _then_fresh_and_right(http, lab, lab.raw.saw("/lean/switch")[-1])


async def test_bytes_on_an_idle_connection_close_it(lab: Lab, http: aiohttp.ClientSession) -> None:
    go = asyncio.Event()
    lab.raw.answers["/lean/idle"] = Answer(ok(b"idle soon"), later=ok(b"unasked answer"), go=go)
    status, _, body = await _get(http, lab, "/lean/idle")
    assert (status, body) == (200, b"idle soon")
    conn = lab.raw.saw("/lean/idle")[-1].conn
    go.set()  # the upstream speaks on the connection now idle in the PEP's pool
    await _wait_for(lambda: conn in lab.raw.closed, "the PEP to close the connection")
    await _then_fresh_and_right(http, lab, lab.raw.saw("/lean/idle")[-1])


async def test_a_reused_connection_found_closed_is_retried_only_when_safe(
    lab: Lab, http: aiohttp.ClientSession
) -> None:
    await _get(http, lab, "/lean/ok")  # at least one connection that has served, now idle
    status, _, body = await _get(http, lab, "/lean/flaky")
    assert (status, body) == (200, b"answered on a fresh connection")
    dropped, answered = lab.raw.saw("/lean/flaky")[-2:]
    assert dropped.conn != answered.conn
    before = len(lab.raw.saw("/lean/flaky"))
    async with http.post(f"https://localhost:{lab.pep.port}/lean/flaky", data=b"once") as resp:
        assert resp.status == 502  # a POST is never sent twice
        assert b"upstream.error" in await resp.read()
    assert len(lab.raw.saw("/lean/flaky")) == before + 1


async def test_an_endless_head_or_trailer_is_cut_and_a_small_trailer_dropped(
    lab: Lab, http: aiohttp.ClientSession
) -> None:
    status, _, body = await _get(http, lab, "/lean/huge-head")
    assert status == 502 and b"upstream.error" in body
    async with http.get(f"https://localhost:{lab.pep.port}/lean/huge-trailer") as resp:
        assert resp.status == 200
        with pytest.raises((aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError)):
            await resp.read()
    status, headers, body = await _get(http, lab, "/lean/trailer")
    assert (status, body) == (200, b"hi")
    assert "X-Trailer" not in headers
    await _then_fresh_and_right(http, lab, lab.raw.saw("/lean/huge-trailer")[-1])
