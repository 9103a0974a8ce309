"""The admin listener: who is calling before the body, problem+json refusals, each on record."""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from examples.pki import issue_client
from tests.conftest import Upstream
from tests.helpers import running_pep
from tests.support import OpaProcess, client_context, config_doc

from vvault_pep.app.runtime import PepRuntime
from vvault_pep.config import Config

QUARANTINES = "/admin/quarantines"


@pytest.fixture(scope="module")
async def admin_pep(pki: Path, opa: OpaProcess, upstream: Upstream) -> AsyncIterator[PepRuntime]:
    issue_client(pki, "admin-bad-svid", uris=("spiffe://demo.vvault:1/client/ops",))
    doc = config_doc(
        pki,
        opa_url=opa.url,
        upstream_port=upstream.port,
        identity={"workload": {"trust_domains": ["demo.vvault"]}},
        limits={"body_deadline_s": 1.5},  # the admin body's deadline too
        admin={
            "host": "127.0.0.1",
            "port": 0,
            "policy": "vvault/admin/decision",
            "tls": {
                "cert_file": str(pki / "server.pem"),
                "key_file": str(pki / "server-key.pem"),
                "client_ca_file": str(pki / "ca.pem"),
                "client_auth": "optional",
            },
        },
    )
    async with running_pep(Config.model_validate(doc)) as pep:
        yield pep


async def _raw(
    pep: PepRuntime, ctx: ssl.SSLContext, head: bytes, body: bytes = b"", later: bytes = b""
) -> tuple[int, dict[str, str], Any]:
    """Send the head (and maybe a body, and ``later`` after a pause); read the answer."""
    async with asyncio.timeout(10):
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", pep.admin_port, ssl=ctx, server_hostname="localhost"
        )
        try:
            writer.write(head + body)
            await writer.drain()
            if later:
                await asyncio.sleep(0.2)  # the network's pause: the answer must not depend on it
                writer.write(later)
                await writer.drain()
            status_line = await reader.readline()
            headers: dict[str, str] = {}
            while (line := await reader.readline()) not in (b"\r\n", b""):
                k, _, v = line.decode().partition(":")
                headers[k.strip().lower()] = v.strip()
            data = await reader.readexactly(int(headers.get("content-length", "0")))
        finally:
            writer.close()
    return int(status_line.split()[1]), headers, json.loads(data) if data else None


def _post(length: int) -> bytes:
    return (
        f"POST {QUARANTINES} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


def _audit(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [r.audit for r in caplog.records if getattr(r, "audit", {}).get("admin_action") == "quarantine.add"]


@pytest.mark.parametrize(
    ("cert", "status", "code"),
    [
        ("admin-bad-svid", 403, "admin.certificate_refused"),
        (None, 401, "admin.no_certificate"),
        ("reader", 403, "admin.denied"),
    ],
)
async def test_a_refused_caller_is_answered_before_its_body_is_read(
    admin_pep: PepRuntime, pki: Path, caplog: pytest.LogCaptureFixture, cert: str | None, status: int, code: str
) -> None:
    with caplog.at_level(logging.INFO, logger="vvault_pep.audit"):
        # A 1 MB body announced and never sent: an answer proves nobody waited for it
        # (the policy's refusal for a listed certificate needs the body, so it is sent).
        body = b'{"scope": "subject", "value": "x"}' if cert == "reader" else b""
        length = len(body) if body else 1 << 20
        got, headers, doc = await _raw(admin_pep, client_context(pki, cert), _post(length), body)
    assert (got, headers["content-type"].split(";")[0], doc["code"]) == (status, "application/problem+json", code)
    [record] = _audit(caplog)
    assert record["result"] == {"allow": False} and record["code"] == code


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b"not json", "body"),
        (b"[1, 2]", "body"),
        (b'{"scope": "subject"}', "value"),
        (b'{"scope": "subject", "value": 7}', "value"),
        (b'{"scope": "subject", "value": "x", "ttl_s": "60"}', "ttl_s"),
        (b'{"scope": "subject", "value": "x", "ttl_s": 1e9}', "ttl_s"),
        (b'{"scope": "subject", "value": "x", "reason": ["a"]}', "reason"),
    ],
)
async def test_a_malformed_body_from_an_admin_is_a_400_naming_the_field(
    admin_pep: PepRuntime, pki: Path, body: bytes, field: str
) -> None:
    status, headers, doc = await _raw(admin_pep, client_context(pki, "ops"), _post(len(body)), body)
    assert (status, headers["content-type"].split(";")[0]) == (400, "application/problem+json")
    assert doc["detail"].startswith(f"{field}: ")


def _chunked() -> bytes:
    return (
        f"POST {QUARANTINES} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    ).encode()


@pytest.mark.parametrize(
    ("head", "body", "later", "status", "codes"),
    [
        # announced past the limit: refused before a byte of it is read (none is sent)
        (_post(4 << 20 | 1), b"", b"", 413, {"admin.body_too_large"}),
        # a good chunk, then a chunk size that is not hex: never the first piece taken as
        # the body. In one write the parser refuses the request; after a pause the handler
        # is reading it, and the body fails.
        (_chunked(), b'5\r\n{"sco\r\nZZ\r\n', b"", 400, {"admin.bad_request", "admin.bad_body"}),
        (_chunked(), b'5\r\n{"sco\r\n', b"ZZ\r\n", 400, {"admin.bad_request", "admin.bad_body"}),
        # a third of the announced body, then nothing: the deadline, not a wait for ever
        (_post(90), b'{"scope": "subject", "value": "', b"", 408, {"admin.body_timeout"}),
    ],
    ids=["declared too large", "bad chunk after a good one", "bad chunk after a pause", "stalled"],
)
async def test_a_body_that_cannot_be_read_whole_is_refused_on_record(
    admin_pep: PepRuntime,
    pki: Path,
    caplog: pytest.LogCaptureFixture,
    head: bytes,
    body: bytes,
    later: bytes,
    status: int,
    codes: set[str],
) -> None:
    with caplog.at_level(logging.INFO, logger="vvault_pep.audit"):
        got, headers, doc = await _raw(admin_pep, client_context(pki, "ops"), head, body, later)
    assert (got, headers["content-type"].split(";")[0]) == (status, "application/problem+json")
    assert doc["code"] in codes
    records = [r.audit for r in caplog.records if getattr(r, "audit", {}).get("result") == {"allow": False}]
    assert [r["code"] for r in records] == [doc["code"]]  # one record, saying the same
    if status == 413:
        assert headers.get("connection", "").lower() == "close"  # the unread body is not waited for


async def test_a_handler_that_fails_is_one_record_and_no_parser_refusal(
    admin_pep: PepRuntime, pki: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert admin_pep.cache is not None
    # counters the handler cannot serialise: it raises TypeError after authorisation
    monkeypatch.setattr(admin_pep.cache, "stats", {"l1": object()})
    head = b"GET /admin/cache HTTP/1.1\r\nHost: localhost\r\n\r\n"
    with caplog.at_level(logging.INFO, logger="vvault_pep.audit"):
        got, headers, doc = await _raw(admin_pep, client_context(pki, "ops"), head)
    assert (got, headers["content-type"].split(";")[0], doc["code"]) == (500, "application/problem+json", "admin.error")
    assert "parser" not in doc["detail"]
    records = [r.audit for r in caplog.records if hasattr(r, "audit")]
    assert [(r["admin_action"], r["result"], r["code"]) for r in records] == [
        ("cache.read", {"allow": False}, "admin.error")
    ]
