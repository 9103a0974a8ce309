"""The commands as a user runs them: serve (with drain), check --offline, probe."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import aiohttp
import yaml
from tests.conftest import Upstream
from tests.support import ROOT, OpaProcess, client_context, config_doc, start_serve


async def test_sigterm_drains_not_ready_first_then_stops(
    tmp_path: Path, pki: Path, opa: OpaProcess, upstream: Upstream
) -> None:
    doc = config_doc(pki, opa_url=opa.url, upstream_port=upstream.port, listener={"drain_s": 3})
    doc["routes"] = [r for r in doc["routes"] if "nonexistent" not in r["policy"]]
    path = tmp_path / "pep.yaml"
    path.write_text(yaml.safe_dump(doc))
    served = await start_serve(path)
    proc, port, admin = served.proc, served.port, served.admin_port
    connector = aiohttp.TCPConnector(ssl=client_context(pki, "reader"), force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http:
        async with http.get(f"http://127.0.0.1:{admin}/readyz") as resp:
            assert resp.status == 200
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            while True:
                async with http.get(f"http://127.0.0.1:{admin}/readyz") as resp:
                    if resp.status == 503:
                        assert (await resp.json())["checks"]["draining"] is True
                        break
                await asyncio.sleep(0.02)
        # out of rotation, still serving
        async with http.get(f"https://localhost:{port}/v1/tenants/acme/secrets/db-password") as resp:
            assert resp.status == 200
    async with asyncio.timeout(30):
        assert await proc.wait() == 0
    await served.drain


async def test_check_offline_validates_configs_meant_for_elsewhere(tmp_path: Path) -> None:
    config = tmp_path / "pep.yaml"
    config.write_text(
        "listener:\n  host: 0.0.0.0\n  tls:\n    cert_file: /etc/vvault-pep/tls/tls.crt\n"
        "    key_file: /etc/vvault-pep/tls/tls.key\n"
        "    client_ca_file: /etc/vvault-pep/tls/ca.crt\nupstreams:\n  app:\n    url: http://127.0.0.1:8080\n"
        "identity:\n  workload:\n    trust_domains: [prod.vvault]\n"
        "routes:\n  - name: all\n    path: /{rest*}\n    upstream: app\n    policy: vvault/authz/decision\n"
    )
    ok = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "vvault_pep.cli",
        "check",
        "--offline",
        "--config",
        str(config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await ok.communicate()
    assert ok.returncode == 0, err.decode()
    assert b"is valid (1 routes" in out
    config.write_text(config.read_text().replace("upstream: app", "upstream: nope"))
    bad = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "vvault_pep.cli",
        "check",
        "--offline",
        "--config",
        str(config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await bad.communicate()
    assert bad.returncode == 2
    assert b"routes[0].upstream" in err


async def test_probe_exit_codes(pep) -> None:  # type: ignore[no-untyped-def]
    for url, code in (
        (f"http://127.0.0.1:{pep.admin_port}/healthz", 0),
        ("http://127.0.0.1:9/healthz", 1),
        ("http://example.com/", 2),
    ):
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "vvault_pep.cli", "probe", url, cwd=ROOT)
        assert await proc.wait() == code, url


async def test_explain_shows_input_decision_reasons_and_cache_key(
    tmp_path: Path, pki: Path, opa: OpaProcess, upstream: Upstream
) -> None:
    import json

    doc = config_doc(pki, opa_url=opa.url, upstream_port=upstream.port, cache=True)
    path = tmp_path / "pep.yaml"
    path.write_text(yaml.safe_dump(doc))

    async def explain(target: str) -> dict:  # type: ignore[type-arg]
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "vvault_pep.cli",
            "explain",
            "--config",
            str(path),
            "--path",
            target,
            "--cert",
            str(pki / "client-reader.pem"),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        return json.loads(out)  # type: ignore[no-any-return]

    denied = await explain("/v1/tenants/globex/secrets/db-password")
    assert denied["route"]["name"] == "secrets"
    assert denied["input"]["route"]["params"] == {"tenant": "globex", "path": "db-password"}
    assert denied["decision"]["code"] == "policy.tenant_not_entitled"
    assert "policy.tenant_not_entitled" in denied["decision"]["reasons"]
    assert denied["answer"] == {
        "status": 403,
        "code": "policy.tenant_not_entitled",
        "detail": "the client is not entitled to this tenant",
    }
    assert len(denied["cache"]["key"]) == 64
    allowed = await explain("/v1/tenants/acme/secrets/../secrets/db-password")
    assert allowed["input"]["request"]["path"] == "/v1/tenants/acme/secrets/db-password"
    assert allowed["answer"]["status"] == "forwarded"
    refused = await explain("/v1/tenants/acme%2Fglobex/secrets/x")
    assert refused["answer"]["code"] == "sanitize.ambiguous_path"
