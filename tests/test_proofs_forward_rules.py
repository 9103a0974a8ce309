"""The forwarder's rules, driven directly: :class:`~vvault_pep.edge.forward.Upstreams` between two sockets.

A small front server (plain aiohttp on loopback) hands each request it receives to
``Upstreams.forward`` and answers with what it returns — or, for a :class:`PepError`, with the
code, detail and headers as JSON.  Behind it an aiohttp upstream records exactly what arrived.
Checked: what the upstream receives (method, target, headers, body, ``Host`` and
``Accept-Encoding`` rules), what the client receives (status, headers, the PEP's ``Server``,
the decision's response headers, the redacted body and its headers), every refusal's code and
detail, and the :class:`~vvault_pep.edge.forward.Outcome` (bytes each way, why it was aborted).
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from yarl import URL

from vvault_pep.config.models import Upstream
from vvault_pep.core import responses
from vvault_pep.edge import forward, listener
from vvault_pep.edge.forward import Outcome, Upstreams, upstream_ssl
from vvault_pep.errors import PepError


@dataclass
class Seen:
    method: str
    path_qs: str
    headers: dict[str, str]
    body: bytes
    peer: Any = None


@dataclass
class Back:
    port: int = 0
    seen: list[Seen] = field(default_factory=list)


Answer = Callable[[web.Request], Awaitable[web.StreamResponse]]


@asynccontextmanager
async def back(answer: Answer | None = None, ssl_context: ssl.SSLContext | None = None) -> AsyncIterator[Back]:
    b = Back()

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        peer = request.transport.get_extra_info("peername") if request.transport else None
        b.seen.append(Seen(request.method, request.raw_path, dict(request.headers), body, peer))
        if answer is not None:
            return await answer(request)
        return web.json_response({"ok": True, "n": len(body)}, headers={"X-App": "1", "Server": "app/1.0"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await site.start()
    b.port = runner.addresses[0][1]
    try:
        yield b
    finally:
        await runner.cleanup()


@dataclass
class Front:
    port: int
    ups: Upstreams
    outcomes: list[Outcome] = field(default_factory=list)


@asynccontextmanager
async def front(
    upstreams: dict[str, Upstream], *, forward_kw: dict[str, Any] | None = None, preread: bool = False, **kw: Any
) -> AsyncIterator[Front]:
    server_cls = kw.pop("server_cls", web.Server)
    ups = Upstreams(upstreams, **{"max_body_bytes": 1 << 20, "body_idle_timeout_s": 5, **kw})
    f = Front(0, ups)

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        args: dict[str, Any] = {
            "path": request.raw_path.partition("?")[0],
            "query": request.raw_path.partition("?")[2],
            "headers": [
                (k, v)
                for k, v in request.headers.items()
                if k.lower() not in ("host", "content-length", "transfer-encoding")
            ],
            "content_length": request.content_length,
            "chunked": "chunked" in request.headers.get("Transfer-Encoding", ""),
            "response_headers": [("X-Request-Id", "rid-1")],
            **(forward_kw or {}),
        }
        if preread:  # as the body stage does: the policy read all of it first
            args["prefix"] = await request.content.read()
        try:
            resp, outcome = await ups.forward(request.headers.get("X-Upstream", "up"), request, **args)
        except PepError as err:
            # in headers: a HEAD answer has no body
            doc = {"code": err.code, "detail": err.detail, "headers": list(err.headers)}
            return web.Response(status=599, headers={"X-Refusal": orjson.dumps(doc).decode()})
        f.outcomes.append(outcome)
        return resp

    runner = web.ServerRunner(server_cls(handle), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    f.port = runner.addresses[0][1]
    try:
        yield f
    finally:
        await ups.close()
        await runner.cleanup()


def up(port: int, **kw: Any) -> Upstream:
    return Upstream(url=f"http://127.0.0.1:{port}", **kw)


async def call(
    f: Front, method: str = "GET", path: str = "/x", *, headers: dict[str, str] | None = None, data: Any = None
) -> tuple[int, Any, bytes]:
    async with aiohttp.ClientSession(
        auto_decompress=False, skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding")
    ) as http:
        url = URL(f"http://127.0.0.1:{f.port}{path}", encoded=True)  # sent exactly as written
        async with http.request(method, url, headers=headers, data=data, allow_redirects=False) as resp:
            REASONS.append(resp.reason)
            return resp.status, resp.headers, await resp.read()


REASONS: list[str | None] = []  # the reason phrase of each answer call() got, in order


def refusal(status: int, headers: Any) -> dict[str, Any]:
    assert status == 599, status
    return dict(orjson.loads(headers["X-Refusal"]))


# --- the upstream TLS context -------------------------------------------------------


def test_an_upstream_without_tls_settings_verifies_against_the_system_store() -> None:
    assert upstream_ssl(Upstream(url="https://up.test")) is True


def test_upstream_tls_settings_make_a_verifying_context_with_the_client_certificate(pki: Path) -> None:
    tls = {
        "ca_file": str(pki / "ca.pem"),
        "cert_file": str(pki / "client-reader.pem"),
        "key_file": str(pki / "client-reader-key.pem"),
    }
    ctx = upstream_ssl(Upstream(url="https://up.test", tls=tls))
    assert isinstance(ctx, ssl.SSLContext)
    assert (ctx.minimum_version, ctx.verify_mode, ctx.check_hostname) == (
        ssl.TLSVersion.TLSv1_2,
        ssl.CERT_REQUIRED,
        True,
    )
    assert [c["subject"] for c in ctx.get_ca_certs()] == [
        ((("organizationName", "vvault-pep demo"),), (("commonName", "vvault demo CA"),))
    ]
    # without a key the certificate is not loaded (there would be nothing to sign with)
    only_cert = upstream_ssl(
        Upstream(
            url="https://up.test", tls={"ca_file": str(pki / "ca.pem"), "cert_file": str(pki / "client-reader.pem")}
        )
    )
    assert isinstance(only_cert, ssl.SSLContext)


# --- what the upstream receives -----------------------------------------------------


async def test_the_upstream_gets_the_target_as_given_and_no_headers_of_its_own() -> None:
    async with back() as b, front({"up": up(b.port)}) as f:
        status, _, body = await call(f, "GET", "/a/%2e%2E/%41%2f?x=1&y=%20", headers={"X-Client": "c"})
        assert (status, orjson.loads(body)) == (200, {"ok": True, "n": 0})
        # HEAD goes through aiohttp's client: it adds no User-Agent, Accept or Accept-Encoding either
        status, _, body = await call(f, "HEAD", "/h")
        assert (status, body) == (200, b"")
    get, head = b.seen
    assert (get.method, get.path_qs) == ("GET", "/a/%2e%2E/%41%2f?x=1&y=%20")
    assert get.headers["X-Client"] == "c" and get.headers["Host"] == f"127.0.0.1:{b.port}"
    for seen in (get, head):
        assert "User-Agent" not in seen.headers and "Accept-Encoding" not in seen.headers
    assert head.method == "HEAD" and "Accept" not in head.headers and "Content-Type" not in head.headers


async def test_tls_server_hostname_is_the_host_header() -> None:
    async with back() as b, front({"up": up(b.port, tls={"server_hostname": "api.internal"})}) as f:
        assert (await call(f))[0] == 200
        assert (await call(f, "HEAD"))[0] == 200
    assert [s.headers["Host"] for s in b.seen] == ["api.internal", "api.internal"]


async def test_the_answer_keeps_its_status_headers_and_bytes_and_gets_the_peps_own() -> None:
    async def answer(request: web.Request) -> web.StreamResponse:
        raw = gzip.compress(b'{"z": 1}')
        return web.Response(
            status=203,
            reason="Fine",
            body=raw,
            headers={
                "Content-Encoding": "gzip",
                "Content-Type": "application/json",
                "X-Request-Id": "app's",
                "X-App": "1",
            },
        )

    async with back(answer) as b, front({"up": up(b.port)}) as f:
        status, headers, body = await call(f)
    assert status == 203
    assert gzip.decompress(body) == b'{"z": 1}'  # passed through as it came, never decompressed
    assert headers["X-Request-Id"] == "rid-1"  # the decision's response headers replace the upstream's
    assert headers["Server"] == "vvault-pep"
    assert headers["X-App"] == "1"
    assert f.outcomes == [Outcome(203, 0, len(body))]


async def test_a_request_body_reaches_the_upstream_counted_and_whole() -> None:
    big = b"b" * (200 << 10)  # past the buffer: streamed
    async with back() as b, front({"up": up(b.port)}, buffer_body_bytes=1024) as f:
        assert (await call(f, "PUT", "/small", data=b"tiny"))[0] == 200
        assert (await call(f, "PUT", "/big", data=big))[0] == 200

        async def chunked() -> AsyncIterator[bytes]:
            yield b"one,"
            yield b"two"

        assert (await call(f, "POST", "/chunked", data=chunked()))[0] == 200
    assert [(s.path_qs, s.body) for s in b.seen] == [("/small", b"tiny"), ("/big", big), ("/chunked", b"one,two")]
    assert b.seen[1].headers["Content-Length"] == str(len(big))
    assert [o.bytes_in for o in f.outcomes] == [4, len(big), 7]


async def test_what_the_policy_read_goes_first() -> None:
    async with back() as b, front({"up": up(b.port)}, forward_kw={"prefix": b'{"a":'}) as f:
        # the first bytes were read (and judged) before forward: only the rest is on the connection
        assert (await call(f, "POST", "/p", data=b"1}"))[0] == 200
    assert b.seen[0].body == b'{"a":1}'
    assert f.outcomes[0].bytes_in == 7


@pytest.mark.parametrize(
    ("limit_kw", "size", "expected"),
    [
        ({}, 100, None),
        ({"max_body_bytes": 10}, 10, None),
        ({"max_body_bytes": 10}, 11, ("sanitize.body_too_large", "request body exceeds the limit")),
        ({"max_body_bytes": 0}, 1, ("sanitize.body_too_large", "request body exceeds the limit")),
    ],
)
async def test_the_route_body_limit_is_counted_as_it_passes(
    limit_kw: dict[str, int], size: int, expected: tuple[str, str] | None
) -> None:
    async with back() as b, front({"up": up(b.port)}, forward_kw=limit_kw) as f:
        status, headers, _ = await call(f, "PUT", "/l", data=b"x" * size)
    if expected is None:
        assert status == 200 and b.seen[0].body == b"x" * size
    else:
        doc = refusal(status, headers)
        assert (doc["code"], doc["detail"]) == expected
        assert b.seen == []  # received whole before the upstream was asked: it never was


async def test_the_global_body_limit_holds_without_a_route_limit() -> None:
    async with back() as b, front({"up": up(b.port)}, max_body_bytes=8) as f:
        assert (await call(f, "PUT", "/l", data=b"x" * 8))[0] == 200
        doc = refusal(*(await call(f, "PUT", "/l", data=b"x" * 9))[:2])
        assert doc["code"] == "sanitize.body_too_large"
        # the policy's prefix counts against it too
    async with back() as b2, front({"up": up(b2.port)}, max_body_bytes=4, forward_kw={"prefix": b"12345"}) as f2:
        doc = refusal(*(await call(f2, "PUT", "/l", data=b"6"))[:2])
        assert doc["code"] == "sanitize.body_too_large"
    assert len(b.seen) == 1 and b2.seen == []


async def test_a_stalled_body_is_cut_at_the_idle_gap_and_a_slow_one_at_the_deadline() -> None:
    async def trickle(pause: float, n: int) -> AsyncIterator[bytes]:
        for _ in range(n):
            yield b"."
            await asyncio.sleep(pause)

    async with back() as b, front({"up": up(b.port)}, body_idle_timeout_s=0.3) as f:
        doc = refusal(*(await call(f, "PUT", "/s", data=trickle(1.0, 2)))[:2])
        assert (doc["code"], doc["detail"]) == ("sanitize.body_timeout", "the request body stalled")
    async with back() as b, front({"up": up(b.port)}, body_idle_timeout_s=5, forward_kw={"body_deadline_s": 0.4}) as f:
        doc = refusal(*(await call(f, "PUT", "/s", data=trickle(0.1, 20)))[:2])
        assert (doc["code"], doc["detail"]) == ("sanitize.body_deadline", "the request body took too long")
    assert b.seen == []


# --- a full pool -----------------------------------------------------------------------


async def test_a_full_pool_is_a_fast_503_with_retry_after_and_slots_are_given_back() -> None:
    hold = asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        await hold.wait()
        return web.Response(text="late")

    async with back(slow) as b, front({"up": up(b.port, max_connections=1, pool_timeout_s=0.2)}) as f:
        first = asyncio.get_running_loop().create_task(call(f, "GET", "/1"))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while f.ups.in_use("up") == 0 and loop.time() < deadline:
            await asyncio.sleep(0.01)
        assert f.ups.in_use("up") == 1
        doc = refusal(*(await call(f, "GET", "/2"))[:2])
        assert doc == {
            "code": "upstream.saturated",
            "detail": "the upstream is busy, retry later",
            "headers": [["Retry-After", "1"]],
        }
        hold.set()
        assert (await first)[0] == 200
        assert f.ups.in_use("up") == 0
        assert (await call(f, "GET", "/3"))[0] == 200  # the slot came back


# --- upstream failures -------------------------------------------------------------------


async def test_upstream_failures_before_the_answer_have_their_codes(down_port: int) -> None:
    port = down_port
    hang = asyncio.Event()

    async def never(request: web.Request) -> web.StreamResponse:
        await hang.wait()
        return web.Response()

    async with back(never) as slow:
        upstreams = {
            "down": up(port, connect_timeout_s=1),
            "hang": up(slow.port, read_timeout_s=0.3),
        }
        async with front(upstreams) as f:
            status, headers, _ = await call(f, "GET", "/x", headers={"X-Upstream": "down"})
            assert refusal(status, headers) == {
                "code": "upstream.unavailable",
                "detail": "the upstream refused the connection",
                "headers": [],
            }
            doc = refusal(*(await call(f, "GET", "/x", headers={"X-Upstream": "hang"}))[:2])
            assert (doc["code"], doc["detail"]) == ("upstream.timeout", "the upstream did not answer in time")
        hang.set()


async def test_head_failures_have_the_same_codes(down_port: int) -> None:
    port = down_port
    hang = asyncio.Event()

    async def never(request: web.Request) -> web.StreamResponse:
        await hang.wait()
        return web.Response()

    async with back(never) as slow, front({"down": up(port), "hang": up(slow.port, read_timeout_s=0.3)}) as f:
        doc = refusal(*(await call(f, "HEAD", "/x", headers={"X-Upstream": "down"}))[:2])
        assert (doc["code"], doc["detail"]) == ("upstream.unavailable", "the upstream refused the connection")
        doc = refusal(*(await call(f, "HEAD", "/x", headers={"X-Upstream": "hang"}))[:2])
        assert (doc["code"], doc["detail"]) == ("upstream.timeout", "the upstream did not answer in time")
        hang.set()


async def test_an_upstream_that_breaks_mid_answer_aborts_the_client_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def dying(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Length": "100000"})
        await resp.prepare(request)
        await resp.write(b"x" * 1000)
        assert request.transport is not None
        request.transport.abort()
        return resp

    async with back(dying) as b, front({"up": up(b.port)}) as f:
        with caplog.at_level(logging.WARNING, logger="vvault_pep.forward"), pytest.raises(aiohttp.ClientPayloadError):
            await call(f, "PUT", "/d", data=b"1234")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while not f.outcomes and loop.time() < deadline:
            await asyncio.sleep(0.01)
    [outcome] = f.outcomes
    assert (outcome.status, outcome.bytes_in, outcome.aborted) == (200, 4, "upstream_failed")
    assert 0 < outcome.bytes_out <= 1000
    assert [r.getMessage() for r in caplog.records if r.name == "vvault_pep.forward"] == [
        "upstream up failed mid-response: UpstreamFailure"
    ]


# --- redaction -------------------------------------------------------------------------


def json_answer(doc: Any, status: int = 200, **headers: str) -> Answer:
    async def answer(request: web.Request) -> web.StreamResponse:
        return web.Response(
            status=status,
            body=orjson.dumps(doc),
            headers={"Content-Type": "application/json", "ETag": '"v1"', "X-App": "1", **headers},
        )

    return answer


async def test_a_redacted_answer_loses_its_fields_and_every_body_bound_header() -> None:
    doc = {"id": 1, "secret": "s", "nested": [{"secret": 2, "keep": 3}], "deep": {"token": "t", "x": 4}}
    kw = {"redact": ("secret", "token")}
    async with back(json_answer(doc)) as b, front({"up": up(b.port)}, forward_kw=kw) as f:
        status, headers, body = await call(
            f, "GET", "/r", headers={"Range": "bytes=0-1", "If-None-Match": '"v0"', "Accept-Encoding": "gzip"}
        )
        head_status, head_headers, head_body = await call(f, "HEAD", "/r")
    assert status == 200
    assert orjson.loads(body) == {"id": 1, "nested": [{"keep": 3}], "deep": {"x": 4}}
    assert "ETag" not in headers
    assert headers["Accept-Ranges"] == "none"
    assert headers["X-Vvault-Redacted"] == "secret,token"
    assert (headers["X-App"], headers["X-Request-Id"], headers["Server"]) == ("1", "rid-1", "vvault-pep")
    assert headers["Content-Type"].startswith("application/json")
    # the upstream was asked for the whole, uncompressed answer; a HEAD became a GET
    first, second = b.seen
    assert "Range" not in first.headers and "If-None-Match" not in first.headers
    assert first.headers["Accept-Encoding"] == "identity"
    assert second.method == "GET"
    assert (head_status, head_body) == (200, b"")
    assert head_headers["X-Vvault-Redacted"] == "secret,token"
    assert [o.bytes_out for o in f.outcomes] == [len(body), 0]


async def test_a_redacted_204_has_no_body() -> None:
    async def empty(request: web.Request) -> web.StreamResponse:
        return web.Response(status=204, headers={"ETag": '"e"'})

    async with back(empty) as b, front({"up": up(b.port)}, forward_kw={"redact": ("x",)}) as f:
        status, headers, body = await call(f)
    assert (status, body, headers.get("ETag")) == (204, b"", None)
    assert headers["X-Vvault-Redacted"] == "x"


@pytest.mark.parametrize(
    ("answer", "kw", "expected"),
    [
        (
            json_answer({"a": 1}, 206, **{"Content-Range": "bytes 0-1/10"}),
            {},
            ("enforce.partial_answer", "the upstream answered 206 Partial Content"),
        ),
        (
            json_answer({"a": 1}, **{"Content-Type": "text/plain"}),
            {},
            ("enforce.redaction_impossible", "the response is not JSON the PEP can redact"),
        ),
        (
            json_answer({"a": 1}, **{"Content-Encoding": "gzip"}),
            {},
            ("enforce.redaction_impossible", "the response is not JSON the PEP can redact"),
        ),
        (
            json_answer({"a": "x" * 100}),
            {"redact_max_bytes": 50},
            ("enforce.redaction_impossible", "the response is too large to redact"),
        ),
    ],
)
async def test_what_cannot_be_redacted_is_withheld(
    answer: Answer, kw: dict[str, Any], expected: tuple[str, str]
) -> None:
    async with back(answer) as b, front({"up": up(b.port)}, forward_kw={"redact": ("x",), **kw}) as f:
        doc = refusal(*(await call(f))[:2])
    assert (doc["code"], doc["detail"]) == expected


@pytest.mark.parametrize(
    ("ctype", "encoding", "redactable"),
    [
        ("application/json", None, True),
        ("Application/JSON; charset=utf-8", None, True),
        ("application/problem+json", None, True),
        ("application/json", "identity", True),
        ("application/jsonx", None, False),
        ("text/json", None, False),
        ("application/json", "br", False),
    ],
)
async def test_which_answers_are_redactable(ctype: str, encoding: str | None, redactable: bool) -> None:
    async def answer(request: web.Request) -> web.StreamResponse:
        resp = web.Response(body=b'{"x": 1, "y": 2}')
        resp.headers["Content-Type"] = ctype
        if encoding is not None:
            resp.headers["Content-Encoding"] = encoding
        return resp

    async with back(answer) as b, front({"up": up(b.port)}, forward_kw={"redact": ("x",)}) as f:
        status, headers, body = await call(f)
    if redactable:
        assert (status, orjson.loads(body)) == (200, {"y": 2})
    else:
        assert refusal(status, headers)["code"] == "enforce.redaction_impossible"


async def test_an_undeclared_answer_past_the_limit_or_not_json_is_withheld() -> None:
    async def streamed(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        await resp.write(request.query.get("body", "").encode())
        await resp.write_eof()
        return resp

    async with (
        back(streamed) as b,
        front({"up": up(b.port)}, forward_kw={"redact": ("x",), "redact_max_bytes": 10}) as f,
    ):
        doc = refusal(*(await call(f, "GET", "/s?body=" + "1" * 11))[:2])
        assert (doc["code"], doc["detail"]) == ("enforce.redaction_impossible", "the response is too large to redact")
        status, _, body = await call(f, "GET", "/s?body=" + "1" * 10)
        assert (status, body) == (200, b"1111111111")  # exactly the limit is read and redacted
        doc = refusal(*(await call(f, "GET", "/s?body={bad"))[:2])
        assert (doc["code"], doc["detail"]) == ("enforce.redaction_impossible", "the response is not valid JSON")


async def test_a_conditional_write_is_refused_where_the_answer_is_redacted() -> None:
    async with back() as b, front({"up": up(b.port)}, forward_kw={"redact": ("x",)}) as f:
        doc = refusal(*(await call(f, "PUT", "/w", headers={"If-Match": '"v1"'}, data=b"{}"))[:2])
    assert (doc["code"], doc["detail"]) == (
        "enforce.conditional_refused",
        "If-Match is not accepted where the answer is redacted",
    )
    assert b.seen == []


# --- the header policy ---------------------------------------------------------------------


async def test_the_routes_header_policy_applies_to_the_answer() -> None:
    async def answer(request: web.Request) -> web.StreamResponse:
        return web.Response(text="x", headers={"X-Keep": "1", "X-Internal": "2", "Server": "app/1.0"})

    policy = responses.HeaderPolicy(frozenset({"x-internal", "server"}), (), None, "drop")
    async with back(answer) as b, front({"up": up(b.port)}, forward_kw={"header_policy": policy}) as f:
        _, headers, _ = await call(f)
    assert headers["X-Keep"] == "1" and "X-Internal" not in headers
    assert headers["Server"] == "vvault-pep"
    assert forward.CHUNK == 64 * 1024


# --- HEAD, through aiohttp's client ---------------------------------------------------


async def test_head_keeps_the_target_the_reason_a_body_and_a_redirect_as_they_are() -> None:
    async def answer(request: web.Request) -> web.StreamResponse:
        if request.path == "/moved":
            return web.Response(status=302, reason="Elsewhere", headers={"Location": "/target"})
        return web.Response(status=200, reason="Fine Here", headers={"X-App": "1"})

    async with back(answer) as b, front({"up": up(b.port)}) as f:
        REASONS.clear()
        status, headers, body = await call(f, "HEAD", "/a/%2e%2E/%41%2f?x=%20")
        assert (status, body, headers["X-App"], REASONS[-1]) == (200, b"", "1", "Fine Here")
        status, headers, _ = await call(f, "HEAD", "/moved")
        assert (status, headers["Location"], REASONS[-1]) == (302, "/target", "Elsewhere")  # not followed
        status, _, _ = await call(f, "GET", "/x")
        assert REASONS[-1] == "Fine Here"
        assert (await call(f, "HEAD", "/with-body", headers={"Content-Type": "text/plain"}, data=b"abc"))[0] == 200
    assert [(s.method, s.path_qs) for s in b.seen] == [
        ("HEAD", "/a/%2e%2E/%41%2f?x=%20"),
        ("HEAD", "/moved"),
        ("GET", "/x"),
        ("HEAD", "/with-body"),
    ]
    assert b.seen[-1].body == b"abc"


async def test_the_server_name_goes_to_an_https_upstream_for_head_and_get(pki: Path) -> None:
    names: list[str | None] = []
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(str(pki / "server.pem"), str(pki / "server-key.pem"))
    server_ctx.sni_callback = lambda _sock, name, _ctx: names.append(name)  # type: ignore[assignment,return-value]
    tls = {"ca_file": str(pki / "ca.pem"), "server_hostname": "localhost"}
    async with back(ssl_context=server_ctx) as b:
        upstream = Upstream(url=f"https://127.0.0.1:{b.port}", tls=tls)
        async with front({"up": upstream}) as f:
            assert (await call(f, "HEAD", "/h"))[0] == 200
            assert (await call(f, "GET", "/g"))[0] == 200
    assert names == ["localhost", "localhost"]
    assert [s.headers["Host"] for s in b.seen] == ["localhost", "localhost"]


async def test_an_unreachable_upstream_is_logged_by_name_and_cause(
    caplog: pytest.LogCaptureFixture, down_port: int
) -> None:
    async with front({"down": up(down_port)}) as f:
        with caplog.at_level(logging.WARNING, logger="vvault_pep.forward"):
            for method in ("GET", "HEAD"):
                doc = refusal(*(await call(f, method, "/x", headers={"X-Upstream": "down"}))[:2])
                assert (doc["code"], doc["detail"]) == ("upstream.unavailable", "the upstream refused the connection")
    assert [r.getMessage() for r in caplog.records if r.name == "vvault_pep.forward"] == [
        "upstream down unreachable: ConnectionRefusedError",
        "upstream down unreachable: ConnectionRefusedError",
    ]


@asynccontextmanager
async def raw_back(reply: bytes) -> AsyncIterator[int]:
    """An upstream that reads a request head, writes ``reply`` and closes."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(reply)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


