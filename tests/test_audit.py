"""Audit, traces, metrics and monitor mode — real sinks, real OTel SDK, real scrapes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from prometheus_client.parser import text_string_to_metric_families
from tests.conftest import Upstream
from tests.idp import Issuer
from tests.support import ROUTES, OpaProcess, client_context, config_doc, start_opa

from vvault_pep.app.runtime import PepRuntime
from vvault_pep.config import Config
from vvault_pep.observe.telemetry import Telemetry

SECRET = "/v1/tenants/acme/secrets/db-password"
SECRET_PATH = "/v1/tenants/{tenant}/secrets/{path*}"
AUDIT_ROUTES: list[dict[str, Any]] = [
    {
        "name": "a_user",
        "host": "user.audit.test",
        "path": SECRET_PATH,
        "methods": ["GET"],
        "upstream": "vvault",
        "policy": "faults/echo_identity",
        "authn": {"require": "user"},
    },
    {
        "name": "a_trial",
        "host": "trial.audit.test",
        "path": SECRET_PATH,
        "methods": ["GET"],
        "upstream": "vvault",
        "policy": "faults/monitor_only_deny",
    },
]


def audit_doc(pki: Path, opa_url: str, upstream: Upstream, idp: Issuer, sink_path: Path, **extra: Any) -> dict:  # type: ignore[type-arg]
    return config_doc(
        pki,
        opa_url=opa_url,
        upstream_port=upstream.port,
        routes=AUDIT_ROUTES + ROUTES,
        listener={"tls": {"client_auth": "optional"}},
        identity={
            "issuers": [
                {
                    "name": "corp",
                    "issuer": idp.url,
                    "audiences": ["vvault"],
                    "allow_http": True,
                    "passthrough_claims": ["email"],
                }
            ]
        },
        sanitize={"policy_headers": ["accept", "x-api-key", "cookie", "x-device-posture"]},
        audit={
            "sinks": [{"type": "stdout"}, {"type": "file", "path": str(sink_path), "buffer_records": 50}],
            "redact": {"erase": ["request.headers.x-api-key"], "mask": ["identity.claims.email"]},
        },
        telemetry={"trusted_trace_sources": {"spiffe_ids": ["spiffe://demo.vvault/client/reader"]}},
        **extra,
    )


@contextlib.asynccontextmanager
async def running(doc: dict, spans: InMemorySpanExporter | None = None) -> AsyncIterator[PepRuntime]:  # type: ignore[type-arg]
    config = Config.model_validate(doc)
    processors = [SimpleSpanProcessor(spans)] if spans is not None else []
    runtime = PepRuntime(config, telemetry=Telemetry(config.telemetry, span_processors=processors))
    await runtime.start()
    try:
        yield runtime
    finally:
        await runtime.stop()


async def send(
    pep: PepRuntime,
    pki: Path,
    *,
    host: str = "localhost",
    path: str = SECRET,
    cert: str | None = "reader",
    headers: dict[str, str] | None = None,
) -> tuple[int, str]:
    connector = aiohttp.TCPConnector(ssl=client_context(pki, cert), force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http:
        async with http.get(
            f"https://localhost:{pep.port}{path}",
            headers={"Host": host, **(headers or {})},
            server_hostname="localhost",
        ) as resp:
            await resp.read()
            return resp.status, resp.headers["X-Request-Id"]


def file_records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


async def wait_for_records(path: Path, request_ids: list[str]) -> list[dict[str, Any]]:
    """The sink writes from its own thread: wait until every expected record is there."""
    async with asyncio.timeout(10):
        while True:
            records = [r for r in file_records(path) if r.get("request_id") in request_ids]
            if {r["request_id"] for r in records} >= set(request_ids):
                return records
            await asyncio.sleep(0.02)


async def test_every_outcome_leaves_exactly_one_record(
    pki: Path, upstream: Upstream, idp: Issuer, tmp_path: Path
) -> None:
    own_opa = start_opa()
    sink = tmp_path / "decisions.log"
    try:
        async with running(audit_doc(pki, own_opa.url, upstream, idp, sink)) as pep:
            ids = {}
            ids["allowed"] = (await send(pep, pki))[1]
            ids["denied"] = (await send(pep, pki, path="/v1/tenants/globex/secrets/db-password"))[1]
            ids["unauthenticated"] = (await send(pep, pki, host="user.audit.test"))[1]
            ids["not_found"] = (await send(pep, pki, path="/nope"))[1]
            # client gone mid-stream: read a little of a big response, then hang up
            connector = aiohttp.TCPConnector(ssl=client_context(pki, "reader"), force_close=True)
            async with aiohttp.ClientSession(connector=connector) as http:
                resp = await http.get(f"https://localhost:{pep.port}/v1/tenants/acme/stream/200000000")
                ids["client_gone"] = resp.headers["X-Request-Id"]
                await resp.content.read(65536)
                resp.close()
            own_opa.stop()
            ids["pdp_down"] = (await send(pep, pki))[1]
            records = await wait_for_records(sink, list(ids.values()))
    finally:
        own_opa.stop()
    by_id: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_id.setdefault(r["request_id"], []).append(r)
    assert {k: len(by_id[v]) for k, v in ids.items()} == {k: 1 for k in ids}
    one = {k: by_id[v][0] for k, v in ids.items()}
    assert (one["allowed"]["status"], one["allowed"]["result"]["allow"]) == (200, True)
    assert one["denied"]["result"]["code"] == "policy.tenant_not_entitled"
    assert (one["unauthenticated"]["status"], one["unauthenticated"]["result"]["code"]) == (401, "authn.required")
    assert one["not_found"]["status"] == 404
    assert (one["pdp_down"]["status"], one["pdp_down"]["result"]["code"]) == (503, "pdp.unavailable")
    assert one["client_gone"]["aborted"] == "client_gone"
    assert one["client_gone"]["bytes_out"] < 200_000_000
    allowed = one["allowed"]
    for name in (
        "timestamp",
        "decision_id",
        "request_id",
        "trace_id",
        "route",
        "method",
        "path",
        "request_path",
        "source_ip",
        "client_cert_sha256",
        "spiffe_id",
        "subject",
        "issuer",
        "tenant",
        "device_id",
        "risk_score",
        "bundles",
        "result",
        "obligations",
        "cache",
        "stages_ms",
        "upstream_status",
        "bytes_in",
        "bytes_out",
        "input",
        "redacted",
    ):
        assert name in allowed, name
    assert allowed["path"] == "vvault/authz/decision"
    assert allowed["request_path"] == SECRET
    assert len(allowed["trace_id"]) == 32
    assert set(allowed["stages_ms"]) >= {"sanitize", "authn", "cache", "pdp", "upstream"}


async def test_secrets_never_reach_any_sink(
    pki: Path, opa: OpaProcess, upstream: Upstream, idp: Issuer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sink = tmp_path / "decisions.log"
    token = idp.token(sub="alice", email="alice@example.com")
    secrets = {
        "Authorization": f"Bearer {token}",
        "X-Device-Posture": "eyJhbGciOiJFUzI1NiJ9.posture-assertion-secret.sig",
        "Cookie": "session=cookie-secret-value",
        "X-Api-Key": "api-key-secret-value",
    }
    async with running(audit_doc(pki, opa.url, upstream, idp, sink)) as pep:
        status, request_id = await send(
            pep, pki, host="user.audit.test", headers=secrets, path=SECRET + "?api_key=query-secret-value"
        )
        assert status == 200
        [record] = await wait_for_records(sink, [request_id])
    out = capsys.readouterr()
    everything = sink.read_text() + out.out + out.err
    assert request_id in out.out  # the stdout sink wrote it too
    for needle in (
        token,
        *token.split("."),
        "posture-assertion-secret",
        "cookie-secret-value",
        "api-key-secret-value",
        "alice@example.com",
    ):
        assert needle not in everything, needle
    assert "request.headers.x-api-key" in record["redacted"]["erased"]
    assert "request.headers.cookie" in record["redacted"]["erased"]
    assert "identity.claims.email" in record["redacted"]["masked"]
    assert "request.query" in record["redacted"]["masked"]
    assert record["input"]["request"]["query"]["api_key"][0].startswith("masked:sha256:")
    assert record["input"]["identity"]["claims"]["email"].startswith("masked:sha256:")


async def test_a_blocked_sink_costs_records_not_latency(
    pki: Path, opa: OpaProcess, upstream: Upstream, idp: Issuer, tmp_path: Path
) -> None:
    fifo = tmp_path / "stuck.fifo"
    os.mkfifo(fifo)  # nobody reads it: the file sink's first open blocks for good
    doc = audit_doc(pki, opa.url, upstream, idp, fifo)
    doc["audit"]["sinks"] = [{"type": "file", "path": str(fifo), "buffer_records": 20}]
    try:
        async with running(doc) as pep:
            connector = aiohttp.TCPConnector(ssl=client_context(pki, "reader"))
            async with aiohttp.ClientSession(connector=connector) as http:
                for _ in range(120):
                    # each request on its own deadline: one blocked behind the sink fails here
                    async with asyncio.timeout(10), http.get(f"https://localhost:{pep.port}{SECRET}") as resp:
                        assert resp.status == 200
            metrics = await scrape(pep)
            assert pep.audit is not None
            stuck = pep.audit.sinks[0].in_flight
    finally:
        # let the stuck writer go: open the reading end once, without blocking
        with contextlib.suppress(OSError):
            os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))
    # 120 records: 20 fit the buffer, the batch the sink's thread took is stuck in the
    # open(), every other one is dropped and counted
    assert stuck >= 1
    assert total(metrics, "vvault_pep_audit_dropped_total", sink="file-0") == 120 - 20 - stuck


async def scrape(pep: PepRuntime) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{pep.admin_port}/metrics") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain")
            text = await resp.text()
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def total(metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, lbl), v in metrics.items() if n == name and want <= set(lbl))


async def test_metrics_move_as_requests_flow(
    pki: Path, opa: OpaProcess, upstream: Upstream, idp: Issuer, tmp_path: Path
) -> None:
    async with running(audit_doc(pki, opa.url, upstream, idp, tmp_path / "d.log")) as pep:
        before = await scrape(pep)
        for _ in range(3):
            await send(pep, pki)
        await send(pep, pki, path="/v1/tenants/globex/secrets/db-password")
        after = await scrape(pep)
    assert (
        total(after, "vvault_pep_requests_total", route="secrets", status="200")
        - total(before, "vvault_pep_requests_total", route="secrets", status="200")
        == 3
    )
    assert (
        total(after, "vvault_pep_decisions_total", result="deny", code="policy.tenant_not_entitled")
        - total(before, "vvault_pep_decisions_total", result="deny", code="policy.tenant_not_entitled")
        == 1
    )
    assert (
        total(after, "vvault_pep_stage_duration_seconds_count", stage="pdp")
        - total(before, "vvault_pep_stage_duration_seconds_count", stage="pdp")
        == 4
    )
    assert total(after, "vvault_pep_cache_lookups_total", result="bypass") >= 4
    assert total(after, "vvault_pep_upstream_duration_seconds_count", status_class="2xx") >= 3
    assert any(name == "vvault_pep_connections_open" for name, _ in after)


async def test_span_tree_and_propagation(
    pki: Path, opa: OpaProcess, upstream: Upstream, idp: Issuer, tmp_path: Path
) -> None:
    spans = InMemorySpanExporter()
    async with running(audit_doc(pki, opa.url, upstream, idp, tmp_path / "d.log"), spans) as pep:
        _, request_id = await send(pep, pki)
        caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736"
        trusted = f"00-{caller_trace}-00f067aa0ba902b7-01"
        _, trusted_id = await send(pep, pki, headers={"traceparent": trusted})
        _, untrusted_id = await send(pep, pki, cert="ops", headers={"traceparent": trusted})
    finished = spans.get_finished_spans()
    servers = {s.attributes["vvault_pep.request_id"]: s for s in finished if s.kind == SpanKind.SERVER}
    server = servers[request_id]
    children = [s for s in finished if s.parent is not None and s.parent.span_id == server.context.span_id]
    assert {s.name for s in children} >= {"sanitize", "route", "authn", "cache", "pdp", "upstream"}
    assert all(s.context.trace_id == server.context.trace_id for s in children)
    assert server.name == "GET /v1/tenants/{tenant}/secrets/{path*}"
    assert server.attributes["http.route"] == "/v1/tenants/{tenant}/secrets/{path*}"
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["vvault_pep.result.allow"] is True
    assert {s.name: s.kind for s in children}["pdp"] == SpanKind.CLIENT
    # the upstream received our trace context, parented on the upstream span
    upstream_span = next(s for s in children if s.name == "upstream")
    [seen] = upstream.seen_with(request_id)
    traceparent = dict(seen["headers"])["traceparent"]
    assert traceparent.split("-")[1] == format(server.context.trace_id, "032x")
    assert traceparent.split("-")[2] == format(upstream_span.context.span_id, "016x")
    # a trusted caller's trace is continued; an untrusted caller's is not, and never forwarded
    assert format(servers[trusted_id].context.trace_id, "032x") == caller_trace
    assert format(servers[untrusted_id].context.trace_id, "032x") != caller_trace
    [seen] = upstream.seen_with(untrusted_id)
    assert caller_trace not in dict(seen["headers"])["traceparent"]


async def test_monitor_only_rule_forwards_and_is_counted(
    pki: Path, opa: OpaProcess, upstream: Upstream, idp: Issuer, tmp_path: Path
) -> None:
    sink = tmp_path / "d.log"
    async with running(audit_doc(pki, opa.url, upstream, idp, sink)) as pep:
        status, request_id = await send(pep, pki, host="trial.audit.test")
        metrics = await scrape(pep)
        [record] = await wait_for_records(sink, [request_id])
    assert status == 200
    assert len(upstream.seen_with(request_id)) == 1
    assert record["enforced"] is False
    assert record["would_have"] == {"status": 403, "code": "policy.new_rule"}
    assert total(metrics, "vvault_pep_would_deny_total", route="a_trial", code="policy.new_rule") == 1


async def test_otlp_http_exporters_ship_traces_and_decision_logs(
    pki: Path, opa: OpaProcess, upstream: Upstream, idp: Issuer, tmp_path: Path
) -> None:
    from aiohttp import web
    from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    received: dict[str, list[bytes]] = {"/v1/traces": [], "/v1/logs": []}

    async def collector(request: web.Request) -> web.Response:
        received[request.path].append(await request.read())
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/v1/traces", collector)
    app.router.add_post("/v1/logs", collector)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    doc = audit_doc(pki, opa.url, upstream, idp, tmp_path / "d.log")
    doc["audit"]["sinks"] = [{"type": "otlp", "protocol": "http", "endpoint": f"{base}/v1/logs"}]
    doc["telemetry"]["traces"] = {"exporter": "otlp-http", "endpoint": f"{base}/v1/traces"}
    try:
        config = Config.model_validate(doc)
        pep = PepRuntime(config)
        await pep.start()
        try:
            _, request_id = await send(pep, pki)
        finally:
            await pep.stop()  # flushes the batch processors
        async with asyncio.timeout(10):
            while not (received["/v1/traces"] and received["/v1/logs"]):
                await asyncio.sleep(0.05)
    finally:
        await runner.cleanup()
    traces = ExportTraceServiceRequest()
    traces.ParseFromString(received["/v1/traces"][0])
    names = {s.name for rs in traces.resource_spans for ss in rs.scope_spans for s in ss.spans}
    assert {"sanitize", "pdp", "upstream"} <= names
    logs = ExportLogsServiceRequest()
    logs.ParseFromString(b"".join(received["/v1/logs"][:1]))
    bodies = [lr.body.string_value for rl in logs.resource_logs for sl in rl.scope_logs for lr in sl.log_records]
    assert any(request_id in body for body in bodies)


def test_redaction_never_touches_the_policy_input() -> None:
    import copy

    from vvault_pep.observe.audit import redact

    doc = {
        "request": {"headers": {"cookie": ["s=1"], "accept": ["*/*"]}, "query": {"k": ["secret"]}},
        "identity": {"claims": {"email": "a@example.com", "dept": "x"}},
    }
    original = copy.deepcopy(doc)
    out, done = redact(doc, ("request.headers.accept",), ("identity.claims.email",))
    assert doc == original  # the input the policy saw is unchanged
    assert out["request"]["headers"] == {}
    assert out["request"]["query"]["k"][0].startswith("masked:sha256:")
    assert out["identity"]["claims"]["email"].startswith("masked:sha256:")
    assert out["identity"]["claims"]["dept"] == "x"
    assert set(done["erased"]) == {"request.headers.cookie", "request.headers.accept"}


def test_a_file_moved_away_does_not_stop_the_file_sink(tmp_path: Path) -> None:
    """logrotate (or an operator) moved the file: rotation starts a new one and records go on."""
    from vvault_pep.config import AuditSink
    from vvault_pep.observe.sinks import _FileSink

    path = tmp_path / "decisions.log"
    sink = _FileSink("file-0", AuditSink(type="file", path=path, max_bytes=200, backups=2))
    sink.write([{"n": i, "pad": "x" * 40} for i in range(3)])
    path.rename(tmp_path / "moved.log")  # the sink still holds it open, and it is over max_bytes
    for i in range(3, 9):
        sink.write([{"n": i, "pad": "x" * 40}])
    sink.close()
    written = [
        json.loads(line)["n"] for f in sorted(tmp_path.glob("decisions.log*")) for line in f.read_text().splitlines()
    ]
    assert sorted(written)[-3:] == [6, 7, 8] and sink.failures == 0
    assert (tmp_path / "decisions.log.1").exists()  # rotation went on as usual afterwards
