"""The policy reads JSON request bodies on routes that opt in: real OPA, real upstream, real TLS."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from tests.conftest import Upstream
from tests.helpers import running_pep
from tests.support import OpaProcess, client_context, config_doc, raw_https

from vvault_pep.app.runtime import PepRuntime
from vvault_pep.config import Config, Route

QUERY = "/v1/tenants/acme/collections/docs/query"
BODY_ROUTES: list[dict[str, Any]] = [
    {
        "name": "collection_query",
        "path": "/v1/tenants/{tenant}/collections/{collection}/query",
        "methods": ["POST"],
        "upstream": "vvault",
        "policy": "vvault/authz/decision",
        "body": {"inspect": "json", "max_bytes": 4096},
    },
    {
        "name": "blobs",  # a streamed route: its body is never read before the decision
        "path": "/v1/tenants/{tenant}/blobs/{name}",
        "methods": ["PUT"],
        "upstream": "vvault",
        "policy": "faults/allow_with_headers",
    },
]


@pytest.fixture
async def pep(pki: Path, opa: OpaProcess, upstream: Upstream) -> AsyncIterator[PepRuntime]:
    doc = config_doc(pki, opa_url=opa.url, upstream_port=upstream.port, routes=BODY_ROUTES)
    async with running_pep(Config.model_validate(doc)) as runtime:
        yield runtime


async def post(
    pep: PepRuntime, pki: Path, body: bytes, content_type: str = "application/json"
) -> tuple[int, dict[str, Any], str]:
    connector = aiohttp.TCPConnector(ssl=client_context(pki, "reader"), force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http:
        async with http.post(
            f"https://localhost:{pep.port}{QUERY}", data=body, headers={"Content-Type": content_type}
        ) as resp:
            return resp.status, json.loads(await resp.read()), resp.headers["X-Request-Id"]


async def test_policy_allows_and_denies_a_vector_query_by_its_body(
    pep: PepRuntime, pki: Path, upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    # odd spacing and key order: the upstream must get these bytes, not a re-serialisation
    good = b'{ "filter": {"tag":"faq"},\n  "top_k": 3, "vector": [0.1, 0.9] }'
    with caplog.at_level(logging.INFO, logger="vvault_pep.audit"):
        status, doc, rid = await post(pep, pki, good)
        assert status == 200, doc
        assert doc["collection"] == "docs"
        [seen] = upstream.seen_with(rid)
        assert seen["body_sha256"] == hashlib.sha256(good).hexdigest()
        assert ("Content-Length", str(len(good))) in seen["headers"]
        [record] = [r.audit for r in caplog.records if getattr(r, "audit", {}).get("request_id") == rid]  # type: ignore[attr-defined]
    assert record["input"]["request"]["body"] == {"filter": {"tag": "faq"}, "top_k": 3, "vector": [0.1, 0.9]}
    assert record["input"]["request"]["body_truncated"] is False

    for body, code in [
        (b'{"vector": [0.1], "top_k": 5000}', "policy.query_top_k"),
        (b'{"vector": [0.1], "top_k": 3, "filter": {"tenant": "globex"}}', "policy.query_filter"),
        (b'{"vector": [0.1]}', "policy.query_top_k"),
        (b'{"vector": [' + b"0.1, " * 1000 + b'0.1], "top_k": 3}', "policy.query_too_large"),  # past max_bytes
    ]:
        status, doc, rid = await post(pep, pki, body)
        assert (status, doc["code"]) == (403, code), body
        assert upstream.seen_with(rid) == []


@pytest.mark.parametrize(
    ("body", "content_type", "status", "code"),
    [
        (b'{"top_k": 3,', "application/json", 400, "sanitize.invalid_json"),
        (b'{"top_k": 3}', "text/plain", 415, "sanitize.unsupported_media_type"),
        (b"[" * 1100 + b"]" * 1100, "application/json", 400, "sanitize.invalid_json"),  # too deep to judge
    ],
)
async def test_a_body_the_policy_cannot_read_is_refused_before_it(
    pep: PepRuntime, pki: Path, upstream: Upstream, body: bytes, content_type: str, status: int, code: str
) -> None:
    got, doc, rid = await post(pep, pki, body, content_type)
    assert (got, doc["code"]) == (status, code)
    assert upstream.seen_with(rid) == []


def chunked_post(body: bytes, pieces: int = 3) -> bytes:
    size = -(-len(body) // pieces)
    chunks = [body[i : i + size] for i in range(0, len(body), size)]
    framed = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
    head = (
        f"POST {QUERY} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + framed


async def test_chunked_bodies_are_judged_and_forwarded_byte_for_byte(
    pep: PepRuntime, pki: Path, upstream: Upstream
) -> None:
    good = b'{"vector": [0.5, 0.5], "top_k": 2}'
    resp = await raw_https(pep.port, client_context(pki, "reader"), chunked_post(good))
    assert resp.status == 200, resp.body
    [seen] = upstream.seen_with(resp.headers["x-request-id"])
    assert seen["body_sha256"] == hashlib.sha256(good).hexdigest()
    # past the limit while reading: judged as truncated, denied, never forwarded
    big = b'{"vector": [' + b"0.5, " * 1000 + b'0.5], "top_k": 2}'
    resp = await raw_https(pep.port, client_context(pki, "reader"), chunked_post(big, pieces=6))
    assert resp.status == 403 and json.loads(resp.body)["code"] == "policy.query_too_large"
    assert upstream.seen_with(resp.headers["x-request-id"]) == []


async def test_streamed_routes_never_read_the_body_for_the_policy(
    pep: PepRuntime, pki: Path, upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    blob = b"{not json at all" * 1000
    connector = aiohttp.TCPConnector(ssl=client_context(pki, "reader"), force_close=True)
    with caplog.at_level(logging.INFO, logger="vvault_pep.audit"):
        async with aiohttp.ClientSession(connector=connector) as http:
            async with http.put(
                f"https://localhost:{pep.port}/v1/tenants/acme/blobs/b9",
                data=blob,
                headers={"Content-Type": "application/json"},
            ) as resp:
                assert resp.status == 201
                rid = resp.headers["X-Request-Id"]
        [record] = [r.audit for r in caplog.records if getattr(r, "audit", {}).get("request_id") == rid]  # type: ignore[attr-defined]
    assert "body" not in record["input"]["request"] and "body" not in record["stages_ms"]
    [seen] = upstream.seen_with(rid)
    assert seen["body_sha256"] == hashlib.sha256(blob).hexdigest()


def test_the_body_is_in_the_cache_key_only_when_the_route_says_so() -> None:
    base = {"name": "q", "path": "/q", "methods": ["POST"], "upstream": "u", "policy": "p/d"}
    assert Route.model_validate({**base, "body": {}}).cache.enabled is False
    keyed = Route.model_validate({**base, "body": {"cache_key": True}, "cache": {"key": ["identity.subject"]}})
    assert keyed.cache.enabled is True
    assert keyed.cache.key == ("identity.subject", "request.body", "request.body_truncated")
    whole = Route.model_validate({**base, "body": {"cache_key": True}})
    assert whole.cache.enabled is True and whole.cache.key is None  # the whole input, body included
    assert Route.model_validate(base).cache.enabled is True
    # caching asked for explicitly, without the body in the key: refused at load, never silently wrong
    with pytest.raises(ValueError, match="cache_key"):
        Route.model_validate({**base, "body": {}, "cache": {"ttl_s": 30}})
    assert Route.model_validate({**base, "body": {}, "cache": "off"}).cache.enabled is False


async def test_expect_continue_is_answered_before_the_body_is_read(
    pep: PepRuntime, pki: Path, upstream: Upstream
) -> None:
    good = b'{"vector": [1, 0], "top_k": 1}'
    connector = aiohttp.TCPConnector(ssl=client_context(pki, "reader"), force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http:
        async with http.post(
            f"https://localhost:{pep.port}{QUERY}",
            data=good,
            headers={"Content-Type": "application/json"},
            expect100=True,
        ) as resp:
            assert resp.status == 200
            rid = resp.headers["X-Request-Id"]
    [seen] = upstream.seen_with(rid)
    assert seen["body_sha256"] == hashlib.sha256(good).hexdigest()


async def test_the_documented_example_drives_the_shipped_policy(opa: OpaProcess) -> None:
    doc = json.loads(
        (Path(__file__).parent.parent / "examples" / "policy-input" / "vector-query-body.json").read_text()
    )
    greedy = json.loads(json.dumps(doc))
    greedy["request"]["body"]["top_k"] = 10_000
    async with aiohttp.ClientSession() as http:
        results = []
        for case in (doc, greedy):
            async with http.post(f"{opa.url}/v1/data/vvault/authz/decision", json={"input": case}) as resp:
                results.append((await resp.json())["result"])
    assert results[0]["allow"] is True
    assert results[1]["allow"] is False and results[1]["code"] == "policy.query_top_k"
