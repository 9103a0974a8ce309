"""Forward: stream an allowed request to its upstream and the answer back.

* The request goes out on the lean client of :mod:`..net.http1` (llhttp
  parses the answer); ``HEAD`` goes through aiohttp's client, whose parser can
  be told that such an answer has no body.  Either way the upstream receives
  byte-for-byte the path the policy saw: the lean client writes the canonical
  target as it is, and aiohttp gets it marked *already encoded*
  (``yarl.URL(..., encoded=True)``) so it cannot re-normalise or re-encode it.
* Bodies stream both ways in chunks; nothing large is buffered whole.  The
  request body is counted against ``limits.max_body_bytes`` as it passes, each
  piece must come within ``limits.body_idle_timeout_s`` and the whole body
  within the route's body deadline (408 otherwise).  A client that stops
  reading the answer for ``limits.send_idle_timeout_s`` is cut off.  A body up to
  ``limits.buffer_body_bytes`` is received whole *before* an upstream
  connection is taken: a client trickling a small body holds none.
* One keep-alive pool per upstream, with connect and read timeouts split.  A
  request waits at most ``pool_timeout_s`` for a free connection, then gets a
  fast 503 ``upstream.saturated`` with ``Retry-After``.
* The PEP sets ``X-Forwarded-For/-Proto/-Host`` and ``X-Request-Id`` itself
  (the client's copies were stripped by sanitize) and adds the decision's
  ``upstream_headers``.  The answer's headers pass the route's header policy
  (:mod:`vvault_pep.core.responses`) before the PEP adds its own.
* Refused connection → 502 ``upstream.unavailable``; connect or read timeout
  → 504 ``upstream.timeout``.  A fault after the response has started cannot
  change the status any more: the client connection is aborted instead.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from ..config.models import Upstream
from ..core import responses
from ..errors import PepError
from ..net import http1
from ..net.bounded import read_upto

log = logging.getLogger("vvault_pep.forward")

CHUNK = 64 * 1024
_SERVER = "vvault-pep"  # not the framework and its version


@dataclass(frozen=True, slots=True)
class Outcome:
    status: int
    bytes_in: int
    bytes_out: int
    aborted: str | None = None  # "client_gone", "client_stalled" or "upstream_failed" after the response started


def _strip(doc: Any, fields: frozenset[str]) -> Any:
    if isinstance(doc, dict):
        return {k: _strip(v, fields) for k, v in doc.items() if k not in fields}
    if isinstance(doc, list):
        return [_strip(v, fields) for v in doc]
    return doc


class _Answer(Protocol):
    """An upstream's answer, from the lean client or from aiohttp's."""

    status: int
    reason: str | None

    def header_items(self) -> Iterable[tuple[str, str]]: ...
    def header(self, name: str) -> str | None: ...
    @property
    def content_length(self) -> int | None: ...
    def chunks(self) -> AsyncIterator[bytes]: ...
    async def read(self, limit: int) -> bytes: ...
    def release(self) -> None: ...


class _AiohttpAnswer:
    """aiohttp's ClientResponse behind the interface of the lean client's answer."""

    __slots__ = ("_resp", "reason", "status")

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self._resp = resp
        self.status = resp.status
        self.reason = resp.reason

    def header_items(self) -> Iterable[tuple[str, str]]:
        return self._resp.headers.items()

    def header(self, name: str) -> str | None:
        return self._resp.headers.get(name)

    @property
    def content_length(self) -> int | None:
        return self._resp.content_length

    def chunks(self) -> AsyncIterator[bytes]:
        return self._resp.content.iter_chunked(CHUNK)

    async def read(self, limit: int) -> bytes:
        # content.read(n) would stop at what has arrived: the first piece of a longer body
        return await read_upto(self._resp.content, limit)

    def release(self) -> None:
        self._resp.release()


class _Body:
    """The request body's budget: size, idle gap and total deadline."""

    def __init__(self, limit: int, idle_s: float, deadline: float) -> None:
        self.limit = limit
        self.idle_s = idle_s
        self.deadline = deadline  # loop time
        self.count = 0


