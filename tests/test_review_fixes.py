"""Fixes from a security review of the merged PEP, each tried as the reviewer's attack.

Real OPA with the repo's policies, real TLS with generated certificates, really signed
tokens; each test checks the status, the reason code, whether the upstream was reached
and, where it matters, the audit record.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from tests.conftest import Upstream
from tests.support import OpaProcess, client_context, config_doc, raw_https
from tests.test_body_policy import BODY_ROUTES, QUERY

from vvault_pep.app.runtime import PepRuntime
from vvault_pep.config import Config

# ------------------------------------------------------------------ inspected bodies: deadline and in-flight slot

DEADLINE_S = 1.0


@pytest.fixture
async def body_pep(pki: Path, opa: OpaProcess, upstream: Upstream) -> AsyncIterator[PepRuntime]:
    routes = [{**BODY_ROUTES[0], "body_deadline_s": DEADLINE_S}, *BODY_ROUTES[1:]]
    doc = config_doc(
        pki,
        opa_url=opa.url,
        upstream_port=upstream.port,
        routes=routes,
        limits={"body_idle_timeout_s": 30, "max_in_flight_per_client": 1},
    )
    runtime = PepRuntime(Config.model_validate(doc))
    await runtime.start()
    yield runtime
    await runtime.stop()


async def trickle(port: int, pki: Path, started: asyncio.Event) -> tuple[int, dict[str, Any], float]:
    """A JSON body sent a byte every 100 ms (never idle long enough for the idle timeout)."""
    body = b'{"vector": [0.1, 0.9], "top_k": 3' + b" " * 200 + b"}"
    head = (
        f"POST {QUERY} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=client_context(pki, "reader"), server_hostname="localhost"
    )
    t0 = time.monotonic()

    async def send() -> None:
        writer.write(head)
        await writer.drain()
        started.set()
        for byte in body:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0.1)

    sender = asyncio.create_task(send())
    try:
        async with asyncio.timeout(20):
            head_out = await reader.readuntil(b"\r\n\r\n")
            elapsed = time.monotonic() - t0  # the answer, not the server's lingering close
            length = next(
                int(line.split(b":", 1)[1])
                for line in head_out.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            rest = await reader.readexactly(length)
    finally:
        sender.cancel()
        writer.close()
    return int(head_out.split(b" ")[1]), json.loads(rest), elapsed


async def test_a_trickled_json_body_ends_at_the_body_deadline_holding_its_slot(
    body_pep: PepRuntime, pki: Path, upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    started = asyncio.Event()
    with caplog.at_level(logging.INFO, logger="vvault_pep.audit"):
        slow = asyncio.create_task(trickle(body_pep.port, pki, started))
        await started.wait()
        # the slow body holds this client's one in-flight slot while it trickles
        quick = b'{"vector": [0.1], "top_k": 3}'
        for _ in range(200):
            if body_pep.pipeline.inflight.count(f"client:cert:{_sha(pki)}"):
                break
            await asyncio.sleep(0.02)
        second = await raw_https(body_pep.port, client_context(pki, "reader"), _post(quick))
        assert (second.status, json.loads(second.body)["code"]) == (429, "ratelimit.concurrency")
        status, doc, elapsed = await slow
    assert (status, doc["code"]) == (408, "sanitize.body_deadline")
    assert elapsed < DEADLINE_S + 5  # not the 20 s the whole trickle would take
    [record] = [r.audit for r in caplog.records if getattr(r, "audit", {}).get("status") == 408]
    assert record["result"]["code"] == "sanitize.body_deadline"
    assert upstream.seen_with(doc["request_id"]) == []
    # the slot is released: the client is served again
    again = await raw_https(body_pep.port, client_context(pki, "reader"), _post(quick))
    assert again.status == 200, again.body


def _sha(pki: Path) -> str:
    import hashlib

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert = x509.load_pem_x509_certificate((pki / "client-reader.pem").read_bytes())
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def _post(body: bytes) -> bytes:
    head = (
        f"POST {QUERY} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


# ------------------------------------------------------------------ duplicate JSON keys


async def test_a_json_body_with_a_duplicate_key_is_refused(body_pep: PepRuntime, pki: Path, upstream: Upstream) -> None:
    # orjson keeps the last top_k (3, allowed); a first-wins upstream would read 5000
    resp = await raw_https(
        body_pep.port, client_context(pki, "reader"), _post(b'{"top_k": 5000, "vector": [0.1], "top_k": 3}')
    )
    doc = json.loads(resp.body)
    assert (resp.status, doc["code"]) == (400, "sanitize.invalid_json")
    assert upstream.seen_with(resp.headers["x-request-id"]) == []
    nested = b'{"top_k": 3, "vector": [0.1], "filter": {"tenant": "acme", "tenant": "globex"}}'
    resp = await raw_https(body_pep.port, client_context(pki, "reader"), _post(nested))
    assert (resp.status, json.loads(resp.body)["code"]) == (400, "sanitize.invalid_json")


# ------------------------------------------------------------------ the cache: vary, body, time, absence

VARY_BODY_ROUTE = {
    "name": "vary_query",
    "path": "/v1/tenants/{tenant}/collections/{collection}/query",
    "methods": ["POST"],
    "upstream": "vvault",
    "policy": "faults/vary_subject",  # cache.vary: [identity.subject], nothing of the body
    "body": {"inspect": "json", "cache_key": True},
    "cache": {"ttl_s": 30},
}


@pytest.fixture
async def vary_pep(pki: Path, opa: OpaProcess, upstream: Upstream) -> AsyncIterator[PepRuntime]:
    doc = config_doc(pki, opa_url=opa.url, upstream_port=upstream.port, routes=[VARY_BODY_ROUTE], cache=True)
    runtime = PepRuntime(Config.model_validate(doc))
    await runtime.start()
    yield runtime
    await runtime.stop()


async def test_a_vary_hint_never_drops_the_body_from_the_key(
    vary_pep: PepRuntime, pki: Path, upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    layers = []
    with caplog.at_level(logging.INFO, logger="vvault_pep.audit"):
        for body in (b'{"top_k": 3}', b'{"top_k": 3}', b'{"top_k": 5000, "filter": {"tenant": "globex"}}'):
            resp = await raw_https(vary_pep.port, client_context(pki, "reader"), _post(body))
            assert resp.status == 200, resp.body
            rid = resp.headers["x-request-id"]
            [record] = [r.audit for r in caplog.records if getattr(r, "audit", {}).get("request_id") == rid]
            layers.append(record["cache"])
    # the same body is a hit; another body is asked of OPA, never answered from the first's entry
    assert layers == ["miss", "l1", "miss"]


def _cache_route(pki: Path, **route: Any) -> Any:
    doc = config_doc(pki, opa_url="http://127.0.0.1:9", upstream_port=9, routes=[route], cache=True)
    return Config.model_validate(doc)


def test_a_vary_that_omits_a_path_the_policy_reads_is_ignored(pki: Path) -> None:
    from vvault_pep.decide.cache import CacheHints, DecisionCache

    config = _cache_route(
        pki, name="r", path="/x/{a}", methods=["GET"], upstream="vvault", policy="p/decision", cache={"ttl_s": 30}
    )
    [route] = config.routes
    cache = DecisionCache(config.cache, None)
    cache.opa_revision = "p:rev"
    cache.use_policy_paths({"p/decision": ("identity.subject", "request.method")}, "p:rev")
    revision, epochs = "p:rev#0#0@x", []
    alice_get = {"identity": {"subject": "alice"}, "request": {"method": "GET"}}
    alice_delete = {"identity": {"subject": "alice"}, "request": {"method": "DELETE"}}
    hints = CacheHints(30.0, ("identity.subject",), False)  # leaves out request.method, which the policy reads
    cache.store(route, alice_get, {"allow": True}, ttl_s=30, hints=hints, revision=revision, epochs=epochs)

    async def layer(doc: dict[str, Any]) -> str:
        return (await cache.lookup(route, doc, (revision, epochs)))[1]

    assert asyncio.run(layer(alice_delete)) == "miss"
    assert asyncio.run(layer(alice_get)) == "l1"
    # a vary that covers what the policy reads is honoured: other fields do not split the key
    wide = CacheHints(30.0, ("identity", "request.method"), False)
    cache.store(route, alice_get, {"allow": True}, ttl_s=30, hints=wide, revision=revision, epochs=epochs)
    assert asyncio.run(layer({**alice_get, "device": {"id": "d1"}})) == "l1"


def test_unknown_policy_paths_after_a_push_count_as_reading_the_clock(pki: Path) -> None:
    from vvault_pep.decide.cache import DecisionCache

    config = _cache_route(
        pki, name="r", path="/x/{a}", methods=["GET"], upstream="vvault", policy="p/decision", cache={"ttl_s": 30}
    )
    [route] = config.routes
    cache = DecisionCache(config.cache, None)
    cache.opa_revision = "p:rev"
    cache.use_policy_paths({"p/decision": ("identity.subject",)}, "p:rev")
    assert cache.time_dependent(route) is False  # known not to read the clock
    cache.forget_policy_paths()  # an admin pushed a module nobody analysed
    assert cache.time_dependent(route) is True


def test_a_client_value_cannot_spell_an_absent_field() -> None:
    from vvault_pep.decide.cache import project

    paths = ("request.body.owner",)
    absent = project({"request": {"body": {}}}, paths)
    spelled = project({"request": {"body": {"owner": {"$missing": True}}}}, paths)
    assert absent != spelled
    assert project({"request": {"body": {"owner": None}}}, paths) != absent


# ------------------------------------------------------------------ a trusted front proxy: one element, no address

FRONT = "spiffe://demo.vvault/client/ops"  # the front proxy, by its own certificate
READER = "spiffe://demo.vvault/client/reader"
INDEXER = "spiffe://prod.vvault/ns/platform/sa/indexer"
SECRET = "/v1/tenants/acme/secrets/db-password"


async def _front_pep(pki: Path, opa: OpaProcess, upstream: Upstream, **xfcc: Any) -> PepRuntime:
    doc = config_doc(
        pki,
        opa_url=opa.url,
        upstream_port=upstream.port,
        listener={"tls": {"client_auth": "optional"}},
        identity={"workload": {"trust_domains": ["demo.vvault", "prod.vvault"]}},
        xfcc={"trusted_proxies": [{"spiffe_id": FRONT}], **xfcc},
    )
    runtime = PepRuntime(Config.model_validate(doc))
    await runtime.start()
    return runtime


def _get(path: str, *headers: str) -> bytes:
    return "\r\n".join([f"GET {path} HTTP/1.1", "Host: localhost", *headers, "Connection: close", "", ""]).encode()


def _reader_hash(pki: Path) -> str:
    return _sha(pki)


async def test_more_than_one_xfcc_element_from_the_front_proxy_is_refused(
    pki: Path, opa: OpaProcess, upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    # a front proxy in append mode: the client wrote the first element (as the indexer), the
    # proxy appended the second
    value = f"By={FRONT};Hash={'1' * 64};URI={INDEXER},By={FRONT};Hash={_reader_hash(pki)};URI={READER}"
    runtime = await _front_pep(pki, opa, upstream)
    try:
        with caplog.at_level(logging.INFO, logger="vvault_pep.audit"):
            resp = await raw_https(
                runtime.port, client_context(pki, "ops"), _get(SECRET, f"X-Forwarded-Client-Cert: {value}")
            )
        rid = resp.headers["x-request-id"]
        assert (resp.status, json.loads(resp.body)["code"]) == (400, "sanitize.bad_xfcc")
        assert upstream.seen_with(rid) == []
        [record] = [r.audit for r in caplog.records if getattr(r, "audit", {}).get("request_id") == rid]
        assert record["result"]["code"] == "sanitize.bad_xfcc"
        # one element, as SANITIZE_SET sends: believed
        one = f"By={FRONT};Hash={_reader_hash(pki)};URI={READER}"
        resp = await raw_https(
            runtime.port, client_context(pki, "ops"), _get(SECRET, f"X-Forwarded-Client-Cert: {one}")
        )
        assert resp.status != 400
    finally:
        await runtime.stop()
    # only where every hop is yours: the last element is believed again
    runtime = await _front_pep(pki, opa, upstream, require_single_element=False)
    try:
        resp = await raw_https(
            runtime.port, client_context(pki, "ops"), _get(SECRET, f"X-Forwarded-Client-Cert: {value}")
        )
        assert resp.status != 400
    finally:
        await runtime.stop()


async def test_behind_the_front_proxy_a_request_without_a_forwarded_certificate_is_refused(
    pki: Path, opa: OpaProcess, upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    # client_auth optional: a direct client may come without a certificate, keyed on its address;
    # through the proxy that address is everyone's, so nothing would name the caller
    runtime = await _front_pep(pki, opa, upstream)
    try:
        with caplog.at_level(logging.INFO, logger="vvault_pep.audit"):
            resp = await raw_https(runtime.port, client_context(pki, "ops"), _get(SECRET))
        rid = resp.headers["x-request-id"]
        assert (resp.status, json.loads(resp.body)["code"]) == (401, "tls.client_cert_required")
        assert upstream.seen_with(rid) == []
        [record] = [r.audit for r in caplog.records if getattr(r, "audit", {}).get("request_id") == rid]
        assert record["forwarded_by"] == FRONT
        # a direct client without a certificate is still let in (and keyed on its own address)
        resp = await raw_https(runtime.port, client_context(pki, None), _get(SECRET))
        assert json.loads(resp.body).get("code") != "tls.client_cert_required"
    finally:
        await runtime.stop()


# ------------------------------------------------------------------ the admin API: token pushes, one record per call

ADMIN_TOKEN = "review-admin-token-0123456789abcdef-0123"


def _audit_of(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [r.audit for r in caplog.records if "admin_action" in getattr(r, "audit", {})]


async def _admin_call(
    port: int, pki: Path | None, method: str, path: str, body: Any = None, token: str | None = None
) -> tuple[int, Any]:
    scheme = "https" if pki is not None else "http"
    connector = aiohttp.TCPConnector(ssl=client_context(pki, "ops") if pki is not None else False, force_close=True)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession(connector=connector) as http:
        async with http.request(method, f"{scheme}://localhost:{port}{path}", json=body, headers=headers) as resp:
            text = await resp.text()
            return resp.status, json.loads(text) if text[:1] == "{" else text


async def test_the_shared_admin_token_may_not_push_opa_data_or_policies(
    pki: Path, opa: OpaProcess, upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    doc = config_doc(
        pki, opa_url=opa.url, upstream_port=upstream.port, admin={"host": "127.0.0.1", "port": 0, "token": ADMIN_TOKEN}
    )
    runtime = PepRuntime(Config.model_validate(doc))
    await runtime.start()
    try:
        for path, body in (("/admin/opa/data/faults_data/x", {"a": 1}), ("/admin/opa/policies/extra", "package x")):
            caplog.clear()
            with caplog.at_level(logging.INFO, logger="vvault_pep.audit"):
                status, answer = await _admin_call(runtime.admin_port, None, "PUT", path, body, ADMIN_TOKEN)
            assert (status, answer["code"]) == (403, "admin.push_needs_certificate"), path
            [record] = _audit_of(caplog)
            assert (record["result"], record["admin"], record["code"]) == (
                {"allow": False},
                "token",
                "admin.push_needs_certificate",
            )
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{opa.url}/v1/data/faults_data/x") as resp:
                assert (await resp.json()).get("result") is None  # OPA never written
        # the token still does what it is for
        assert (await _admin_call(runtime.admin_port, None, "GET", "/admin/cache", token=ADMIN_TOKEN))[0] == 200
    finally:
        await runtime.stop()


def test_the_report_names_an_admin_api_on_every_interface_and_without_tls(pki: Path) -> None:
    from vvault_pep.app.hardening import findings

    doc = config_doc(
        pki,
        opa_url="http://127.0.0.1:9",
        upstream_port=9,
        admin={"host": "0.0.0.0", "port": 9901, "token": ADMIN_TOKEN},
    )
    fields = {f.field for f in findings(Config.model_validate(doc))}
    assert {"admin.host", "admin.tls", "admin.token"} <= fields
    doc["admin"]["token_may_push"] = True
    assert "admin.token_may_push" in {f.field for f in findings(Config.model_validate(doc))}
    doc["admin"] = {"host": "127.0.0.1", "port": 9901}  # off: nothing to report
    assert not {"admin.host", "admin.tls"} & {f.field for f in findings(Config.model_validate(doc))}


@pytest.fixture
async def cert_admin_pep(pki: Path, opa: OpaProcess, upstream: Upstream) -> AsyncIterator[PepRuntime]:
    tls = {
        "cert_file": str(pki / "server.pem"),
        "key_file": str(pki / "server-key.pem"),
        "client_ca_file": str(pki / "ca.pem"),
    }
    doc = config_doc(
        pki,
        opa_url=opa.url,
        upstream_port=upstream.port,
        identity={"workload": {"trust_domains": ["demo.vvault"]}},
        admin={"host": "127.0.0.1", "port": 0, "policy": "vvault/admin/decision", "tls": tls},
    )
    runtime = PepRuntime(Config.model_validate(doc))
    await runtime.start()
    yield runtime
    await runtime.stop()


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "action"),
    [
        ("GET", "/admin/cache", None, 200, "cache.read"),
        ("GET", "/admin/quarantines", None, 200, "quarantine.list"),
        ("POST", "/admin/quarantines", {"scope": "subject"}, 400, "quarantine.add"),
        ("DELETE", "/admin/quarantines/nonsense/x", None, 400, "quarantine.lift"),
        ("POST", "/admin/cache/invalidate", {"scope": "subject"}, 400, "cache.invalidate"),
    ],
)
async def test_every_admin_call_gets_exactly_one_audit_record(
    cert_admin_pep: PepRuntime,
    pki: Path,
    caplog: pytest.LogCaptureFixture,
    method: str,
    path: str,
    body: Any,
    status: int,
    action: str,
) -> None:
    with caplog.at_level(logging.INFO, logger="vvault_pep.audit"):
        got, _ = await _admin_call(cert_admin_pep.admin_port, pki, method, path, body)
    assert got == status
    [record] = _audit_of(caplog)
    assert record["admin_action"] == action
    assert record["admin"] == "spiffe://demo.vvault/client/ops"
    assert record["result"] == {"allow": status < 400}
    if status >= 400:
        assert record["code"] == "admin.bad_request"
