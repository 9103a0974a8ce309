"""The OPA client, call by call: what it sends, what it makes of each answer, how it fails.

Two OPAs: the real one (its own process, the repo's policies) for what OPA really answers —
provenance, the policy list, data documents — and a recording stand-in (a loopback aiohttp
server, over TCP, TLS with the test PKI, or a Unix socket) for what the client sends and for
the answers real OPA will not give on demand (a 500, garbage, a hang).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import ssl
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from tests.support import OpaProcess, start_opa

from vvault_pep.config.models import Opa
from vvault_pep.decide.pdp import (
    ANSWER_LIMIT,
    LISTING_LIMIT,
    Answer,
    PdpClient,
    _bundle_revisions,
    _opa_error_code,
    _rule_paths,
)
from vvault_pep.errors import PepError

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class StandIn:
    """Records every request; answers each (method, path) as told (404 otherwise)."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self.routes: dict[tuple[str, str], Handler] = {}
        self.url = ""
        self.gate = asyncio.Event()
        self.sent = 0  # bytes of the last endless body written
        self.runner: web.AppRunner | None = None

    def answer(self, method: str, path: str, doc: Any = None, status: int = 200, raw: bytes | None = None) -> None:
        body = raw if raw is not None else orjson.dumps(doc)

        async def handler(_: web.Request) -> web.Response:
            return web.Response(status=status, body=body, content_type="application/json")

        self.routes[(method, path)] = handler

    def hang(self, method: str, path: str) -> None:
        async def handler(_: web.Request) -> web.Response:
            await self.gate.wait()
            return web.json_response({})

        self.routes[(method, path)] = handler

    def endless(self, method: str, path: str, declared: int | None = None) -> None:
        """A 200 whose body goes on past every limit (JSON whitespace, 64 KiB at a time, up to
        twice the listing's limit: a client that reads it all fails with another error, not
        the machine's memory), or, with ``declared``, a Content-Length of that many bytes and
        then nothing."""

        async def handler(request: web.Request) -> web.StreamResponse:
            resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
            if declared is not None:
                resp.content_length = declared
            await resp.prepare(request)
            if declared is not None:
                await self.gate.wait()
                return resp
            with contextlib.suppress(ConnectionError, aiohttp.ClientConnectionResetError):
                self.sent = 0
                while self.sent < 2 * LISTING_LIMIT:
                    await resp.write(b" " * 65536)
                    self.sent += 65536
                await resp.write_eof()
            return resp

        self.routes[(method, path)] = handler

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(
            {
                "method": request.method,
                "path": request.path,
                "query": request.query_string,
                "headers": {k.lower(): v for k, v in request.headers.items()},
                "body": await request.read(),
            }
        )
        handler = self.routes.get((request.method, request.path))
        if handler is None:
            return web.Response(status=404)
        return await handler(request)

    async def start(self, *, tls: ssl.SSLContext | None = None, unix: Path | None = None) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self.runner.setup()
        if unix is not None:
            await web.UnixSite(self.runner, str(unix)).start()
            self.url = f"unix://{unix}"
            return
        site = web.TCPSite(self.runner, "localhost" if tls else "127.0.0.1", 0, ssl_context=tls)
        await site.start()
        port = self.runner.addresses[0][1]
        self.url = f"https://localhost:{port}" if tls else f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        self.gate.set()
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.fixture
async def stand_in() -> AsyncIterator[StandIn]:
    s = StandIn()
    await s.start()
    yield s
    await s.stop()


@pytest.fixture
async def client(stand_in: StandIn) -> AsyncIterator[PdpClient]:
    c = PdpClient(Opa(url=stand_in.url, timeout_ms=2000))
    yield c
    await c.close()


@pytest.fixture(scope="module")
def real_opa() -> Any:
    proc = start_opa()
    yield proc
    proc.stop()


@pytest.fixture
async def real(real_opa: OpaProcess) -> AsyncIterator[PdpClient]:
    c = PdpClient(Opa(url=real_opa.url))
    yield c
    await c.close()


DECIDE = "/v1/data/vvault/authz/decision"


# -- decide: what is sent ---------------------------------------------------------------------------


async def test_decide_posts_the_input_and_nothing_more(stand_in: StandIn, client: PdpClient) -> None:
    stand_in.answer("POST", DECIDE, {"result": {"allow": True}, "decision_id": "d-1"})
    answer = await client.decide("vvault/authz/decision", {"b": 1, "a": [1, "x"]})
    assert answer == Answer(True, {"allow": True}, "d-1", None)
    [sent] = stand_in.seen
    assert (sent["method"], sent["path"], sent["query"]) == ("POST", DECIDE, "")
    assert sent["body"] == b'{"input":{"b":1,"a":[1,"x"]}}'
    assert sent["headers"]["content-type"] == "application/json"
    assert "user-agent" not in sent["headers"] and "authorization" not in sent["headers"]


