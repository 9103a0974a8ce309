"""What the policy sees of a JSON request body, function by function, over real sockets.

``body.is_json`` and ``body.parse`` are pure: tables.  ``body.inspect`` reads
a real aiohttp request: a small in-process server runs it on what a client
sends over TCP (declared and chunked bodies, at and past the limit, a stalled
body, broken chunking, ``Expect: 100-continue``) and answers with what it
returned, so every field of the result is checked — the bytes that will be
forwarded first included.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Sequence
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from vvault_pep.config import RouteBody
from vvault_pep.core import body
from vvault_pep.core.sanitize import Headers
from vvault_pep.edge import listener
from vvault_pep.edge.body import inspect
from vvault_pep.errors import PepError

LIMIT = 64
IDLE_S = 0.3
DEADLINE_S = 1.0
BAD_CHUNK = b"zz\r\n"  # a chunk size that is not hex


@pytest.mark.parametrize(
    ("content_type", "expected"),
    [
        ("application/json", True),
        ("Application/JSON; charset=utf-8", True),
        ("application/problem+json", True),
        ("application/vnd.api+JSON;x=1", True),
        ("application/json;a=b;c=d", True),
        ("text/plain+json", False),  # +json only under application/
        ("application/jsonx", False),
        ("application/x-www-form-urlencoded", False),
        ("text/plain; x=application/json", False),
        ("application/json text", False),
        ("", False),
        (None, False),
    ],
)
def test_which_media_types_are_json(content_type: str | None, expected: bool) -> None:
    assert body.is_json(content_type) is expected


def test_parse_keeps_the_bytes_and_says_whether_they_were_all() -> None:
    assert body.parse(b'{"a": 1}', complete=True) == body.Inspected({"a": 1}, False, b'{"a": 1}')
    assert body.parse(b"", complete=True) == body.Inspected(None, False, b"")
    assert body.parse(b'{"a": 1', complete=False) == body.Inspected(None, True, b'{"a": 1')
    with pytest.raises(PepError) as refused:
        body.parse(b'{"a": 1', complete=True)
    assert (refused.value.code, refused.value.detail) == ("sanitize.invalid_json", "the request body is not valid JSON")


@pytest.fixture
async def server() -> AsyncIterator[int]:
    async for port in _server(60.0):
        yield port


@pytest.fixture
async def short_deadline() -> AsyncIterator[int]:
    async for port in _server(DEADLINE_S):
        yield port


@pytest.fixture
async def listener_server() -> AsyncIterator[int]:
    """The same, behind the listener's connection handler (which fails a body at a bad chunk)."""
    async for port in _server(60.0, _ListenerServer):
        yield port


@pytest.fixture
async def two_reads_server() -> AsyncIterator[int]:
    """The listener's handler, handed a bad chunk as a second read of the same loop iteration."""
    async for port in _server(60.0, _TwoReadsServer):
        yield port


class _ListenerServer(web.Server):
    def __call__(self) -> RequestHandler:
        return listener._Handler(self, loop=self._loop, **self._kwargs)


class _TwoReadsHandler(listener._Handler):
    """What one socket read brought, handed to the parser as two reads split before a bad chunk
    size: two reads the loop makes before the request's own task has run once."""

    def data_received(self, data: bytes) -> None:
        at = data.find(BAD_CHUNK)
        if at <= 0:
            super().data_received(data)
            return
        super().data_received(data[:at])
        assert self._current_request is None  # the window: the request is queued, not started
        super().data_received(data[at:])


class _TwoReadsServer(web.Server):
    def __call__(self) -> RequestHandler:
        return _TwoReadsHandler(self, loop=self._loop, **self._kwargs)


async def _server(deadline_s: float, server: type[web.Server] = web.Server) -> AsyncIterator[int]:
    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        length = request.headers.get("Content-Length")
        headers = Headers(
            host="localhost",
            port=None,
            forward=tuple((k, v) for k, v in request.headers.items() if k.lower() == "content-type"),
            policy=(),
            authorization=None,
            content_length=int(length) if length is not None else None,
            chunked="chunked" in request.headers.get("Transfer-Encoding", ""),
            expect_continue=request.headers.get("Expect", "").lower() == "100-continue",
        )
        try:
            seen = await inspect(request, RouteBody(max_bytes=LIMIT), headers, IDLE_S, deadline_s)
        except PepError as err:
            return web.json_response({"code": err.code, "detail": err.detail})
        return web.json_response(
            {
                "value": seen.value,
                "truncated": seen.truncated,
                "raw": base64.b64encode(seen.raw).decode() if isinstance(seen.raw, bytes) else repr(seen.raw),
                "continued": seen.continued,
            }
        )

    runner = web.ServerRunner(server(handle))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield runner.addresses[0][1]
    await runner.cleanup()