def upstream_ssl(up: Upstream) -> ssl.SSLContext | bool:
    if up.tls is None:
        return True  # https:// upstreams verify against the system store by default
    ctx = ssl.create_default_context(cafile=str(up.tls.ca_file) if up.tls.ca_file else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if up.tls.cert_file and up.tls.key_file:
        ctx.load_cert_chain(str(up.tls.cert_file), str(up.tls.key_file))
    return ctx


class Upstreams:
    def __init__(
        self,
        upstreams: dict[str, Upstream],
        *,
        max_body_bytes: int,
        body_idle_timeout_s: float,
        buffer_body_bytes: int = 64 << 10,
        send_idle_timeout_s: float = 30.0,
    ) -> None:
        self._config = upstreams
        self._max_body = max_body_bytes
        self._body_idle = body_idle_timeout_s
        self._buffer = buffer_body_bytes
        self._send_idle = send_idle_timeout_s
        self._sessions: dict[str, aiohttp.ClientSession] = {}  # HEAD and what the lean client does not cover
        self._pools: dict[str, http1.Pool] = {}  # the lean client, made on first use
        # The PEP's own count of pooled connections in use: a full pool is known
        # without waiting in aiohttp's queue.
        self._slots: dict[str, asyncio.Semaphore] = {}
        self._in_use: dict[str, int] = dict.fromkeys(upstreams, 0)
        for name, up in upstreams.items():
            self._slots[name] = asyncio.Semaphore(up.max_connections)
            connector = aiohttp.TCPConnector(
                limit=up.max_connections, keepalive_timeout=30, ssl=upstream_ssl(up), ttl_dns_cache=30
            )
            self._sessions[name] = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(
                    total=None,
                    connect=up.pool_timeout_s + up.connect_timeout_s,
                    sock_connect=up.connect_timeout_s,
                    sock_read=up.read_timeout_s,
                ),
                auto_decompress=False,  # pass bytes through with their Content-Encoding
                skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept", "Content-Type"),
                cookie_jar=aiohttp.DummyCookieJar(),  # never keep one client's cookies for another
            )

    async def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        for session in self._sessions.values():
            await session.close()

    def in_use(self, name: str) -> int:
        """Pooled connections of ``name`` held by requests now."""
        return self._in_use[name]

    async def forward(
        self,
        name: str,
        request: web.BaseRequest,
        *,
        path: str,
        query: str,
        headers: list[tuple[str, str]],
        content_length: int | None,
        chunked: bool,
        response_headers: list[tuple[str, str]],
        redact: tuple[str, ...] = (),
        redact_max_bytes: int = 1 << 20,
        header_policy: responses.HeaderPolicy = responses.DEFAULT_POLICY,
        body_deadline_s: float = 60.0,
        prefix: bytes = b"",
        max_body_bytes: int | None = None,
    ) -> tuple[web.StreamResponse, Outcome]:
        """Forward and stream the answer back; PepError if nothing was sent yet."""
        up = self._config[name]
        target = path + (f"?{query}" if query else "")
        method = request.method
        if redact:
            # The obligation reads the whole answer: no partial content, no conditionals.
            headers = responses.whole_answer_request(headers)
            if method == "HEAD":
                # The upstream's HEAD would describe the unredacted body (its length, its
                # validators): ask for the body, redact it, send its headers only.
                method = "GET"
        send = CIMultiDict(headers)
        if redact:
            send["Accept-Encoding"] = "identity"  # the PEP must read what it redacts
        if up.tls and up.tls.server_hostname:
            send["Host"] = up.tls.server_hostname
        limit = self._max_body if max_body_bytes is None else max_body_bytes
        budget = _Body(limit, self._body_idle, asyncio.get_running_loop().time() + body_deadline_s)
        body: AsyncIterator[bytes] | bytes | None = None
        if content_length or chunked:
            # Received before a pooled connection is taken, up to the buffer size.
            first, done = await self._prefix(request, budget, prefix)
            if done:
                body = first
            else:
                body = self._rest(request, budget, first)
                if content_length:
                    send["Content-Length"] = str(content_length)
        slots = self._slots[name]
        try:
            if slots.locked():
                async with asyncio.timeout(up.pool_timeout_s):
                    await slots.acquire()
            else:
                await slots.acquire()  # a free slot: taken at once, no timer armed
        except TimeoutError as exc:
            raise PepError(
                "upstream.saturated", "the upstream is busy, retry later", headers=(("Retry-After", "1"),)
            ) from exc
        self._in_use[name] += 1
        try:
            return await self._exchange(
                name,
                request,
                method,
                target,
                send,
                body,
                budget,
                response_headers,
                redact,
                redact_max_bytes,
                header_policy,
            )
        finally:
            self._in_use[name] -= 1
            slots.release()

    async def _exchange(
        self,
        name: str,
        request: web.BaseRequest,
        method: str,
        target: str,
        send: CIMultiDict[str],
        body: AsyncIterator[bytes] | bytes | None,
        budget: _Body,
        response_headers: list[tuple[str, str]],
        redact: tuple[str, ...],
        redact_max_bytes: int,
        policy: responses.HeaderPolicy,
    ) -> tuple[web.StreamResponse, Outcome]:
        if method == "HEAD":
            # The lean parser cannot be told an answer belongs to a HEAD.
            upstream = await self._via_aiohttp(name, method, target, send, body)
        else:
            upstream = await self._via_lean(name, method, target, send, body)
        try:
            return await self._answer(
                name, request, upstream, budget, response_headers, redact, redact_max_bytes, policy
            )
        finally:
            upstream.release()

    def _pool(self, name: str) -> http1.Pool:
        pool = self._pools.get(name)
        if pool is None:
            up = self._config[name]
            tls: ssl.SSLContext | bool | None = None
            if up.url.startswith("https://"):
                tls = upstream_ssl(up)
            pool = http1.Pool(
                up.url,
                ssl_context=tls if isinstance(tls, ssl.SSLContext) else ssl.create_default_context() if tls else None,
                server_hostname=up.tls.server_hostname if up.tls else None,
                connect_timeout=up.connect_timeout_s,
                read_timeout=up.read_timeout_s,
            )
            self._pools[name] = pool
        return pool

    async def _via_lean(
        self,
        name: str,
        method: str,
        target: str,
        send: CIMultiDict[str],
        body: AsyncIterator[bytes] | bytes | None,
    ) -> _Answer:
        pool = self._pool(name)
        declared = send.get("Content-Length")
        try:
            return await pool.request(
                method,
                target,
                list(send.items()),
                body,
                content_length=int(declared) if declared is not None and not isinstance(body, bytes) else None,
            )
        except http1.UpstreamTimeout as exc:
            raise PepError("upstream.timeout", "the upstream did not answer in time") from exc
        except http1.UpstreamRefused as exc:
            log.warning("upstream %s unreachable: %s", name, exc)
            raise PepError("upstream.unavailable", "the upstream refused the connection") from exc
        except http1.UpstreamError as exc:
            log.warning("upstream %s failed: %s", name, exc)  # fixed phrases, never the bytes received
            raise PepError("upstream.error", "the upstream connection failed") from exc

    async def _via_aiohttp(
        self,
        name: str,
        method: str,
        target: str,
        send: CIMultiDict[str],
        body: AsyncIterator[bytes] | bytes | None,
    ) -> _Answer:
        up = self._config[name]
        url = URL(up.url + target, encoded=True)
        session = self._sessions[name]
        try:
            upstream = await session.request(
                method,
                url,
                headers=send,
                data=body,
                allow_redirects=False,
                server_hostname=up.tls.server_hostname if up.tls else None,
            )
        except PepError:
            raise
        except aiohttp.ServerTimeoutError as exc:  # connect or read timeout
            raise PepError("upstream.timeout", "the upstream did not answer in time") from exc
        except TimeoutError as exc:
            raise PepError("upstream.timeout", "the upstream did not answer in time") from exc
        except aiohttp.ClientConnectorError as exc:
            log.warning("upstream %s unreachable: %s", name, exc.os_error.__class__.__name__)
            raise PepError("upstream.unavailable", "the upstream refused the connection") from exc
        except (aiohttp.ClientError, OSError) as exc:
            if isinstance(exc.__cause__, PepError):
                raise exc.__cause__ from exc
            log.warning("upstream %s failed: %s", name, type(exc).__name__)
            raise PepError("upstream.error", "the upstream connection failed") from exc
        return _AiohttpAnswer(upstream)

    async def _answer(
        self,
        name: str,
        request: web.BaseRequest,
        upstream: _Answer,
        budget: _Body,
        response_headers: list[tuple[str, str]],
        redact: tuple[str, ...],
        redact_max_bytes: int,
        policy: responses.HeaderPolicy,
    ) -> tuple[web.StreamResponse, Outcome]:
        passed = responses.pass_headers(upstream.header_items(), policy)
        if redact:
            return await self._redacted(request, upstream, redact, redact_max_bytes, passed, response_headers, budget)
        out = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        for key, value in passed:
            out.headers.add(key, value)
        out.headers.setdefault("Server", _SERVER)
        for key, value in response_headers:
            out.headers[key] = value
        try:
            await out.prepare(request)
        except (ConnectionError, aiohttp.ClientConnectionResetError):
            return out, Outcome(upstream.status, budget.count, 0, "client_gone")
        sent = 0
        try:
            async for chunk in upstream.chunks():
                try:
                    # A client that stops reading holds the pooled connection as surely
                    # as one that trickles its body.
                    async with asyncio.timeout(self._send_idle):
                        await out.write(chunk)
                except TimeoutError:
                    log.info("client stopped reading the answer from %s", name)
                    if request.transport is not None:
                        request.transport.abort()
                    return out, Outcome(upstream.status, budget.count, sent, "client_stalled")
                except (ConnectionError, aiohttp.ClientConnectionResetError):
                    # The client went away: stop reading the upstream, keep the record.
                    return out, Outcome(upstream.status, budget.count, sent, "client_gone")
                sent += len(chunk)
        except (aiohttp.ClientError, OSError, TimeoutError, http1.UpstreamError) as exc:
            # The status line is gone already; a truncated, aborted
            # connection is the only honest signal left.
            log.warning("upstream %s failed mid-response: %s", name, type(exc).__name__)
            if request.transport is not None:
                request.transport.abort()
            return out, Outcome(upstream.status, budget.count, sent, "upstream_failed")
        await out.write_eof()
        return out, Outcome(upstream.status, budget.count, sent)

    async def _redacted(
        self,
        request: web.BaseRequest,
        upstream: _Answer,
        fields: tuple[str, ...],
        limit: int,
        passed: list[tuple[str, str]],
        response_headers: list[tuple[str, str]],
        budget: _Body,
    ) -> tuple[web.StreamResponse, Outcome]:
        """Field-level least privilege: remove ``fields`` from a whole JSON answer, or withhold it."""
        partial = responses.partial_reason(upstream.status, upstream.header_items())
        if partial is not None:
            raise PepError("enforce.partial_answer", partial)
        kept = [(k, v) for k, v in passed if k.lower() not in responses.BODY_BOUND]
        if upstream.status == 204:
            out = web.Response(status=204)
            body = b""
        else:
            body = await self._redact_body(upstream, fields, limit)
            out = web.Response(status=upstream.status, body=body, content_type="application/json")
        for key, value in kept:
            out.headers.add(key, value)
        out.headers.setdefault("Server", _SERVER)
        out.headers["Accept-Ranges"] = "none"  # the PEP answers only whole representations here
        for key, value in response_headers:
            out.headers[key] = value
        out.headers["X-Vvault-Redacted"] = ",".join(fields)
        sent = 0 if request.method == "HEAD" else len(body)
        return out, Outcome(upstream.status, budget.count, sent)

    async def _redact_body(self, upstream: _Answer, fields: tuple[str, ...], limit: int) -> bytes:
        ctype = (upstream.header("Content-Type") or "").split(";")[0].strip().lower()
        declared = upstream.content_length
        if not (ctype == "application/json" or ctype.endswith("+json")) or (
            upstream.header("Content-Encoding") or "identity"
        ) not in ("identity", ""):
            raise PepError("enforce.redaction_impossible", "the response is not JSON the PEP can redact")
        if declared is not None and declared > limit:
            raise PepError("enforce.redaction_impossible", "the response is too large to redact")
        try:
            raw = await upstream.read(limit)
        except (aiohttp.ClientError, OSError, TimeoutError, http1.UpstreamError) as exc:
            log.warning("upstream failed mid-response: %s", type(exc).__name__)
            raise PepError("upstream.error", "the upstream connection failed") from exc
        if len(raw) > limit:
            raise PepError("enforce.redaction_impossible", "the response is too large to redact")
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise PepError("enforce.redaction_impossible", "the response is not valid JSON") from exc
        return orjson.dumps(_strip(doc, frozenset(fields)))

    async def _read(self, request: web.BaseRequest, budget: _Body) -> bytes:
        """The next piece of the request body (b"" at its end), within both time limits."""
        left = budget.deadline - asyncio.get_running_loop().time()
        if left <= 0:
            raise PepError("sanitize.body_deadline", "the request body took too long")
        try:
            # A client that trickles its body would hold a pooled upstream
            # connection for ever: each piece must come within the idle gap,
            # and the whole body within the deadline.
            async with asyncio.timeout(min(budget.idle_s, left)):
                chunk = await request.content.readany()
        except TimeoutError as exc:
            if budget.idle_s < left:
                raise PepError("sanitize.body_timeout", "the request body stalled") from exc
            raise PepError("sanitize.body_deadline", "the request body took too long") from exc
        except (ValueError, aiohttp.ClientPayloadError, web.HTTPException) as exc:
            raise PepError("sanitize.malformed", "malformed request body") from exc
        budget.count += len(chunk)
        if budget.count > budget.limit:
            raise PepError("sanitize.body_too_large", "request body exceeds the limit")
        return chunk

    async def _prefix(self, request: web.BaseRequest, budget: _Body, read: bytes = b"") -> tuple[bytes, bool]:
        """Up to the buffer size of the body; True when that is all of it.

        ``read``: what the policy already read (and judged) of the body; it goes first, byte for byte.
        """
        pieces: list[bytes] = [read] if read else []
        size = len(read)
        budget.count += size
        if budget.count > budget.limit:
            raise PepError("sanitize.body_too_large", "request body exceeds the limit")
        while size <= self._buffer:
            chunk = await self._read(request, budget)
            if not chunk:
                return b"".join(pieces), True
            pieces.append(chunk)
            size += len(chunk)
        return b"".join(pieces), False

    async def _rest(self, request: web.BaseRequest, budget: _Body, first: bytes) -> AsyncIterator[bytes]:
        yield first
        while chunk := await self._read(request, budget):
            yield chunk
