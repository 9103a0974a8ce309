"""The body deadline holds against a client that stalls, not only one that trickles.

A body that stops arriving part way is cut at ``limits.body_deadline_s``
(408 ``sanitize.body_deadline``), not at the much longer idle gap: the
deadline bounds the wait for the next piece too, not only the moments between
pieces.  Same real PEP, upstream and TLS as test_slow_bodies.py (idle gap
10 s, deadline 1.5 s).
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest
from tests.support import client_context
from tests.test_slow_bodies import DEADLINE_S, _records, pep, slow_upstream

from vvault_pep.app.runtime import PepRuntime

__all__ = ["pep", "slow_upstream"]  # the fixtures, shared with test_slow_bodies.py


async def test_a_body_that_stalls_is_cut_at_the_deadline_not_the_idle_gap(
    pep: PepRuntime, pki: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ctx = client_context(pki, "ops")
    with caplog.at_level(logging.INFO, logger="vvault_pep.audit"):
        reader, writer = await asyncio.open_connection("127.0.0.1", pep.port, ssl=ctx, server_hostname="localhost")
        try:
            # past limits.buffer_body_bytes, so it streams; then nothing more, ever
            writer.write(
                b"PUT /blobs/stall HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1048576\r\n\r\n" + b"z" * (80 << 10)
            )
            await writer.drain()
            started = time.monotonic()
            async with asyncio.timeout(8):  # the idle gap (10 s) would come later than this
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            elapsed = time.monotonic() - started
        finally:
            writer.close()
    assert head.split(" ")[1] == "408"
    assert elapsed < DEADLINE_S + 3
    request_id = next(
        line.split(":", 1)[1].strip() for line in head.split("\r\n") if line.lower().startswith("x-request-id")
    )
    [record] = _records(caplog, {request_id})
    assert (record["status"], record["error"]["code"]) == (408, "sanitize.body_deadline")
