"""Policy distribution: a real OPA pulls the signed bundle from a bundle server, and refuses a tampered one."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import tarfile
from pathlib import Path

import aiohttp
import yaml
from aiohttp import web
from deploy.compose_kit import bundle
from tests.support import free_port, opa_binary


def _tamper(blob: bytes) -> bytes:
    """Same signatures, other contents: give the reader client every tenant."""
    out = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as src, tarfile.open(fileobj=out, mode="w:gz") as dst:
        for member in src.getmembers():
            data = src.extractfile(member).read() if member.isfile() else b""  # type: ignore[union-attr]
            if member.name.endswith("vvault/data.json"):
                doc = json.loads(data)
                doc["clients"]["spiffe://demo.vvault/client/reader"]["tenants"].append("globex")
                data = json.dumps(doc).encode()
                member.size = len(data)
            dst.addfile(member, io.BytesIO(data))
    return out.getvalue()


async def test_signed_bundle_is_pulled_and_a_tampered_one_is_refused(tmp_path: Path) -> None:
    target = bundle(out_dir=tmp_path, env_file=None, revision="rev-1")
    good = target.read_bytes()
    served = {"body": good, "etag": "1", "fetches": 0}

    async def handler(request: web.Request) -> web.Response:
        served["fetches"] += 1  # type: ignore[operator]
        if request.headers.get("If-None-Match") == served["etag"]:
            return web.Response(status=304)
        return web.Response(
            body=served["body"],
            headers={"ETag": str(served["etag"])},  # type: ignore[arg-type]
            content_type="application/gzip",
        )

    app = web.Application()
    app.router.add_get("/bundles/vvault.tar.gz", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    server = f"http://127.0.0.1:{runner.addresses[0][1]}"
    config = {
        "services": {"bundles": {"url": server}},
        "bundles": {
            "vvault": {
                "service": "bundles",
                "resource": "bundles/vvault.tar.gz",
                "polling": {"min_delay_seconds": 1, "max_delay_seconds": 1},
                "signing": {"keyid": "signer"},
            }
        },
        "keys": {"signer": {"algorithm": "ES256", "key": (tmp_path / "bundle-signer.pub.pem").read_text()}},
    }
    (tmp_path / "opa.yaml").write_text(yaml.safe_dump(config))
    port = free_port()
    opa = subprocess.Popen(
        [
            opa_binary(),
            "run",
            "--server",
            "--addr",
            f"127.0.0.1:{port}",
            "--skip-version-check",
            "--log-level",
            "error",
            "--config-file",
            str(tmp_path / "opa.yaml"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    reader = {
        "route": {"name": "secrets", "params": {"tenant": "globex"}},
        "request": {"method": "GET"},
        "tls": {
            "client_cert": {
                "issuer": "CN=vvault demo CA,O=vvault-pep demo",
                "spiffe_id": "spiffe://demo.vvault/client/reader",
            }
        },
    }
    try:
        async with aiohttp.ClientSession() as http:
            async with asyncio.timeout(30):  # until the signed bundle is active
                while True:
                    try:
                        async with http.get(f"http://127.0.0.1:{port}/health?bundles") as resp:
                            if resp.status == 200:
                                break
                    except aiohttp.ClientError:
                        pass
                    await asyncio.sleep(0.1)

            async def ask() -> tuple[str, bool]:
                async with http.post(
                    f"http://127.0.0.1:{port}/v1/data/vvault/authz/decision?provenance=true", json={"input": reader}
                ) as resp:
                    doc = await resp.json()
                return doc["provenance"]["bundles"]["vvault"]["revision"], doc["result"]["allow"]

            assert await ask() == ("rev-1", False)  # reader is not entitled to globex
            served.update(body=_tamper(good), etag="2")
            seen = served["fetches"]
            async with asyncio.timeout(30):  # OPA fetched the tampered bundle at least twice
                while served["fetches"] < seen + 2:  # type: ignore[operator]
                    await asyncio.sleep(0.1)
            assert await ask() == ("rev-1", False)  # refused: the last good policy stays active
    finally:
        opa.terminate()
        opa.wait(10)
        await runner.cleanup()