async def test_the_token_goes_on_every_call(stand_in: StandIn) -> None:
    c = PdpClient(Opa(url=stand_in.url, token="opa-secret"))
    try:
        stand_in.answer("POST", DECIDE, {"result": 1})
        stand_in.answer("GET", "/health", {})
        await c.decide("vvault/authz/decision", {})
        assert await c.healthy()
        await c.put_data("x", b"{}")
    finally:
        await c.close()
    assert [s["headers"].get("authorization") for s in stand_in.seen] == ["Bearer opa-secret"] * 3


async def test_provenance_is_asked_for_and_read(stand_in: StandIn, client: PdpClient) -> None:
    stand_in.answer(
        "POST",
        DECIDE,
        {"result": False, "provenance": {"bundles": {"b2": {"revision": "r2"}, "b1": {"revision": "r1"}}}},
    )
    answer = await client.decide("vvault/authz/decision", {}, provenance=True)
    assert answer == Answer(True, False, None, '{"b1":"r1","b2":"r2"}')
    assert stand_in.seen[0]["query"] == "provenance=true"


@pytest.mark.parametrize(
    ("doc", "answer"),
    [
        ({}, Answer(False, None, None)),
        ({"result": None}, Answer(True, None, None)),
        ({"result": [], "decision_id": 5}, Answer(True, [], None)),
        ({"decision_id": "d"}, Answer(False, None, "d")),
    ],
)
async def test_what_an_answer_holds(stand_in: StandIn, client: PdpClient, doc: Any, answer: Answer) -> None:
    stand_in.answer("POST", DECIDE, doc)
    assert await client.decide("vvault/authz/decision", {}) == answer


# -- decide: every failure ------------------------------------------------------------------------


def refused(exc: pytest.ExceptionInfo[PepError], code: str, detail: str) -> None:
    assert (exc.value.code, exc.value.status, exc.value.detail) == (code, 503, detail)


@pytest.mark.parametrize(
    ("status", "raw", "logged"),
    [
        (500, b'{"code":"internal_error","message":"boom"}', "OPA answered 500: internal_error"),
        (400, b'{"message":"x"}', "OPA answered 400: no code"),
        (404, b"[1]", "OPA answered 404: unexpected body"),
        (502, b"<html>", "OPA answered 502: unparsable body"),
        (201, b'{"result":true}', "OPA answered 201: no code"),
    ],
)
async def test_an_answered_error(
    stand_in: StandIn, client: PdpClient, caplog: pytest.LogCaptureFixture, status: int, raw: bytes, logged: str
) -> None:
    stand_in.answer("POST", DECIDE, status=status, raw=raw)
    with caplog.at_level(logging.WARNING, logger="vvault_pep.pdp"), pytest.raises(PepError) as exc:
        await client.decide("vvault/authz/decision", {})
    refused(exc, "pdp.error", "the policy decision point answered with an error")
    assert [r.getMessage() for r in caplog.records if r.name == "vvault_pep.pdp"] == [logged]
    assert len(stand_in.seen) == 1  # never a retry


@pytest.mark.parametrize("raw", [b"not json", b"[]", b'"result"', b"null", b""])
async def test_garbage(stand_in: StandIn, client: PdpClient, raw: bytes) -> None:
    stand_in.answer("POST", DECIDE, raw=raw)
    with pytest.raises(PepError) as exc:
        await client.decide("vvault/authz/decision", {})
    refused(exc, "pdp.error", "the policy decision point answered garbage")


async def test_the_deadline_of_one_call(stand_in: StandIn, client: PdpClient) -> None:
    stand_in.hang("POST", DECIDE)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(PepError) as exc:
        await client.decide("vvault/authz/decision", {}, deadline_s=0.2)
    assert loop.time() - started < 1.9  # this call's deadline, not the client's 2 s
    refused(exc, "pdp.timeout", "the policy decision point did not answer in time")


async def test_the_default_deadline(stand_in: StandIn) -> None:
    c = PdpClient(Opa(url=stand_in.url, timeout_ms=300))
    assert c.deadline_s == 0.3
    stand_in.hang("POST", DECIDE)
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        with pytest.raises(PepError) as exc:
            await c.decide("vvault/authz/decision", {})
    finally:
        await c.close()
    assert 0.29 <= loop.time() - started < 1.2
    refused(exc, "pdp.timeout", "the policy decision point did not answer in time")


async def test_nothing_listening(caplog: pytest.LogCaptureFixture, down_port: int) -> None:
    c = PdpClient(Opa(url=f"http://127.0.0.1:{down_port}"))
    try:
        with caplog.at_level(logging.WARNING, logger="vvault_pep.pdp"), pytest.raises(PepError) as exc:
            await c.decide("vvault/authz/decision", {})
    finally:
        await c.close()
    refused(exc, "pdp.unavailable", "the policy decision point is unreachable")
    assert [r.getMessage() for r in caplog.records if r.name == "vvault_pep.pdp"] == [
        "OPA unreachable: UpstreamRefused (ConnectionRefusedError)"
    ]


