"""The lean upstream client on its own, against an upstream scripted byte by byte.

Each test runs a raw asyncio TCP server on loopback whose script reads what the client sent
and writes exact bytes back.  The :class:`~vvault_pep.net.http1.Pool` is driven
directly: the exact request head it writes (framing, ``Host``, the base path), what it refuses
to send, what the answer object says, the read and connect deadlines, keep-alive reuse and the
idle limit, and a slow upstream holding back a streamed body instead of it piling up here.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from vvault_pep.net import http1
from vvault_pep.net.http1 import Pool, UpstreamFailure, UpstreamRefused, UpstreamTimeout

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter, "Raw"], Awaitable[None]]


@dataclass
class Raw:
    port: int = 0
    heads: list[bytes] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    connections: int = 0
    after: list[bytes] = field(default_factory=list)


def ok(body: bytes = b"ok", *extra: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n" % (len(body), b"".join(e + b"\r\n" for e in extra)) + body


@pytest.fixture
def loop_errors() -> list[dict[str, Any]]:
    """What reached the event loop's exception handler (an error in a protocol callback, a timer)."""
    loop = asyncio.get_event_loop()
    seen: list[dict[str, Any]] = []
    old = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: seen.append(context))
    yield seen
    loop.set_exception_handler(old)


async def read_request(reader: asyncio.StreamReader, raw: Raw) -> bytes:
    """One request: its head recorded, its body (Content-Length or chunked) read and recorded."""
    head = await reader.readuntil(b"\r\n\r\n")
    raw.heads.append(head)
    lower = head.lower()
    body = b""
    if b"content-length:" in lower:
        length = int(lower.split(b"content-length:")[1].split(b"\r\n")[0])
        body = await reader.readexactly(length)
    elif b"transfer-encoding: chunked" in lower:
        while True:
            size_line = await reader.readuntil(b"\r\n")
            body += size_line
            size = int(size_line.strip(), 16)
            data = await reader.readexactly(size + 2)
            body += data
            if size == 0:
                break
    raw.bodies.append(body)
    return head


def answering(*answers: bytes, close: bool = False) -> Script:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: Raw) -> None:
        for answer in answers:
            await read_request(reader, raw)
            writer.write(answer)
            await writer.drain()
        if close:
            writer.close()
            return
        raw.after.append(await reader.read())  # what else came, until the client drops the connection

    return script


@asynccontextmanager
async def upstream(script: Script) -> AsyncIterator[Raw]:
    raw = Raw()
    tasks: set[asyncio.Task[None]] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raw.connections += 1
        try:
            await script(reader, writer, raw)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.get_running_loop().create_task(serve(reader, writer))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    raw.port = server.sockets[0].getsockname()[1]
    try:
        yield raw
    finally:
        server.close()
        if tasks:  # the scripts see the client's close first (what came after the answer is recorded)
            await asyncio.wait(list(tasks), timeout=2)
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def pool(url: str, **kw: object) -> Pool:
    args: dict[str, object] = {"ssl_context": None, "server_hostname": None, "connect_timeout": 5, "read_timeout": 5}
    return Pool(url, **{**args, **kw})  # type: ignore[arg-type]


async def body_of(resp: http1.Response) -> bytes:
    return b"".join([piece async for piece in resp.chunks()])


# --- the pool's view of its upstream ------------------------------------------------


@pytest.mark.parametrize(
    ("url", "kw", "expected"),
    [
        ("http://up.test", {}, ("up.test", 80, "", "up.test", None)),
        ("http://up.test:80/", {}, ("up.test", 80, "", "up.test", None)),
        ("http://up.test:8080/base/", {}, ("up.test", 8080, "/base", "up.test:8080", None)),
        ("http://up.test:443", {}, ("up.test", 443, "", "up.test:443", None)),
        ("https://up.test", {}, ("up.test", 443, "", "up.test", "up.test")),
        ("https://up.test:80/a/b", {}, ("up.test", 80, "/a/b", "up.test:80", "up.test")),
        (
            "https://10.0.0.1:8443",
            {"server_hostname": "api.internal"},
            ("10.0.0.1", 8443, "", "10.0.0.1:8443", "api.internal"),
        ),
        ("http://[::1]:81", {}, ("::1", 81, "", "[::1]:81", None)),
        ("http://up.test/apiX//", {}, ("up.test", 80, "/apiX", "up.test", None)),
        ("http://[::1]", {"server_hostname": "ignored"}, ("::1", 80, "", "[::1]", None)),
    ],
)
async def test_what_the_pool_makes_of_its_url(url: str, kw: dict[str, str], expected: tuple[object, ...]) -> None:
    ctx = ssl.create_default_context()
    p = pool(url, ssl_context=ctx, **kw)
    assert (p.host, p.port, p.base_path, p.host_header, p._sni) == expected
    assert (p._ssl is ctx) is url.startswith("https://")
    assert (p.connect_timeout, p.read_timeout, p.opened) == (5, 5, 0)


