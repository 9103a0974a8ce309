"""Reading a request body the policy may see: at most ``max_bytes``, with idle and overall deadlines.

What the policy sees of the bytes read (and the whole contract) is :mod:`..core.body`'s; this
module only takes them off the connection, answering ``Expect: 100-continue`` first.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

import aiohttp
from aiohttp import web

from ..config.models import RouteBody
from ..core.body import NOTHING, Inspected, is_json, parse
from ..core.sanitize import Headers
from ..errors import PepError


async def inspect(
    request: web.BaseRequest | None,
    cfg: RouteBody,
    headers: Headers,
    idle_timeout_s: float,
    deadline_s: float = 60.0,
) -> Inspected:
    """Read up to ``cfg.max_bytes`` of the body (never more) and parse it, all within ``deadline_s``.

    ``request`` is None when nothing was received (``explain``): a body announced then is refused.
    """
    try:
        async with asyncio.timeout(deadline_s):
            return await _inspect(request, cfg, headers, idle_timeout_s)
    except TimeoutError as exc:
        raise PepError("sanitize.body_deadline", "the request body took too long") from exc


async def _inspect(
    request: web.BaseRequest | None, cfg: RouteBody, headers: Headers, idle_timeout_s: float
) -> Inspected:
    has_body = bool(headers.content_length) or headers.chunked
    if not has_body:
        return NOTHING
    if request is None:
        raise PepError("sanitize.malformed", "a body was announced but none can be read")
    # The Content-Type the upstream will receive is the one judged.
    types = [v for k, v in headers.forward if k.lower() == "content-type"]
    if len(types) != 1 or not is_json(types[0]):
        raise PepError("sanitize.unsupported_media_type", "this route takes application/json bodies")
    if headers.content_length is not None and headers.content_length > cfg.max_bytes:
        return Inspected(None, True, b"")  # not read at all: it streams to the upstream after the decision
    continued = headers.expect_continue and request.version >= (1, 1)
    if continued:
        # The client waits for this before sending a body the policy must see.
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    chunks: list[bytes] = []
    size = 0
    content = request.content
    while size <= cfg.max_bytes:
        try:
            async with asyncio.timeout(idle_timeout_s):
                chunk = await content.readany()
        except TimeoutError as exc:
            raise PepError("sanitize.body_timeout", "the request body stalled") from exc
        except (ValueError, aiohttp.ClientPayloadError, web.HTTPException) as exc:
            raise PepError("sanitize.malformed", "malformed request body") from exc
        if not chunk:
            return replace(parse(b"".join(chunks), complete=True), continued=continued)
        chunks.append(chunk)
        size += len(chunk)
    return replace(parse(b"".join(chunks), complete=False), continued=continued)