async def test_over_a_unix_socket(tmp_path: Path) -> None:
    s = StandIn()
    await s.start(unix=tmp_path / "opa.sock")
    c = PdpClient(Opa(), url=s.url)
    try:
        assert c.url == s.url
        s.answer("POST", DECIDE, {"result": 7})
        assert (await c.decide("vvault/authz/decision", {})).result == 7
    finally:
        await c.close()
        await s.stop()
    assert s.seen[0]["headers"]["host"] == "opa" and s.seen[0]["path"] == DECIDE


async def test_the_url_comes_from_the_config_unless_given(stand_in: StandIn) -> None:
    c = PdpClient(Opa(url=stand_in.url))
    try:
        assert c.url == stand_in.url
    finally:
        await c.close()


async def test_over_https_with_the_configured_ca(pki: Path) -> None:
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(pki / "server.pem", pki / "server-key.pem")
    s = StandIn()
    await s.start(tls=server)
    s.answer("POST", DECIDE, {"result": "tls"})
    trusted = PdpClient(Opa(url=s.url, ca_file=pki / "ca.pem"))
    untrusted = PdpClient(Opa(url=s.url))
    try:
        assert (await trusted.decide("vvault/authz/decision", {})).result == "tls"
        with pytest.raises(PepError) as exc:
            await untrusted.decide("vvault/authz/decision", {})
        refused(exc, "pdp.unavailable", "the policy decision point is unreachable")
    finally:
        await trusted.close()
        await untrusted.close()
        await s.stop()
    assert len(s.seen) == 1  # the untrusted call never got past the handshake


async def test_the_control_calls_over_https_with_the_configured_ca(pki: Path) -> None:
    """The calls off the request path keep their own pool: it verifies OPA with the same CA."""
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(pki / "server.pem", pki / "server-key.pem")
    s = StandIn()
    await s.start(tls=server)
    s.answer("GET", "/health", {})
    s.answer("GET", "/v1/data/x", {"result": 5})
    trusted = PdpClient(Opa(url=s.url, ca_file=pki / "ca.pem"))
    untrusted = PdpClient(Opa(url=s.url))
    try:
        assert await trusted.healthy() and await trusted.get_data("x") == 5
        assert not await untrusted.healthy()
        with pytest.raises(PepError) as exc:
            await untrusted.get_data("x")
        assert exc.value.code == "pdp.unavailable"
    finally:
        await trusted.close()
        await untrusted.close()
        await s.stop()
    assert [seen["path"] for seen in s.seen] == ["/health", "/v1/data/x"]


# -- revision, version ------------------------------------------------------------------------------

PROBE = "/v1/data/vvault_pep/revision_probe"


def modules_hash(modules: list[tuple[str, str]]) -> str:
    return "p:" + hashlib.sha256(orjson.dumps(sorted(modules))).hexdigest()[:32]


async def test_the_revision_from_bundles(stand_in: StandIn, client: PdpClient) -> None:
    stand_in.answer("POST", PROBE, {"provenance": {"bundles": {"main": {"revision": "abc"}}}})
    assert await client.revision() == 'b:{"main":"abc"}'
    [probe] = stand_in.seen
    assert (probe["method"], probe["query"], probe["body"]) == ("POST", "provenance=true", b"{}")
    assert (client.revision_checks, client.module_downloads) == (1, 0)


async def test_the_revision_from_modules(stand_in: StandIn, client: PdpClient) -> None:
    stand_in.answer("POST", PROBE, {"provenance": {"version": "1"}})
    ast = {"package": {"path": [{"type": "var", "value": "data"}]}, "rules": [{"head": {"name": "allow"}}]}
    stand_in.answer(
        "GET",
        "/v1/policies",
        {
            "result": [
                {"id": "b.rego", "raw": "package b", "ast": ast},
                {"id": "a.rego", "raw": "package a", "ast": ast},
            ]
        },
    )
    # The hash of each module's id and source, whatever else the listing carries (the AST).
    assert await client.revision() == modules_hash([("b.rego", "package b"), ("a.rego", "package a")])
    assert (client.revision_checks, client.module_downloads) == (1, 1)
    assert await client.revision(modules=False) is None
    assert (client.revision_checks, client.module_downloads) == (2, 1)