# --- the request as written --------------------------------------------------------


async def chunks_of(*pieces: bytes) -> AsyncIterator[bytes]:
    for piece in pieces:
        yield piece


HEADS = [
    ("GET", None, None, [], b"GET /base/x?q=1 HTTP/1.1\r\nA: b\r\nHost: 127.0.0.1:{port}\r\n\r\n"),
    ("DELETE", None, None, [], b"DELETE /base/x?q=1 HTTP/1.1\r\nA: b\r\nHost: 127.0.0.1:{port}\r\n\r\n"),
    ("OPTIONS", None, None, [], b"OPTIONS /base/x?q=1 HTTP/1.1\r\nA: b\r\nHost: 127.0.0.1:{port}\r\n\r\n"),
    (
        "POST",
        None,
        None,
        [],
        b"POST /base/x?q=1 HTTP/1.1\r\nA: b\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\n\r\n",
    ),
    ("PUT", b"", None, [], b"PUT /base/x?q=1 HTTP/1.1\r\nA: b\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\n\r\n"),
    ("GET", b"", None, [], b"GET /base/x?q=1 HTTP/1.1\r\nA: b\r\nHost: 127.0.0.1:{port}\r\n\r\n"),
    (
        "GET",
        b"abc",
        None,
        [],
        b"GET /base/x?q=1 HTTP/1.1\r\nA: b\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 3\r\n\r\n",
    ),
    (
        "POST",
        "stream",
        5,
        [("content-length", "99")],
        b"POST /base/x?q=1 HTTP/1.1\r\nA: b\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 5\r\n\r\n",
    ),
    (
        "POST",
        "stream",
        None,
        [("Host", "named.test")],
        b"POST /base/x?q=1 HTTP/1.1\r\nA: b\r\nHost: named.test\r\nTransfer-Encoding: chunked\r\n\r\n",
    ),
]


@pytest.mark.parametrize(("method", "body", "length", "extra", "head"), HEADS)
async def test_the_request_head_and_its_framing(
    method: str, body: bytes | str | None, length: int | None, extra: list[tuple[str, str]], head: bytes
) -> None:
    async with upstream(answering(ok())) as raw:
        p = pool(f"http://127.0.0.1:{raw.port}/base/")
        sent: bytes | AsyncIterator[bytes] | None = chunks_of(b"he", b"", b"llo") if body == "stream" else body  # type: ignore[assignment]
        resp = await p.request(method, "/x?q=1", [("A", "b"), *extra], sent, content_length=length)
        assert (resp.status, await body_of(resp)) == (200, b"ok")
        resp.release()
        p.close()
    assert raw.heads == [head.replace(b"{port}", str(raw.port).encode())]
    expected_body = {None: b"", b"": b"", b"abc": b"abc"}.get(body, b"")  # type: ignore[call-overload]
    if body == "stream":
        expected_body = b"hello" if length else b"2\r\nhe\r\n3\r\nllo\r\n0\r\n\r\n"  # an empty piece is skipped
    assert raw.bodies == [expected_body]
    assert raw.after == [b""]  # not a byte more than the framing said


