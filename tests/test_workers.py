"""``vvault-pep serve --workers N``: processes sharing the listener, supervised together."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from tests.conftest import RedisServer, Upstream
from tests.support import OpaProcess, client_context, config_doc, free_port, start_serve

from vvault_pep.config.models import Redis

SECRET = "/v1/tenants/acme/secrets/db-password"


def workers_config(tmp_path: Path, pki: Path, opa: OpaProcess, upstream: Upstream, redis: RedisServer | None) -> Path:
    doc: dict[str, Any] = config_doc(
        pki, opa_url=opa.url, upstream_port=upstream.port, listener={"port": free_port(), "drain_s": 0}
    )
    if redis is not None:
        doc["redis"] = {"url": redis.url, "key_prefix": "workers-test:"}
    doc["admin"]["port"] = two_free_ports()
    doc["routes"] = [r for r in doc["routes"] if "nonexistent" not in r["policy"]]
    path = tmp_path / "pep.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def two_free_ports() -> int:
    """A port p with p + 1 free too (worker 2 serves admin on admin.port + 1)."""
    while True:
        port = free_port()
        with contextlib.suppress(OSError), socket.socket() as s:
            s.bind(("127.0.0.1", port + 1))
            return port


async def served_by(admin_port: int) -> float:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{admin_port}/metrics") as resp:
            text = await resp.text()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("vvault_pep_requests_total{") and 'status="200"' in line
    )


async def test_two_workers_share_the_listener_and_stop_together(
    tmp_path: Path, pki: Path, opa: OpaProcess, upstream: Upstream, redis_server: RedisServer
) -> None:
    served = await start_serve(workers_config(tmp_path, pki, opa, upstream, redis_server), workers=2)
    assert len(served.admin_ports) == 2 and served.admin_ports[1] == served.admin_ports[0] + 1
    try:
        # New connections are spread by the kernel: 40 of them reach both workers
        # (all on one would happen with probability 2^-39).
        for _ in range(40):
            connector = aiohttp.TCPConnector(ssl=client_context(pki, "reader"), force_close=True)
            async with aiohttp.ClientSession(connector=connector) as http:
                async with http.get(f"https://localhost:{served.port}{SECRET}") as resp:
                    assert resp.status == 200
        counts = [await served_by(port) for port in served.admin_ports]
        assert sum(counts) == 40
        assert all(c > 0 for c in counts), counts
    finally:
        served.proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            assert await served.proc.wait() == 0
        await served.drain


async def test_a_dead_worker_stops_the_pep_with_an_error(
    tmp_path: Path, pki: Path, opa: OpaProcess, upstream: Upstream, redis_server: RedisServer
) -> None:
    served = await start_serve(workers_config(tmp_path, pki, opa, upstream, redis_server), workers=2)
    children = [int(p) for p in _children(served.proc.pid)]
    assert len(children) == 2
    os.kill(children[0], signal.SIGKILL)
    async with asyncio.timeout(30):
        assert await served.proc.wait() == 1
    stderr = (await served.drain).decode()
    assert "exited (-9): stopping the others" in stderr
    # the supervisor stopped and reaped the other worker before exiting: nothing keeps the port
    assert not _alive(children[1])


def _children(pid: int) -> list[str]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return f.read().split()


async def test_workers_refuse_a_managed_opa(tmp_path: Path, pki: Path, upstream: Upstream) -> None:
    doc = config_doc(pki, opa_url="http://127.0.0.1:1", upstream_port=upstream.port, listener={"port": free_port()})
    doc["opa"] = {"managed": True, "binary": "opa", "url": "http://127.0.0.1:18181", "policy_dir": str(tmp_path)}
    path = tmp_path / "pep.yaml"
    path.write_text(yaml.safe_dump(doc))
    code, err = await serve_two_workers(path)
    assert code == 2
    assert b"needs an OPA sidecar (opa.managed: false)" in err


async def serve_two_workers(path: Path) -> tuple[int | None, bytes]:
    """`serve --workers 2` for a config it must refuse: (exit status, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "vvault_pep.cli", "serve", "--config", str(path), "--workers", "2",
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await proc.communicate()
    return proc.returncode, err


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_workers_refuse_to_run_without_redis(
    tmp_path: Path, pki: Path, opa: OpaProcess, upstream: Upstream
) -> None:
    """Without Redis a quarantine sent to one worker would never reach the others."""
    path = workers_config(tmp_path, pki, opa, upstream, None)
    code, err = await serve_two_workers(path)
    assert code == 2
    assert b"--workers > 1 needs redis" in err


async def test_a_quarantine_sent_to_one_worker_holds_on_all(
    tmp_path: Path, pki: Path, opa: OpaProcess, upstream: Upstream, redis_server: RedisServer
) -> None:
    admin_token = "workers-admin-token-0123456789abcdef0123"
    path = workers_config(tmp_path, pki, opa, upstream, redis_server)
    doc = yaml.safe_load(path.read_text())
    doc["admin"]["token"] = admin_token
    doc["redis"]["key_prefix"] = "workers-quarantine:"
    # A tenant is contained for callers verified as its own: here the workload's registered tenant.
    doc["identity"] = {
        "workload": {
            "trust_domains": ["demo.vvault"],
            "tenants": {"spiffe://demo.vvault/client/reader": "acme"},
        }
    }
    path.write_text(yaml.safe_dump(doc))
    served = await start_serve(path, workers=2)
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(
                f"http://127.0.0.1:{served.admin_ports[0]}/admin/quarantines",
                json={"scope": "tenant", "value": "acme", "ttl_s": 600, "reason": "incident"},
                headers={"Authorization": f"Bearer {admin_token}"},
            ) as resp:
                # 201 and shared: written to Redis and announced, so every worker must hold it
                assert (resp.status, (await resp.json())["shared"]) == (201, True)
        # The promise is "on every worker within the pushed state's staleness window": a worker
        # that has not heard the announcement yet may still answer from what it knows until then.
        pushed = Redis.model_validate(doc["redis"])
        await asyncio.sleep((pushed.heartbeat_ms + pushed.heartbeat_deadline_ms) / 1000)
        statuses = []
        for _ in range(30):  # new connections: the kernel spreads them over both workers
            connector = aiohttp.TCPConnector(ssl=client_context(pki, "reader"), force_close=True)
            async with aiohttp.ClientSession(connector=connector) as http:
                async with http.get(f"https://localhost:{served.port}{SECRET}") as resp:
                    statuses.append(resp.status)
        assert set(statuses) == {403}, statuses
        assert [await served_by(port) for port in served.admin_ports] == [0, 0]  # nothing got through anywhere
    finally:
        served.proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            await served.proc.wait()
        await served.drain