@pytest.mark.parametrize(
    "listing",
    [
        {"result": [{"id": "a.rego", "raw": "package a"}, "junk"]},
        {"result": [{"id": "a.rego", "raw": "package a"}, {"x": 1}]},
        {"result": [{"id": "a.rego", "raw": 7}]},
        {"result": {"id": "a.rego", "raw": "package a"}},
        [],
        b"<html>",
    ],
    ids=["a string", "no id", "a number for a source", "an object for the list", "a list", "not JSON"],
)
async def test_a_listing_that_is_not_modules_names_no_revision(
    stand_in: StandIn, client: PdpClient, listing: object
) -> None:
    stand_in.answer("POST", PROBE, {})
    if isinstance(listing, bytes):
        stand_in.answer("GET", "/v1/policies", raw=listing)
    else:
        stand_in.answer("GET", "/v1/policies", listing)
    with pytest.raises(PepError) as exc:
        await client.revision()
    assert exc.value.code == "pdp.error"
    assert exc.value.detail.startswith("GET /v1/policies: not a module listing (")


async def test_an_answered_error_for_the_listing_names_no_revision(stand_in: StandIn, client: PdpClient) -> None:
    stand_in.answer("POST", PROBE, {})
    stand_in.answer("GET", "/v1/policies", {"code": "internal_error", "message": "boom"}, status=500)
    with pytest.raises(PepError) as exc:
        await client.revision()
    refused(exc, "pdp.error", "GET /v1/policies answered 500")


def past(what: str, limit: int, declared: int | None) -> str:
    said = f"an answer of {declared} bytes" if declared is not None else "an answer that went on"
    return f"{what}: {said} past the limit of {limit} bytes"


BOUNDS = pytest.mark.parametrize("declared", [None, 1 << 40], ids=["a body that goes on", "a declared terabyte"])


@BOUNDS
async def test_a_listing_past_its_limit_names_no_revision(
    stand_in: StandIn, client: PdpClient, declared: int | None
) -> None:
    """Whatever answers on OPA's address (OPA, or a process that took its place) is read no
    further than the listing's limit: refused, the revision kept, memory spent bounded."""
    stand_in.answer("POST", PROBE, {})
    stand_in.endless("GET", "/v1/policies", declared)
    with pytest.raises(PepError) as exc:
        await client.revision(timeout_s=120)  # 64 MiB through one busy loop: not the point here
    refused(exc, "pdp.error", past("GET /v1/policies", LISTING_LIMIT, declared))
    assert stand_in.sent < 2 * LISTING_LIMIT  # the read stopped at the limit; past it, what sockets buffer
    with pytest.raises(PepError) as exc:
        await client.defined_paths(["vvault/authz"], timeout_s=120)
    refused(exc, "pdp.error", past("GET /v1/policies", LISTING_LIMIT, declared))


@BOUNDS
async def test_every_other_control_answer_is_bounded_by_the_decision_limit(
    stand_in: StandIn, client: PdpClient, declared: int | None
) -> None:
    stand_in.endless("POST", PROBE, declared)
    with pytest.raises(PepError) as exc:
        await client.revision(timeout_s=60)
    refused(exc, "pdp.error", past("the revision probe", ANSWER_LIMIT, declared))
    assert await client.version(timeout_s=60) is None
    stand_in.endless("GET", "/v1/data/vvault/x", declared)
    with pytest.raises(PepError) as exc:
        await client.get_data("vvault/x", timeout_s=60)
    refused(exc, "pdp.error", past("GET /v1/data/vvault/x", ANSWER_LIMIT, declared))
    stand_in.endless("GET", "/health", declared)
    assert await client.healthy(timeout_s=60) is False


