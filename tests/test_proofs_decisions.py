"""Strict decision fields, through real OPA: almost-right is malformed, and malformed is denied.

Each shape in tests/policies/strict_fields.rego differs from a valid decision
by one field.  The PEP must answer 403 ``pdp.malformed_decision``, and the
upstream must never see the request — not as an allow, not as a monitored
deny (a ``monitor_only`` that is not a boolean must not switch enforcement off).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from tests.conftest import Upstream
from tests.support import ROUTES, OpaProcess, client_context, get, make_config, raw_https

from vvault_pep.app.runtime import PepRuntime

SHAPES = {
    "monitor_only_as_string": (403, "pdp.malformed_decision"),
    "monitor_only_as_number": (403, "pdp.malformed_decision"),
    "nul_in_upstream_header": (403, "pdp.malformed_decision"),
    "cr_in_upstream_header": (403, "pdp.malformed_decision"),
    "lf_in_upstream_header": (403, "pdp.malformed_decision"),
    "nul_in_response_header": (403, "pdp.malformed_decision"),
    "lf_in_response_header": (403, "pdp.malformed_decision"),
}
STRICT_ROUTES: list[dict[str, Any]] = [
    {
        "name": f"strict_{shape}",
        "path": f"/strict/{shape}",
        "methods": ["GET"],
        "upstream": "vvault",
        "policy": f"faults_strict/{shape}",
    }
    for shape in [*SHAPES, "monitor_only_true", "clean_header"]
]


@pytest.fixture(scope="module")
async def strict_pep(pki: Path, opa: OpaProcess, upstream: Upstream) -> AsyncIterator[PepRuntime]:
    config = make_config(pki, opa_url=opa.url, upstream_port=upstream.port, routes=[*ROUTES, *STRICT_ROUTES])
    runtime = PepRuntime(config)
    await runtime.start()
    yield runtime
    await runtime.stop()


def _audit_of(caplog: pytest.LogCaptureFixture, request_id: str) -> dict[str, Any]:
    [record] = [r.audit for r in caplog.records if getattr(r, "audit", {}).get("request_id") == request_id]
    return record  # type: ignore[no-any-return]


@pytest.mark.parametrize("shape", list(SHAPES))
async def test_almost_right_decision_is_malformed_and_denied(
    strict_pep: PepRuntime, pki: Path, upstream: Upstream, caplog: pytest.LogCaptureFixture, shape: str
) -> None:
    with caplog.at_level(logging.INFO, logger="vvault_pep.audit"):
        resp = await raw_https(strict_pep.port, client_context(pki, "reader"), get(f"/strict/{shape}"))
    status, code = SHAPES[shape]
    doc = orjson.loads(resp.body)
    assert (resp.status, doc["code"]) == (status, code)
    assert resp.headers["content-type"] == "application/problem+json"
    assert "x-a" not in resp.headers  # a malformed decision's response headers are not applied
    request_id = resp.headers["x-request-id"]
    assert upstream.seen_with(request_id) == []
    record = _audit_of(caplog, request_id)
    assert record["status"] == status
    assert record["result"]["code"] == code
    assert record["enforced"] is True


async def test_well_formed_neighbours_behave(
    strict_pep: PepRuntime, pki: Path, upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    """The controls: a real boolean monitor_only forwards, a clean header arrives."""
    with caplog.at_level(logging.INFO, logger="vvault_pep.audit"):
        resp = await raw_https(strict_pep.port, client_context(pki, "reader"), get("/strict/monitor_only_true"))
    assert resp.status == 404  # the example upstream has no /strict/ route: what matters is it was reached
    [seen] = upstream.seen_with(resp.headers["x-request-id"])
    assert seen["raw_path"] == "/strict/monitor_only_true"
    record = _audit_of(caplog, resp.headers["x-request-id"])
    assert record["enforced"] is False
    assert record["would_have"] == {"status": 403, "code": "policy.rollout"}

    resp = await raw_https(strict_pep.port, client_context(pki, "reader"), get("/strict/clean_header"))
    [seen] = upstream.seen_with(resp.headers["x-request-id"])
    assert ("X-A", "ab") in seen["headers"]