@pytest.mark.parametrize(
    ("target", "headers"),
    [
        ("/x y", []),
        ("/x\r\nX: y", []),
        ("/x\n", []),
        ("/x\0", []),
        ("/x", [("A", "b\r\nEvil: 1")]),
        ("/x", [("A", "b\nc")]),
        ("/x", [("A", "b\rc")]),
        ("/x", [("A", "b\0")]),
        ("/x", [("A\r\nB", "c")]),
        ("/x", [("A:B", "c")]),
        ("/x", [("A B", "c")]),
    ],
)
async def test_a_head_that_would_smuggle_is_never_sent(target: str, headers: list[tuple[str, str]]) -> None:
    async with upstream(answering(ok())) as raw:
        p = pool(f"http://127.0.0.1:{raw.port}")
        with pytest.raises(UpstreamFailure) as err:
            await p.request("GET", target, headers, None)
        assert str(err.value) == "request head not sendable"
        assert p.opened == 0
    assert raw.heads == []


async def test_head_is_not_sent_on_the_lean_path() -> None:
    with pytest.raises(ValueError, match=r"^HEAD is not sent on the lean path$"):
        await pool("http://127.0.0.1:9").request("HEAD", "/", [], None)


# --- the answer ----------------------------------------------------------------------


async def test_the_answer_as_the_forwarder_reads_it() -> None:
    answer = b"HTTP/1.1 201 Made Here\r\nContent-Length: 11\r\nX-One: 1\r\nx-one: 2\r\nX-Two: \xe9\r\n\r\nhello world"
    async with upstream(answering(answer, ok(b"0123456789"), ok(b""))) as raw:
        p = pool(f"http://127.0.0.1:{raw.port}")
        resp = await p.request("GET", "/", [], None)
        assert (resp.status, resp.reason) == (201, "Made Here")
        assert list(resp.header_items()) == [
            ("Content-Length", "11"),
            ("X-One", "1"),
            ("x-one", "2"),
            ("X-Two", "\xe9"),
        ]
        assert (resp.header("x-ONE"), resp.header("X-Three"), resp.content_length) == ("1", None, 11)
        assert await resp.read(100) == b"hello world"
        resp.release()
        resp = await p.request("GET", "/", [], None)
        assert await resp.read(3) == b"0123456789"  # at least limit + 1 bytes, here all of one piece
        resp.release()
        resp = await p.request("GET", "/", [], None)
        assert (resp.content_length, await resp.read(0)) == (0, b"")
        resp.release()
        assert p.opened == 1
        p.close()


async def test_read_stops_once_past_its_limit() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: Raw) -> None:
        await read_request(reader, raw)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(4):
            writer.write(b"4\r\nabcd\r\n")
            await writer.drain()
            await asyncio.sleep(0.02)
        writer.write(b"0\r\n\r\n")
        await reader.read()

    async with upstream(script) as raw:
        p = pool(f"http://127.0.0.1:{raw.port}")
        resp = await p.request("GET", "/", [], None)
        got = await resp.read(8)  # 8 bytes may be all of it: read on until past the limit
        assert got + b"abcd" * ((16 - len(got)) // 4) == b"abcd" * 4 and 8 < len(got) <= 16
        resp.release()
        resp = await p.request("GET", "/", [], None)
        got = await resp.read(0)  # a limit of 0 still reads the first piece: it says "too large"
        assert got.startswith(b"abcd")
        resp.release()
        p.close()


async def test_no_reason_phrase_is_none() -> None:
    async with upstream(answering(b"HTTP/1.1 204 \r\n\r\n")) as raw:
        p = pool(f"http://127.0.0.1:{raw.port}")
        resp = await p.request("GET", "/", [], None)
        assert (resp.status, resp.reason, resp.content_length) == (204, None, None)
        resp.release()
        p.close()


# --- deadlines ------------------------------------------------------------------------


async def test_an_upstream_that_never_answers_times_out_at_the_read_deadline() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: Raw) -> None:
        await read_request(reader, raw)
        await reader.read()

    async with upstream(silent) as raw:
        p = pool(f"http://127.0.0.1:{raw.port}", read_timeout=0.2)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(UpstreamTimeout) as err:
            await p.request("GET", "/", [], None)
        assert str(err.value) == "the upstream did not answer in time"
        assert loop.time() - started >= 0.2
        assert p._idle == []  # that connection is never reused


async def test_an_answer_that_stalls_mid_body_times_out_too() -> None:
    async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: Raw) -> None:
        await read_request(reader, raw)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await reader.read()

    async with upstream(stall) as raw:
        p = pool(f"http://127.0.0.1:{raw.port}", read_timeout=0.2)
        resp = await p.request("GET", "/", [], None)
        assert await resp._conn.next_chunk() == b"abc"
        with pytest.raises(UpstreamTimeout) as err:
            await resp._conn.next_chunk()
        assert str(err.value) == "the upstream did not answer in time"
        resp.release()
        assert p._idle == []


