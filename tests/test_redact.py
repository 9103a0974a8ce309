"""Field-level least privilege: the redact obligation, enforced on real upstream answers."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
from examples.vvault_api.app import STORE
from tests.conftest import Upstream
from tests.support import ROUTES, OpaProcess, client_context, get, make_config, raw_https

from vvault_pep.app.runtime import PepRuntime

LISTER = [
    {
        "name": "lister",
        "host": "lister.test",
        "path": "/v1/tenants/{tenant}/secrets/{path*}",
        "methods": ["GET"],
        "upstream": "vvault",
        "policy": "faults/lister",
    },
    {
        "name": "lister_stream",
        "host": "lister.test",
        "path": "/v1/tenants/{tenant}/stream/{n}",
        "methods": ["GET"],
        "upstream": "vvault",
        "policy": "faults/lister",
    },
]


@pytest.fixture(scope="module")
async def pep(pki: Path, opa: OpaProcess, upstream: Upstream) -> AsyncIterator[PepRuntime]:
    runtime = PepRuntime(
        make_config(
            pki, opa_url=opa.url, upstream_port=upstream.port, routes=LISTER + ROUTES, limits={"max_redact_bytes": 2048}
        )
    )
    await runtime.start()
    yield runtime
    await runtime.stop()


async def test_a_lister_sees_the_secret_without_its_value(pep: PepRuntime, pki: Path) -> None:
    resp = await raw_https(
        pep.port, client_context(pki, "reader"), get("/v1/tenants/acme/secrets/db-password", host="lister.test")
    )
    assert resp.status == 200
    doc = orjson.loads(resp.body)
    assert doc["path"] == "db-password"
    assert doc["version"] >= 1
    assert "value" not in doc
    assert b"acme-s3cr3t" not in resp.body
    assert resp.headers["x-vvault-redacted"] == "value"


async def test_non_json_or_too_large_answers_are_withheld_not_leaked(
    pep: PepRuntime, pki: Path, upstream: Upstream
) -> None:
    resp = await raw_https(
        pep.port, client_context(pki, "reader"), get("/v1/tenants/acme/stream/64", host="lister.test")
    )
    assert resp.status == 502
    assert orjson.loads(resp.body)["code"] == "enforce.redaction_impossible"
    upstream.app[STORE].secrets[("acme", "big")] = {"value": "v" * 5000, "version": 1, "updated": time.time()}
    resp = await raw_https(
        pep.port, client_context(pki, "reader"), get("/v1/tenants/acme/secrets/big", host="lister.test")
    )
    assert resp.status == 502
    assert b"vvvv" not in resp.body
