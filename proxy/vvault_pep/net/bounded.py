"""Reading a whole answer from aiohttp's client, never past a limit.

``StreamReader.read(n)`` returns what has arrived, up to ``n`` bytes: one read of a
document that comes in two pieces gets the first.  ``ClientResponse.read()`` reads
everything, however much is sent.  The control-plane documents the PEP fetches (OPA's
answers, an issuer's discovery document and key set) are read whole, and refused once
they are past their limit: whatever answers on a configured address is trusted with
the PEP's memory no further than that.  Bodies the PEP itself receives through aiohttp
(the admin API's, an upstream's answer to redact on aiohttp's client) are read the same way.
"""

from __future__ import annotations

import aiohttp


class TooLarge(Exception):
    """The answer was longer than the limit (declared, or as it came)."""

    def __init__(self, limit: int, declared: int | None) -> None:
        self.limit = limit
        self.declared = declared
        said = f"an answer of {declared} bytes" if declared is not None else "an answer that went on"
        super().__init__(f"{said} past the limit of {limit} bytes")


async def read_upto(stream: aiohttp.StreamReader, limit: int) -> bytes:
    """The whole stream; or, once it is past ``limit`` bytes, what had been read by then.

    The caller tells the two apart by the length (more than ``limit``: not whole).  The
    pieces are joined once at the end: a buffer grown piece by piece through realloc left
    the heap fragmented by a few hundred KB at every module listing (the soak's steps).
    """
    pieces: list[bytes] = []
    size = 0
    async for chunk in stream.iter_any():
        pieces.append(chunk)
        size += len(chunk)
        if size > limit:
            break
    return pieces[0] if len(pieces) == 1 else b"".join(pieces)


async def read_bounded(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """The whole body of ``resp``, or TooLarge once it is past ``limit`` bytes.

    A Content-Length past the limit is refused before a byte of the body is read; a body
    that keeps coming, at the first chunk past the limit.  Leaving ``resp``'s context then
    closes the connection, unless the whole answer had already arrived.
    """
    declared = resp.content_length
    if declared is not None and declared > limit:
        raise TooLarge(limit, declared)
    body = await read_upto(resp.content, limit)
    if len(body) > limit:
        raise TooLarge(limit, None)
    return body