async def test_a_refused_connection_is_refused() -> None:
    async with upstream(answering()) as raw:
        port = raw.port
    with pytest.raises(UpstreamRefused) as err:
        await pool(f"http://127.0.0.1:{port}").request("GET", "/", [], None)
    assert str(err.value) == "ConnectionRefusedError"


async def test_a_tls_handshake_that_never_ends_times_out_at_the_connect_deadline() -> None:
    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: Raw) -> None:
        await reader.read()  # takes the ClientHello, never answers it

    async with upstream(mute) as raw:
        p = pool(f"https://127.0.0.1:{raw.port}", ssl_context=ssl.create_default_context(), connect_timeout=0.2)
        with pytest.raises(UpstreamTimeout) as err:
            await p.request("GET", "/", [], None)
        assert str(err.value) == "connect timed out"
        assert p.opened == 0


# --- keep-alive --------------------------------------------------------------------


async def test_idle_connections_are_reused_last_in_first_out_and_dropped_when_old(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: Raw) -> None:
        conn = raw.connections
        while True:
            await read_request(reader, raw)
            writer.write(ok(b"conn %d" % conn))
            await writer.drain()

    async with upstream(script) as raw:
        p = pool(f"http://127.0.0.1:{raw.port}")
        first = await p.request("GET", "/", [], None)
        second = await p.request("GET", "/", [], None)  # the first is busy: a second connection
        assert (await body_of(first), await body_of(second)) == (b"conn 1", b"conn 2")
        first.release()
        second.release()  # put back last: taken first
        again = await p.request("GET", "/", [], None)
        assert await body_of(again) == b"conn 2"
        again.release()
        assert p.opened == 2
        monkeypatch.setattr(http1, "KEEPALIVE_S", 0.0)
        await asyncio.sleep(0.01)
        fresh = await p.request("GET", "/", [], None)
        assert await body_of(fresh) == b"conn 3"  # both idle ones were too old
        fresh.release()
        assert p.opened == 3
        assert len(p._idle) == 1  # and both were dropped, not only the first one looked at
        p.close()
        assert p._idle == []


async def test_a_connection_closed_while_idle_is_not_taken() -> None:
    async with upstream(answering(ok(b"one"), close=True)) as raw:
        p = pool(f"http://127.0.0.1:{raw.port}")
        resp = await p.request("GET", "/", [], None)
        assert await body_of(resp) == b"one"
        resp.release()
        # the upstream closed it: wait until the pool has heard
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while p._idle and loop.time() < deadline:
            await asyncio.sleep(0.01)
        assert p._idle == []
        p.close()


# --- a slow upstream holds the body back ---------------------------------------------


async def test_a_streamed_body_waits_for_an_upstream_that_does_not_read() -> None:
    go = asyncio.Event()

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: Raw) -> None:
        await go.wait()
        await read_request(reader, raw)
        writer.write(ok(b"stored"))
        await writer.drain()
        await reader.read()

    piece = b"x" * (64 << 10)
    total = 256  # 16 MiB: far more than the socket buffers hold
    pulled = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal pulled
        for _ in range(total):
            pulled += 1
            yield piece

    async with upstream(slow) as raw:
        p = pool(f"http://127.0.0.1:{raw.port}", read_timeout=30)
        task = asyncio.get_running_loop().create_task(
            p.request("PUT", "/", [], body(), content_length=total * len(piece))
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        seen = -1
        while pulled != seen and loop.time() < deadline:  # until the client's body stops being pulled
            seen = pulled
            await asyncio.sleep(0.2)
        assert pulled < total  # held back: the rest waits for the upstream
        go.set()
        resp = await asyncio.wait_for(task, 30)
        assert (resp.status, await body_of(resp)) == (200, b"stored")
        resp.release()
        assert pulled == total and raw.bodies == [piece * total]
        p.close()


async def test_the_read_deadline_fires_cleanly(loop_errors: list[dict[str, Any]]) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: Raw) -> None:
        await read_request(reader, raw)
        await reader.read()

    async with upstream(silent) as raw:
        p = pool(f"http://127.0.0.1:{raw.port}", read_timeout=0.1)
        with pytest.raises(UpstreamTimeout):
            await p.request("GET", "/", [], None)
        await asyncio.sleep(0)  # let a late timer run, if any
    assert loop_errors == []


