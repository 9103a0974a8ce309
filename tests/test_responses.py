"""The answer is judged too: redaction holds through Range, validators and HEAD; the
upstream's headers pass a policy; the PEP's own headers cannot be forged by it.

The upstream here is a small loopback aiohttp app that does what real frameworks do:
it honours ``Range`` (one range or ``multipart/byteranges``), ``If-Range``,
``If-None-Match`` and ``If-Modified-Since``, and its ``ETag`` is the SHA-256 of the
full body — the validator that leaked a redacted PIN.  A second set of its paths
misbehave on purpose.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import AsyncIterator
from email.utils import format_datetime, parsedate_to_datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from tests.support import OpaProcess, client_context, config_doc

from vvault_pep.app.runtime import PepRuntime
from vvault_pep.config import Config
from vvault_pep.core import responses

PIN = "4711-zq"  # not hex: a request or decision id can never contain it by chance
DOC = {"path": "pin", "owner": "alice", "value": PIN}
BODY = orjson.dumps(DOC)
REDACTED = orjson.dumps({"path": "pin", "owner": "alice"})
ETAG = '"' + hashlib.sha256(BODY).hexdigest() + '"'
MODIFIED = parsedate_to_datetime("Tue, 01 Dec 2026 10:00:00 GMT")
VALUE_AT = BODY.index(PIN.encode())
SEEN: list[dict[str, Any]] = []

NOISY_HEADERS = [
    ("Server", "Apache/2.4.1 (Unix) OpenSSL/1.0.2k"),
    ("X-Powered-By", "PHP/5.6.40"),
    ("X-AspNet-Version", "4.0.30319"),
    ("X-Debug-Token", "a1b2c3"),
    ("X-Internal-Node", "10.2.3.4"),
    ("X-Vvault-Redacted", "nothing"),
    ("X-Vvault-Tenant", "globex"),
    ("X-Decision-Cache", "l1"),
    ("X-Request-Id", "forged-by-the-upstream"),
    ("Strict-Transport-Security", "max-age=0"),
    ("Alt-Svc", 'h2="evil.example:443"'),
    ("X-Policy", "from-the-upstream"),
    ("X-App-Note", "kept"),
    ("Connection", "X-Hop-Secret"),
    ("X-Hop-Secret", "only-for-the-next-hop"),
    ("Set-Cookie", "parent=1; Domain=example.com; Secure; Path=/"),
    ("Set-Cookie", "plain=1; Path=/"),
    ("Set-Cookie", "sneaky=1; Domain=example.com; Domain=; Secure"),
    ("Set-Cookie", "good=1; Path=/; Secure; HttpOnly; SameSite=Strict"),
]


def _seen(request: web.Request) -> None:
    SEEN.append({"method": request.method, "path": request.path, "headers": dict(request.headers)})


async def honest(request: web.Request) -> web.StreamResponse:
    """A representation with every validator and partial-content feature a framework offers."""
    _seen(request)
    validators = {"ETag": ETAG, "Last-Modified": format_datetime(MODIFIED, usegmt=True), "Accept-Ranges": "bytes"}
    if request.headers.get("If-None-Match") == ETAG or (
        "If-Modified-Since" in request.headers
        and parsedate_to_datetime(request.headers["If-Modified-Since"]) >= MODIFIED
    ):
        return web.Response(status=304, headers=validators)
    wanted = request.headers.get("Range")
    if wanted and request.headers.get("If-Range", ETAG) == ETAG:
        if "," in wanted:
            with aiohttp.MultipartWriter("byteranges") as parts:
                for spec in wanted.removeprefix("bytes=").split(","):
                    start, end = (int(x) for x in spec.split("-"))
                    part = parts.append(BODY[start : end + 1], {"Content-Type": "application/json"})
                    part.headers["Content-Range"] = f"bytes {start}-{end}/{len(BODY)}"
            return web.Response(status=206, body=parts, headers=validators)
        piece = request.http_range
        start = piece.start or 0
        chunk = BODY[piece]
        headers = {**validators, "Content-Range": f"bytes {start}-{start + len(chunk) - 1}/{len(BODY)}"}
        return web.Response(status=206, body=chunk, headers=headers, content_type="application/json")
    return web.Response(body=BODY, headers=validators, content_type="application/json")


async def always_partial(request: web.Request) -> web.Response:
    _seen(request)
    value = BODY[VALUE_AT : VALUE_AT + len(PIN)]
    content_range = f"bytes {VALUE_AT}-{VALUE_AT + len(PIN) - 1}/{len(BODY)}"
    return web.Response(
        status=206, body=value, content_type="application/json", headers={"Content-Range": content_range}
    )


async def byteranges(request: web.Request) -> web.Response:
    _seen(request)
    with aiohttp.MultipartWriter("byteranges") as parts:
        parts.append(BODY, {"Content-Type": "application/json"})
    return web.Response(body=parts)


async def content_range(request: web.Request) -> web.Response:
    _seen(request)
    return web.Response(
        body=BODY, content_type="application/json", headers={"Content-Range": f"bytes 0-{len(BODY) - 1}/{len(BODY)}"}
    )


async def not_modified(request: web.Request) -> web.Response:
    _seen(request)
    return web.Response(status=304, headers={"ETag": ETAG})


async def no_content(request: web.Request) -> web.Response:
    _seen(request)
    return web.Response(status=204, headers={"ETag": ETAG, "X-App-Note": "kept"})


async def noisy(request: web.Request) -> web.Response:
    _seen(request)
    response = web.Response(body=BODY, content_type="application/json")
    for key, value in NOISY_HEADERS:
        response.headers.add(key, value)
    return response


def _route(name: str, prefix: str, policy: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "path": f"/{prefix}/{{kind}}",
        "methods": ["GET", "HEAD", "PUT"],
        "upstream": "test",
        "policy": policy,
        **extra,
    }


ROUTES = [
    _route("redacted", "r", "faults/lister"),
    _route("plain", "p", "faults/plain_true"),
    {**_route("decided", "d", "faults/allow_with_headers"), "path": "/d/{tenant}"},  # the policy reads a tenant
    _route("more_drops", "m", "faults/plain_true", responses={"drop": ["X-App-Note"]}),
    _route("allow_list", "a", "faults/plain_true", responses={"allow": ["X-App-Note"]}),
    _route("cookies_dropped", "cd", "faults/plain_true", responses={"set_cookie": "drop"}),
    _route("cookies_passed", "cp", "faults/plain_true", responses={"set_cookie": "pass"}),
]


@pytest.fixture(scope="module")
async def test_upstream() -> AsyncIterator[int]:
    app = web.Application()
    for path, handler in (
        ("/r/honest", honest),
        ("/r/partial", always_partial),
        ("/r/byteranges", byteranges),
        ("/r/content-range", content_range),
        ("/r/not-modified", not_modified),
        ("/r/no-content", no_content),
        ("/p/honest", honest),
    ):
        app.router.add_get(path, handler)
    app.router.add_route("*", "/{prefix}/noisy", noisy)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield runner.addresses[0][1]
    await runner.cleanup()


@pytest.fixture(scope="module")
async def pep(pki: Path, opa: OpaProcess, test_upstream: int) -> AsyncIterator[PepRuntime]:
    doc = config_doc(pki, opa_url=opa.url, upstream_port=test_upstream, routes=ROUTES)
    doc["upstreams"] = {"test": {"url": f"http://127.0.0.1:{test_upstream}"}}
    runtime = PepRuntime(Config.model_validate(doc))
    await runtime.start()
    yield runtime
    await runtime.stop()


@pytest.fixture
async def http(pki: Path) -> AsyncIterator[aiohttp.ClientSession]:
    connector = aiohttp.TCPConnector(ssl=client_context(pki, "reader"))
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
        yield session


async def _ask(
    http: aiohttp.ClientSession, port: int, method: str, path: str, headers: dict[str, str] | None = None
) -> tuple[int, Any, bytes]:
    async with http.request(method, f"https://localhost:{port}{path}", headers=headers or {}) as resp:
        return resp.status, resp.headers, await resp.read()


def _upstream_saw(path: str) -> dict[str, Any]:
    return [s for s in SEEN if s["path"] == path][-1]


async def test_the_test_upstream_really_leaks_through_range_and_validators(test_upstream: int) -> None:
    """Without the PEP, each of these would reveal the PIN: the attacks are real."""
    async with aiohttp.ClientSession() as direct:
        url = f"http://127.0.0.1:{test_upstream}/r/honest"
        async with direct.get(url, headers={"Range": f"bytes={VALUE_AT}-{VALUE_AT + len(PIN) - 1}"}) as resp:
            assert resp.status == 206
            assert await resp.read() == PIN.encode()
        async with direct.get(url, headers={"If-None-Match": ETAG}) as resp:
            assert resp.status == 304
        async with direct.get(url) as resp:
            assert resp.headers["ETag"] == ETAG  # a digest of the body with the PIN in it


@pytest.mark.parametrize(
    "headers",
    [
        {"Range": f"bytes={VALUE_AT}-{VALUE_AT + len(PIN) - 1}"},
        {"Range": f"bytes={VALUE_AT}-{VALUE_AT + len(PIN) - 1}", "If-Range": ETAG},
        {"Range": f"bytes=0-1,{VALUE_AT}-{VALUE_AT + len(PIN) - 1}"},
        {"Range": f"bytes=-{len(BODY) - VALUE_AT}"},
    ],
    ids=["range", "if-range", "multi-range", "suffix-range"],
)
async def test_range_on_a_redacted_route_gets_the_whole_redacted_answer(
    pep: PepRuntime, http: aiohttp.ClientSession, headers: dict[str, str]
) -> None:
    status, got, body = await _ask(http, pep.port, "GET", "/r/honest", headers)
    assert status == 200
    assert body == REDACTED
    assert PIN.encode() not in body
    assert "Content-Range" not in got
    assert got["Accept-Ranges"] == "none"
    seen = _upstream_saw("/r/honest")["headers"]
    assert "Range" not in seen and "If-Range" not in seen


async def test_validators_and_conditionals_are_no_oracle(pep: PepRuntime, http: aiohttp.ClientSession) -> None:
    status, got, body = await _ask(http, pep.port, "GET", "/r/honest")
    assert status == 200 and body == REDACTED
    assert "ETag" not in got and "Last-Modified" not in got
    # The right guess of the full-body ETag, and a date after the change: still a plain 200.
    for conditional in ({"If-None-Match": ETAG}, {"If-Modified-Since": "Wed, 02 Dec 2026 10:00:00 GMT"}):
        status, got, body = await _ask(http, pep.port, "GET", "/r/honest", conditional)
        assert (status, body) == (200, REDACTED)
        seen = _upstream_saw("/r/honest")["headers"]
        assert "If-None-Match" not in seen and "If-Modified-Since" not in seen


@pytest.mark.parametrize("precondition", [{"If-Match": ETAG}, {"If-Unmodified-Since": "Wed, 02 Dec 2026 10:00:00 GMT"}])
async def test_preconditions_on_a_redacted_route_are_refused(
    pep: PepRuntime, http: aiohttp.ClientSession, precondition: dict[str, str]
) -> None:
    before = len(SEEN)
    status, _, body = await _ask(http, pep.port, "GET", "/r/honest", precondition)
    assert status == 400
    assert orjson.loads(body)["code"] == "enforce.conditional_refused"
    assert len(SEEN) == before  # the upstream was not asked


async def test_head_on_a_redacted_route_works_and_describes_the_redacted_body(
    pep: PepRuntime, http: aiohttp.ClientSession
) -> None:
    status, got, body = await _ask(http, pep.port, "HEAD", "/r/honest")
    assert status == 200
    assert body == b""
    assert int(got["Content-Length"]) == len(REDACTED)  # not the full body's length
    assert "ETag" not in got and "Last-Modified" not in got
    assert got["X-Vvault-Redacted"] == "value"
    assert _upstream_saw("/r/honest")["method"] == "GET"


@pytest.mark.parametrize(
    ("path", "why"),
    [
        ("/r/partial", "206"),
        ("/r/byteranges", "multipart/byteranges"),
        ("/r/content-range", "Content-Range"),
        ("/r/not-modified", "304"),
    ],
)
async def test_partial_answers_on_a_redacted_route_are_withheld_and_the_record_says_why(
    pep: PepRuntime, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture, path: str, why: str
) -> None:
    with caplog.at_level(logging.INFO, logger="vvault_pep.audit"):
        status, got, body = await _ask(http, pep.port, "GET", path)
    assert status == 502
    assert PIN.encode() not in body
    assert orjson.loads(body)["code"] == "enforce.partial_answer"
    [record] = [r.audit for r in caplog.records if getattr(r, "audit", {}).get("request_id") == got["X-Request-Id"]]
    assert record["status"] == 502
    assert record["result"]["allow"] is True  # the policy allowed; the answer was withheld
    assert record["error"]["code"] == "enforce.partial_answer"
    assert why in record["error"]["reason"]


async def test_no_content_on_a_redacted_route_passes_without_validators(
    pep: PepRuntime, http: aiohttp.ClientSession
) -> None:
    status, got, body = await _ask(http, pep.port, "GET", "/r/no-content")
    assert (status, body) == (204, b"")
    assert "ETag" not in got and "Content-Length" not in got
    assert got["X-App-Note"] == "kept"


async def test_range_still_works_where_nothing_is_redacted(pep: PepRuntime, http: aiohttp.ClientSession) -> None:
    status, got, body = await _ask(http, pep.port, "GET", "/p/honest", {"Range": "bytes=0-3"})
    assert (status, body) == (206, BODY[:4])
    assert got["ETag"] == ETAG


async def test_a_misbehaving_upstreams_headers_stop_at_the_pep(pep: PepRuntime, http: aiohttp.ClientSession) -> None:
    for prefix in ("p", "r"):  # the streamed answer and the redacted one
        status, got, body = await _ask(http, pep.port, "GET", f"/{prefix}/noisy")
        assert status == 200
        assert (PIN.encode() in body) is (prefix == "p")
        names = {k.lower() for k in got}
        for gone in (
            "x-powered-by",
            "x-aspnet-version",
            "x-debug-token",
            "x-internal-node",
            "x-vvault-tenant",
            "x-decision-cache",
            "strict-transport-security",
            "alt-svc",
            "x-hop-secret",
        ):
            assert gone not in names, gone
        assert got["Server"] == "vvault-pep"
        assert got.getall("X-Request-Id") == [got["X-Request-Id"]] != ["forged-by-the-upstream"]
        assert got.getall("X-Vvault-Redacted", []) == (["value"] if prefix == "r" else [])
        assert got.getall("Set-Cookie") == ["good=1; Path=/; Secure; HttpOnly; SameSite=Strict"]
        assert got["X-App-Note"] == "kept"


async def test_the_decisions_response_headers_apply_last(pep: PepRuntime, http: aiohttp.ClientSession) -> None:
    status, got, _ = await _ask(http, pep.port, "GET", "/d/noisy")
    assert status == 200
    assert got.getall("X-Policy") == ["faults"]  # the policy's value, not the upstream's beside it


async def test_per_route_drops_allow_list_and_cookie_rules(pep: PepRuntime, http: aiohttp.ClientSession) -> None:
    _, got, _ = await _ask(http, pep.port, "GET", "/m/noisy")
    assert "X-App-Note" not in got
    _, got, body = await _ask(http, pep.port, "GET", "/a/noisy")
    assert body == BODY
    upstream_names = {k.lower() for k in got} - {"x-request-id", "server", "date"}
    assert upstream_names == {"x-app-note", "content-type", "content-length", "set-cookie"}
    _, got, _ = await _ask(http, pep.port, "GET", "/cd/noisy")
    assert "Set-Cookie" not in got
    _, got, _ = await _ask(http, pep.port, "GET", "/cp/noisy")
    assert len(got.getall("Set-Cookie")) == 4
    assert "X-Decision-Cache" not in got  # PEP-owned headers go whatever the cookie rule


@pytest.mark.parametrize(
    ("cookie", "passes"),
    [
        ("s=1; Secure", True),
        ("s=1; Path=/; secure; HttpOnly; SameSite=Lax", True),
        ("__Host-s=1; Secure; Path=/", True),
        ("s=1", False),  # cleartext
        ("s=1; Path=/", False),
        ("s=1; Domain=example.com; Secure", False),  # every sibling host
        ("s=1; domain=.example.com; Secure", False),
        ("s=1; Domain=example.com; Domain=; Secure", False),  # browsers ignore the empty one
        ("s=1; Domain=; Secure", False),  # any Domain at all
        ("s=1; Secure=no; Domain =x", False),
        ("Secure", False),  # no name=value pair: browsers ignore it
        ("=1; Secure", False),
    ],
)
def test_host_only_secure_reads_cookies_as_a_browser_does(cookie: str, passes: bool) -> None:
    assert responses.cookie_passes(cookie, "host_only_secure") is passes
    assert responses.cookie_passes(cookie, "pass") is True
    assert responses.cookie_passes(cookie, "drop") is False


@pytest.mark.parametrize(
    ("status", "headers", "partial"),
    [
        (200, [("Content-Type", "application/json")], False),
        (404, [("Content-Type", "application/problem+json")], False),
        (206, [("Content-Type", "application/json")], True),
        (304, [], True),
        (200, [("content-range", "bytes 0-9/10")], True),
        (200, [("Content-Type", "Multipart/ByteRanges; boundary=x")], True),
    ],
)
def test_partial_answers_are_recognised(status: int, headers: list[tuple[str, str]], partial: bool) -> None:
    assert (responses.partial_reason(status, headers) is not None) is partial


def test_pep_owned_headers_go_even_from_an_allow_list() -> None:
    policy = responses.HeaderPolicy(frozenset(), (), frozenset({"x-vvault-redacted", "x-request-id", "x-app"}), "drop")
    kept = responses.pass_headers(
        [("X-Vvault-Redacted", "no"), ("X-Request-Id", "forged"), ("X-App", "1"), ("X-Other", "2")], policy
    )
    assert kept == [("X-App", "1")]
