"""A lean keep-alive HTTP/1.1 client for the common forward, parsed by llhttp.

The answer is parsed by ``httptools`` (llhttp); nothing here reads HTTP by
hand.  What it does:

* One pool per upstream: idle connections are reused last-in first-out and
  dropped after ``KEEPALIVE_S`` unused.  How many requests run at once is the
  caller's business (forward.py counts the pool's slots); a request that finds
  no idle connection opens one.
* Connect (TCP and TLS, with the client certificate of the upstream's ``tls``
  block) within ``connect_timeout_s``; every wait for the answer's next bytes
  within ``read_timeout_s``.
* The request body is written as given (``Content-Length``) or in chunks; a
  streamed body is written by its own task while the answer is awaited, so an
  upstream that answers early is heard.  The answer's body is handed out as it
  comes; past ``HIGH_WATER`` bytes not yet taken, reading from the upstream is
  paused until the consumer catches up.
* Interim 1xx answers are skipped; 204 and 304 carry no body.  HEAD is not
  sent here: the parser cannot be told that an answer belongs to one.
* A connection goes back to the pool only after a complete answer that allows
  keep-alive, with the request body written whole and not a byte more on the
  wire.  Anything else, a parse error, bytes after the answer, bytes while
  idle, a timeout, a consumer that gives up, closes it.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from typing import cast
from urllib.parse import urlsplit

import httptools

MAX_QUIET = 64 * 1024  # bytes parsed without progress (head, trailers, chunk framing)
HIGH_WATER = 256 * 1024  # answer bytes buffered before reading from the upstream pauses
LOW_WATER = 64 * 1024  # ... and resumes
KEEPALIVE_S = 30.0
# Methods a reused connection may resend once if it proved dead before any byte of the answer.
_REPLAYABLE = frozenset({"GET", "OPTIONS", "TRACE", "PUT", "DELETE"})
_BODYLESS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "DELETE", "CONNECT"})


class UpstreamError(Exception):
    """The exchange with the upstream failed."""


class UpstreamRefused(UpstreamError):
    """No connection could be made (refused, unresolvable, TLS handshake failed)."""


class UpstreamTimeout(UpstreamError):
    """Connect, or a wait for the answer's next bytes, took too long."""


class UpstreamFailure(UpstreamError):
    """The connection broke, or the upstream's answer was not valid HTTP/1.1."""


class _Stale(UpstreamFailure):
    """A reused connection closed before any byte of the answer."""


class _Extra(Exception):
    """Bytes after a complete answer: stop parsing."""