async def test_a_large_body_written_at_once_waits_cleanly_for_a_slow_upstream(
    loop_errors: list[dict[str, Any]],
) -> None:
    go = asyncio.Event()

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: Raw) -> None:
        await go.wait()
        await read_request(reader, raw)
        writer.write(ok(b"stored"))
        await writer.drain()
        await reader.read()

    body = b"y" * (16 << 20)
    async with upstream(slow) as raw:
        p = pool(f"http://127.0.0.1:{raw.port}", read_timeout=30)
        task = asyncio.get_running_loop().create_task(p.request("PUT", "/", [], body))
        await asyncio.sleep(0.2)
        go.set()
        resp = await asyncio.wait_for(task, 30)
        assert (resp.status, await body_of(resp)) == (200, b"stored")
        resp.release()
        p.close()
    assert raw.bodies == [body]
    assert loop_errors == []


async def test_an_interim_answer_leaves_nothing_in_the_final_one() -> None:
    interim = b"HTTP/1.1 100 Continue\r\nX-Interim: 1\r\n\r\nHTTP/1.1 200 Fine\r\nContent-Length: 2\r\n\r\nhi"
    async with upstream(answering(interim)) as raw:
        p = pool(f"http://127.0.0.1:{raw.port}")
        resp = await p.request("GET", "/", [], None)
        assert (resp.status, resp.reason, list(resp.header_items())) == (200, "Fine", [("Content-Length", "2")])
        assert await body_of(resp) == b"hi"
        resp.release()
        p.close()


async def test_a_body_that_fails_before_the_answer_is_the_callers_error_after_it_the_upstreams() -> None:
    class Stalled(Exception):
        pass

    async def failing() -> AsyncIterator[bytes]:
        yield b"part"
        await asyncio.sleep(0.1)
        raise Stalled("the client stopped sending")

    async def early(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: Raw) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")  # answers before the body is in
        await writer.drain()
        await reader.read()

    async def late(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: Raw) -> None:
        await reader.read()  # waits for the body, which never completes

    async with upstream(late) as raw:
        p = pool(f"http://127.0.0.1:{raw.port}")
        with pytest.raises(Stalled):
            await p.request("PUT", "/", [], failing(), content_length=100)
    async with upstream(early) as raw:
        p = pool(f"http://127.0.0.1:{raw.port}")
        resp = await p.request("PUT", "/", [], failing(), content_length=100)
        assert resp.status == 200
        with pytest.raises(UpstreamFailure) as err:
            await body_of(resp)
        assert str(err.value) == "the request body failed"
        resp.release()
        assert p._idle == []


async def test_an_answer_delimited_by_the_close_is_whole_and_its_connection_is_not_kept() -> None:
    async def eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: Raw) -> None:
        await read_request(reader, raw)
        writer.write(b"HTTP/1.1 200 OK\r\n\r\nuntil the end")
        await writer.drain()
        writer.close()

    async with upstream(eof) as raw:
        p = pool(f"http://127.0.0.1:{raw.port}", read_timeout=5)
        resp = await p.request("GET", "/", [], None)
        assert (resp.status, resp.content_length, await body_of(resp)) == (200, None, b"until the end")
        resp.release()
        assert p._idle == []
        resp = await p.request("GET", "/", [], None)
        assert await body_of(resp) == b"until the end"
        resp.release()
        assert (p.opened, raw.connections) == (2, 2)


async def test_a_connection_the_upstream_closed_after_its_answer_is_not_reused() -> None:
    async with upstream(answering(ok(b"one"), close=True)) as raw:
        p = pool(f"http://127.0.0.1:{raw.port}", read_timeout=2)
        resp = await p.request("GET", "/", [], None)
        assert await body_of(resp) == b"one"
        transport = resp._conn.transport
        assert transport is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while not transport.is_closing() and loop.time() < deadline:  # the close is heard before release
            await asyncio.sleep(0.01)
        await asyncio.sleep(0)
        resp.release()
        assert p._idle == []
        resp = await p.request("GET", "/", [], None)  # a fresh connection, answered at once
        assert await body_of(resp) == b"one"
        resp.release()
        assert p.opened == 2
        p.close()


