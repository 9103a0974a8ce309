"""The request's walk end to end: real TLS, real OPA, real upstream."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import aiohttp
import orjson
import pytest
from tests.conftest import Upstream
from tests.support import client_context, get, raw_https

from vvault_pep.app.runtime import PepRuntime


async def test_allowed_read_reaches_upstream_with_pep_headers(
    client: aiohttp.ClientSession, base: str, upstream: Upstream
) -> None:
    async with client.get(f"{base}/v1/tenants/acme/secrets/db-password") as resp:
        assert resp.status == 200
        body = await resp.json()
        request_id = resp.headers["X-Request-Id"]
    assert body["value"] == "acme-s3cr3t"
    [seen] = upstream.seen_with(request_id)
    headers = dict(seen["headers"])
    assert headers["X-Forwarded-For"] == "127.0.0.1"
    assert headers["X-Forwarded-Proto"] == "https"
    assert headers["X-Forwarded-Host"].startswith("localhost")
    assert headers["X-Vvault-Client"] == "spiffe://demo.vvault/client/reader"  # the decision's upstream_headers


async def test_allowed_body_arrives_intact(client: aiohttp.ClientSession, base: str, upstream: Upstream) -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB of every byte value
    async with client.put(f"{base}/v1/tenants/acme/blobs/b1", data=payload) as resp:
        assert resp.status == 201
        doc = await resp.json()
        assert resp.headers["X-Policy"] == "faults"  # response_headers from the decision
        request_id = resp.headers["X-Request-Id"]
    assert doc["bytes"] == len(payload)
    assert doc["sha256"] == hashlib.sha256(payload).hexdigest()
    [seen] = upstream.seen_with(request_id)
    assert dict(seen["headers"])["Content-Length"] == str(len(payload))


async def test_chunked_body_is_streamed_through(client: aiohttp.ClientSession, base: str) -> None:
    parts = [b"a" * 70_000, b"b" * 3, b"c" * 200_000]

    async def gen():  # type: ignore[no-untyped-def]
        for p in parts:
            yield p

    async with client.put(f"{base}/v1/tenants/acme/blobs/chunked", data=gen()) as resp:
        assert resp.status == 201
        doc = await resp.json()
    assert doc["sha256"] == hashlib.sha256(b"".join(parts)).hexdigest()


async def test_streamed_response_arrives_whole(client: aiohttp.ClientSession, base: str) -> None:
    async with client.get(f"{base}/v1/tenants/acme/stream/5000000") as resp:
        assert resp.status == 200
        total = 0
        async for chunk in resp.content.iter_chunked(65536):
            total += len(chunk)
    assert total == 5_000_000


async def test_denied_request_gets_problem_json_and_never_reaches_upstream(
    client: aiohttp.ClientSession, base: str, upstream: Upstream
) -> None:
    async with client.get(f"{base}/v1/tenants/globex/secrets/db-password") as resp:
        assert resp.status == 403
        assert resp.headers["Content-Type"] == "application/problem+json"
        doc = await resp.json(content_type=None)
        request_id = resp.headers["X-Request-Id"]
    assert doc["status"] == 403
    assert resp.headers["Server"] == "vvault-pep"  # no framework or version disclosed
    assert doc["code"] == "policy.tenant_not_entitled"
    assert doc["title"] == "Forbidden"
    assert doc["type"].endswith("policy.tenant_not_entitled")
    assert doc["request_id"] == request_id
    assert doc["decision_id"]
    assert "globex-s3cr3t" not in str(doc)
    assert upstream.seen_with(request_id) == []


async def test_admin_area_denied(client: aiohttp.ClientSession, base: str, upstream: Upstream) -> None:
    async with client.get(f"{base}/v1/admin/tenants") as resp:
        assert resp.status == 403
        doc = await resp.json(content_type=None)
        assert upstream.seen_with(resp.headers["X-Request-Id"]) == []
    assert doc["code"] == "policy.admin_denied"


async def test_spoofed_identity_and_forwarding_headers_never_reach_upstream(
    client: aiohttp.ClientSession, base: str, upstream: Upstream
) -> None:
    spoofed = {
        "X-Forwarded-For": "10.9.9.9",
        "X-Forwarded-Host": "evil.example",
        "X-Forwarded-Proto": "http",
        "Forwarded": "for=10.9.9.9;proto=http",
        "X-Real-IP": "10.9.9.9",
        "X-Client-Cert": "spoofed",
        "X-SSL-Client-Verify": "SUCCESS",
        "X-Vvault-Client": "spiffe://demo.vvault/client/ops",
        "X-Device-Posture": "managed=true",
        "X-Request-Id": "client-chosen",
        "X-Original-URL": "/v1/admin/tenants",
        "X-HTTP-Method-Override": "DELETE",
        "X_Forwarded_For": "10.9.9.9",
        "X-Keep-Me": "yes",
    }
    async with client.get(f"{base}/v1/tenants/acme/secrets/db-password", headers=spoofed) as resp:
        assert resp.status == 200
        request_id = resp.headers["X-Request-Id"]
    assert request_id != "client-chosen"
    [seen] = upstream.seen_with(request_id)
    names = [k.lower() for k, _ in seen["headers"]]
    values = [v for _, v in seen["headers"]]
    assert "10.9.9.9" not in str(values)
    assert "evil.example" not in values
    assert "spoofed" not in values and "SUCCESS" not in values and "managed=true" not in values
    for name in (
        "forwarded",
        "x-real-ip",
        "x-client-cert",
        "x-ssl-client-verify",
        "x-device-posture",
        "x-original-url",
        "x-http-method-override",
        "x_forwarded_for",
    ):
        assert name not in names
    assert names.count("x-forwarded-for") == 1
    headers = dict(seen["headers"])
    assert headers["X-Vvault-Client"] == "spiffe://demo.vvault/client/reader"
    assert headers["X-Keep-Me"] == "yes"


async def test_connection_named_headers_and_upgrade_are_hop_by_hop(
    pep: PepRuntime, pki: Path, upstream: Upstream
) -> None:
    # h2c smuggling: "Upgrade: h2c" must never reach the upstream.
    resp = await raw_https(
        pep.port,
        client_context(pki, "reader"),
        b"GET /v1/tenants/acme/secrets/db-password HTTP/1.1\r\nHost: localhost\r\n"
        b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\nX-Secret-Hop: 1\r\n"
        b"Connection: close, Upgrade, HTTP2-Settings, X-Secret-Hop\r\n\r\n",
    )
    assert resp.status == 200
    [seen] = upstream.seen_with(resp.headers["x-request-id"])
    names = {k.lower() for k, _ in seen["headers"]}
    assert not names & {"upgrade", "http2-settings", "x-secret-hop"}


@pytest.mark.parametrize(
    ("raw_path", "status", "policy_path"),
    [
        # normalised, then judged on the normalised path
        ("/v1/tenants/acme/secrets/../secrets/db-password", 200, "/v1/tenants/acme/secrets/db-password"),
        ("/v1/tenants/acme//secrets///db-password", 200, "/v1/tenants/acme/secrets/db-password"),
        ("/v1/tenants/acme/./secrets/db-password", 200, "/v1/tenants/acme/secrets/db-password"),
        ("/v1/%74enants/acme/secrets/db%2Dpassword", 200, "/v1/tenants/acme/secrets/db-password"),
        (
            "/v1/tenants/acme/secrets/%2e%2e/%2E%2E/globex/secrets/db-password",
            403,
            "/v1/tenants/globex/secrets/db-password",
        ),
        ("/v1/tenants/acme/secrets/../../globex/secrets/db-password", 403, "/v1/tenants/globex/secrets/db-password"),
        ("/v1/tenants/acme/../../admin/tenants", 403, "/v1/admin/tenants"),
    ],
)
async def test_path_variants_are_normalised_and_upstream_sees_the_policy_path(
    pep: PepRuntime,
    pki: Path,
    upstream: Upstream,
    caplog: pytest.LogCaptureFixture,
    raw_path: str,
    status: int,
    policy_path: str,
) -> None:
    with caplog.at_level(logging.INFO, logger="vvault_pep.audit"):
        resp = await raw_https(pep.port, client_context(pki, "reader"), get(raw_path))
    assert resp.status == status
    [record] = [
        r.audit for r in caplog.records if getattr(r, "audit", {}).get("request_id") == resp.headers["x-request-id"]
    ]
    assert record["request_path"] == policy_path
    seen = upstream.seen_with(resp.headers["x-request-id"])
    if status == 200:
        assert [s["raw_path"] for s in seen] == [policy_path]
    else:
        assert seen == []


@pytest.mark.parametrize(
    ("raw_path", "code"),
    [
        ("/v1/tenants/acme/secrets/a%2Fb", "sanitize.ambiguous_path"),
        ("/v1/tenants/acme/secrets/a%2fb", "sanitize.ambiguous_path"),
        ("/v1/tenants/acme%2F..%2Fglobex/secrets/db-password", "sanitize.ambiguous_path"),
        ("/v1/tenants/acme/secrets/a%5Cb", "sanitize.ambiguous_path"),
        ("/v1/tenants/acme/secrets/a%00b", "sanitize.ambiguous_path"),
        ("/v1/tenants/acme/secrets/%c0%ae%c0%ae", "sanitize.ambiguous_path"),  # overlong UTF-8 '..'
        ("/v1/tenants/acme/secrets/%252e%252e", "sanitize.ambiguous_path"),  # double encoding
        ("/v1/tenants/acme/secrets/%zz", "sanitize.ambiguous_path"),
        ("/../v1/tenants/acme/secrets/db-password", "sanitize.path_escape"),
        ("/v1/%2e%2e/%2e%2e/etc", "sanitize.path_escape"),
    ],
)
async def test_ambiguous_paths_are_rejected_before_routing(
    pep: PepRuntime, pki: Path, upstream: Upstream, raw_path: str, code: str
) -> None:
    resp = await raw_https(pep.port, client_context(pki, "reader"), get(raw_path))
    assert resp.status == 400
    assert resp.headers["content-type"] == "application/problem+json"
    doc = orjson.loads(resp.body)
    assert doc["code"] == code
    assert upstream.seen_with(resp.headers["x-request-id"]) == []


async def test_backslash_is_refused(pep: PepRuntime, pki: Path, upstream: Upstream) -> None:
    resp = await raw_https(pep.port, client_context(pki, "reader"), get("/v1/tenants/acme\\..\\globex/secrets/x"))
    assert resp.status == 400
    assert upstream.seen_path("/v1/tenants/globex/secrets/x") == []


async def test_query_is_forwarded_unchanged(pep: PepRuntime, pki: Path, upstream: Upstream) -> None:
    resp = await raw_https(
        pep.port, client_context(pki, "reader"), get("/v1/tenants/acme/secrets/db-password?v=1&v=%32&x=a+b")
    )
    assert resp.status == 200
    [seen] = upstream.seen_with(resp.headers["x-request-id"])
    assert seen["raw_path"] == "/v1/tenants/acme/secrets/db-password?v=1&v=%32&x=a+b"


@pytest.mark.parametrize(
    ("request_bytes", "code"),
    [
        (
            b"GET /v1/tenants/acme/secrets/db-password HTTP/1.1\r\nHost: localhost\r\nHost: evil\r\n"
            b"Connection: close\r\n\r\n",
            "sanitize.duplicate_header",
        ),
        (
            b"GET /v1/tenants/acme/secrets/db-password HTTP/1.1\r\nConnection: close\r\n\r\n",
            "sanitize.duplicate_header",
        ),
        (
            b"GET /v1/tenants/acme/secrets/db-password HTTP/1.1\r\nHost: localhost\r\n"
            b"Authorization: Bearer a\r\nAuthorization: Bearer b\r\nConnection: close\r\n\r\n",
            "sanitize.duplicate_header",
        ),
        (
            b"GET /v1/tenants/acme/secrets/db-password HTTP/1.1\r\nHost: localhost\r\n"
            b"Expect: something-else\r\nConnection: close\r\n\r\n",
            "sanitize.expectation",
        ),
        (
            b"GET http://evil.example/v1/tenants/acme/secrets/db-password HTTP/1.1\r\nHost: localhost\r\n"
            b"Connection: close\r\n\r\n",
            "sanitize.bad_request_target",
        ),
    ],
)
async def test_ambiguous_headers_are_rejected(
    pep: PepRuntime, pki: Path, upstream: Upstream, request_bytes: bytes, code: str
) -> None:
    resp = await raw_https(pep.port, client_context(pki, "reader"), request_bytes)
    # only an Expect the PEP does not understand is a 417; every other shape is a 400
    assert resp.status == (417 if code == "sanitize.expectation" else 400)
    assert orjson.loads(resp.body)["code"] == code
    assert upstream.seen_with(resp.headers["x-request-id"]) == []


@pytest.mark.parametrize(
    "request_bytes",
    [
        # CL.TE and TE.CL smuggling shapes
        b"PUT /v1/tenants/acme/blobs/x HTTP/1.1\r\nHost: localhost\r\nContent-Length: 4\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /v1/admin/tenants HTTP/1.1\r\nHost: localhost\r\n\r\n",
        b"PUT /v1/tenants/acme/blobs/x HTTP/1.1\r\nHost: localhost\r\n"
        b"Content-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
        b"PUT /v1/tenants/acme/blobs/x HTTP/1.1\r\nHost: localhost\r\n"
        b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        b"PUT /v1/tenants/acme/blobs/x HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
        b"GET /v1/tenants/acme/secrets/db-password HTTP/1.1\r\nHost: localhost\r\nX-A: a\rb\r\n\r\n",
        b"GET /v1/tenants/acme/secrets/db-password HTTP/1.1\r\nHost: localhost\r\nX-A: a\x00b\r\n\r\n",
    ],
)
async def test_smuggling_shapes_get_400_and_reach_nobody(
    pep: PepRuntime, pki: Path, upstream: Upstream, request_bytes: bytes
) -> None:
    before = upstream.count()
    resp = await raw_https(pep.port, client_context(pki, "reader"), request_bytes)
    assert resp.status == 400
    assert upstream.count() == before
    assert upstream.seen_path("/v1/admin/tenants") == []


async def test_unknown_route_is_404_problem(client: aiohttp.ClientSession, base: str) -> None:
    async with client.get(f"{base}/v1/unknown/thing") as resp:
        assert resp.status == 404
        assert resp.headers["Content-Type"] == "application/problem+json"
        assert (await resp.json(content_type=None))["code"] == "route.not_found"
        assert resp.headers["X-Request-Id"]


async def test_wrong_method_is_405_with_allow(client: aiohttp.ClientSession, base: str) -> None:
    async with client.post(f"{base}/v1/tenants/acme/secrets/x", data=b"{}") as resp:
        assert resp.status == 405
        assert set(resp.headers["Allow"].split(", ")) == {"GET", "HEAD", "PUT", "DELETE"}


async def test_undefined_decision_is_a_deny(client: aiohttp.ClientSession, base: str, upstream: Upstream) -> None:
    async with client.get(f"{base}/undefined/x") as resp:
        assert resp.status == 403
        assert (await resp.json(content_type=None))["code"] == "pdp.undefined"
        assert upstream.seen_with(resp.headers["X-Request-Id"]) == []


@pytest.mark.parametrize(
    ("shape", "status", "code"),
    [
        ("plain_false", 403, "policy.denied"),
        ("string_decision", 403, "pdp.malformed_decision"),
        ("allow_as_string", 403, "pdp.malformed_decision"),
        ("status_out_of_range", 403, "pdp.malformed_decision"),
        ("status_as_bool", 403, "pdp.malformed_decision"),
        ("crlf_header", 403, "pdp.malformed_decision"),
        ("reserved_header", 403, "pdp.malformed_decision"),
        ("obligation", 403, "enforce.unsupported_obligation"),
        ("custom_status", 429, "policy.rate_limited"),
        ("conflict", 503, "pdp.error"),
    ],
)
async def test_decision_shapes_from_real_opa(
    client: aiohttp.ClientSession, base: str, upstream: Upstream, shape: str, status: int, code: str
) -> None:
    async with client.get(f"{base}/shape/{shape}") as resp:
        assert resp.status == status
        doc = await resp.json(content_type=None)
        assert upstream.seen_with(resp.headers["X-Request-Id"]) == []
        if shape == "custom_status":
            assert resp.headers["Retry-After"] == "3"
            assert doc["detail"] == "slow down"
    assert doc["code"] == code


async def test_monitor_mode_forwards_a_deny_and_records_it(
    client: aiohttp.ClientSession, base: str, upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="vvault_pep.audit"):
        async with client.get(f"{base}/monitor/v1/tenants/acme/secrets/db-password") as resp:
            request_id = resp.headers["X-Request-Id"]
            status, ctype = resp.status, resp.headers.get("Content-Type", "")
    # The upstream's own answer (the example API has no /monitor/ path: 404), never the PEP's 403.
    assert (status, ctype.startswith("application/problem+json")) == (404, False)
    assert len(upstream.seen_with(request_id)) == 1
    [record] = [r.audit for r in caplog.records if getattr(r, "audit", {}).get("request_id") == request_id]
    assert record["enforced"] is False
    assert (record["status"], record["upstream_status"]) == (404, 404)
    assert record["result"]["code"] == "policy.denied"
    assert record["would_have"] == {"status": 403, "code": "policy.denied"}
    assert record["result"]["allow"] is False


async def test_upstream_down_is_502(client: aiohttp.ClientSession, base: str) -> None:
    async with client.get(f"{base}/down/x") as resp:
        assert resp.status == 502
        assert (await resp.json(content_type=None))["code"] == "upstream.unavailable"


async def test_upstream_timeout_is_504(client: aiohttp.ClientSession, base: str) -> None:
    async with client.get(f"{base}/hang/x") as resp:
        assert resp.status == 504
        assert (await resp.json(content_type=None))["code"] == "upstream.timeout"


async def test_every_request_is_audited_without_secrets(
    client: aiohttp.ClientSession, base: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="vvault_pep.audit"):
        async with client.get(
            f"{base}/v1/tenants/acme/secrets/db-password", headers={"Authorization": "Token sekrit-token"}
        ) as resp:
            request_id = resp.headers["X-Request-Id"]
    [record] = [r.audit for r in caplog.records if getattr(r, "audit", {}).get("request_id") == request_id]
    assert record["result"] == {
        "allow": True,
        "status": 200,
        "code": "policy.allowed",
        "reasons": ["read within an entitled tenant"],
    }
    assert record["route"] == "secrets"
    assert record["path"] == "vvault/authz/decision"
    assert record["spiffe_id"] == "spiffe://demo.vvault/client/reader"
    assert record["upstream_status"] == 200
    assert set(record["stages_ms"]) == {
        "sanitize",
        "route",
        "authn",
        "posture",
        "context",
        "cache",
        "pdp",
        "upstream",
    }
    assert record["cache"] == "bypass"
    assert "sekrit" not in orjson.dumps(record).decode()


async def test_requests_the_parser_refuses_are_on_record_too(
    pep: PepRuntime, pki: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="vvault_pep.audit"):
        resp = await raw_https(
            pep.port,
            client_context(pki, "reader"),
            b"GET /v1/tenants/acme/secrets/db-password HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        )
    assert resp.status == 400
    [record] = [
        r.audit for r in caplog.records if getattr(r, "audit", {}).get("request_id") == resp.headers["x-request-id"]
    ]
    assert record["result"]["code"] == "sanitize.duplicate_header"
    assert record["status"] == 400