async def test_a_broken_upstream_is_an_upstream_error_logged_without_its_bytes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with raw_back(b"NOT HTTP AT ALL secret-bytes\r\n\r\n") as port, front({"bad": up(port)}) as f:
        with caplog.at_level(logging.WARNING, logger="vvault_pep.forward"):
            for method in ("GET", "HEAD"):
                doc = refusal(*(await call(f, method, "/x", headers={"X-Upstream": "bad"}))[:2])
                assert (doc["code"], doc["detail"]) == ("upstream.error", "the upstream connection failed")
    messages = [r.getMessage() for r in caplog.records if r.name == "vvault_pep.forward"]
    assert messages[0].startswith("upstream bad failed: malformed answer: ")
    assert messages[1] == "upstream bad failed: ClientResponseError"
    assert all("secret-bytes" not in m for m in messages)


async def test_a_redaction_whose_upstream_breaks_mid_body_is_an_upstream_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    reply = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"x": 1'
    async with raw_back(reply) as port, front({"up": up(port)}, forward_kw={"redact": ("x",)}) as f:
        with caplog.at_level(logging.WARNING, logger="vvault_pep.forward"):
            doc = refusal(*(await call(f))[:2])
    assert (doc["code"], doc["detail"]) == ("upstream.error", "the upstream connection failed")
    assert [r.getMessage() for r in caplog.records if r.name == "vvault_pep.forward"] == [
        "upstream failed mid-response: UpstreamFailure"
    ]


