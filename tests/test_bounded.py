"""Whole reads of aiohttp streams, never past a limit (``net/bounded.py``).

The property: however a body is cut into pieces on the way, what is read is the whole body
when it is within the limit, and more than the limit (a prefix of it) when it is not.  Over
a real loopback server: an upstream answer read on aiohttp's client comes whole, in pieces.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from aiohttp.base_protocol import BaseProtocol
from hypothesis import given, settings
from hypothesis import strategies as st

from vvault_pep.edge.forward import _AiohttpAnswer
from vvault_pep.net.bounded import TooLarge, read_bounded, read_upto


def cut(body: bytes, points: list[int]) -> list[bytes]:
    edges = sorted({0, len(body), *(p % (len(body) + 1) for p in points)})
    return [body[a:b] for a, b in itertools.pairwise(edges)]


async def read_pieces(pieces: list[bytes], limit: int) -> bytes:
    loop = asyncio.get_running_loop()
    protocol = BaseProtocol(loop)
    protocol.transport = asyncio.Transport()  # connected; never paused (the bodies stay far below its limit)
    stream = aiohttp.StreamReader(protocol, 2**16, loop=loop)

    async def feed() -> None:
        for piece in pieces:
            stream.feed_data(piece)
            await asyncio.sleep(0)  # each piece its own arrival: the reader runs between them
        stream.feed_eof()

    feeder = asyncio.create_task(feed())
    try:
        return bytes(await read_upto(stream, limit))
    finally:
        feeder.cancel()


@settings(max_examples=200, deadline=None)
@given(body=st.binary(max_size=300), points=st.lists(st.integers(min_value=0), max_size=12), limit=st.integers(0, 400))
def test_the_body_whole_or_past_the_limit_however_it_is_cut(body: bytes, points: list[int], limit: int) -> None:
    # A loop of its own, never made the thread's current one (asyncio.run would leave the
    # thread with none, and a later test's get_event_loop() would fail).
    loop = asyncio.new_event_loop()
    try:
        got = loop.run_until_complete(read_pieces(cut(body, points), limit))
    finally:
        loop.close()
    if len(body) <= limit:
        assert got == body
    else:
        assert len(got) > limit and body.startswith(got)


@pytest.fixture
async def in_pieces() -> AsyncIterator[str]:
    """A server that sends a JSON body in two pieces with a pause between them."""

    async def handler(request: web.Request) -> web.StreamResponse:
        body = b'{"a": "' + b"x" * 5000 + b'", "b": 2}'
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        with contextlib.suppress(ConnectionError):  # a reader past its limit may have gone
            await resp.write(body[:100])
            await asyncio.sleep(0.1)  # the network's pause; the answer must not depend on its length
            await resp.write(body[100:])
            await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}/"
    await runner.cleanup()


async def test_an_answer_on_aiohttps_client_is_read_whole_when_it_comes_in_pieces(in_pieces: str) -> None:
    async with aiohttp.ClientSession() as http, http.get(in_pieces) as resp:
        raw = await _AiohttpAnswer(resp).read(1 << 20)
    assert raw == b'{"a": "' + b"x" * 5000 + b'", "b": 2}'


async def test_an_answer_past_the_limit_is_read_no_further_than_past_it(in_pieces: str) -> None:
    async with aiohttp.ClientSession() as http, http.get(in_pieces) as resp:
        raw = await _AiohttpAnswer(resp).read(50)
    assert 50 < len(raw) <= 100  # the first piece, not the whole


async def test_a_streamed_answer_past_the_limit_is_too_large_with_no_length_declared(in_pieces: str) -> None:
    async with aiohttp.ClientSession() as http, http.get(in_pieces) as resp:
        with pytest.raises(TooLarge) as exc:
            await read_bounded(resp, 1000)
    assert (exc.value.limit, exc.value.declared) == (1000, None)
    async with aiohttp.ClientSession() as http, http.get(in_pieces) as resp:
        assert bytes(await read_bounded(resp, 5017)) == b'{"a": "' + b"x" * 5000 + b'", "b": 2}'
