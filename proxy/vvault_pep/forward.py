"""Forward: stream an allowed request to its upstream and the answer back.

* The URL is built from the canonical path and marked *already encoded*
  (``yarl.URL(..., encoded=True)``) so the client library cannot re-normalise
  or re-encode it: the upstream receives byte-for-byte the path the policy saw.
* Bodies stream both ways in chunks; nothing is buffered whole.  The request
  body is counted against ``limits.max_body_bytes`` as it passes.
* One keep-alive pool per upstream, with connect and read timeouts split.
* The PEP sets ``X-Forwarded-For/-Proto/-Host`` and ``X-Request-Id`` itself
  (the client's copies were stripped by sanitize) and adds the decision's
  ``upstream_headers``.
* Refused connection → 502 ``upstream.unavailable``; connect or read timeout
  → 504 ``upstream.timeout``.  A fault after the response has started cannot
  change the status any more: the client connection is aborted instead.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from .config import Upstream
from .errors import PepError

log = logging.getLogger("vvault_pep.forward")

CHUNK = 64 * 1024
_RESPONSE_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)


@dataclass(frozen=True, slots=True)
class Outcome:
    status: int
    bytes_in: int
    bytes_out: int
    aborted: str | None = None  # "client_gone" or "upstream_failed" after the response started


def _strip(doc: Any, fields: frozenset[str]) -> Any:
    if isinstance(doc, dict):
        return {k: _strip(v, fields) for k, v in doc.items() if k not in fields}
    if isinstance(doc, list):
        return [_strip(v, fields) for v in doc]
    return doc


class _Counter:
    def __init__(self, limit: int) -> None:
        self.limit = limit
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
    def __init__(self, upstreams: dict[str, Upstream], *, max_body_bytes: int, body_idle_timeout_s: float) -> None:
        self._config = upstreams
        self._max_body = max_body_bytes
        self._body_idle = body_idle_timeout_s
        self._sessions: dict[str, aiohttp.ClientSession] = {}
        for name, up in upstreams.items():
            connector = aiohttp.TCPConnector(
                limit=up.max_connections, keepalive_timeout=30, ssl=upstream_ssl(up), ttl_dns_cache=30
            )
            self._sessions[name] = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(
                    total=None,
                    connect=up.pool_timeout_s,  # waiting for a pooled connection, then connecting
                    sock_connect=up.connect_timeout_s,
                    sock_read=up.read_timeout_s,
                ),
                auto_decompress=False,  # pass bytes through with their Content-Encoding
                skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept", "Content-Type"),
                cookie_jar=aiohttp.DummyCookieJar(),  # never keep one client's cookies for another
            )

    async def close(self) -> None:
        for session in self._sessions.values():
            await session.close()

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
        max_body_bytes: int | None = None,
    ) -> tuple[web.StreamResponse, Outcome]:
        """Forward and stream the answer back; PepError if nothing was sent yet."""
        up = self._config[name]
        url = URL(up.url + path + (f"?{query}" if query else ""), encoded=True)
        send = CIMultiDict(headers)
        if redact:
            send["Accept-Encoding"] = "identity"  # the PEP must read what it redacts
        if up.tls and up.tls.server_hostname:
            send["Host"] = up.tls.server_hostname
        counter = _Counter(self._max_body if max_body_bytes is None else max_body_bytes)
        body: AsyncIterator[bytes] | None = None
        if content_length:
            send["Content-Length"] = str(content_length)
            body = self._body(request, counter)
        elif chunked:
            body = self._body(request, counter)
        session = self._sessions[name]
        try:
            upstream = await session.request(
                request.method,
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
        async with upstream:
            if redact:
                return await self._redacted(request, upstream, redact, redact_max_bytes, response_headers, counter)
            out = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            connection_named = {
                t.strip().lower() for v in upstream.headers.getall("Connection", []) for t in v.split(",")
            }
            for key, value in upstream.headers.items():
                low = key.lower()
                if low in _RESPONSE_HOP_BY_HOP or low in connection_named:
                    continue
                out.headers.add(key, value)
            for key, value in response_headers:
                out.headers[key] = value
            try:
                await out.prepare(request)
            except (ConnectionError, aiohttp.ClientConnectionResetError):
                return out, Outcome(upstream.status, counter.count, 0, "client_gone")
            sent = 0
            try:
                async for chunk in upstream.content.iter_chunked(CHUNK):
                    try:
                        await out.write(chunk)
                    except (ConnectionError, aiohttp.ClientConnectionResetError):
                        # The client went away: stop reading the upstream, keep the record.
                        return out, Outcome(upstream.status, counter.count, sent, "client_gone")
                    sent += len(chunk)
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                # The status line is gone already; a truncated, aborted
                # connection is the only honest signal left.
                log.warning("upstream %s failed mid-response: %s", name, type(exc).__name__)
                if request.transport is not None:
                    request.transport.abort()
                return out, Outcome(upstream.status, counter.count, sent, "upstream_failed")
            await out.write_eof()
            return out, Outcome(upstream.status, counter.count, sent)

    async def _redacted(
        self,
        request: web.BaseRequest,
        upstream: aiohttp.ClientResponse,
        fields: tuple[str, ...],
        limit: int,
        response_headers: list[tuple[str, str]],
        counter: _Counter,
    ) -> tuple[web.StreamResponse, Outcome]:
        """Field-level least privilege: remove ``fields`` from a JSON answer, or withhold it."""
        ctype = upstream.headers.get("Content-Type", "").split(";")[0].strip().lower()
        declared = upstream.content_length
        if not (ctype == "application/json" or ctype.endswith("+json")) or upstream.headers.get(
            "Content-Encoding", "identity"
        ) not in ("identity", ""):
            raise PepError("enforce.redaction_impossible", "the response is not JSON the PEP can redact")
        if declared is not None and declared > limit:
            raise PepError("enforce.redaction_impossible", "the response is too large to redact")
        raw = await upstream.content.read(limit + 1)
        if len(raw) > limit:
            raise PepError("enforce.redaction_impossible", "the response is too large to redact")
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise PepError("enforce.redaction_impossible", "the response is not valid JSON") from exc
        body = orjson.dumps(_strip(doc, frozenset(fields)))
        out = web.Response(status=upstream.status, body=body, content_type="application/json")
        for key, value in upstream.headers.items():
            if key.lower() in ("etag", "cache-control", "last-modified", "vary"):
                out.headers[key] = value
        for key, value in response_headers:
            out.headers[key] = value
        out.headers["X-Vvault-Redacted"] = ",".join(fields)
        return out, Outcome(upstream.status, counter.count, len(body))

    async def _body(self, request: web.BaseRequest, counter: _Counter) -> AsyncIterator[bytes]:
        content = request.content
        while True:
            try:
                # A client that trickles its body would hold a pooled upstream
                # connection for ever: each piece must come within the idle timeout.
                async with asyncio.timeout(self._body_idle):
                    chunk = await content.readany()
            except TimeoutError as exc:
                raise PepError("sanitize.body_timeout", "the request body stalled") from exc
            except (ValueError, aiohttp.ClientPayloadError, web.HTTPException) as exc:
                raise PepError("sanitize.malformed", "malformed request body") from exc
            if not chunk:
                return
            counter.count += len(chunk)
            if counter.count > counter.limit:
                raise PepError("sanitize.body_too_large", "request body exceeds the limit")
            yield chunk