class _Conn(asyncio.Protocol):
    """One upstream connection and the answer it is receiving."""

    def __init__(self, pool: Pool) -> None:
        self._pool = pool
        self._loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.busy = False
        self.idle_since = 0.0
        self._parser = httptools.HttpResponseParser(self)
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.reason = ""
        self.headers: list[tuple[str, str]] = []
        self.complete = False
        self.keep_alive = False
        self.dirty = False  # bytes came after the answer
        self.got_bytes = False
        self.until_eof = False
        self._head_done = False
        self._quiet = 0  # bytes since the parser last made progress
        self.error: BaseException | None = None
        self._interim = False
        self._head: asyncio.Future[None] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._read_paused = False
        self._write_paused = False
        self._drain: asyncio.Future[None] | None = None
        self.writer: asyncio.Task[None] | None = None

    # -- asyncio.Protocol --------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        if not self.busy or self.complete:
            # Nobody asked: never let these bytes answer the next request.
            self.dirty = True
            self.close()
            return
        self.got_bytes = True
        self._quiet += len(data)
        try:
            self._parser.feed_data(data)
            if self._quiet > MAX_QUIET:
                # llhttp itself bounds no header, trailer or chunk extension: an upstream
                # sending one without end would be buffered without end.
                self._fail(UpstreamFailure("the answer's head or framing is too large"))
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamFailure("the upstream switched protocols unasked"))
        except (httptools.HttpParserError, _Extra) as exc:
            # After a complete answer (_Extra is how the parser is stopped there) this
            # only drops the connection; before, it fails the exchange.
            self._fail(UpstreamFailure(f"malformed answer: {exc}"))

    def eof_received(self) -> bool | None:
        return None  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._pool.forget(self)
        if self.busy and not self.complete and self.error is None:
            if self._head is not None and self._head.done() and self.until_eof:
                self.complete = True  # the answer was delimited by the close
                self.keep_alive = False
                self._wake()
            elif not self.got_bytes:
                self._fail(_Stale("the upstream closed the connection before answering"))
            else:
                self._fail(UpstreamFailure("the upstream closed the connection mid-answer"))
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    # -- llhttp callbacks --------------------------------------------------

    def on_message_begin(self) -> None:
        if self.complete:
            raise _Extra

    def on_status(self, status: bytes) -> None:
        self.reason += status.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._head_done:
            return  # trailers are not passed on
        self.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200:
            self._interim = True  # 101 makes the parser raise HttpParserUpgrade
            return
        self.status = status
        self._head_done = True
        self._quiet = 0
        framed = False
        for name, value in self.headers:
            low = name.lower()
            if low == "content-length" or (low == "transfer-encoding" and value.lower().endswith("chunked")):
                framed = True
        self.until_eof = not framed
        if self._head is not None and not self._head.done():
            self._head.set_result(None)

    def on_body(self, body: bytes) -> None:
        self._quiet = 0
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > HIGH_WATER and not self._read_paused and self.transport is not None:
            self._read_paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            self.headers = []
            self.reason = ""
            return
        self.complete = True
        self.keep_alive = self._parser.should_keep_alive()
        self._wake()

    # -- the exchange ------------------------------------------------------

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        if self.complete:
            # The answer is whole; what came after it (garbage, a second answer) only
            # costs the connection.
            self.dirty = True
            self.close()
            return
        if self.error is None:
            self.error = exc
        if self._head is not None and not self._head.done():
            self._head.set_exception(exc)
            self._head.exception()  # retrieved here; raised again where awaited
        self._wake()
        self.close()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.abort()
        self.closed = True
        self._pool.forget(self)

    async def _wait(self, fut: asyncio.Future[None]) -> None:
        timer = self._loop.call_later(self._pool.read_timeout, self._expire, fut)
        try:
            await fut
        finally:
            timer.cancel()

    def _expire(self, fut: asyncio.Future[None]) -> None:
        if not fut.done():
            self._fail(UpstreamTimeout("the upstream did not answer in time"))
            if not fut.done():
                fut.set_exception(self.error or UpstreamTimeout())
                fut.exception()

    async def start(self, head: bytes, body: bytes | AsyncIterator[bytes] | None, chunked: bool) -> None:
        """Send the request and wait for the final answer's head."""
        assert self.transport is not None
        self._reset()
        self.busy = True
        self._head = self._loop.create_future()
        if isinstance(body, bytes):
            self.transport.write(head + body)
        else:
            self.transport.write(head)
            if body is not None:
                self.writer = self._loop.create_task(self._send(body, chunked))
        await self._wait(self._head)

    async def _send(self, body: AsyncIterator[bytes], chunked: bool) -> None:
        transport = self.transport
        assert transport is not None
        try:
            async for piece in body:
                if self.closed:
                    return
                if not piece:
                    continue
                if chunked:
                    transport.writelines((b"%x\r\n" % len(piece), piece, b"\r\n"))
                else:
                    transport.write(piece)
                if self._write_paused and not self.closed:
                    self._drain = self._loop.create_future()
                    await self._drain
            if chunked and not self.closed:
                transport.write(b"0\r\n\r\n")
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            # The caller's own error (a stalled client body) reaches the caller as is
            # while no answer came; after that the answer is cut short.
            if self._head is not None and not self._head.done():
                self._fail(exc)
            else:
                self._fail(UpstreamFailure("the request body failed"))

    async def next_chunk(self) -> bytes:
        """The answer's next piece of body, b"" at its end."""
        while True:
            if self._chunks:
                piece = self._chunks.popleft()
                self._buffered -= len(piece)
                if self._read_paused and self._buffered < LOW_WATER and self.transport is not None:
                    self._read_paused = False
                    self.transport.resume_reading()
                return piece
            if self.error is not None:
                raise self.error
            if self.complete:
                return b""
            self._waiter = self._loop.create_future()
            await self._wait(self._waiter)

    def finish(self) -> None:
        """Back to the pool if the exchange ended cleanly, else closed."""
        writer = self.writer
        reusable = (
            self.complete
            and self.keep_alive
            and self.error is None
            and not self.dirty
            and not self.closed
            and not self._chunks
            and (writer is None or (writer.done() and not writer.cancelled()))
        )
        if writer is not None and not writer.done():
            writer.cancel()
        self.busy = False
        if reusable:
            self._pool.put(self)
        else:
            self.close()


class Response:
    """The upstream's answer: status, headers in their order, the body as it comes."""

    __slots__ = ("_conn", "headers", "reason", "status")

    def __init__(self, conn: _Conn) -> None:
        self._conn = conn
        self.status = conn.status
        self.reason = conn.reason or None
        self.headers = conn.headers

    def header_items(self) -> Iterable[tuple[str, str]]:
        return self.headers

    def header(self, name: str) -> str | None:
        low = name.lower()
        for key, value in self.headers:
            if key.lower() == low:
                return value
        return None

    @property
    def content_length(self) -> int | None:
        value = self.header("Content-Length")
        return int(value) if value is not None else None  # llhttp let only digits through

    async def chunks(self) -> AsyncIterator[bytes]:
        while piece := await self._conn.next_chunk():
            yield piece

    async def read(self, limit: int) -> bytes:
        """The whole body, or its first ``limit + 1`` bytes if it is longer."""
        pieces: list[bytes] = []
        size = 0
        while size <= limit and (piece := await self._conn.next_chunk()):
            pieces.append(piece)
            size += len(piece)
        return b"".join(pieces)

    def release(self) -> None:
        self._conn.finish()