async def test_why_an_exchange_failed_is_said_in_words() -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: Raw) -> None:
        await read_request(reader, raw)
        writer.close()

    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: Raw) -> None:
        await read_request(reader, raw)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this")
        await writer.drain()
        writer.close()

    async with upstream(hang_up) as raw:
        with pytest.raises(UpstreamFailure) as err:
            await pool(f"http://127.0.0.1:{raw.port}").request("POST", "/", [], b"x")
        assert str(err.value) == "the upstream closed the connection before answering"
    async with upstream(cut) as raw:
        resp = await pool(f"http://127.0.0.1:{raw.port}").request("GET", "/", [], None)
        with pytest.raises(UpstreamFailure) as err:
            await body_of(resp)
        assert str(err.value) == "the upstream closed the connection mid-answer"
        resp.release()


async def test_a_consumer_that_does_not_read_holds_the_upstream_back() -> None:
    piece = b"z" * (1 << 20)
    total = 48  # MiB: far more than the socket buffers on both sides hold
    written = 0

    async def big(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: Raw) -> None:
        nonlocal written
        await read_request(reader, raw)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (total * len(piece)))
        for _ in range(total):
            writer.write(piece)
            await writer.drain()
            written += 1
        await reader.read()

    async with upstream(big) as raw:
        p = pool(f"http://127.0.0.1:{raw.port}", read_timeout=5)
        resp = await p.request("GET", "/", [], None)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        seen = -1
        while written != seen and loop.time() < deadline:  # until the upstream can write no more
            seen = written
            await asyncio.sleep(0.2)
        assert written < total  # the answer waits in the upstream, not in this process
        got = 0
        chunks = resp.chunks()
        while got < 4 * len(piece):  # read some: reading from the upstream resumes …
            got += len(await anext(chunks))
        seen = -1
        while written != seen and loop.time() < deadline + 10:  # … and pauses again once we stop
            seen = written
            await asyncio.sleep(0.2)
        assert written < total
        async for chunk in chunks:
            got += len(chunk)
        assert (got, written) == (total * len(piece), total)
        resp.release()
        p.close()