async def test_a_write_answered_200_and_cut_short_is_a_write_done(stand_in: StandIn, client: PdpClient) -> None:
    async def cut(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        resp.content_length = 100
        await resp.prepare(request)
        await resp.write(b"{")
        assert request.transport is not None
        request.transport.close()  # 1 byte of the 100 announced
        return resp

    stand_in.routes[("PUT", "/v1/policies/p1")] = cut
    assert await client.put_policy("p1", b"package p1") == 200


@BOUNDS
async def test_a_write_is_judged_by_its_status_whatever_its_answer_holds(
    stand_in: StandIn, client: PdpClient, declared: int | None
) -> None:
    # OPA may have applied the write: the answer's size is no reason to report it failed.
    stand_in.endless("PUT", "/v1/policies/p1", declared)
    assert await client.put_policy("p1", b"package p1") == 200


async def test_the_module_hash_is_the_same_as_a_whole_decode_gives(real: PdpClient, real_opa: OpaProcess) -> None:
    # Replicas of two releases share Redis during a rolling upgrade: the revision each names
    # for the same modules must be the same string, or neither finds the other's entries.
    async with aiohttp.ClientSession() as http, http.get(f"{real_opa.url}/v1/policies") as resp:
        doc = await resp.json()
    assert len(doc["result"]) > 1 and all("ast" in m for m in doc["result"])
    assert await real.revision() == modules_hash([(m["id"], m["raw"]) for m in doc["result"]])


async def test_the_revision_of_no_modules(stand_in: StandIn, client: PdpClient) -> None:
    stand_in.answer("POST", PROBE, {})
    stand_in.answer("GET", "/v1/policies", {})
    assert await client.revision() == modules_hash([])


async def test_the_revision_of_the_real_opa(real: PdpClient) -> None:
    first = await real.revision()
    assert first is not None and first.startswith("p:") and len(first) == 34
    assert await real.revision() == first
    assert await real.revision(modules=False) is None


@pytest.mark.parametrize(
    ("setup", "code", "detail"),
    [
        ("hang", "pdp.timeout", "OPA did not answer in time"),
        ("garbage", "pdp.unavailable", "OPA unreachable: JSONDecodeError"),
    ],
)
async def test_the_revision_when_opa_cannot_be_asked(
    stand_in: StandIn, client: PdpClient, setup: str, code: str, detail: str
) -> None:
    if setup == "hang":
        stand_in.hang("POST", PROBE)
    else:
        stand_in.answer("POST", PROBE, raw=b"<html>")
    with pytest.raises(PepError) as exc:
        await client.revision(timeout_s=0.3)
    refused(exc, code, detail)


async def test_the_revision_deadline_defaults_to_two_seconds(stand_in: StandIn, client: PdpClient) -> None:
    stand_in.hang("POST", PROBE)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(PepError) as exc:
        await client.revision()
    assert 1.9 <= loop.time() - started < 2.9
    assert exc.value.code == "pdp.timeout"


async def test_revision_when_nothing_listens(down_port: int) -> None:
    c = PdpClient(Opa(url=f"http://127.0.0.1:{down_port}"))
    try:
        with pytest.raises(PepError) as exc:
            await c.revision()
    finally:
        await c.close()
    refused(exc, "pdp.unavailable", "OPA unreachable: ClientConnectorError")


@pytest.mark.parametrize(
    ("doc", "version"),
    [
        ({"provenance": {"version": "1.22.3"}}, "1.22.3"),
        ({"provenance": {"version": 1}}, None),
        ({"provenance": "1.22.3"}, None),
        ({}, None),
        ([], None),
    ],
)
async def test_the_version(stand_in: StandIn, client: PdpClient, doc: Any, version: str | None) -> None:
    stand_in.answer("POST", PROBE, doc)
    assert await client.version() == version
    assert stand_in.seen[0]["query"] == "provenance=true"


async def test_the_version_of_the_real_opa(real: PdpClient) -> None:
    assert await real.version() == "1.22.3"


async def test_no_version_when_opa_cannot_be_asked(stand_in: StandIn, client: PdpClient, down_port: int) -> None:
    stand_in.answer("POST", PROBE, raw=b"<html>")
    assert await client.version() is None
    stand_in.hang("POST", PROBE)
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await client.version(timeout_s=0.2) is None
    assert loop.time() - started < 0.9
    c = PdpClient(Opa(url=f"http://127.0.0.1:{down_port}"))
    try:
        assert await c.version() is None
    finally:
        await c.close()


async def test_the_version_deadline_defaults_to_one_second(stand_in: StandIn, client: PdpClient) -> None:
    stand_in.hang("POST", PROBE)
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await client.version() is None
    assert 0.95 <= loop.time() - started < 1.9


# -- writing to OPA ----------------------------------------------------------------------------------


async def test_put_and_delete_on_the_wire(stand_in: StandIn, client: PdpClient) -> None:
    stand_in.answer("PUT", "/v1/policies/p1", {}, status=200)
    stand_in.answer("PUT", "/v1/data/a/b", {}, status=204)
    stand_in.answer("DELETE", "/v1/data/a/b", {}, status=404)
    assert await client.put_policy("p1", b"package p1") == 200
    assert await client.put_data("a/b", b'{"x":1}') == 204
    assert await client.delete_data("a/b") == 404
    assert [(s["method"], s["path"], s["headers"]["content-type"], s["body"]) for s in stand_in.seen] == [
        ("PUT", "/v1/policies/p1", "text/plain", b"package p1"),
        ("PUT", "/v1/data/a/b", "application/json", b'{"x":1}'),
        ("DELETE", "/v1/data/a/b", "application/json", b""),
    ]


async def test_a_write_that_hangs_is_given_up_after_five_seconds(stand_in: StandIn, client: PdpClient) -> None:
    stand_in.hang("PUT", "/v1/data/slow")
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(PepError) as exc:
        await client.put_data("slow", b"{}")
    assert 4.9 <= loop.time() - started < 5.9
    refused(exc, "pdp.timeout", "OPA did not answer in time")


async def test_data_in_the_real_opa(real: PdpClient) -> None:
    path = f"proofs_client/d{uuid.uuid4().hex}"
    assert await real.get_data(path) is None
    assert await real.put_data(path, b'{"k":[1,2]}') == 204
    assert await real.get_data(path) == {"k": [1, 2]}
    assert await real.delete_data(path) == 204
    assert await real.get_data(path) is None
    assert await real.delete_data(path) == 404


async def test_a_policy_into_the_real_opa(real: PdpClient) -> None:
    name = f"proofs_client_{uuid.uuid4().hex}"
    assert await real.put_policy(name, f"package {name}\n\nx := 1\n".encode()) == 200
    assert await real.get_data(f"{name}/x") == 1
    assert await real.put_policy(name + "_bad", b"package broken\n\nx := \n") == 400
    assert (await real.defined_paths([f"{name}/x", f"{name}/y"])) == {f"{name}/x": True, f"{name}/y": False}


@pytest.mark.parametrize(("raw", "value"), [(b'{"result":[1]}', [1]), (b"{}", None), (b"[1]", None)])
async def test_get_data(stand_in: StandIn, client: PdpClient, raw: bytes, value: Any) -> None:
    stand_in.answer("GET", "/v1/data/a", raw=raw)
    assert await client.get_data("a") == value


async def test_get_data_failures(stand_in: StandIn, client: PdpClient) -> None:
    stand_in.answer("GET", "/v1/data/a", raw=b"<html>")
    with pytest.raises(PepError) as exc:
        await client.get_data("a")
    refused(exc, "pdp.unavailable", "OPA unreachable: JSONDecodeError")
    stand_in.hang("GET", "/v1/data/b")
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(PepError) as exc:
        await client.get_data("b")
    assert 1.9 <= loop.time() - started < 2.9  # two seconds by default
    refused(exc, "pdp.timeout", "OPA did not answer in time")


# -- the instance id --------------------------------------------------------------------------------

INSTANCE = "/v1/data/vvault_pep/instance"


async def test_the_instance_id_of_the_real_opa(real_opa: OpaProcess) -> None:
    a, b = PdpClient(Opa(url=real_opa.url)), PdpClient(Opa(url=real_opa.url))
    try:
        first = await a.instance_id()
        assert first is not None and len(first) == 32 and int(first, 16) >= 0
        assert await b.instance_id() == first  # shared by every PEP of this OPA
    finally:
        await a.close()
        await b.close()


async def test_an_instance_id_already_there(stand_in: StandIn, client: PdpClient) -> None:
    stand_in.answer("GET", INSTANCE, {"result": "given"})
    assert await client.instance_id() == "given"
    assert [s["method"] for s in stand_in.seen] == ["GET"]


async def test_an_instance_id_is_written_once_then_read(stand_in: StandIn, client: PdpClient) -> None:
    stand_in.answer("GET", INSTANCE, {})

    async def put(request: web.Request) -> web.Response:
        stand_in.answer("GET", INSTANCE, {"result": orjson.loads(await request.read())})
        return web.Response(status=204)

    stand_in.routes[("PUT", INSTANCE)] = put
    got = await client.instance_id()
    assert [s["method"] for s in stand_in.seen] == ["GET", "PUT", "GET"]
    written = orjson.loads(stand_in.seen[1]["body"])
    assert got == written and len(written) == 32
    assert stand_in.seen[1]["headers"]["content-type"] == "application/json"


@pytest.mark.parametrize("status", [200, 204])
async def test_an_instance_id_that_does_not_stick(stand_in: StandIn, client: PdpClient, status: int) -> None:
    stand_in.answer("GET", INSTANCE, {"result": 5})
    stand_in.answer("PUT", INSTANCE, {}, status=status)
    assert await client.instance_id() is None
    assert [s["method"] for s in stand_in.seen] == ["GET", "PUT", "GET"]  # two reads, one write, no more


@pytest.mark.parametrize("status", [400, 403, 500, 201])
async def test_no_instance_id_when_opa_refuses_the_write(stand_in: StandIn, client: PdpClient, status: int) -> None:
    stand_in.answer("GET", INSTANCE, {})
    stand_in.answer("PUT", INSTANCE, {}, status=status)
    assert await client.instance_id() is None
    assert [s["method"] for s in stand_in.seen] == ["GET", "PUT"]


async def test_no_instance_id_when_opa_cannot_be_asked(stand_in: StandIn, client: PdpClient) -> None:
    stand_in.answer("GET", INSTANCE, raw=b"<html>")
    assert await client.instance_id() is None
    stand_in.answer("GET", INSTANCE, {})
    stand_in.hang("PUT", INSTANCE)
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await client.instance_id() is None
    assert 1.9 <= loop.time() - started < 2.9  # two seconds for the whole exchange, not the write's five


# -- health and defined paths -----------------------------------------------------------------------


@pytest.mark.parametrize(("status", "healthy"), [(200, True), (500, False), (204, False), (404, False)])
async def test_healthy(stand_in: StandIn, client: PdpClient, status: int, healthy: bool) -> None:
    stand_in.answer("GET", "/health", {}, status=status)
    assert await client.healthy() is healthy


async def test_unhealthy_when_opa_cannot_be_asked(stand_in: StandIn, client: PdpClient, down_port: int) -> None:
    stand_in.hang("GET", "/health")
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await client.healthy() is False
    assert 0.95 <= loop.time() - started < 1.9  # one second by default
    c = PdpClient(Opa(url=f"http://127.0.0.1:{down_port}"))
    try:
        assert await c.healthy() is False
    finally:
        await c.close()


async def test_the_real_opa_is_healthy(real: PdpClient) -> None:
    assert await real.healthy() is True


async def test_defined_paths_in_the_real_opa(real: PdpClient) -> None:
    got = await real.defined_paths(
        ["vvault/authz/decision", "vvault/authz", "vvault", "vvault/nope", "faults/echo_identity"]
    )
    assert got == {
        "vvault/authz/decision": True,
        "vvault/authz": True,
        "vvault": True,
        "vvault/nope": False,
        "faults/echo_identity": True,
    }


async def test_a_path_that_is_a_data_document(stand_in: StandIn, client: PdpClient) -> None:
    stand_in.answer("GET", "/v1/policies", {"result": []})
    stand_in.answer("GET", "/v1/data/docs/a", {"result": {"x": 1}})
    stand_in.answer("GET", "/v1/data/docs/b", {})
    stand_in.answer("GET", "/v1/data/docs/c", {"result": 1}, status=500)
    stand_in.answer("GET", "/v1/data/docs/d", [1])
    got = await client.defined_paths(["docs/a", "docs/b", "docs/c", "docs/d"])
    assert got == {"docs/a": True, "docs/b": False, "docs/c": False, "docs/d": False}


async def test_defined_paths_when_the_policy_list_is_refused(stand_in: StandIn, client: PdpClient) -> None:
    stand_in.answer("GET", "/v1/policies", {"result": []}, status=401)
    with pytest.raises(PepError) as exc:
        await client.defined_paths(["a"])
    assert (exc.value.code, exc.value.detail) == ("pdp.error", "GET /v1/policies answered 401")


async def test_defined_paths_when_opa_cannot_be_asked(stand_in: StandIn, client: PdpClient) -> None:
    stand_in.answer("GET", "/v1/policies", raw=b"<html>")
    with pytest.raises(PepError) as exc:
        await client.defined_paths(["a"])
    refused(exc, "pdp.unavailable", "OPA unreachable: JSONDecodeError")
    stand_in.hang("GET", "/v1/policies")
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(PepError) as exc:
        await client.defined_paths(["a"])
    assert 1.9 <= loop.time() - started < 2.9
    refused(exc, "pdp.timeout", "OPA did not answer in time")


# -- the pure helpers --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("doc", "revisions"),
    [
        ({"provenance": {"bundles": {"b": {"revision": "r"}, "a": {"revision": 5}}}}, '{"a":"5","b":"r"}'),
        ({"provenance": {"bundles": {"a": {}, "b": "x", 1: {"revision": "r"}}}}, '{"1":"r","a":"","b":""}'),
        ({"provenance": {"bundles": []}}, "{}"),
        ({"provenance": {}}, "{}"),
        ({"provenance": "x"}, "{}"),
        ({}, "{}"),
        (None, "{}"),
    ],
)
def test_bundle_revisions(doc: Any, revisions: str) -> None:
    assert _bundle_revisions(doc) == revisions


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b'{"code":"resource_not_found"}', "resource_not_found"),
        (b'{"code":5}', "5"),
        (b"{}", "no code"),
        (b"[]", "unexpected body"),
        (b"x", "unparsable body"),
    ],
)
def test_opa_error_code(raw: bytes, code: str) -> None:
    assert _opa_error_code(raw) == code


