"""``explain`` walks the live stages: its cache key is the live one, containment and hosts hold.

* the key ``explain`` prints for a request is the key a live PEP then stores in Redis for the
  same request, and a second ``explain`` finds that entry (layer ``l2``) under the same key;
* ``explain`` stores nothing itself: after it, Redis holds no decision;
* a quarantine another replica wrote to Redis makes ``explain`` answer 403
  ``containment.quarantined`` (stage ``context``), as a live request would be answered;
* a ``Host`` the listener does not serve is 421 ``sanitize.unknown_host`` (stage ``sanitize``);
* a route's rate limit counts ``explain`` like a request, in Redis: a live request uses the
  one token there is, and ``explain`` is then 429 ``ratelimit.exceeded`` (stage ``ratelimit``).
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from tests.conftest import RedisServer, Upstream
from tests.helpers import mtls_request, running_pep
from tests.support import ROOT, OpaProcess, config_doc

from vvault_pep.app.runtime import PepRuntime
from vvault_pep.config import Config
from vvault_pep.core.request import parse_peer

SECRET = "/v1/tenants/acme/secrets/db-password"
# What the shipped policy reads on this route, named by hand: the whole input would key on
# what explain cannot know (the negotiated cipher, the client's own headers and port).
KEY = ["request.method", "request.path", "route.params", "tls.client_cert.sha256", "identity", "device", "risk"]


@pytest.fixture
async def setup(
    tmp_path: Path, pki: Path, opa: OpaProcess, upstream: Upstream, redis_server: RedisServer
) -> AsyncIterator[tuple[PepRuntime, Path, aioredis.Redis, str]]:
    prefix = f"explain-{os.urandom(4).hex()}:"
    doc = config_doc(
        pki,
        opa_url=opa.url,
        upstream_port=upstream.port,
        cache=True,
        redis={"url": redis_server.url, "key_prefix": prefix},
        risk={"enabled": False},
    )
    doc["routes"] = [{**r, "cache": {"ttl_s": 60, "key": KEY}} if r["name"] == "secrets" else r for r in doc["routes"]]
    # About one request per certificate an hour on this route, counted in Redis.
    doc["routes"].insert(
        0,
        {
            **next(r for r in doc["routes"] if r["name"] == "secrets"),
            "name": "limited",
            "path": "/v1/limited/{path*}",
            "rate_limit": {"per": "certificate", "rate_per_s": 0.0003},
        },
    )
    path = tmp_path / "pep.yaml"
    path.write_text(yaml.safe_dump(doc))
    async with running_pep(Config.model_validate({**doc, "source": str(path)})) as runtime:
        client = aioredis.from_url(redis_server.url)
        try:
            yield runtime, path, client, prefix
        finally:
            await client.aclose()


async def explain(path: Path, pki: Path, target: str, host: str = "localhost") -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "vvault_pep.cli", "explain", "--config", str(path), "--path", target,
        "--host", host, "--cert", str(pki / "client-reader.pem"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT,
    )  # fmt: skip
    async with asyncio.timeout(40):
        out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return orjson.loads(out)  # type: ignore[no-any-return]


async def stored_decisions(client: aioredis.Redis, prefix: str) -> list[str]:
    keys = [k.decode() async for k in client.scan_iter(match=f"{prefix}dec:*")]
    return sorted(k.removeprefix(f"{prefix}dec:") for k in keys)


async def test_explain_prints_the_key_a_live_request_stores(
    setup: tuple[PepRuntime, Path, aioredis.Redis, str], pki: Path
) -> None:
    runtime, path, client, prefix = setup
    before = await explain(path, pki, SECRET)
    assert before["answer"] == {"status": "forwarded", "to": "vvault", "enforced": True}
    assert before["cache"]["layer"] == "miss"
    assert len(before["cache"]["key"]) == 64
    assert await stored_decisions(client, prefix) == []  # explain stored nothing

    assert (await mtls_request(pki, runtime.port, SECRET)).status == 200
    assert runtime.cache is not None
    await runtime.cache.drain()
    assert await stored_decisions(client, prefix) == [before["cache"]["key"]]

    after = await explain(path, pki, SECRET)
    assert after["cache"]["layer"] == "l2"  # found the live entry by that key
    assert after["cache"]["key"] == before["cache"]["key"]


async def test_explain_runs_containment_and_the_host_check(
    setup: tuple[PepRuntime, Path, aioredis.Redis, str], pki: Path
) -> None:
    runtime, path, _, _ = setup
    cert = x509.load_pem_x509_certificate((pki / "client-reader.pem").read_bytes())
    sha = parse_peer(cert.public_bytes(serialization.Encoding.DER), require_client_auth_eku=False).sha256
    assert runtime.containment is not None
    _, shared = await runtime.containment.add("certificate", sha, 120, "explain test", by="admin")
    assert shared  # in Redis, where explain's own process reads it
    contained = await explain(path, pki, SECRET)
    assert contained["answer"]["status"] == 403
    assert contained["answer"]["code"] == "containment.quarantined"
    assert contained["answer"]["stage"] == "context"
    assert "decision" not in contained  # refused before any cached answer or OPA

    elsewhere = await explain(path, pki, SECRET, host="elsewhere.example")
    assert elsewhere["answer"]["status"] == 421
    assert elsewhere["answer"]["code"] == "sanitize.unknown_host"
    assert elsewhere["answer"]["stage"] == "sanitize"


async def test_explain_counts_against_the_rate_limit_a_live_request_used(
    setup: tuple[PepRuntime, Path, aioredis.Redis, str], pki: Path
) -> None:
    runtime, path, _, _ = setup
    assert (await mtls_request(pki, runtime.port, "/v1/limited/x")).status != 429  # the one token
    limited = await explain(path, pki, "/v1/limited/x")
    assert limited["answer"]["status"] == 429
    assert limited["answer"]["code"] == "ratelimit.exceeded"
    assert limited["answer"]["stage"] == "ratelimit"
