"""OPA-format decision logs: the event against OPA's schema, the HTTP sink against a real receiver."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import pytest
from aiohttp import web
from tests.conftest import Upstream
from tests.support import client_context, config_doc, start_opa

from vvault_pep.app.runtime import PepRuntime
from vvault_pep.config import Audit, AuditSink, Config
from vvault_pep.observe.audit import AuditLog
from vvault_pep.observe.decision_log import INSTANCE_ID, opa_event, pointer

SCHEMA = json.loads((Path(__file__).parent.parent / "docs" / "opa-decision-log-event.schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)


@dataclass
class Receiver:
    """A decision-log service on loopback that checks OPA's wire format on every POST."""

    port: int = 0
    events: list[dict[str, Any]] = field(default_factory=list)
    posts: int = 0
    answers: list[int] = field(default_factory=list)  # statuses to give before 200s
    problems: list[str] = field(default_factory=list)
    authorizations: list[str | None] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        self.posts += 1
        self.authorizations.append(request.headers.get("Authorization"))
        if request.headers.get("Content-Encoding") != "gzip":
            self.problems.append("Content-Encoding is not gzip")
        if request.headers.get("Content-Type") != "application/json":
            self.problems.append("Content-Type is not application/json")
        raw = await request.read()
        try:
            batch = json.loads(gzip.decompress(raw))
        except (OSError, ValueError) as exc:
            self.problems.append(f"body is not gzip JSON: {exc}")
            return web.Response(status=400)
        if not isinstance(batch, list):
            self.problems.append("body is not a JSON array")
            return web.Response(status=400)
        if self.answers:
            return web.Response(status=self.answers.pop(0))
        self.events.extend(batch)
        return web.Response(status=204)

    async def wait_for(self, n: int) -> list[dict[str, Any]]:
        async with asyncio.timeout(15):
            while len(self.events) < n:
                await asyncio.sleep(0.02)
        return self.events


@contextlib.asynccontextmanager
async def receiver(answers: list[int] | None = None, tls: ssl.SSLContext | None = None) -> AsyncIterator[Receiver]:
    rec = Receiver(answers=list(answers or []))
    app = web.Application()
    app.router.add_post("/logs", rec.handle)
    # auto_decompress off: the test sees the bytes on the wire, not aiohttp's inflated copy
    runner = web.AppRunner(app, access_log=None, auto_decompress=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls)
    await site.start()
    rec.port = runner.addresses[0][1]
    try:
        yield rec
    finally:
        await runner.cleanup()


