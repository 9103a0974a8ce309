"""Big bodies stream through a real `vvault-pep serve` process without being buffered."""

from __future__ import annotations

import hashlib
import re
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import yaml
from tests.conftest import Upstream
from tests.support import OpaProcess, client_context, config_doc, start_serve

MiB = 1024 * 1024


def _vm_hwm_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmHWM:\s+(\d+) kB", status)
    assert match
    return int(match.group(1))


@pytest.fixture
async def pep_process(tmp_path: Path, pki: Path, opa: OpaProcess, upstream: Upstream) -> AsyncIterator[tuple[int, int]]:
    doc = config_doc(pki, opa_url=opa.url, upstream_port=upstream.port, listener={"drain_s": 0})
    for route in doc["routes"]:
        if route["name"] == "open_blobs":
            route["max_body_bytes"] = 1 << 30  # blobs: raised on this route only
    path = tmp_path / "pep.yaml"
    path.write_text(yaml.safe_dump(doc))
    served = await start_serve(path)
    yield served.proc.pid, served.port
    served.proc.terminate()
    await served.proc.wait()
    await served.drain


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_100_mib_upload_and_download_are_streamed(pep_process: tuple[int, int], pki: Path) -> None:
    pid, port = pep_process
    base = f"https://localhost:{port}"
    connector = aiohttp.TCPConnector(ssl=client_context(pki, "reader"))
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=100)) as http:
        async with http.get(f"{base}/v1/tenants/acme/stream/1") as resp:  # warm up
            assert resp.status == 200
        baseline = _vm_hwm_kib(pid)

        chunk = bytes(range(256)) * 4096  # 1 MiB
        digest = hashlib.sha256()

        async def body() -> AsyncIterator[bytes]:
            for _ in range(100):
                digest.update(chunk)
                yield chunk

        async with http.put(
            f"{base}/v1/tenants/acme/blobs/big", data=body(), headers={"Content-Length": str(100 * MiB)}
        ) as resp:
            assert resp.status == 201
            doc = await resp.json()
        assert doc["bytes"] == 100 * MiB
        assert doc["sha256"] == digest.hexdigest()

        async with http.get(f"{base}/v1/tenants/acme/stream/{100 * MiB}") as resp:
            assert resp.status == 200
            total = 0
            async for part in resp.content.iter_chunked(MiB):
                total += len(part)
        assert total == 100 * MiB

    growth_mib = (_vm_hwm_kib(pid) - baseline) / 1024
    print(f"PEP peak RSS growth over 100 MiB up + 100 MiB down: {growth_mib:.1f} MiB")
    # 100 MiB each way went through; a buffering proxy would grow by at least that.
    assert growth_mib < 32, f"PEP peak memory grew by {growth_mib:.1f} MiB"
