"""Session fixtures: one PKI, one OPA, one example upstream, one PEP.

Everything is real and on loopback: OPA is the real server with the repo's
policies (plus ``tests/policies`` for fault shapes), the upstream is the
example vvault API, TLS uses certificates generated for this session.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from examples.pki import make_pki
from examples.vvault_api.app import SEEN, make_app
from tests.helpers import running_pep
from tests.idp import Issuer, Trap
from tests.support import STARTED, OpaProcess, client_context, free_port, make_config, start_opa

from vvault_pep.app.runtime import PepRuntime

# `make unit`: tests that start no server and no process (no OPA, no Redis, no PEP) are
# marked `unit`.  A test is one when none of its fixtures is a server and its module starts
# nothing itself.
_SERVERS = frozenset(
    {"opa", "own_opa", "redis_server", "pep", "upstream", "hanging_upstream", "idp", "devices", "trap", "client"}
    | {"base"}
    | {"docs", "rotating", "stand_in"}  # loopback key documents, a second IdP, an OPA stand-in
    | {"in_pieces"}  # an answer sent in two pieces
)
_STARTS = (
    "start_opa(", "start_serve(", "RedisServer(", "create_subprocess_exec", "PepRuntime(", "running_pep(",
    "subprocess.", "ThreadingHTTPServer(", "grpc.server(",
)  # fmt: skip


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    starts: dict[Path, bool] = {}
    for item in items:
        path = item.path
        if path not in starts:
            starts[path] = any(s in path.read_text() for s in _STARTS)
        if not starts[path] and not _SERVERS & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.unit)


# The Redis Cluster and Sentinel fixtures (started only by the tests that ask for them).
pytest_plugins = ["tests.redis_topologies"]


@pytest.fixture(autouse=True)
async def _no_pep_left_running() -> AsyncIterator[None]:
    """A `vvault-pep serve` a test started is gone after it, whatever the test did."""
    yield
    while STARTED:
        proc = STARTED.pop()
        if proc.returncode is None:
            proc.kill()  # its workers follow their supervisor
            await proc.wait()


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pki(tmp_path_factory.mktemp("pki"))


class RedisServer:
    def __init__(self) -> None:
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server not found: run `make redis` (installs it from Debian)")
        self.proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "yes",
            ],
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return
            time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def opa() -> Iterator[OpaProcess]:
    proc = start_opa()
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
async def idp() -> AsyncIterator[Issuer]:
    """A real OIDC issuer (discovery + JWKS over HTTP) shared by the session."""
    issuer = Issuer()
    await issuer.start()
    yield issuer
    await issuer.stop()


@pytest.fixture(scope="session")
async def devices() -> AsyncIterator[Issuer]:
    """A device trust service: signs posture assertions with its own keys."""
    issuer = Issuer()
    await issuer.start()
    yield issuer
    await issuer.stop()


@pytest.fixture(scope="session")
async def trap() -> AsyncIterator[Trap]:
    t = Trap()
    await t.start()
    yield t
    await t.stop()


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
def down_port() -> Iterator[int]:
    """A port where nothing listens, for the whole session: bound and never listened on, so
    connecting is refused and no server a later test starts on port 0 can be handed it."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        yield int(held.getsockname()[1])


@pytest.fixture(scope="session")
async def pep(
    pki: Path, opa: OpaProcess, upstream: Upstream, hanging_upstream: int, down_port: int
) -> AsyncIterator[PepRuntime]:
    config = make_config(
        pki, opa_url=opa.url, upstream_port=upstream.port, hang_port=hanging_upstream, down_port=down_port
    )
    async with running_pep(config) as runtime:
        yield runtime


@pytest.fixture(scope="session")
async def client(pki: Path) -> AsyncIterator[aiohttp.ClientSession]:
    """A client holding the demo reader's certificate."""
    connector = aiohttp.TCPConnector(ssl=client_context(pki, "reader"))
    async with aiohttp.ClientSession(connector=connector) as session:
        yield session


@pytest.fixture
def base(pep: PepRuntime) -> str:
    return f"https://localhost:{pep.port}"