def var(name: str) -> dict[str, str]:
    return {"type": "var", "value": name}


def string(name: str) -> dict[str, str]:
    return {"type": "string", "value": name}


def module(package: list[str], *rules: dict[str, Any]) -> dict[str, Any]:
    path = [var("data"), *[string(p) for p in package]]
    return {"ast": {"package": {"path": path}, "rules": list(rules)}}


def test_rule_paths() -> None:
    doc = {
        "result": [
            module(["a", "b"], {"head": {"ref": [var("allow")]}}, {"head": {"name": "old"}}),
            module(["c"], {"head": {"ref": [var("obj"), string("k"), string("l")]}}),
            module(["d"], {"head": {"ref": [var("set"), var("x"), string("after")]}}),
            module(["e"], {"head": {"ref": [string("notfirst")]}}),
            module(["f"], {"head": {}}),
            module(["g"], {"head": {"ref": [], "name": "fallback"}}),
        ]
    }
    assert _rule_paths(doc) == {
        ("a", "b", "allow"),
        ("a", "b", "old"),
        ("c", "obj", "k", "l"),
        ("d", "set"),
        ("e",),
        ("f",),
        ("g", "fallback"),
    }


@pytest.mark.parametrize("doc", [None, [], {}, {"result": []}])
def test_no_rule_paths(doc: Any) -> None:
    assert _rule_paths(doc) == set()


