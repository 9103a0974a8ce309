"""Session fixtures: one PKI, one OPA, one example upstream, one PEP.

Everything is real and on loopback: OPA is the real server with the repo's
policies (plus ``tests/policies`` for fault shapes), the upstream is the
example vvault API, TLS uses certificates generated for this session.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from examples.pki import make_pki
from examples.vvault_api.app import SEEN, make_app
from tests.support import OpaProcess, client_context, free_port, make_config, start_opa

from vvault_pep.runtime import PepRuntime


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def opa() -> Iterator[OpaProcess]:
    proc = start_opa()
    yield proc
    proc.stop()


class Upstream:
    def __init__(self, app: web.Application, port: int) -> None:
        self.app = app
        self.port = port

    def seen_with(self, request_id: str) -> list[dict[str, Any]]:
        """Requests the upstream received carrying this X-Request-Id."""
        return [
            e for e in self.app[SEEN] if any(k.lower() == "x-request-id" and v == request_id for k, v in e["headers"])
        ]

    def count(self) -> int:
        return len(self.app[SEEN])

    def seen_path(self, raw_path: str) -> list[dict[str, Any]]:
        return [e for e in self.app[SEEN] if e["raw_path"] == raw_path]


@pytest.fixture(scope="session")
async def upstream() -> AsyncIterator[Upstream]:
    app = make_app()
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield Upstream(app, port)
    await runner.cleanup()


@pytest.fixture(scope="session")
async def hanging_upstream() -> AsyncIterator[int]:
    """An upstream that accepts and never answers (for read timeouts)."""
    never = asyncio.Event()

    async def handler(request: web.Request) -> web.Response:
        await never.wait()
        return web.Response()

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield runner.addresses[0][1]
    never.set()
    await runner.cleanup()


@pytest.fixture(scope="session")
async def pep(pki: Path, opa: OpaProcess, upstream: Upstream, hanging_upstream: int) -> AsyncIterator[PepRuntime]:
    config = make_config(
        pki, opa_url=opa.url, upstream_port=upstream.port, hang_port=hanging_upstream, down_port=free_port()
    )
    runtime = PepRuntime(config)
    await runtime.start()
    yield runtime
    await runtime.stop()


@pytest.fixture(scope="session")
async def client(pki: Path) -> AsyncIterator[aiohttp.ClientSession]:
    """A client holding the demo reader's certificate."""
    connector = aiohttp.TCPConnector(ssl=client_context(pki, "reader"))
    async with aiohttp.ClientSession(connector=connector) as session:
        yield session


@pytest.fixture
def base(pep: PepRuntime) -> str:
    return f"https://localhost:{pep.port}"
