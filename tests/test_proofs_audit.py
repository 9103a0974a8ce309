"""The bearer token reaches no sink, even when the policy is given the Authorization header.

``sanitize.policy_headers`` may list ``authorization`` (a policy that reads the
scheme, say); the audit record's ``input`` then holds the header — and the
always-erase list must take it out.  Checked in every place a token could
leak: the file and stdout audit sinks, every log record of every logger,
and every span attribute.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import aiohttp
import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from tests.conftest import Upstream
from tests.idp import Issuer
from tests.support import OpaProcess, client_context, config_doc

from vvault_pep.app.runtime import PepRuntime
from vvault_pep.config import Config
from vvault_pep.observe.telemetry import Telemetry

SECRET = "/v1/tenants/acme/secrets/db-password"


async def test_bearer_token_listed_in_policy_headers_reaches_no_sink(
    pki: Path,
    opa: OpaProcess,
    upstream: Upstream,
    idp: Issuer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    sink = tmp_path / "decisions.log"
    doc = config_doc(
        pki,
        opa_url=opa.url,
        upstream_port=upstream.port,
        identity={"issuers": [{"name": "corp", "issuer": idp.url, "audiences": ["vvault"], "allow_http": True}]},
        sanitize={"policy_headers": ["accept", "authorization"]},
        audit={"sinks": [{"type": "stdout"}, {"type": "file", "path": str(sink), "buffer_records": 10}]},
    )
    config = Config.model_validate(doc)
    spans = InMemorySpanExporter()
    pep = PepRuntime(config, telemetry=Telemetry(config.telemetry, span_processors=[SimpleSpanProcessor(spans)]))
    token = idp.token(sub="tok-owner")
    await pep.start()
    try:
        with caplog.at_level(logging.DEBUG):
            connector = aiohttp.TCPConnector(ssl=client_context(pki, "reader"), force_close=True)
            async with aiohttp.ClientSession(connector=connector) as http:
                async with http.get(
                    f"https://localhost:{pep.port}{SECRET}", headers={"Authorization": f"Bearer {token}"}
                ) as resp:
                    await resp.read()
                    status, request_id = resp.status, resp.headers["X-Request-Id"]
            async with asyncio.timeout(10):
                while request_id not in (sink.read_text() if sink.exists() else ""):
                    await asyncio.sleep(0.02)
    finally:
        await pep.stop()
    assert status == 200
    # the upstream never gets it (the PEP judged the credential), and although the header
    # reached the policy input, the erase list is what keeps it out of every sink
    [seen] = upstream.seen_with(request_id)
    assert all(name.lower() != "authorization" for name, _ in seen["headers"])
    [record] = [json.loads(line) for line in sink.read_text().splitlines() if request_id in line]
    assert record["identity"]["subject"] == "tok-owner"
    assert "request.headers.authorization" in record["redacted"]["erased"]
    assert "authorization" not in record["input"]["request"]["headers"]
    out = capsys.readouterr()
    assert request_id in out.out  # the stdout sink wrote the record too
    logs = "\n".join(r.getMessage() + repr(r.__dict__) for r in caplog.records)
    attributes = repr([dict(s.attributes or {}) for s in spans.get_finished_spans()])
    assert spans.get_finished_spans()
    everything = sink.read_text() + out.out + out.err + logs + attributes
    signature = token.rsplit(".", 1)[1]
    for needle in (token, signature):
        assert needle not in everything