async def get(pep: PepRuntime, pki: Path, path: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    connector = aiohttp.TCPConnector(ssl=client_context(pki, "reader"), force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http:
        async with http.get(f"https://localhost:{pep.port}{path}", headers=headers or {}) as resp:
            await resp.read()
            return resp.status, resp.headers["X-Request-Id"]


async def test_records_are_opa_events_posted_in_opas_wire_format(pki: Path, upstream: Upstream) -> None:
    opa = start_opa()
    try:
        async with receiver() as rec:
            doc = config_doc(
                pki,
                opa_url=opa.url,
                upstream_port=upstream.port,
                sanitize={"policy_headers": ["accept", "user-agent"]},
                audit={
                    "format": "opa",
                    "labels": {"app": "vvault", "env": "test"},
                    "redact": {"mask": ["request.headers.user-agent"]},
                    "sinks": [{"type": "http", "url": f"http://127.0.0.1:{rec.port}/logs", "flush_interval_s": 0.05}],
                },
            )
            pep = PepRuntime(Config.model_validate(doc))
            await pep.start()
            try:
                allowed = await get(pep, pki, "/v1/tenants/acme/secrets/db-password?v=2", {"User-Agent": "probe/1"})
                denied = await get(pep, pki, "/v1/tenants/globex/secrets/db-password")
                assert (allowed[0], denied[0]) == (200, 403)
                events = await rec.wait_for(2)
                # the answers OPA itself gives for these inputs, to compare `result` with
                raw = {}
                async with aiohttp.ClientSession() as http:
                    for event in events:
                        async with http.post(
                            f"{opa.url}/v1/data/{event['path']}", json={"input": event["input"]}
                        ) as resp:
                            raw[event["decision_id"]] = (await resp.json())["result"]
            finally:
                await pep.stop()
        assert rec.problems == []
    finally:
        opa.stop()
    by_request = {e["vvault_pep"]["request_id"]: e for e in events}
    for event in events:
        errors = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in VALIDATOR.iter_errors(event)]
        assert errors == [], errors
    ok, no = by_request[allowed[1]], by_request[denied[1]]
    assert ok["labels"] == {"app": "vvault", "env": "test", "id": INSTANCE_ID, "version": ok["labels"]["version"]}
    assert ok["path"] == "vvault/authz/decision"
    # result is the policy's own answer, not the PEP's reading of it
    assert ok["result"] == raw[ok["decision_id"]] and ok["result"]["allow"] is True
    assert no["result"] == raw[no["decision_id"]] and no["result"]["allow"] is False
    assert sorted(ok["masked"]) == ["/input/request/headers/user-agent", "/input/request/query"]
    assert ok["input"]["request"]["headers"]["user-agent"].startswith("masked:sha256:")
    assert ok["requested_by"].startswith("127.0.0.1:")
    assert ok["metrics"]["timer_server_handler_ns"] > 0
    assert "bundles" not in ok  # policies loaded from files: no bundle to name
    assert ok["vvault_pep"]["status"] == 200 and ok["vvault_pep"]["upstream_status"] == 200
    assert no["vvault_pep"]["status"] == 403 and no["vvault_pep"]["enforced"] is True
    assert no["vvault_pep"]["decision"]["code"] == no["result"]["code"]


def test_event_carries_bundles_errors_and_pointers() -> None:
    record = {
        "timestamp": "2026-01-02T03:04:05.123456Z",
        "decision_id": "d-1",
        "trace_id": "0" * 31 + "1",
        "path": "vvault/authz/decision",
        "bundles": {"revision": 'b:{"authz":"r42","data":"r7"}#3#0'},
        "input": {"a/b": {"c~d": 1}, "source": {"ip": "::1", "port": 5000}},
        "redacted": {"erased": ["request.headers.authorization"], "masked": []},
        "result": {"allow": False, "code": "pdp.timeout", "reasons": ["too slow"]},
        "source_ip": "::1",
        "status": 503,
    }
    event = opa_event(record, extension=False)
    assert list(VALIDATOR.iter_errors(event)) == []
    assert event["bundles"] == {"authz": {"revision": "r42"}, "data": {"revision": "r7"}}
    assert event["erased"] == ["/input/request/headers/authorization"]
    assert event["error"] == {"code": "pdp.timeout", "message": "too slow"}
    assert "result" not in event and "vvault_pep" not in event
    assert event["requested_by"] == "[::1]:5000"
    assert pointer("a/b.c~d") == "/input/a~1b/c~0d"


async def test_http_sink_retries_with_backoff_then_delivers() -> None:
    async with receiver(answers=[503, 429]) as rec:
        log = AuditLog(Audit(sinks=(_sink(rec.port, backoff_s=0.01, token="t" * 40),)))
        log.start()
        try:
            log.emit({"timestamp": "2026-01-01T00:00:00Z", "decision_id": "x"})
            [event] = await rec.wait_for(1)
            assert log.dropped() == {"http-0": 0}
        finally:
            await asyncio.to_thread(log.stop)
    assert event["decision_id"] == "x"
    assert rec.posts == 3
    assert rec.authorizations == ["Bearer " + "t" * 40] * 3


async def test_http_sink_counts_what_it_cannot_deliver(down_port: int) -> None:
    async with receiver(answers=[400]) as rec:
        # a refused batch (400) is not retried: it is counted as lost at once
        log = AuditLog(Audit(sinks=(_sink(rec.port, backoff_s=0.01),)))
        log.start()
        try:
            log.emit({"timestamp": "2026-01-01T00:00:00Z", "decision_id": "refused"})
            await _wait(lambda: log.dropped() == {"http-0": 1})
            assert rec.posts == 1
        finally:
            await asyncio.to_thread(log.stop)
    # nobody listening: each batch is tried max_attempts times, then counted
    closed = down_port
    log = AuditLog(Audit(sinks=(_sink(closed, backoff_s=0.01, max_attempts=2, buffer_records=5),)))
    log.start()
    try:
        for i in range(20):
            log.emit({"timestamp": "2026-01-01T00:00:00Z", "decision_id": f"lost-{i}"})
        await _wait(lambda: log.dropped() == {"http-0": 20})
        assert log.sinks[0].retries > 0  # type: ignore[attr-defined]
    finally:
        await asyncio.to_thread(log.stop)


def _sink(port: int, **kwargs: Any) -> AuditSink:
    return AuditSink(type="http", url=f"http://127.0.0.1:{port}/logs", flush_interval_s=0.02, **kwargs)


async def _wait(condition: Any) -> None:
    async with asyncio.timeout(15):
        while not condition():
            await asyncio.sleep(0.02)


async def test_https_decision_log_service_is_verified_against_its_ca(pki: Path) -> None:
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(str(pki / "server.pem"), str(pki / "server-key.pem"))
    async with receiver(tls=tls) as rec:
        url = f"https://localhost:{rec.port}/logs"
        good = AuditSink(type="http", url=url, ca_file=pki / "ca.pem", flush_interval_s=0.02, token="t" * 40)
        unknown_ca = AuditSink(type="http", url=url, flush_interval_s=0.02, backoff_s=0.01, max_attempts=2)
        log = AuditLog(Audit(sinks=(good, unknown_ca)))
        log.start()
        try:
            log.emit({"timestamp": "2026-01-01T00:00:00Z", "decision_id": "over-tls"})
            [event] = await rec.wait_for(1)
            # the sink that cannot verify the service never sends it anything (nor its token)
            await _wait(lambda: log.dropped() == {"http-0": 0, "http-1": 1})
        finally:
            await asyncio.to_thread(log.stop)
    assert event["decision_id"] == "over-tls" and rec.posts == 1


def test_a_sink_token_never_travels_in_clear_text_off_the_machine() -> None:
    with pytest.raises(ValueError, match="https"):
        AuditSink(type="http", url="http://logs.internal/logs", token="t" * 40)
    with pytest.raises(ValueError, match="url"):
        AuditSink(type="http")
    assert "t" * 40 not in repr(AuditSink(type="http", url="https://logs.internal/logs", token="t" * 40))