def test_rule_paths_of_a_module_without_an_ast() -> None:
    assert _rule_paths({"result": [{}, {"ast": {"package": {"path": [var("data"), string("p")]}}}]}) == set()


# -- what mutation testing found ----------------------------------------------------------------------


async def test_a_decision_over_a_kilobyte_from_the_real_opa(real: PdpClient) -> None:
    """OPA gzips a /v1/data answer over 1 KiB when asked to; the client must not ask (it reads bytes as sent)."""
    path = f"proofs_client/big{uuid.uuid4().hex}"
    big = {"reasons": ["r" * 100] * 40}
    assert await real.put_data(path, orjson.dumps(big)) == 204
    try:
        answer = await real.decide(path, {"a": 1})
        assert answer.defined and answer.result == big
        assert await real.get_data(path) == big
    finally:
        await real.delete_data(path)


async def test_no_compression_is_asked_for(stand_in: StandIn, client: PdpClient) -> None:
    stand_in.answer("POST", DECIDE, {"result": 1})
    stand_in.answer("GET", "/health", {})
    await client.decide("vvault/authz/decision", {})
    await client.healthy()
    assert all("accept-encoding" not in s["headers"] for s in stand_in.seen)


async def test_an_answer_compressed_unasked_is_garbage(stand_in: StandIn, client: PdpClient) -> None:
    import gzip

    async def gzipped(_: web.Request) -> web.Response:
        return web.Response(
            body=gzip.compress(b'{"result":true}'),
            headers={"Content-Encoding": "gzip"},
            content_type="application/json",
        )

    stand_in.routes[("POST", DECIDE)] = gzipped
    with pytest.raises(PepError) as exc:
        await client.decide("vvault/authz/decision", {})
    refused(exc, "pdp.error", "the policy decision point answered garbage")


