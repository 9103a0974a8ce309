"""Helpers every test file may share: a running PEP, one mTLS request.

``running_pep(config)`` starts a :class:`PepRuntime` in this process and stops it after;
``mtls_request(pki, port, path)`` sends one request with a demo client certificate and
returns what a user would look at.  New tests use these instead of a copy of their own.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from tests.support import client_context

from vvault_pep.app.runtime import PepRuntime
from vvault_pep.config import Config


@contextlib.asynccontextmanager
async def running_pep(config: Config) -> AsyncIterator[PepRuntime]:
    """A started PEP (listener, admin API, its services), stopped on the way out."""
    runtime = PepRuntime(config)
    await runtime.start()
    try:
        yield runtime
    finally:
        await runtime.stop()


@dataclass(frozen=True)
class Answer:
    status: int
    headers: Mapping[str, str]
    body: bytes


async def mtls_request(
    pki: Path,
    port: int,
    path: str,
    *,
    client: str | None = "reader",
    method: str = "GET",
    headers: Mapping[str, str] | None = None,
    body: bytes | None = None,
) -> Answer:
    """One request over a fresh TLS connection holding the demo ``client``'s certificate (None: none)."""
    connector = aiohttp.TCPConnector(ssl=client_context(pki, client), force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http:
        async with http.request(method, f"https://localhost:{port}{path}", headers=headers, data=body) as resp:
            return Answer(resp.status, dict(resp.headers), await resp.read())