async def send(port: int, head: str, parts: Sequence[bytes] = (), pause_s: float = 0.0) -> tuple[bytes, dict[str, Any]]:
    """One request over TCP; what came back before the final answer, and the answer's JSON."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head.encode())
        await writer.drain()
        before = b""
        if "Expect: 100-continue" in head:
            before = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        for part in parts:
            writer.write(part)
            await writer.drain()
            if pause_s:
                await asyncio.sleep(pause_s)
        answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        length = int(
            next(line.split(b":")[1] for line in answer.split(b"\r\n") if line.lower().startswith(b"content-length"))
        )
        doc = orjson.loads(await asyncio.wait_for(reader.readexactly(length), 5))
        return before, doc
    finally:
        writer.close()


def put(length: int | None = None, *, ctype: str = "application/json", extra: str = "") -> str:
    framing = f"Content-Length: {length}\r\n" if length is not None else "Transfer-Encoding: chunked\r\n"
    return f"PUT /x HTTP/1.1\r\nHost: localhost\r\nContent-Type: {ctype}\r\n{framing}{extra}\r\n"


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def raw(doc: dict[str, Any]) -> bytes:
    return base64.b64decode(doc["raw"])


async def test_a_body_of_exactly_the_limit_is_read_whole_in_pieces(server: int) -> None:
    payload = b'{"k": "' + b"v" * (LIMIT - 9) + b'"}'
    assert len(payload) == LIMIT
    _, doc = await send(server, put(), [chunk(payload[:20]), chunk(payload[20:]), b"0\r\n\r\n"], pause_s=0.05)
    assert (doc["value"], doc["truncated"], raw(doc), doc["continued"]) == (
        {"k": "v" * (LIMIT - 9)},
        False,
        payload,
        False,
    )
    _, doc = await send(server, put(LIMIT), [payload])
    assert (doc["truncated"], raw(doc)) == (False, payload)


async def test_a_chunked_body_past_the_limit_stops_being_read(server: int) -> None:
    pieces = [chunk(b" " * 16) for _ in range(12)]  # 192 bytes of JSON whitespace, 16 at a time
    _, doc = await send(server, put(), [*pieces, chunk(b"1"), b"0\r\n\r\n"], pause_s=0.01)
    assert doc["value"] is None
    assert doc["truncated"] is True
    assert LIMIT < len(raw(doc)) <= LIMIT + 16 * 12  # read past the limit by at most what had arrived
    assert raw(doc) == b" " * len(raw(doc))  # exactly the bytes received, forwarded first


async def test_a_declared_oversize_body_is_not_read_at_all(server: int) -> None:
    _, doc = await send(server, put(LIMIT + 1), [b" " * (LIMIT + 1)])
    assert (doc["value"], doc["truncated"], doc["raw"], doc["continued"]) == (None, True, "", False)


async def test_no_body_is_nothing(server: int) -> None:
    _, doc = await send(server, put(0))
    assert (doc["value"], doc["truncated"], doc["raw"]) == (None, False, "")


async def test_not_json_is_refused_unread(server: int) -> None:
    _, doc = await send(server, put(2, ctype="text/plain"), [b"{}"])
    assert doc == {"code": "sanitize.unsupported_media_type", "detail": "this route takes application/json bodies"}


async def test_a_stalled_body_is_cut_at_the_idle_gap(server: int) -> None:
    started = asyncio.get_running_loop().time()
    _, doc = await send(server, put(10), [b"{"])
    assert doc == {"code": "sanitize.body_timeout", "detail": "the request body stalled"}
    assert asyncio.get_running_loop().time() - started >= IDLE_S


async def test_expect_continue_is_answered_before_the_body_and_remembered(server: int) -> None:
    before, doc = await send(server, put(8, extra="Expect: 100-continue\r\n"), [b'{"a": 1}'])
    assert before == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert (doc["value"], doc["continued"]) == ({"a": 1}, True)
    before, doc = await send(server, put(extra="Expect: 100-continue\r\n"), [chunk(b" " * 40)] * 4, pause_s=0.02)
    assert before == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert (doc["truncated"], doc["continued"]) == (True, True)
    _, doc = await send(server, put(), [chunk(b" " * 40), chunk(b" " * 40), b"0\r\n\r\n"])
    assert (doc["truncated"], doc["continued"]) == (True, False)


async def test_a_body_that_trickles_past_the_deadline_is_cut_there(short_deadline: int) -> None:
    # Each piece comes well within the idle gap; the whole body does not come within the deadline.
    started = asyncio.get_running_loop().time()
    _, doc = await send(short_deadline, put(40), [b" "] * 39, pause_s=IDLE_S / 3)
    assert doc == {"code": "sanitize.body_deadline", "detail": "the request body took too long"}
    assert asyncio.get_running_loop().time() - started >= DEADLINE_S


async def test_a_body_within_the_deadline_is_read(short_deadline: int) -> None:
    _, doc = await send(short_deadline, put(8), [b'{"a": 1}'])
    assert (doc["value"], doc["truncated"]) == ({"a": 1}, False)


def _headers(length: int | None, chunked: bool = False, ctype: str = "application/json") -> Headers:
    return Headers(
        host="localhost",
        port=None,
        forward=(("Content-Type", ctype),),
        policy=(),
        authorization=None,
        content_length=length,
        chunked=chunked,
        expect_continue=False,
    )


@pytest.mark.parametrize(("length", "chunked"), [(2, False), (None, True)])
async def test_a_body_announced_where_none_can_be_read_is_refused(length: int | None, chunked: bool) -> None:
    # `explain` judges a request it never received: a body it cannot read is not judged empty.
    with pytest.raises(PepError) as refused:
        await inspect(None, RouteBody(max_bytes=LIMIT), _headers(length, chunked), IDLE_S)
    assert (refused.value.code, refused.value.detail) == (
        "sanitize.malformed",
        "a body was announced but none can be read",
    )


@pytest.mark.parametrize("length", [None, 0])
async def test_no_body_announced_is_nothing_even_unreceived(length: int | None) -> None:
    assert await inspect(None, RouteBody(max_bytes=LIMIT), _headers(length), IDLE_S) == body.NOTHING


async def test_a_body_without_content_type_is_refused_unread(server: int) -> None:
    head = "PUT /x HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\n\r\n"
    _, doc = await send(server, head, [b"{}"])
    assert doc == {"code": "sanitize.unsupported_media_type", "detail": "this route takes application/json bodies"}


async def test_an_http_1_0_client_gets_no_interim_answer(server: int) -> None:
    head = "PUT /x HTTP/1.0\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 8\r\n"
    head += "Expect: 100-continue\r\n\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", server)
    try:
        writer.write(head.encode() + b'{"a": 1}')
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(-1), 5)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.0 200 ")  # no "100 Continue" before it: 1.0 has no interim answers
    doc = orjson.loads(answer.partition(b"\r\n\r\n")[2])
    assert (doc["value"], doc["continued"]) == ({"a": 1}, False)


async def test_a_bad_chunk_read_before_its_request_started_is_refused_as_malformed(two_reads_server: int) -> None:
    # Head, a good chunk and a bad one in one write: the parser queues the request and, in the
    # next read, the error; the body queued with the request fails then, not at a deadline.
    whole = put() + chunk(b" " * 10).decode() + BAD_CHUNK.decode() + "hello\r\n0\r\n\r\n"
    _, doc = await send(two_reads_server, whole)
    assert doc == {"code": "sanitize.malformed", "detail": "malformed request body"}


async def test_a_bad_chunk_after_good_ones_is_refused_as_malformed(listener_server: int) -> None:
    # The listener fails the body the moment the parser finds the bad chunk (not a stall at the idle gap).
    _, doc = await send(listener_server, put(), [chunk(b" " * 10), b"zz\r\nhello\r\n0\r\n\r\n"], pause_s=0.05)
    assert doc == {"code": "sanitize.malformed", "detail": "malformed request body"}