async def test_a_control_answer_compressed_unasked_is_not_taken(stand_in: StandIn, client: PdpClient) -> None:
    """The control pool decompresses nothing either: what OPA was not asked to compress is no document."""
    import gzip

    async def gzipped(_: web.Request) -> web.Response:
        return web.Response(
            body=gzip.compress(b'{"result":5}'), headers={"Content-Encoding": "gzip"}, content_type="application/json"
        )

    stand_in.routes[("GET", "/v1/data/x")] = gzipped
    with pytest.raises(PepError) as exc:
        await client.get_data("x")
    assert exc.value.code == "pdp.unavailable"


@pytest.mark.parametrize("over", ["tcp", "unix"])
@pytest.mark.parametrize("pool", ["decisions", "control"])
async def test_a_pool_holds_max_connections(tmp_path: Path, over: str, pool: str) -> None:
    """Each pool (the decision POST's, the control calls') has at most max_connections open at once."""
    s = StandIn()
    await s.start(unix=tmp_path / "opa.sock" if over == "unix" else None)
    c = PdpClient(Opa(max_connections=2), url=s.url)
    s.hang(*(("POST", DECIDE) if pool == "decisions" else ("GET", "/health")))

    def ask() -> Awaitable[Any]:
        return c.decide("vvault/authz/decision", {}, deadline_s=30) if pool == "decisions" else c.healthy(30)

    calls = [asyncio.ensure_future(ask()) for _ in range(4)]
    try:
        async with asyncio.timeout(10):
            while len(s.seen) < 2:
                await asyncio.sleep(0.01)
        # a third connection would have been opened by the time the first two arrived
        for _ in range(20):
            await asyncio.sleep(0)
        assert len(s.seen) == 2
        s.gate.set()
        await asyncio.gather(*calls)
        assert len(s.seen) == 4
    finally:
        for call in calls:
            call.cancel()
        await c.close()
        await s.stop()


async def test_module_downloads_are_counted_one_by_one(stand_in: StandIn, client: PdpClient) -> None:
    stand_in.answer("POST", PROBE, {})
    stand_in.answer("GET", "/v1/policies", {"result": []})
    for n in (1, 2, 3):
        await client.revision()
        assert (client.revision_checks, client.module_downloads) == (n, n)


async def test_the_version_probe_is_the_revision_probe(stand_in: StandIn, client: PdpClient) -> None:
    stand_in.answer("POST", PROBE, {"provenance": {"version": "1"}})
    assert await client.version() == "1"
    [probe] = stand_in.seen
    assert (probe["method"], probe["path"], probe["query"], probe["body"]) == ("POST", PROBE, "provenance=true", b"{}")


def test_a_rule_without_a_head_names_its_package() -> None:
    assert _rule_paths({"result": [module(["p", "q"], {})]}) == {("p", "q")}
