"""Redaction limits: an answer up to ``limits.max_redact_bytes`` is redacted, one byte more is withheld.

Real upstream, real OPA (``faults/lister`` redacts ``value``), real TLS.  The
answer sizes are measured on the upstream itself, so the two cases sit on
either side of the limit — not at some size far past it, where a limit
doubled or ignored would still refuse.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest
from examples.vvault_api.app import STORE
from tests.conftest import Upstream
from tests.support import OpaProcess, client_context, get, make_config, raw_https
from tests.test_redact import LISTER

from vvault_pep.app.runtime import PepRuntime

LIMIT = 2048


@pytest.fixture(scope="module")
async def pep(pki: Path, opa: OpaProcess, upstream: Upstream) -> AsyncIterator[PepRuntime]:
    runtime = PepRuntime(
        make_config(
            pki, opa_url=opa.url, upstream_port=upstream.port, routes=LISTER, limits={"max_redact_bytes": LIMIT}
        )
    )
    await runtime.start()
    yield runtime
    await runtime.stop()


async def sized(upstream: Upstream, name: str, size: int) -> None:
    """A secret whose upstream answer is exactly ``size`` bytes."""
    secrets = upstream.app[STORE].secrets
    secrets[("acme", name)] = {"value": "", "version": 1, "updated": time.time()}
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{upstream.port}/v1/tenants/acme/secrets/{name}") as resp:
            base = len(await resp.read())
    secrets[("acme", name)]["value"] = "v" * (size - base)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{upstream.port}/v1/tenants/acme/secrets/{name}") as resp:
            assert len(await resp.read()) == size


@pytest.mark.parametrize(("size", "status"), [(LIMIT, 200), (LIMIT + 1, 502)])
async def test_the_redaction_limit_is_exact(
    pep: PepRuntime, pki: Path, upstream: Upstream, size: int, status: int
) -> None:
    name = f"sized-{size}"
    await sized(upstream, name, size)
    resp = await raw_https(
        pep.port, client_context(pki, "reader"), get(f"/v1/tenants/acme/secrets/{name}", host="lister.test")
    )
    assert resp.status == status
    assert b"vvvv" not in resp.body  # the value never reaches the client, either way
    if status == 200:
        doc = orjson.loads(resp.body)
        assert doc["path"] == name and "value" not in doc
        assert resp.headers["x-vvault-redacted"] == "value"
    else:
        doc = orjson.loads(resp.body)
        assert (doc["code"], doc["detail"]) == ("enforce.redaction_impossible", "the response is too large to redact")