class Pool:
    """Keep-alive connections to one upstream."""

    def __init__(
        self,
        url: str,
        *,
        ssl_context: ssl.SSLContext | None,
        server_hostname: str | None,
        connect_timeout: float,
        read_timeout: float,
        unix_path: str | None = None,
    ) -> None:
        parts = urlsplit(url)
        assert parts.hostname is not None
        self.loop = asyncio.get_running_loop()
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.base_path = parts.path.rstrip("/")
        self._ssl = ssl_context if parts.scheme == "https" else None
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if parts.scheme == "https" else 80
        self.host_header = host if self.port == default else f"{host}:{self.port}"
        self._sni = (server_hostname or self.host) if self._ssl is not None else None
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.unix_path = unix_path  # connect here instead of host:port (the Host header stays the URL's)
        self._idle: list[_Conn] = []
        self.opened = 0  # connections ever made, for tests and metrics

    def put(self, conn: _Conn) -> None:
        conn.idle_since = self.loop.time()
        self._idle.append(conn)

    def forget(self, conn: _Conn) -> None:
        if conn in self._idle:
            self._idle.remove(conn)

    def close(self) -> None:
        for conn in list(self._idle):
            conn.close()
        self._idle.clear()

    def _take(self) -> _Conn | None:
        now = self.loop.time()
        while self._idle:
            conn = self._idle.pop()
            if conn.closed or conn.dirty:
                continue
            if now - conn.idle_since > KEEPALIVE_S:
                conn.close()
                continue
            return conn
        return None

    async def _connect(self) -> _Conn:
        try:
            async with asyncio.timeout(self.connect_timeout):
                if self.unix_path is not None:
                    _, conn = await self.loop.create_unix_connection(
                        lambda: _Conn(self), self.unix_path, ssl=self._ssl, server_hostname=self._sni
                    )
                else:
                    _, conn = await self.loop.create_connection(
                        lambda: _Conn(self), self.host, self.port, ssl=self._ssl, server_hostname=self._sni
                    )
        except TimeoutError as exc:
            raise UpstreamTimeout("connect timed out") from exc
        except OSError as exc:
            raise UpstreamRefused(type(exc).__name__) from exc
        self.opened += 1
        return conn

    def _head(self, method: str, target: str, headers: Iterable[tuple[str, str]]) -> bytes:
        lines = [f"{method} {self.base_path}{target} HTTP/1.1"]
        names = []
        for key, value in headers:
            names.append(key)
            lines.append(f"{key}: {value}")
        # One look over the whole head: no line breaks or NULs smuggled in a name,
        # a value or the target; no colon or space in a name; no space in the target.
        probe = "".join(lines)
        keys = "".join(names)
        if "\r" in probe or "\n" in probe or "\0" in probe or ":" in keys or " " in keys or " " in target:
            raise UpstreamFailure("request head not sendable")
        lines.append("\r\n")
        return "\r\n".join(lines).encode("utf-8")

    async def request(
        self,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        body: bytes | AsyncIterator[bytes] | None,
        *,
        content_length: int | None = None,
        replay: bool = False,
        note: Callable[[str], object] | None = None,
    ) -> Response:
        """Send one request; the caller must ``release()`` the answer.

        ``replay`` marks a request of another method as safe to resend in the one case a
        GET is: a reused connection that proved dead before any byte of the answer (a
        query that changes nothing, such as a policy decision).  ``note`` is told where the
        exchange stands: ``"connecting"``, then ``"sent"`` (on a new or a reused connection,
        the request written and its answer awaited).
        """
        if method == "HEAD":
            raise ValueError("HEAD is not sent on the lean path")
        names = {key.lower() for key, _ in headers}
        extra: list[tuple[str, str]] = []
        if "host" not in names:
            extra.append(("Host", self.host_header))
        chunked = False
        if isinstance(body, bytes):
            if body or method not in _BODYLESS:
                extra.append(("Content-Length", str(len(body))))
        elif body is None:
            if method not in _BODYLESS:
                extra.append(("Content-Length", "0"))
        elif content_length is not None:
            extra.append(("Content-Length", str(content_length)))
        else:
            chunked = True
            extra.append(("Transfer-Encoding", "chunked"))
        head = self._head(method, target, [(k, v) for k, v in headers if k.lower() != "content-length"] + extra)
        replayable = (replay or method in _REPLAYABLE) and not isinstance(body, AsyncIterator)
        for attempt in range(2):
            conn = self._take() if attempt == 0 else None  # a retry never trusts another idle one
            reused = conn is not None
            if conn is None:
                if note is not None:
                    note("connecting")
                conn = await self._connect()
            if note is not None:
                note("sent")
            try:
                await conn.start(head, body, chunked)
            except _Stale:
                conn.finish()
                if reused and replayable and attempt == 0:
                    continue
                raise
            except BaseException:
                conn.finish()
                raise
            return Response(conn)
        raise AssertionError("unreachable")
