"""A minimal config is a hardened one: what it refuses, and what `check --strict` says otherwise.

The config below names only what has no safe default (where to listen, the certificates, the
upstream, the route, the trusted SPIFFE domain); every refusal here comes from a default.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from tests.conftest import Upstream
from tests.support import OpaProcess, client_context, get, raw_https

from vvault_pep.app.hardening import findings
from vvault_pep.app.runtime import PepRuntime
from vvault_pep.config import Config


def minimal(pki: Path, opa_url: str, upstream_port: int) -> dict[str, Any]:
    return {
        "listener": {
            "host": "127.0.0.1",
            "port": 0,
            "tls": {
                "cert_file": str(pki / "server.pem"),
                "key_file": str(pki / "server-key.pem"),
                "client_ca_file": str(pki / "ca.pem"),
            },
        },
        "admin": {"host": "127.0.0.1", "port": 0},
        "opa": {"url": opa_url},
        "identity": {"workload": {"trust_domains": ["demo.vvault"]}},
        "upstreams": {"vvault": {"url": f"http://127.0.0.1:{upstream_port}"}},
        "routes": [
            {
                "name": "secrets",
                "path": "/v1/tenants/{tenant}/secrets/{path*}",
                "methods": ["GET", "PUT"],
                "upstream": "vvault",
                "policy": "vvault/authz/decision",
                "cache": "off",
            }
        ],
    }


@pytest.fixture(scope="module")
async def pep(pki: Path, opa: OpaProcess, upstream: Upstream) -> AsyncIterator[PepRuntime]:
    runtime = PepRuntime(Config.model_validate(minimal(pki, opa.url, upstream.port)))
    await runtime.start()
    yield runtime
    await runtime.stop()


async def send(pep: PepRuntime, pki: Path, request: bytes) -> tuple[int, dict[str, Any], dict[str, str]]:
    resp = await raw_https(pep.port, client_context(pki, "reader"), request)
    doc = orjson.loads(resp.body) if resp.headers.get("content-type") == "application/problem+json" else {}
    return resp.status, doc, resp.headers


SECRET = "/v1/tenants/acme/secrets/db-password"


async def test_the_minimal_config_serves_its_certificates_names(pep: PepRuntime, pki: Path) -> None:
    for host in ("localhost", f"localhost:{pep.port}", "127.0.0.1"):
        status, _, _ = await send(pep, pki, get(SECRET, host=host))
        assert status == 200, host


async def test_host_poisoning_is_refused(pep: PepRuntime, pki: Path, upstream: Upstream) -> None:
    before = upstream.count()
    status, doc, _ = await send(pep, pki, get(SECRET, host="evil.example"))
    assert (status, doc["code"]) == (421, "sanitize.unknown_host")
    assert upstream.count() == before


async def test_an_over_size_body_is_refused(pep: PepRuntime, pki: Path, upstream: Upstream) -> None:
    before = upstream.count()
    request = (
        f"PUT {SECRET} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {(8 << 20) + 1}\r\n"
        "Content-Type: application/json\r\nConnection: close\r\n\r\n"
    ).encode()
    # The body is never sent: the answer comes on the headers alone (and the server then
    # lingers to drain what a client might still send, so read the answer, not to EOF).
    async with asyncio.timeout(10):
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", pep.port, ssl=client_context(pki, "reader"), server_hostname="localhost"
        )
        try:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(
                next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length:")).split(b":")[1]
            )
            body = await reader.readexactly(length)
        finally:
            writer.close()
    assert head.split(b" ")[1] == b"413"
    assert orjson.loads(body)["code"] == "sanitize.body_too_large"
    assert upstream.count() == before


@pytest.mark.parametrize("path", ["/v1/tenants/acme/secrets/pii;v=1/ssn", "/v1/tenants/acme/secrets/db-password;x"])
async def test_semicolon_parameters_are_refused(pep: PepRuntime, pki: Path, upstream: Upstream, path: str) -> None:
    before = upstream.count()
    status, doc, _ = await send(pep, pki, get(path))
    assert (status, doc["code"]) == (400, "sanitize.ambiguous_path")
    assert upstream.count() == before


async def test_an_unverifiable_token_is_refused_not_forwarded(pep: PepRuntime, pki: Path, upstream: Upstream) -> None:
    before = upstream.count()
    token = "eyJhbGciOiJub25lIn0.eyJzdWIiOiJyb290Iiwicm9sZXMiOlsidnZhdWx0LWFkbWluIl19."
    status, doc, headers = await send(pep, pki, get(SECRET, f"Authorization: Bearer {token}"))
    assert (status, doc["code"]) == (401, "authn.unknown_issuer")
    assert "www-authenticate" in headers
    assert upstream.count() == before


async def test_authorization_is_not_forwarded_unless_the_route_says_so(
    pep: PepRuntime, pki: Path, upstream: Upstream
) -> None:
    status, _, headers = await send(pep, pki, get(SECRET, "Authorization: Basic dXNlcjpwYXNz"))
    assert status == 200
    [seen] = upstream.seen_with(headers["x-request-id"])
    assert "authorization" not in {k.lower() for k, _ in seen["headers"]}


async def test_anonymous_callers_are_refused_by_default(pep: PepRuntime, pki: Path, upstream: Upstream) -> None:
    before = upstream.count()
    resp = await raw_https(pep.port, client_context(pki, "cn-spoof"), get(SECRET))  # a cert, but no SPIFFE ID
    assert resp.status == 401
    assert orjson.loads(resp.body)["code"] == "authn.required"
    assert upstream.count() == before


def test_the_minimal_config_has_no_findings_but_risk_without_redis(pki: Path) -> None:
    doc = minimal(pki, "http://127.0.0.1:8181", 8080)
    assert [f.field for f in findings(Config.model_validate(doc))] == ["risk.enabled"]  # no Redis, no risk
    doc["risk"] = {"enabled": False}
    assert findings(Config.model_validate(doc)) == []


INSECURE: list[tuple[str, Any, str]] = [
    ("listener.host", lambda d: d["listener"].update(host="0.0.0.0"), "listener.host"),
    ("listener.hosts", lambda d: d["listener"].update(hosts=["*"]), "listener.hosts"),
    ("client_auth", lambda d: d["listener"]["tls"].update(client_auth="optional"), "listener.tls.client_auth"),
    ("max_body_bytes", lambda d: d.update(limits={"max_body_bytes": 1 << 30}), "limits.max_body_bytes"),
    ("semicolon", lambda d: d.update(sanitize={"reject_semicolon": False}), "sanitize.reject_semicolon"),
    ("authn none", lambda d: d["routes"][0].update(authn={"require": "none"}), "routes[0] (secrets).authn.require"),
    (
        "forward_authorization",
        lambda d: d["routes"][0].update(forward_authorization=True),
        "routes[0] (secrets).forward_authorization",
    ),
    (
        "typ",
        lambda d: d["identity"].update(
            issuers=[{"name": "corp", "issuer": "https://idp.example", "audiences": ["v"], "typ": None}]
        ),
        "identity.issuers[0] (corp).typ",
    ),
    (
        "required_claims",
        lambda d: d["identity"].update(
            issuers=[{"name": "corp", "issuer": "https://idp.example", "audiences": ["v"], "required_claims": []}]
        ),
        "identity.issuers[0] (corp).required_claims",
    ),
    ("risk without redis", lambda d: d.update(risk={"enabled": True}), "risk.enabled"),
]


@pytest.mark.parametrize(("name", "edit", "field"), INSECURE, ids=[i[0] for i in INSECURE])
def test_check_strict_fails_on_each_insecure_choice(
    tmp_path: Path, pki: Path, name: str, edit: Any, field: str
) -> None:
    doc = minimal(pki, "http://127.0.0.1:8181", 8080)
    doc["risk"] = {"enabled": False}
    edit(doc)
    path = tmp_path / "pep.yaml"
    path.write_text(yaml.safe_dump(doc))
    run = [sys.executable, "-m", "vvault_pep.cli", "check", "--offline", "--config", str(path)]
    lax = subprocess.run(run, capture_output=True, text=True, timeout=60)
    assert lax.returncode == 0, lax.stdout + lax.stderr
    assert f"warn  hardening: {field}:" in lax.stdout
    strict = subprocess.run([*run, "--strict"], capture_output=True, text=True, timeout=60)
    assert strict.returncode == 1, strict.stdout + strict.stderr
    assert f"FAIL  hardening: {field}:" in strict.stdout
    assert "safe:" in strict.stdout
    assert "Traceback" not in strict.stderr


def test_check_strict_passes_the_hardened_config(tmp_path: Path, pki: Path) -> None:
    doc = minimal(pki, "http://127.0.0.1:8181", 8080)
    doc["risk"] = {"enabled": False}
    path = tmp_path / "pep.yaml"
    path.write_text(yaml.safe_dump(doc))
    run = [sys.executable, "-m", "vvault_pep.cli", "check", "--offline", "--strict", "--config", str(path)]
    done = subprocess.run(run, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ok    hardening: every secure default holds" in done.stdout


def test_the_listener_address_has_no_default(pki: Path) -> None:
    doc = minimal(pki, "http://127.0.0.1:8181", 8080)
    del doc["listener"]["host"]
    with pytest.raises(ValueError, match="host"):
        Config.model_validate(doc)
