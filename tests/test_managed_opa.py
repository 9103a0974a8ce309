"""A managed OPA cannot be impersonated: a squatter on its port never answers a decision."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from aiohttp import web
from tests.conftest import Upstream
from tests.support import POLICIES, client_context, config_doc, free_port, get, make_config, opa_binary, raw_https

from vvault_pep.app.runtime import PepRuntime
from vvault_pep.edge.opa_supervisor import owns_port

CROSS_TENANT = "/v1/tenants/globex/secrets/db-password"  # the reader is acme's: the real policy says no


class Squatter:
    """A local process that took OPA's old default port first and allows everything."""

    def __init__(self) -> None:
        self.decisions = 0
        self.port = 0
        self.runner: web.AppRunner | None = None

    async def _any(self, request: web.Request) -> web.Response:
        if request.path == "/health":
            return web.json_response({})
        if request.path.startswith("/v1/policies"):
            return web.json_response({"result": []})
        self.decisions += 1
        return web.json_response({"result": {"allow": True}})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._any)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


@pytest.fixture
async def squatter() -> AsyncIterator[Squatter]:
    s = Squatter()
    await s.start()
    yield s
    assert s.runner is not None
    await s.runner.cleanup()


def _managed(squatter: Squatter, **extra: Any) -> dict[str, Any]:
    return {
        "url": f"http://127.0.0.1:{squatter.port}",
        "managed": True,
        "binary": opa_binary(),
        "policy_dir": str(POLICIES),
        "ready_timeout_s": 20,
        **extra,
    }


async def test_the_managed_opa_answers_on_its_private_socket_not_the_squatter(
    pki: Path, upstream: Upstream, squatter: Squatter
) -> None:
    runtime = PepRuntime(
        make_config(
            pki, opa_url=f"http://127.0.0.1:{squatter.port}", upstream_port=upstream.port, opa=_managed(squatter)
        )
    )
    await runtime.start()
    try:
        assert runtime.supervisor is not None
        url = runtime.supervisor.url
        assert url.startswith("unix://")
        folder = Path(url.removeprefix("unix://")).parent
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        resp = await raw_https(runtime.port, client_context(pki, "reader"), get(CROSS_TENANT))
        assert resp.status == 403
        assert (
            await raw_https(runtime.port, client_context(pki, "reader"), get("/v1/tenants/acme/secrets/db-password"))
        ).status == 200
        assert squatter.decisions == 0
        _, checks = await runtime.readiness()  # not ready: the test routes' policies are not in policies/
        assert checks["opa"] is True
        assert checks["opa_process"] == {"managed": True, "pid": runtime.supervisor.pid, "listen": url, "restarts": 0}
    finally:
        await runtime.stop()
    assert not folder.exists()  # the private folder goes with the PEP


async def test_a_managed_opa_on_tcp_refuses_to_start_when_the_port_is_taken(
    pki: Path, upstream: Upstream, squatter: Squatter, caplog: pytest.LogCaptureFixture
) -> None:
    config = make_config(
        pki,
        opa_url=f"http://127.0.0.1:{squatter.port}",
        upstream_port=upstream.port,
        opa=_managed(squatter, managed_listen="tcp"),
    )
    runtime = PepRuntime(config)
    try:
        with pytest.raises(RuntimeError, match="managed OPA"):
            await runtime.start()
    finally:
        await runtime.stop()
    assert squatter.decisions == 0
    assert "another local process could bind that port first" in caplog.text


def test_port_ownership_is_read_from_the_kernel() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert owns_port(os.getpid(), port) is True
        assert owns_port(os.getppid(), port) is False
    assert owns_port(os.getpid(), port) is False


async def test_check_names_the_process_that_answers(
    pki: Path, upstream: Upstream, squatter: Squatter, tmp_path: Path
) -> None:
    doc = config_doc(
        pki, opa_url=f"http://127.0.0.1:{squatter.port}", upstream_port=upstream.port, opa=_managed(squatter)
    )
    doc["upstreams"] = {"vvault": doc["upstreams"]["vvault"], "vvault_prefixed": doc["upstreams"]["vvault_prefixed"]}
    doc["routes"] = [r for r in doc["routes"] if r["upstream"] in doc["upstreams"]]
    path = tmp_path / "pep.yaml"
    path.write_text(yaml.safe_dump(doc))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "vvault_pep.cli", "check", "--config", str(path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(40):
        out, _ = await proc.communicate()
    opa_lines = [line for line in out.decode().splitlines() if line.split()[1:2] == ["opa:"]]
    assert any(
        "the managed OPA (pid " in line and "unix://" in line and "answers /health" in line for line in opa_lines
    ), opa_lines
    assert squatter.decisions == 0
    assert orjson.dumps(opa_lines)  # printable, one line each


async def test_a_managed_opa_on_a_free_tcp_port_is_its_own(pki: Path, upstream: Upstream) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    opa = {"url": url, "managed": True, "binary": opa_binary(), "policy_dir": str(POLICIES), "managed_listen": "tcp"}
    runtime = PepRuntime(make_config(pki, opa_url=url, upstream_port=upstream.port, opa=opa))
    await runtime.start()
    try:
        assert runtime.supervisor is not None and runtime.supervisor.pid is not None
        assert owns_port(runtime.supervisor.pid, int(url.rsplit(":", 1)[1])) is True
        assert (await raw_https(runtime.port, client_context(pki, "reader"), get(CROSS_TENANT))).status == 403
    finally:
        await runtime.stop()


async def test_explain_asks_its_own_managed_opa_not_the_squatter(
    pki: Path, upstream: Upstream, squatter: Squatter, tmp_path: Path
) -> None:
    doc = config_doc(
        pki, opa_url=f"http://127.0.0.1:{squatter.port}", upstream_port=upstream.port, opa=_managed(squatter)
    )
    path = tmp_path / "pep.yaml"
    path.write_text(yaml.safe_dump(doc))
    cert = pki / "client-reader.pem"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "vvault_pep.cli", "explain", "--config", str(path), "--path", CROSS_TENANT,
        "--cert", str(cert), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(40):
        out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    answer = orjson.loads(out)["answer"]
    assert answer["status"] == 403, answer
    assert squatter.decisions == 0


def _environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
@pytest.mark.parametrize(("set_by_operator", "expected"), [(None, "400"), ("150", "150")])
async def test_the_managed_opa_runs_with_the_tuned_collector_unless_told_otherwise(
    pki: Path, upstream: Upstream, squatter: Squatter, monkeypatch: pytest.MonkeyPatch,
    set_by_operator: str | None, expected: str,
) -> None:  # fmt: skip
    if set_by_operator is None:
        monkeypatch.delenv("GOGC", raising=False)
    else:
        monkeypatch.setenv("GOGC", set_by_operator)
    monkeypatch.setenv("VVAULT_PEP_TEST_MARKER", "passed-on")
    runtime = PepRuntime(
        make_config(
            pki, opa_url=f"http://127.0.0.1:{squatter.port}", upstream_port=upstream.port, opa=_managed(squatter)
        )
    )
    await runtime.start()
    try:
        assert runtime.supervisor is not None and runtime.supervisor.pid is not None
        environ = _environ_of(runtime.supervisor.pid)
        assert environ["GOGC"] == expected
        assert environ["VVAULT_PEP_TEST_MARKER"] == "passed-on"  # the rest of the PEP's environment too
        # and the OPA started that way decides
        resp = await raw_https(runtime.port, client_context(pki, "reader"), get(CROSS_TENANT))
        assert resp.status == 403
    finally:
        await runtime.stop()
