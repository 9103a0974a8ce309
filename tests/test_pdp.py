"""The PDP faults of DESIGN.md's table, against real OPA processes.

Each test that breaks OPA gets its own OPA process, so the session OPA the
other tests share is never touched.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest
from tests.conftest import Upstream
from tests.support import OpaProcess, client_context, free_port, get, make_config, raw_https, start_opa

from vvault_pep.app.runtime import PepRuntime
from vvault_pep.config import Opa
from vvault_pep.decide.pdp import PdpClient
from vvault_pep.errors import PepError

SECRET = "/v1/tenants/acme/secrets/db-password"


@pytest.fixture
async def own_opa() -> AsyncIterator[OpaProcess]:
    proc = start_opa()
    yield proc
    proc.proc.send_signal(signal.SIGCONT)  # in case a test left it stopped
    proc.stop()


async def _pep_on(pki: Path, opa_url: str, upstream: Upstream, **opa: object) -> PepRuntime:
    runtime = PepRuntime(make_config(pki, opa_url=opa_url, upstream_port=upstream.port, opa=dict(opa)))
    await runtime.start()
    return runtime


async def _status(runtime: PepRuntime, pki: Path, path: str = SECRET) -> tuple[int, dict[str, object]]:
    resp = await raw_https(runtime.port, client_context(pki, "reader"), get(path))
    return resp.status, orjson.loads(resp.body) if resp.headers.get(
        "content-type"
    ) == "application/problem+json" else {}


async def test_opa_stopped_is_503(pki: Path, own_opa: OpaProcess, upstream: Upstream) -> None:
    runtime = await _pep_on(pki, own_opa.url, upstream)
    try:
        assert (await _status(runtime, pki))[0] == 200
        own_opa.stop()
        status, doc = await _status(runtime, pki)
        assert status == 503
        assert doc["code"] == "pdp.unavailable"
    finally:
        await runtime.stop()


async def test_opa_slower_than_deadline_is_503_within_the_deadline(
    pki: Path, own_opa: OpaProcess, upstream: Upstream
) -> None:
    runtime = await _pep_on(pki, own_opa.url, upstream, timeout_ms=300)
    try:
        assert (await _status(runtime, pki))[0] == 200  # warm keep-alive connection
        own_opa.proc.send_signal(signal.SIGSTOP)  # OPA accepts bytes but answers nothing
        loop = asyncio.get_running_loop()
        started = loop.time()
        status, doc = await _status(runtime, pki)
        elapsed = loop.time() - started
        assert status == 503
        assert doc["code"] == "pdp.timeout"
        assert elapsed < 5  # the deadline, not the client's patience, ended it
        own_opa.proc.send_signal(signal.SIGCONT)
        # once OPA answers again, so does the PEP (no sticky failure)
        for _ in range(100):
            if (await _status(runtime, pki))[0] == 200:
                break
        else:
            pytest.fail("PEP did not recover after OPA resumed")
    finally:
        own_opa.proc.send_signal(signal.SIGCONT)
        await runtime.stop()


async def test_opa_over_a_unix_socket(pki: Path, tmp_path: Path, upstream: Upstream) -> None:
    sock = tmp_path / "opa.sock"
    opa = start_opa(addr=f"unix://{sock}")
    try:
        runtime = await _pep_on(pki, f"unix://{sock}", upstream)
        try:
            assert (await _status(runtime, pki))[0] == 200
            status, doc = await _status(runtime, pki, "/v1/tenants/globex/secrets/db-password")
            assert (status, doc["code"]) == (403, "policy.tenant_not_entitled")
        finally:
            await runtime.stop()
    finally:
        opa.stop()


async def test_answered_error_is_not_retried(opa: OpaProcess) -> None:
    client = PdpClient(Opa(url=opa.url, timeout_ms=2000))
    try:
        with pytest.raises(PepError) as err:
            await client.decide("faults/conflict", {"request": {"method": "GET"}})
        assert err.value.code == "pdp.error"
    finally:
        await client.close()


async def test_nothing_listening_is_pdp_unavailable(down_port: int) -> None:
    client = PdpClient(Opa(url=f"http://127.0.0.1:{down_port}", timeout_ms=1000))
    try:
        with pytest.raises(PepError) as err:
            await client.decide("vvault/authz/decision", {})
        assert err.value.code == "pdp.unavailable"
    finally:
        await client.close()


async def test_readyz_reports_opa_and_policy_paths(pep: PepRuntime) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{pep.admin_port}/healthz") as resp:
            assert resp.status == 200
        async with http.get(f"http://127.0.0.1:{pep.admin_port}/readyz") as resp:
            doc = await resp.json()
    # the test table routes one path to a policy that does not exist on purpose
    assert resp.status == 503
    assert doc["checks"]["opa"] is True
    assert doc["checks"]["policies"]["vvault/authz/decision"] is True
    assert doc["checks"]["policies"]["faults/conflict"] is True
    assert doc["checks"]["policies"]["vvault/nonexistent/decision"] is False


async def test_readyz_is_503_when_opa_is_down(pki: Path, own_opa: OpaProcess, upstream: Upstream) -> None:
    runtime = await _pep_on(pki, own_opa.url, upstream)
    try:
        own_opa.stop()
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{runtime.admin_port}/readyz") as resp:
                assert resp.status == 503
                assert (await resp.json())["checks"]["opa"] is False
    finally:
        await runtime.stop()


@pytest.mark.slow
async def test_managed_opa_killed_is_restarted_and_serving_again(pki: Path, upstream: Upstream) -> None:
    from tests.support import POLICIES, opa_binary

    runtime = await _pep_on(
        pki,
        f"http://127.0.0.1:{free_port()}",
        upstream,
        managed=True,
        binary=opa_binary(),
        policy_dir=str(POLICIES),
    )
    try:
        assert runtime.supervisor is not None
        first_pid = runtime.supervisor.pid
        assert first_pid is not None
        assert (await _status(runtime, pki))[0] == 200
        os.kill(first_pid, signal.SIGKILL)
        async with asyncio.timeout(30):
            while runtime.supervisor.restarts < 1:
                await asyncio.sleep(0.05)
        assert runtime.supervisor.pid not in (None, first_pid)
        assert (await _status(runtime, pki))[0] == 200
    finally:
        await runtime.stop()
    assert runtime.supervisor.pid is None  # stopped with the PEP