async def test_a_client_gone_before_the_answer_is_recorded_with_the_upstreams_status() -> None:
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        await release.wait()
        return web.Response(status=201, text="late")

    async with back(slow) as b, front({"up": up(b.port)}) as f:
        _, writer = await asyncio.open_connection("127.0.0.1", f.port)
        writer.write(b"GET /gone HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while not b.seen and loop.time() < deadline:
            await asyncio.sleep(0.01)
        writer.close()
        await writer.wait_closed()
        await asyncio.sleep(0.05)
        release.set()
        while not f.outcomes and loop.time() < deadline:
            await asyncio.sleep(0.01)
    assert f.outcomes == [Outcome(201, 0, 0, "client_gone")]


async def test_a_redacted_answer_keeps_the_upstreams_status_and_counts_the_body() -> None:
    async with (
        back(json_answer({"x": 1, "y": 2}, 201)) as b,
        front({"up": up(b.port)}, forward_kw={"redact": ("x",)}) as f,
    ):
        status, _, body = await call(f, "PUT", "/p", data=b"12345")
    assert (status, orjson.loads(body)) == (201, {"y": 2})
    assert f.outcomes == [Outcome(201, 5, len(body))]


async def test_a_redacted_204_sends_nothing() -> None:
    async def empty(request: web.Request) -> web.StreamResponse:
        return web.Response(status=204)

    async with back(empty) as b, front({"up": up(b.port)}, forward_kw={"redact": ("x",)}) as f:
        assert (await call(f))[0] == 204
    assert f.outcomes == [Outcome(204, 0, 0)]


async def test_a_declared_answer_of_exactly_the_limit_is_redacted() -> None:
    doc = {"y": "1234"}  # {"y":"1234"}: 12 bytes
    async with (
        back(json_answer(doc)) as b,
        front({"up": up(b.port)}, forward_kw={"redact": ("x",), "redact_max_bytes": 12}) as f,
    ):
        status, _, body = await call(f)
        assert (status, orjson.loads(body)) == (200, doc)
    async with (
        back(json_answer(doc)) as b,
        front({"up": up(b.port)}, forward_kw={"redact": ("x",), "redact_max_bytes": 11}) as f,
    ):
        assert refusal(*(await call(f))[:2])["detail"] == "the response is too large to redact"


def big_answer(size: int) -> Answer:
    async def answer(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(status=200, headers={"Content-Length": str(size)})
        await resp.prepare(request)
        piece = b"q" * (1 << 20)
        for _ in range(size // len(piece)):
            await resp.write(piece)
        await resp.write_eof()
        return resp

    return answer


async def test_a_client_that_stops_reading_is_cut_off_at_the_send_deadline(caplog: pytest.LogCaptureFixture) -> None:
    size = 64 << 20  # far past every socket buffer
    async with back(big_answer(size)) as b, front({"up": up(b.port)}, send_idle_timeout_s=0.3) as f:
        with caplog.at_level(logging.INFO, logger="vvault_pep.forward"):
            reader, writer = await asyncio.open_connection("127.0.0.1", f.port)
            writer.write(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
            await writer.drain()
            await reader.readuntil(b"\r\n\r\n")  # the head, then nothing more is read
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 20
            while not f.outcomes and loop.time() < deadline:
                await asyncio.sleep(0.05)
            got = 0
            with contextlib.suppress(ConnectionError):  # the PEP cut the connection: it ends, short
                while chunk := await asyncio.wait_for(reader.read(1 << 20), 10):
                    got += len(chunk)
            writer.close()
        assert got < size
    [outcome] = f.outcomes
    assert (outcome.status, outcome.bytes_in, outcome.aborted) == (200, 0, "client_stalled")
    assert 0 < outcome.bytes_out < size
    assert "client stopped reading the answer from up" in [
        r.getMessage() for r in caplog.records if r.name == "vvault_pep.forward"
    ]


async def test_a_client_that_leaves_mid_answer_is_recorded_with_what_it_got() -> None:
    size = 64 << 20
    async with back(big_answer(size)) as b, front({"up": up(b.port)}) as f:
        reader, writer = await asyncio.open_connection("127.0.0.1", f.port)
        writer.write(b"PUT /big HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
        await writer.drain()
        await reader.readexactly(1 << 20)  # some of it, then away
        writer.transport.abort()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while not f.outcomes and loop.time() < deadline:
            await asyncio.sleep(0.05)
    [outcome] = f.outcomes
    assert (outcome.status, outcome.bytes_in, outcome.aborted) == (200, 3, "client_gone")
    assert 0 < outcome.bytes_out < size


async def test_a_body_within_its_deadline_passes_and_one_read_after_it_is_refused() -> None:
    async with back() as b, front({"up": up(b.port)}, forward_kw={"body_deadline_s": 0.8}) as f:
        assert (await call(f, "PUT", "/in-time", data=b"quick"))[0] == 200
    # a read that starts once the deadline is spent (earlier pieces took it all) is refused at once
    async with back() as b2, front({"up": up(b2.port)}, forward_kw={"body_deadline_s": 0.0}) as f:
        doc = refusal(*(await call(f, "PUT", "/late", data=b"x"))[:2])
    assert (doc["code"], doc["detail"]) == ("sanitize.body_deadline", "the request body took too long")
    assert [s.body for s in b.seen] == [b"quick"] and b2.seen == []


async def test_keep_alive_connections_to_an_upstream_are_reused() -> None:
    async with back() as b, front({"up": up(b.port)}) as f:
        for _ in range(3):
            assert (await call(f))[0] == 200
    assert len({s.peer for s in b.seen}) == 1


async def test_a_tls_handshake_that_never_ends_is_an_upstream_timeout() -> None:
    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    server = await asyncio.start_server(mute, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with front({"up": Upstream(url=f"https://127.0.0.1:{port}", connect_timeout_s=0.3)}) as f:
            doc = refusal(*(await call(f))[:2])
        assert (doc["code"], doc["detail"]) == ("upstream.timeout", "the upstream did not answer in time")
    finally:
        server.close()


async def test_an_https_upstream_without_tls_settings_is_verified_against_the_system_store(pki: Path) -> None:
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(str(pki / "server.pem"), str(pki / "server-key.pem"))
    async with back(ssl_context=server_ctx) as b, front({"up": Upstream(url=f"https://127.0.0.1:{b.port}")}) as f:
        doc = refusal(*(await call(f))[:2])  # the demo CA is in no system store: refused, never plaintext
        assert (doc["code"], doc["detail"]) == ("upstream.unavailable", "the upstream refused the connection")
    assert b.seen == []


@pytest.mark.parametrize(("size", "passes"), [(6, True), (7, False)])
async def test_a_body_the_policy_read_whole_counts_against_the_limit(size: int, passes: bool) -> None:
    async with back() as b, front({"up": up(b.port)}, preread=True, forward_kw={"max_body_bytes": 6}) as f:
        status, headers, _ = await call(f, "PUT", "/p", data=b"x" * size)
    if passes:
        assert status == 200 and b.seen[0].body == b"x" * size
    else:
        doc = refusal(status, headers)
        assert (doc["code"], doc["detail"]) == ("sanitize.body_too_large", "request body exceeds the limit")
        assert b.seen == []


async def test_what_the_policy_read_goes_first_when_the_rest_streams() -> None:
    rest = b"r" * 3000
    kw = {"prefix": b"0123456789", "content_length": 10 + len(rest)}  # the prefix is part of the body
    async with back() as b, front({"up": up(b.port)}, buffer_body_bytes=1024, forward_kw=kw) as f:
        assert (await call(f, "PUT", "/p", data=rest))[0] == 200
    assert b.seen[0].body == b"0123456789" + rest


async def _in_use_while_the_body_waits(buffer: int, sent: list[bytes]) -> tuple[int, int]:
    """(connections in use once ``sent`` is in and the body's end is withheld, in use at the end)."""
    gate = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        for piece in sent:
            yield piece
            await asyncio.sleep(0.05)  # each piece arrives on its own
        await gate.wait()
        yield b"end"

    async with back() as b, front({"up": up(b.port)}, buffer_body_bytes=buffer) as f:
        task = asyncio.get_running_loop().create_task(call(f, "PUT", "/slow", data=body()))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 1.0  # a window to see a connection taken; the rule says none is
        while f.ups.in_use("up") == 0 and loop.time() < deadline:
            await asyncio.sleep(0.01)
        during = f.ups.in_use("up")
        gate.set()
        assert (await task)[0] == 200
        assert b.seen[0].body == b"".join(sent) + b"end"
        return during, f.ups.in_use("up")


async def test_a_small_body_holds_no_upstream_connection_until_it_is_all_in() -> None:
    assert await _in_use_while_the_body_waits(1024, [b"a" * 1024]) == (0, 0)  # exactly the buffer: still small


async def test_a_body_past_the_buffer_takes_its_connection_and_streams() -> None:
    assert await _in_use_while_the_body_waits(1024, [b"b" * 512] * 4) == (1, 0)


class _ListenerServer(web.Server):
    """aiohttp's server behind the listener's connection handler, which fails a body at a bad chunk."""

    def __call__(self) -> RequestHandler:
        return listener._Handler(self, loop=self._loop, **self._kwargs)


async def test_a_bad_chunk_in_a_streamed_body_is_malformed() -> None:
    async with back() as b, front({"up": up(b.port)}, server_cls=_ListenerServer, buffer_body_bytes=16) as f:
        reader, writer = await asyncio.open_connection("127.0.0.1", f.port)
        writer.write(b"PUT /bad HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n20\r\n" + b"g" * 32 + b"\r\n")
        await writer.drain()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while f.ups.in_use("up") == 0 and loop.time() < deadline:  # streaming: the upstream is asked
            await asyncio.sleep(0.01)
        writer.write(b"zz\r\n")
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        writer.close()
    status, headers = int(head.split(b" ")[1]), {}
    for line in head.decode().split("\r\n")[1:]:
        if ":" in line:
            k, _, v = line.partition(":")
            headers[k.strip()] = v.strip()
    doc = refusal(status, headers)
    assert (doc["code"], doc["detail"]) == ("sanitize.malformed", "malformed request body")


async def test_every_byte_of_a_long_answer_is_counted() -> None:
    size = 3 << 20
    async with back(big_answer(size)) as b, front({"up": up(b.port)}) as f:
        status, _, body = await call(f)
    assert (status, len(body)) == (200, size)
    assert f.outcomes == [Outcome(200, 0, size)]


async def test_cookies_an_upstream_sets_on_head_are_never_sent_back_for_another_client() -> None:
    async def answer(request: web.Request) -> web.StreamResponse:
        resp = web.Response(status=200)
        resp.set_cookie("session", "alice-secret", path="/")
        return resp

    async with back(answer) as b, front({"up": Upstream(url=f"http://localhost:{b.port}")}) as f:
        assert (await call(f, "HEAD", "/one"))[0] == 200  # a host name: a cookie jar would keep its cookies
        assert (await call(f, "HEAD", "/two"))[0] == 200
    assert [s.headers.get("Cookie") for s in b.seen] == [None, None]


async def test_a_tls_handshake_that_never_ends_is_an_upstream_timeout_for_head_too() -> None:
    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    server = await asyncio.start_server(mute, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        upstream = Upstream(url=f"https://127.0.0.1:{port}", connect_timeout_s=0.3, pool_timeout_s=0.2)
        async with front({"up": upstream}) as f:
            doc = refusal(*(await asyncio.wait_for(call(f, "HEAD"), 20))[:2])
        assert (doc["code"], doc["detail"]) == ("upstream.timeout", "the upstream did not answer in time")
    finally:
        server.close()


async def test_two_requests_in_flight_hold_two_connections_and_give_both_back() -> None:
    hold = asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        await hold.wait()
        return web.Response(text="late")

    async with back(slow) as b, front({"up": up(b.port, max_connections=2)}) as f:
        loop = asyncio.get_running_loop()
        tasks = [loop.create_task(call(f, "GET", f"/{n}")) for n in (1, 2)]
        deadline = loop.time() + 10
        try:
            while len(b.seen) < 2 and loop.time() < deadline:  # both are at the upstream
                await asyncio.sleep(0.01)
            assert f.ups.in_use("up") == 2
        finally:
            hold.set()
        assert [(await t)[0] for t in tasks] == [200, 200]
        assert f.ups.in_use("up") == 0


@pytest.mark.parametrize(
    ("connect_s", "pool_s"),
    [
        (0.5, 4.0),  # far below pool + connect: the handshake has its own deadline
        (0.8, 1.0),  # pool - connect would cut it at 0.2 s: the whole connect time is given
    ],
)
async def test_a_head_whose_tls_handshake_hangs_is_refused_at_the_connect_timeout(
    connect_s: float, pool_s: float
) -> None:
    accepted: list[bool] = []

    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(True)  # TCP is up; the TLS handshake never gets an answer
        await reader.read()

    server = await asyncio.start_server(mute, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    upstream = Upstream(
        url=f"https://127.0.0.1:{port}", connect_timeout_s=connect_s, pool_timeout_s=pool_s, read_timeout_s=30
    )
    try:
        async with front({"up": upstream}) as f:
            loop = asyncio.get_running_loop()
            start = loop.time()
            doc = refusal(*(await asyncio.wait_for(call(f, "HEAD"), 20))[:2])
            elapsed = loop.time() - start
    finally:
        server.close()
    assert (doc["code"], doc["detail"]) == ("upstream.timeout", "the upstream did not answer in time")
    assert accepted == [True]
    # not before the connect timeout, and long before pool + connect or the read timeout
    assert connect_s - 0.05 <= elapsed < connect_s + 2.5, elapsed


async def test_a_head_with_a_body_reaches_the_upstream_with_only_the_clients_headers() -> None:
    async with back() as b, front({"up": up(b.port)}) as f:
        reader, writer = await asyncio.open_connection("127.0.0.1", f.port)
        writer.write(b"HEAD /h HTTP/1.1\r\nHost: x\r\nX-Client: c\r\nContent-Length: 5\r\n\r\nhello")
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        writer.close()
    assert head.startswith(b"HTTP/1.1 200 ")
    (seen,) = b.seen
    assert (seen.method, seen.body) == ("HEAD", b"hello")
    # no Content-Type the client never sent (aiohttp would add application/octet-stream)
    assert seen.headers == {"Host": f"127.0.0.1:{b.port}", "X-Client": "c", "Content-Length": "5"}
