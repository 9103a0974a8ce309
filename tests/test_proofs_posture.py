"""Device posture when the device service's keys are gone: a dependency fault, so 503, never a guess.

An assertion that does not verify is data (``verified: false`` and a reason,
the policy decides); but when the PEP cannot fetch the device service's keys
at all it cannot tell a good assertion from a forged one, and the request is
refused (503 ``authn.keys_unavailable``) before the policy or the upstream
sees it.  Real device issuer over HTTP, real OPA, real TLS.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest
from tests.conftest import Upstream
from tests.idp import Issuer, posture_assertion
from tests.support import ROUTES, OpaProcess, client_context, config_doc

from vvault_pep.config import Config
from vvault_pep.runtime import PepRuntime

QUERY = "/v1/tenants/acme/collections/customers/query"


@pytest.fixture
async def dead_devices() -> AsyncIterator[Issuer]:
    """A device trust service whose discovery and JWKS answer 503 from the start."""
    issuer = Issuer()
    await issuer.start()
    issuer.failing = True
    yield issuer
    await issuer.stop()


async def test_device_keys_unavailable_is_503_and_reaches_neither_policy_nor_upstream(
    pki: Path,
    opa: OpaProcess,
    upstream: Upstream,
    idp: Issuer,
    dead_devices: Issuer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    doc = config_doc(
        pki,
        opa_url=opa.url,
        upstream_port=upstream.port,
        routes=ROUTES,
        identity={"issuers": [{"name": "corp", "issuer": idp.url, "audiences": ["vvault"], "allow_http": True}]},
        posture={
            "issuers": [
                {"name": "devices", "issuer": dead_devices.url, "audiences": ["vvault-pep"], "allow_http": True}
            ],
            "max_age_s": 60,
        },
    )
    pep = PepRuntime(Config.model_validate(doc))
    await pep.start()
    try:
        headers = {
            "Content-Type": "application/json",
            "Authorization": f"Bearer {idp.token(sub='alice', roles=['pii-analyst'])}",
            "X-Device-Posture": posture_assertion(dead_devices),
        }
        connector = aiohttp.TCPConnector(ssl=client_context(pki, "reader"), force_close=True)
        with caplog.at_level(logging.INFO, logger="vvault_pep.audit"):
            async with aiohttp.ClientSession(connector=connector) as http:
                async with http.post(
                    f"https://localhost:{pep.port}{QUERY}", data=b'{"vector": [1, 0], "top_k": 1}', headers=headers
                ) as resp:
                    status, body = resp.status, await resp.read()
                    request_id = resp.headers["X-Request-Id"]
        assert status == 503
        assert resp.headers["Content-Type"].startswith("application/problem+json")
        assert orjson.loads(body)["code"] == "authn.keys_unavailable"
        assert dead_devices.fetches["jwks"] + dead_devices.fetches["discovery"] >= 1  # it did try
        assert upstream.seen_with(request_id) == []
        [record] = [r.audit for r in caplog.records if getattr(r, "audit", {}).get("request_id") == request_id]
        assert (record["status"], record["result"]["code"]) == (503, "authn.keys_unavailable")
        assert record.get("input") is None  # the policy was never asked
    finally:
        await pep.stop()