async def _failure(*answer: bytes, pause_s: float = 0.0) -> UpstreamFailure:
    """The UpstreamFailure an answer written in these pieces ends in, from request() or the body."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: Raw) -> None:
        await read_request(reader, raw)
        for part in answer:
            writer.write(part)
            await writer.drain()
            await asyncio.sleep(pause_s)
        writer.close()

    async with upstream(script) as raw:
        p = pool(f"http://127.0.0.1:{raw.port}", read_timeout=5)
        try:
            resp = await p.request("GET", "/", [], None)
            try:
                await body_of(resp)
            finally:
                resp.release()
        except UpstreamFailure as exc:
            return exc
    raise AssertionError("the answer was taken")


async def test_why_a_bad_answer_was_refused_is_said_in_words() -> None:
    err = await _failure(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n")
    assert str(err) == "the upstream switched protocols unasked"
    err = await _failure(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
    assert str(err).startswith("malformed answer: ")
    # an endless head in small pieces: what counts is the sum since the parser last made progress
    err = await _failure(b"HTTP/1.1 200 OK\r\nX-Endless: ", *([b"a" * 1024] * 100), pause_s=0.002)
    assert str(err) == "the answer's head or framing is too large"


async def test_a_chunked_answer_cut_short_is_a_failure_not_a_shorter_answer() -> None:
    for te in (b"chunked", b"Chunked", b"gzip, chunked"):
        err = await _failure(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: " + te + b"\r\n\r\n5\r\nhello\r\n")
        assert str(err) == "the upstream closed the connection mid-answer", te


async def test_only_framing_headers_frame_an_answer() -> None:
    async def eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: Raw) -> None:
        await read_request(reader, raw)
        writer.write(b"HTTP/1.1 200 OK\r\nX-Mode: chunked\r\n\r\nto the close")
        await writer.drain()
        writer.close()

    async with upstream(eof) as raw:
        resp = await pool(f"http://127.0.0.1:{raw.port}", read_timeout=5).request("GET", "/", [], None)
        assert await body_of(resp) == b"to the close"
        resp.release()


async def test_a_status_line_in_pieces_keeps_its_whole_reason() -> None:
    async def split(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: Raw) -> None:
        await read_request(reader, raw)
        for part in (b"HTTP/1.1 200 Fi", b"ne By Me\r\nContent-Length: 0\r\n\r\n"):
            writer.write(part)
            await writer.drain()
            await asyncio.sleep(0.05)
        await reader.read()

    async with upstream(split) as raw:
        p = pool(f"http://127.0.0.1:{raw.port}")
        resp = await p.request("GET", "/", [], None)
        assert (resp.status, resp.reason) == (200, "Fine By Me")
        resp.release()
        p.close()


async def test_an_early_answer_while_the_body_is_still_going_ends_that_connection() -> None:
    more = asyncio.Event()
    stopped = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        try:
            yield b"first"
            await more.wait()  # the rest of the body is late
            yield b"second"
        finally:
            stopped.set()

    async def early(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: Raw) -> None:
        raw.heads.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(ok(b"no need"))  # a complete, keep-alive answer before the body is in
        await writer.drain()
        raw.after.append(await reader.read())

    async with upstream(early) as raw:
        p = pool(f"http://127.0.0.1:{raw.port}")
        resp = await p.request("PUT", "/", [], body(), content_length=11)
        assert (resp.status, await body_of(resp)) == (200, b"no need")
        resp.release()
        assert p._idle == []  # never reused with half a body on it
        await asyncio.wait_for(stopped.wait(), 10)  # and the body is no longer pulled
        more.set()
        p.close()
    assert raw.after == [b"first"]


async def test_a_streamed_body_written_whole_leaves_the_connection_reusable() -> None:
    async with upstream(answering(ok(b"one"), ok(b"two"))) as raw:
        p = pool(f"http://127.0.0.1:{raw.port}")
        resp = await p.request("PUT", "/", [], chunks_of(b"ab", b"c"), content_length=3)
        assert await body_of(resp) == b"one"
        resp.release()
        resp = await p.request("PUT", "/", [], chunks_of(b"de"))
        assert await body_of(resp) == b"two"
        resp.release()
        assert p.opened == 1
        p.close()
    assert raw.bodies == [b"abc", b"2\r\nde\r\n0\r\n\r\n"]


async def test_the_configured_server_name_is_the_tls_server_name(pki: Path) -> None:
    names: list[str | None] = []
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(str(pki / "server.pem"), str(pki / "server-key.pem"))
    server_ctx.sni_callback = lambda _sock, name, _ctx: names.append(name)  # type: ignore[assignment,return-value]

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(ok(b"over tls"))
        await writer.drain()
        await reader.read()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    client_ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    try:
        for hostname, expected in (("localhost", "localhost"), (None, None)):  # no name is sent for an IP
            p = pool(f"https://127.0.0.1:{port}", ssl_context=client_ctx, server_hostname=hostname)
            resp = await p.request("GET", "/", [], None)
            assert await body_of(resp) == b"over tls"
            resp.release()
            p.close()
            assert names[-1] == expected
    finally:
        server.close()


async def test_a_retry_after_a_dead_reused_connection_opens_a_fresh_one() -> None:
    async def once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: Raw) -> None:
        conn = raw.connections
        await read_request(reader, raw)
        writer.write(ok(b"conn %d" % conn))
        await writer.drain()
        await read_request(reader, raw)  # a second request on this connection: it dies without a word
        writer.close()

    async with upstream(once) as raw:
        p = pool(f"http://127.0.0.1:{raw.port}")
        first = await p.request("GET", "/", [], None)
        second = await p.request("GET", "/", [], None)
        assert (await body_of(first), await body_of(second)) == (b"conn 1", b"conn 2")
        first.release()
        second.release()
        resp = await p.request("GET", "/", [], None)  # conn 2 dies; conn 1 would too: never tried
        assert await body_of(resp) == b"conn 3"
        resp.release()
        assert p.opened == 3
        # a streamed body cannot be sent again: its request is not retried
        with pytest.raises(UpstreamFailure) as err:
            await p.request("PUT", "/", [], chunks_of(b"once"), content_length=4)
        assert str(err.value) == "the upstream closed the connection before answering"
        assert p.opened == 3
        p.close()
